"""The evolution loop: calibrate, then ask the strategy for children, score them, select
survivors, persisting every finished step to the run store. Two schedules (`mode:`):

- **generational** (default): a generation's children are bred at once, each fitness stage goes to
  the workers whole, and survivors are selected when the generation is scored;
- **steady-state**: as many children are in flight as there are workers; a child goes through its
  stages on its own, and as soon as it is scored it joins the population (NSGA-II survival of the
  population plus it) and the next child is bred from the population as it is then. No worker
  waits for a generation's straggler. Every `population` children scored count as a generation
  (its survivors, front and hypervolume are saved), and each batch of `population` children bred
  shares one set of items and one IRT fit, as a generation does.

The loop is deterministic given the config's seed and the order in which results reach it: every
strategy is seeded (the GA draws generation g from `random.Random(f"{seed}/gen/{g}")`, a
steady-state child k from `.../child/{k}`), and the fitness is a pure function of the answers it
has seen. The store journals every result in the order it was consumed; resuming replays the loop
from the start with those results served again in that order (`fitness.journal`): finished
evaluations are not recomputed, unfinished ones are, and the run retraces its own decisions, in
either mode, before it goes on.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from evolve.breeder import Breeder
from evolve.config import RunConfig
from evolve.selection import hypervolume, minimization_matrix, rank_and_crowding, survivors
from evolve.store import RunStore
from evolve.strategies import Proposal, recipe_strategy
from fitness.code_worker import CodeWorker
from fitness.estimators import Conventions
from fitness.items import item_pool
from fitness.journal import JournalPool
from fitness.pool import Job, LocalPool, Pool, PoolWrapper
from fitness.reduced_fitness import (
    Budget,
    Candidate,
    FitnessResult,
    ReducedFitness,
    Stages,
    failed_result,
    finalist,
    promotable,
)
from fitness.reduced_sets import item_bank
from operators.llm_proposer import Scored
from operators.prune import prunable_units
from operators.recipes import Recipe
from search_spaces.merge_space import MergeSpace
from search_spaces.mnist1d_code import CodeSpace

Progress = Callable[[str, int, int], None]
Activity = Callable[[list[str | None]], None]  # per worker: the candidate it runs, or None
SIZE_OBJECTIVES = ("params", "bytes", "nonzero")


class TimedPool(PoolWrapper):
    """The worker pool, with the driver's time spent waiting for it counted."""

    def __init__(self, pool: Pool):
        super().__init__(pool)
        self.seconds = 0.0  # waiting for the workers

    def completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        results = self.pool.completed(futures)
        while True:
            started = time.perf_counter()
            try:
                future = next(results)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - started
            yield future


@dataclass
class Timings:
    wall: float = 0.0
    fitness: float = 0.0  # inside the fitness calls (merging + evaluating + IRT statistics)
    worker: float = 0.0  # waiting for the workers (merging + evaluating)
    busy: list[float] = field(default_factory=list)  # per worker: seconds spent on jobs

    @property
    def engine(self) -> float:
        return max(self.wall - self.fitness, 0.0)


@dataclass
class Setup:
    """Everything a run needs besides its config: the search space, the sources (a merge run's,
    mapped by the driver for checks, metadata and export: it scores nothing; None in a code
    search), the worker pool that evaluates (in this process or on Ray actors) and the item
    pool's task of each item."""

    space: MergeSpace | CodeSpace
    sources: object
    pool: Pool
    task_of: torch.Tensor
    task_names: tuple[str, ...]
    base_size: dict[str, float] = field(default_factory=dict)


@dataclass
class _Child:
    """A steady-state child on its way through the fitness stages."""

    candidate: Candidate
    proposal: Proposal
    generation: int  # the batch of `population` children it was bred in
    stages: Stages | None  # that batch's items and estimators (None: full evaluation)
    stage: str = "reduced"  # the stage whose items it is answering
    job: Job | None = None


def short(name: str) -> str:
    return name.rstrip("/").split("/")[-1]


class Evolution:
    def __init__(self, config: RunConfig, setup: Setup, store: RunStore,
                 progress: Progress | None = None, activity: Activity | None = None):
        self.config, self.setup, self.store = config, setup, store
        self.progress = progress or (lambda stage, done, total: None)
        self.activity = activity
        journal = JournalPool(setup.pool, store.results(), store.add_result)
        self.pool = TimedPool(journal)
        per_task = config.fitness.bank_items_per_task
        bank = None if config.fitness.full_evaluation or per_task is None else item_bank(
            setup.task_of, per_task, config.seed)
        self.fitness = ReducedFitness(self.pool, setup.task_of, setup.task_names,
                                      config.fitness.dims, config.seed, bank=bank,
                                      journal=journal.journal,
                                      conventions=Conventions(
                                          **config.fitness.conventions.model_dump()))
        self.budget = Budget(config.fitness.items_per_task, config.fitness.promote_items_per_task,
                             config.fitness.max_full_per_generation, config.fitness.selection,
                             config.fitness.estimator, config.fitness.promote_z,
                             config.fitness.full_evaluation)
        self.sizes = config.generation_sizes()
        self.results: dict[str, FitnessResult] = {}
        self.recipes: dict[str, Recipe] = {}
        space = setup.space
        # a source model enters the run as its seed candidate: lineage names that id
        self.seed_of = {name: f"seed-{short(name)}" for name in space.sources}
        self.strategy = recipe_strategy(config, setup.space, self.recipes)
        self.breeder = Breeder(self.strategy, space.key,
                               lambda child, reason: store.event("redrawn", f"{child}: {reason}"),
                               space.lineage_check(self.recipes))
        self.timings = Timings()
        self.front_now: list[str] = []  # the last saved generation's front
        space.observe(_RunView(self), store, store.event)

    # -- helpers ----------------------------------------------------------------------------

    def _record(self, candidate: Candidate, generation: int, operator: str,
                result: FitnessResult) -> None:
        self.recipes[candidate.id] = candidate.recipe
        self.breeder.known(candidate.id, candidate.recipe)
        self.results[candidate.id] = result
        self.store.add_individual(candidate.id, generation, candidate.recipe,
                                  list(candidate.parents), operator)
        self.store.add_evaluation(candidate.id, generation, result.stage, result.objectives,
                                  len(result.asked), result.error)

    def _lineage(self, parents) -> tuple[str, ...]:
        """A proposal's parents as candidate ids: a source model's name becomes its seed's id
        (gene strategies breed from the experts themselves)."""
        return tuple(self.seed_of.get(p, p) for p in parents)

    def _matrix(self, ids: list[str], caution: float = 1.0) -> np.ndarray:
        objectives = []
        for identifier in ids:
            values = dict(self.results[identifier].objectives)
            for name in SIZE_OBJECTIVES:
                if name in values:
                    values[name] = (values[name][0] / self.setup.base_size[name], 0.0)
            objectives.append(values)
        return minimization_matrix(objectives, self.config.objectives, caution)

    def _row(self, result: FitnessResult) -> np.ndarray | None:
        """A scored candidate's objective row for its strategy (None: it failed)."""
        return self._matrix([result.candidate_id])[0] if result.ok else None

    def _known_row(self, identifier: str) -> np.ndarray | None:
        """The objective row of a candidate scored already (None: failed or not yet scored)."""
        result = self.results.get(identifier)
        return None if result is None else self._row(result)

    def _report(self, stage: str, done: int, total: int) -> None:
        """A stage's progress and, with several workers, what each is busy with."""
        self.progress(stage, done, total)
        if self.activity is not None and self.pool.workers > 1:
            self.activity(self.pool.activity())

    def _timed_fitness(self, work):
        started = time.perf_counter()
        try:
            return work()
        finally:
            self.timings.fitness += time.perf_counter() - started

    def _survive(self, population: list[str], newcomers: list[str]) -> list[str]:
        """NSGA-II survival of the population and its scored newcomers; exact results found
        since replace the members' estimates first."""
        for identifier in population:
            if identifier in self.fitness.exact:
                self.results[identifier] = self.fitness.exact[identifier]
        pool = self._distinct(population + newcomers)
        return [pool[i] for i in survivors(self._matrix(pool), self.config.population)]

    # -- the loop ---------------------------------------------------------------------------

    def calibrate(self) -> list[str]:
        space, rng = self.setup.space, random.Random(f"{self.config.seed}/calibration")
        candidates = [Candidate(self.seed_of[m], space.seed_recipe(m)) for m in space.sources]
        candidates += [Candidate(identifier, recipe, self._lineage(parents))
                       for identifier, recipe, parents in space.calibration(
                           rng, self.config.fitness.calibration)]
        self.progress("calibration (full evaluations)", 0, len(candidates))
        self._timed_fitness(lambda: self.fitness.add_full(candidates, "calibration", lambda
                                                          done, total: (
            self._report("calibration (full evaluations)", done, total))))
        self.progress("calibration (full evaluations)", len(candidates), len(candidates))
        if not self.budget.full:
            self._timed_fitness(self.fitness.refit)
        self.setup.base_size = {name: self.fitness.exact[candidates[0].id].objectives[name][0]
                                for name in SIZE_OBJECTIVES}
        for candidate in candidates:
            self._record(candidate, 0, "seed" if candidate.id.startswith("seed") else
                         "calibration", self.fitness.exact[candidate.id])
        ids = [c.id for c in candidates]
        return [ids[i] for i in survivors(self._matrix(ids), self.config.population)]

    def run(self) -> list[str]:
        started = time.perf_counter()
        self.store.set_meta("status", "running")
        self.store.set_meta("search_items", len(self.setup.task_of))  # a full evaluation's cost
        self.store.event("start")
        population = self.calibrate()
        self.pool.retain([self.recipes[p] for p in population])
        if self.config.mode == "steady-state":
            population = self._steady(population)
        else:
            population = self._generational(population)
        front = self.finish(population)
        self.timings.wall = time.perf_counter() - started
        self.timings.worker = self.pool.seconds
        self.timings.busy = self.pool.busy_seconds()
        self.store.set_meta("timings", self.timings.__dict__ | {"engine": self.timings.engine})
        self.store.set_meta("status", "done")
        self.store.event("done")
        return front

    def _generational(self, population: list[str]) -> list[str]:
        for generation, size in enumerate(self.sizes, start=1):
            self.progress("generations", generation - 1, len(self.sizes))
            ids = [f"g{generation}-{k}" for k in range(size)]
            proposals = self.breeder.propose(f"gen/{generation}", ids, population,
                                             self._matrix(population), self._known_row)
            children = [Candidate(i, p.genome, self._lineage(p.parents))
                        for i, p in zip(ids, proposals, strict=True)]
            results = self._timed_fitness(partial(
                self.fitness.evaluate, children, self.budget, self._rivals(population),
                on_candidate=lambda done, total: self._report("candidates this generation", done,
                                                              total)))
            for child, proposal, result in zip(children, proposals, results, strict=True):
                self._record(child, generation, proposal.operator, result)
            self.strategy.tell(proposals, [self._row(r) for r in results])
            population = self._survive(population, [r.candidate_id for r in results if r.ok])
            self.pool.retain([self.recipes[p] for p in population])
            self._save_generation(generation, population)
        self.progress("generations", len(self.sizes), len(self.sizes))
        return population

    def _steady(self, population: list[str]) -> list[str]:
        """As many children in flight as workers; each scored child joins the population at once
        and frees its worker for the next one (see the module docstring)."""
        size, total = self.config.population, sum(self.sizes)
        running: dict[Future, _Child] = {}
        stages: dict[int, Stages] = {}
        fulls: Counter[int] = Counter()  # full evaluations granted per batch
        bred = scored = 0
        self.progress("candidates", 0, total)
        while scored < total:
            while len(running) < self.pool.workers and bred < total:
                generation, index = bred // size + 1, bred % size
                if generation not in stages:
                    stages[generation] = None if self.budget.full else self._timed_fitness(
                        lambda: self.fitness.stages(self.budget))
                identifier = f"g{generation}-{index}"
                proposal = self.breeder.propose(f"child/{bred}", [identifier], population,
                                                self._matrix(population), self._known_row)[0]
                child = _Child(Candidate(identifier, proposal.genome,
                                         self._lineage(proposal.parents)),
                               proposal, generation, stages[generation])
                if self.budget.full:
                    child.stage, items = "full", self.fitness.whole_bank
                else:
                    items = stages[generation].reduced.reduced.indices
                child.job = self.fitness.job(child.candidate, items, child.stage)
                running[self.pool.submit(child.job)] = child
                bred += 1
                self._report("candidates", scored, total)
            future = next(self.pool.completed(list(running)))
            child = running.pop(future)
            result = self._timed_fitness(lambda c=child, f=future, p=population:
                                         self._step(c, f, fulls, p))
            if result is None:  # on to its next stage
                running[self.pool.submit(child.job)] = child
                continue
            self._record(child.candidate, child.generation, child.proposal.operator, result)
            self.strategy.tell([child.proposal], [self._row(result)])
            if result.ok:
                population = self._survive(population, [child.candidate.id])
                self.pool.retain([self.recipes[p] for p in population])
            scored += 1
            self._report("candidates", scored, total)
            if scored % size == 0 or scored == total:
                self._save_generation(-(-scored // size), population)
        return population

    def _step(self, child: _Child, future: Future, fulls: Counter[int], population: list[str]
              ) -> FitnessResult | None:
        """Consume the child's finished job and take it as far as its answers allow: its result,
        or None with `child.job` set to its next stage's job."""
        fitness, candidate = self.fitness, child.candidate
        reason = fitness.receive(child.job, future, guard=True)
        if reason is not None:
            return failed_result(candidate, reason)
        while True:
            if child.stage == "full":
                return fitness.full(candidate)
            estimators = child.stages.reduced if child.stage == "reduced" else \
                child.stages.promoted
            result = fitness.estimate(candidate, estimators, self.budget, child.stage)
            front = self._rivals(population)
            if child.stage == "reduced":
                if not promotable(result, front, self.budget.promote_z):
                    return result
                child.stage, items = "promoted", child.stages.promoted.reduced.indices
            else:
                if not finalist(result, front) or \
                        fulls[child.generation] >= self.budget.max_full_per_call:
                    return result
                fulls[child.generation] += 1
                child.stage, items = "full", self.fitness.whole_bank
            child.job = fitness.job(candidate, items, child.stage)
            if child.job is not None:
                return None

    def _rivals(self, population: list[str]) -> list[FitnessResult]:
        """What a child must not be dominated by to earn more items (promotion, then a full
        evaluation): everything evaluated exactly, and the population's members as estimated. A
        child that one of them dominates cannot join the front it would change, so more items
        spent on it buy nothing the search uses; it keeps its reduced estimate."""
        members = [self.results[p] for p in population if self.results[p].ok]
        return self.fitness.exact_front() + members

    def _distinct(self, pool: list[str]) -> list[str]:
        """Pool members with distinct values of the selection objectives (NSGA-II's duplicate
        elimination): copies of one model would otherwise all sit on the front and stall
        selection; the first one found stays."""
        seen, kept = set(), []
        for identifier in pool:
            values = self.results[identifier].objectives
            key = tuple(round(values[name][0], 9) for name in self.config.objectives)
            if key not in seen:
                seen.add(key)
                kept.append(identifier)
        return kept

    def _front(self, population: list[str]) -> list[str]:
        rank, _ = rank_and_crowding(self._matrix(population, caution=0.0))
        return [p for p, r in zip(population, rank, strict=True) if r == 0]

    def _save_generation(self, generation: int, population: list[str]) -> None:
        front = self._front(population)
        self.front_now = front
        matrix = self._matrix(front, caution=0.0)
        reference = np.array([0.0 if s == "max" else 1.05 for s in self.config.objectives.values()])
        self.store.add_generation(generation, population, front, hypervolume(matrix, reference))

    def finish(self, population: list[str]) -> list[str]:
        """Evaluate the final front fully (the whole item bank), then report it on the test split.

        Where every candidate was scored exactly (`fitness.full_evaluation`, every code
        search), the final front is the run's archive: every scored candidate that none
        dominates, as optuna's `best_trials` is. A population of a few members drops
        non-dominated candidates by crowding, and an exact score gives no reason to lose one.
        With estimates, it is the final population's front, whose members are then evaluated
        fully."""
        archive = [i for i, result in self.results.items() if result.ok]
        front = self._front(self._distinct(archive) if self.budget.full else population)
        self.progress("final front (full + test)", 0, len(front))
        partial = [Candidate(i, self.recipes[i]) for i in front if self.results[i].stage != "full"]
        for result in self._timed_fitness(lambda: self.fitness.add_full(partial, "final")):
            self.results[result.candidate_id] = result
            self.store.add_evaluation(result.candidate_id, -1, "full", result.objectives,
                                      len(self.fitness.task_of), None)
        jobs = {self.pool.submit(Job(i, self.recipes[i], test=True)): i for i in front}
        for done, future in enumerate(self._timed_fitness(
                lambda: list(self.pool.completed(list(jobs)))), start=1):
            self.store.add_report(jobs[future], "test", _test_report(future.result()),
                                  sum(len(r) for r in future.result()))
            self.progress("final front (full + test)", done, len(front))
        front = self._front(self._distinct(front))  # full results may now coincide
        self._save_generation(len(self.sizes) + 1, front)
        return front


class _RunView:
    """What a proposer that reads scores (the LLM) is shown of the run: a parent's scores, the
    front as last saved, and the latest failed children with their reasons."""

    FAILURES = 5

    def __init__(self, evolution: Evolution):
        self.evolution = evolution

    def _scored(self, identifier: str) -> Scored:
        result = self.evolution.results.get(identifier)
        recipe = self.evolution.recipes[identifier]
        return Scored(identifier, self.evolution.setup.space.describe(recipe),
                      dict(result.objectives) if result is not None and result.ok else {})

    def scored(self, recipe: dict) -> Scored:
        """A parent (a member of the run, found by its program) with its scores."""
        return self._scored(self.evolution.breeder.keys[self.evolution.setup.space.key(recipe)])

    def front(self) -> list[Scored]:
        return [self._scored(i) for i in self.evolution.front_now]

    def failures(self) -> list[str]:
        failed = [(i, r.error) for i, r in self.evolution.results.items() if not r.ok]
        return [f"{i}: {error}" for i, error in failed[-self.FAILURES:]]


def _test_report(results) -> dict:
    """Accuracy ± binomial stderr per task on the test split, and their mean."""
    report = {}
    for result in results:
        p, n = result.accuracy, len(result)
        report[f"accuracy/{result.task}"] = (p, (p * (1 - p) / max(n, 1)) ** 0.5)
    accuracies = [report[f"accuracy/{r.task}"][0] for r in results]
    stderr = (sum(report[f"accuracy/{r.task}"][1] ** 2 for r in results) ** 0.5
              / len(results))
    report["accuracy"] = (sum(accuracies) / len(accuracies), stderr)
    return report


def worker_spec(config: RunConfig, base_dir: Path | None = None):
    """What every process that maps the run's sources builds from: checkpoint folders, tasks,
    device, dtype, memory budget."""
    from fitness.worker_spec import WorkerSpec
    from search_spaces.builtin_tasks import BUILTIN_TASKS
    from search_spaces.models import resolve_model

    names = (config.sources.base, *config.sources.experts)
    return WorkerSpec(tuple((name, str(resolve_model(name, base_dir))) for name in names),
                      config.sources.base, tuple(config.tasks),
                      str(base_dir) if base_dir else None, tuple(config.lm_eval.include_path),
                      config.lm_eval.metric, config.device, config.dtype, config.memory_budget,
                      BUILTIN_TASKS)


def prepare(config: RunConfig, base_dir: Path | None = None,
            on_event: Callable[[str, str], None] | None = None) -> Setup:
    """Resolve sources and tasks, check they fit together, and build the workers: the local one,
    or (`backend: ray`) the Ray actors, each of which builds its own. Every check happens here,
    before any candidate is merged or scored."""
    if config.search_space == "mnist1d-code":
        return _prepare_code(config)
    spec = worker_spec(config, base_dir)
    tasks = spec.load_tasks()
    if config.uses_ray:
        from fitness.ray_pool import RayPool

        # the driver maps the sources for checks and metadata only: it scores nothing, so it
        # holds no resident model and no memory budget of the workers' applies to it
        sources = spec.sources("cpu")
        pool: Pool = RayPool(spec, config.workers, gpus_per_worker=config.ray.gpus_per_worker
                             if config.device.startswith("cuda") else 0,
                             cpus_per_worker=config.ray.cpus_per_worker,
                             address=config.ray.address, timeout=config.candidate_timeout,
                             retries=config.worker_retries, on_event=on_event)
    else:
        worker = spec.build(tasks=tasks)
        sources, pool = worker.sources, LocalPool(worker)
    heads = sources.heads
    widths = prunable_units(sources.reference.names(), sources.reference.shape, heads,
                            sources.config)
    edit = config.operators.edit
    space = MergeSpace(config.sources.base, tuple(config.sources.experts),
                       sources.architecture.num_layers, tuple(config.operators.methods),
                       config.operators.crossover.compose, mlp_width=widths.get("mlp"),
                       kv_heads=widths.get("kv_heads"), prune=edit.prune,
                       group=heads.group if heads else 1,
                       endpoint=edit.llm.endpoint() if edit.llm else None)
    task_of = torch.tensor([t for t, _ in item_pool(tasks)])
    return Setup(space, sources, pool, task_of, tuple(t.name for t in tasks))


def _prepare_code(config: RunConfig) -> Setup:
    """A code search: its space, and a worker that trains each candidate in the sandbox."""
    space = CodeSpace(config.code.llm.endpoint() if config.code.llm else None)
    harness, arguments, files = space.harness(config.code.steps, config.seed)
    worker = CodeWorker(space.task, harness, arguments, files, config.code.sandbox.limits())
    task_of = torch.zeros(len(space.task.search), dtype=torch.long)
    return Setup(space, None, LocalPool(worker), task_of, (space.task.name,))
