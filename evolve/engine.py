"""The evolution loop: calibrate, then ask the strategy for children, score them, select
survivors, generation by generation, persisting every finished step to the run store.

The loop is deterministic given the config's seed: every strategy is seeded (the GA draws
generation g from `random.Random(f"{seed}/gen/{g}")`), and the fitness is a pure function of the
answers it has seen.
Resuming therefore replays the loop from the start with the stored answers pre-loaded: finished
evaluations are not recomputed, unfinished ones are, and the final front is the one an
uninterrupted run gives.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from evolve.config import RunConfig
from evolve.selection import hypervolume, minimization_matrix, rank_and_crowding, survivors
from evolve.store import RunStore
from evolve.strategies import recipe_strategy
from fitness.pool import Answers, Job, LocalPool, Pool
from fitness.reduced_fitness import Budget, Candidate, FitnessResult, ReducedFitness
from operators.recipes import Recipe
from search_spaces.merge_space import MergeSpace
from search_spaces.zoo_landscape import default_merge_recipes

Progress = Callable[[str, int, int], None]
SIZE_OBJECTIVES = ("params", "bytes", "nonzero")


class RecordingPool:
    """The worker pool, with every batch of answers committed to the run store as it is
    consumed (in the driver's thread: the driver is the store's only writer)."""

    def __init__(self, pool: Pool, store: RunStore):
        self.pool, self.store = pool, store
        self.workers = pool.workers
        self.seconds = 0.0  # waiting for the workers

    def submit(self, job: Job) -> Future:
        return self.pool.submit(job)

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
            answers = future.result() if future.exception() is None else None
            if isinstance(answers, Answers) and answers.items:
                self.store.add_answers(answers.candidate_id, list(answers.items),
                                       list(answers.values))
            yield future

    def retain(self, recipes: list[dict]) -> None:
        """Tell the workers which recipes the population holds (their sub-recipe caches keep
        only those)."""
        self.pool.retain(recipes)

    def activity(self) -> list[str | None]:
        return self.pool.activity()

    def busy_seconds(self) -> list[float]:
        return self.pool.busy_seconds()

    def close(self) -> None:
        self.pool.close()


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
    """Everything a run needs besides its config: sources, tasks, the workers. `worker` is the
    driver's own (it maps the sources but materializes nothing during a run: export uses it);
    `pool` evaluates, in this process or on Ray actors."""

    space: MergeSpace
    worker: object
    pool: Pool
    task_of: torch.Tensor
    task_names: tuple[str, ...]
    base_size: dict[str, float] = field(default_factory=dict)


def short(name: str) -> str:
    return name.rstrip("/").split("/")[-1]


class Evolution:
    def __init__(self, config: RunConfig, setup: Setup, store: RunStore,
                 progress: Progress | None = None):
        self.config, self.setup, self.store = config, setup, store
        self.progress = progress or (lambda stage, done, total: None)
        self.recorder = RecordingPool(setup.pool, store)
        self.fitness = ReducedFitness(self.recorder, setup.task_of, setup.task_names,
                                      config.fitness.dims, config.seed)
        self.fitness.preload(store.answers())  # resume: finished answers are not redone
        self.budget = Budget(config.fitness.items_per_task, config.fitness.promote_items_per_task,
                             config.fitness.max_full_per_generation, config.fitness.selection,
                             config.fitness.estimator)
        self.sizes = config.generation_sizes()
        self.results: dict[str, FitnessResult] = {}
        self.recipes: dict[str, Recipe] = {}
        self.strategy = recipe_strategy(config, setup.space, self.recipes)
        self.timings = Timings()

    # -- helpers ----------------------------------------------------------------------------

    def _record(self, candidate: Candidate, generation: int, operator: str,
                result: FitnessResult) -> None:
        self.recipes[candidate.id] = candidate.recipe
        self.results[candidate.id] = result
        self.store.add_individual(candidate.id, generation, candidate.recipe,
                                  list(candidate.parents), operator)
        self.store.add_evaluation(candidate.id, generation, result.stage, result.objectives,
                                  len(result.asked), result.error)

    def _matrix(self, ids: list[str], caution: float = 1.0) -> np.ndarray:
        objectives = []
        for identifier in ids:
            values = dict(self.results[identifier].objectives)
            for name in SIZE_OBJECTIVES:
                if name in values:
                    values[name] = (values[name][0] / self.setup.base_size[name], 0.0)
            objectives.append(values)
        return minimization_matrix(objectives, self.config.objectives, caution)

    def _report(self, stage: str, done: int, total: int) -> None:
        """A stage's progress and, with several workers, how many are busy right now."""
        self.progress(stage, done, total)
        if self.recorder.workers > 1:
            activity = self.recorder.activity()
            self.progress("workers busy", sum(a is not None for a in activity), len(activity))

    def _timed_fitness(self, work):
        started = time.perf_counter()
        try:
            return work()
        finally:
            self.timings.fitness += time.perf_counter() - started

    # -- the loop ---------------------------------------------------------------------------

    def calibrate(self) -> list[str]:
        space, rng = self.setup.space, random.Random(f"{self.config.seed}/calibration")
        candidates = [Candidate(f"seed-{short(m)}", {"model": m}) for m in (space.base,
                                                                            *space.experts)]
        candidates += [Candidate(f"default-{r['method']}", r, space.experts)
                       for r in default_merge_recipes(space.base, space.experts)]
        candidates += [Candidate(f"cal-{k}", recipe, tuple(space.experts))
                       for k, recipe in enumerate(space.random(rng) for _ in range(
                           self.config.fitness.calibration))]
        self.progress("calibration (full evaluations)", 0, len(candidates))
        self._timed_fitness(lambda: self.fitness.add_full(candidates, lambda done, total: (
            self._report("calibration (full evaluations)", done, total))))
        self.progress("calibration (full evaluations)", len(candidates), len(candidates))
        self._timed_fitness(self.fitness.refit)
        self.setup.base_size = {name: self.fitness.exact[candidates[0].id].objectives[name][0]
                                for name in SIZE_OBJECTIVES}
        for candidate in candidates:
            self._record(candidate, 0, "seed" if candidate.id.startswith("seed") else
                         "calibration", self.fitness.exact[candidate.id])
        ids = [c.id for c in candidates]
        return [ids[i] for i in survivors(self._matrix(ids), self.config.population)]

    def breed(self, generation: int, population: list[str],
              size: int) -> list[tuple[Candidate, str]]:
        proposals = self.strategy.ask(generation, size, population, self._matrix(population))
        return [(Candidate(f"g{generation}-{k}", p.recipe, p.parents), p.operator)
                for k, p in enumerate(proposals)]

    def run(self) -> list[str]:
        started = time.perf_counter()
        self.store.set_meta("status", "running")
        self.store.event("start")
        population = self.calibrate()
        self.recorder.retain([self.recipes[p] for p in population])
        for generation, size in enumerate(self.sizes, start=1):
            self.progress("generations", generation - 1, len(self.sizes))
            children = self.breed(generation, population, size)
            results = self._timed_fitness(lambda c=children: self.fitness.evaluate(
                [child for child, _ in c], self.budget, on_candidate=lambda done, total:
                self._report("candidates this generation", done, total)))
            for (child, operator), result in zip(children, results, strict=True):
                self._record(child, generation, operator, result)
            self.strategy.tell([self._matrix([c.id])[0] if r.ok else None
                                for (c, _), r in zip(children, results, strict=True)])
            for identifier in population:  # exact results found since replace estimates
                if identifier in self.fitness.exact:
                    self.results[identifier] = self.fitness.exact[identifier]
            pool = self._distinct(population + [c.id for (c, _), r in
                                                zip(children, results, strict=True) if r.ok])
            matrix = self._matrix(pool)
            population = [pool[i] for i in survivors(matrix, self.config.population)]
            self.recorder.retain([self.recipes[p] for p in population])
            self._save_generation(generation, population)
        self.progress("generations", len(self.sizes), len(self.sizes))
        front = self.finish(population)
        self.timings.wall = time.perf_counter() - started
        self.timings.worker = self.recorder.seconds
        self.timings.busy = self.recorder.busy_seconds()
        self.store.set_meta("timings", self.timings.__dict__ | {"engine": self.timings.engine})
        self.store.set_meta("status", "done")
        self.store.event("done")
        return front

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
        matrix = self._matrix(front, caution=0.0)
        reference = np.array([0.0 if s == "max" else 1.05 for s in self.config.objectives.values()])
        self.store.add_generation(generation, population, front, hypervolume(matrix, reference))

    def finish(self, population: list[str]) -> list[str]:
        """Evaluate the final front fully (search split), then report it on the test split."""
        front = self._front(population)
        self.progress("final front (full + test)", 0, len(front))
        partial = [Candidate(i, self.recipes[i]) for i in front if self.results[i].stage != "full"]
        for result in self._timed_fitness(lambda: self.fitness.add_full(partial)):
            self.results[result.candidate_id] = result
            self.store.add_evaluation(result.candidate_id, -1, "full", result.objectives,
                                      len(self.setup.task_of), None)
        jobs = {self.recorder.submit(Job(i, self.recipes[i], test=True)): i for i in front}
        for done, future in enumerate(self._timed_fitness(
                lambda: list(self.recorder.completed(list(jobs)))), start=1):
            self.store.add_report(jobs[future], "test", _test_report(future.result()))
            self.progress("final front (full + test)", done, len(front))
        front = self._front(self._distinct(front))  # full results may now coincide
        self._save_generation(len(self.sizes) + 1, front)
        return front


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


def prepare(config: RunConfig, base_dir: Path | None = None, local: bool = False,
            on_event: Callable[[str, str], None] | None = None) -> Setup:
    """Resolve sources and tasks, check they fit together, and build the workers: the local one,
    and (`backend: ray`, unless `local`) the Ray actors. Every check happens here, before any
    candidate is merged or scored."""
    from fitness.worker_spec import WorkerSpec
    from search_spaces.models import resolve_model

    names = (config.sources.base, *config.sources.experts)
    spec = WorkerSpec(tuple((name, str(resolve_model(name, base_dir))) for name in names),
                      config.sources.base, tuple(config.tasks),
                      str(base_dir) if base_dir else None, tuple(config.lm_eval.include_path),
                      config.lm_eval.metric, config.device, config.dtype, config.memory_budget)
    tasks = spec.load_tasks()
    ray = config.uses_ray and not local
    # under Ray the driver's worker only maps the sources (checks, metadata, export): on the CPU
    worker = spec.build("cpu" if ray else None, tasks)
    if ray:
        from fitness.ray_pool import RayPool

        pool: Pool = RayPool(spec, config.workers, gpus_per_worker=config.ray.gpus_per_worker
                             if config.device.startswith("cuda") else 0,
                             cpus_per_worker=config.ray.cpus_per_worker,
                             address=config.ray.address, timeout=config.candidate_timeout,
                             retries=config.worker_retries, on_event=on_event)
    else:
        pool = LocalPool(worker)
    space = MergeSpace(config.sources.base, tuple(config.sources.experts),
                       worker.architecture.num_layers, tuple(config.operators.methods),
                       config.operators.crossover.compose)
    return Setup(space, worker, pool, worker.task_of, tuple(t.name for t in tasks))
