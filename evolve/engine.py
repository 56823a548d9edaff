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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from evolve.config import RunConfig
from evolve.selection import hypervolume, minimization_matrix, rank_and_crowding, survivors
from evolve.store import RunStore
from evolve.strategies import recipe_strategy
from fitness.reduced_fitness import Budget, Candidate, FitnessResult, ReducedFitness
from operators.recipes import Recipe
from search_spaces.merge_space import MergeSpace
from search_spaces.zoo_landscape import default_merge_recipes

Progress = Callable[[str, int, int], None]
SIZE_OBJECTIVES = ("params", "bytes", "nonzero")


class RecordingScorer:
    """The worker, with every batch of answers committed to the run store as it arrives."""

    def __init__(self, scorer, store: RunStore):
        self.scorer, self.store = scorer, store
        self.seconds = 0.0

    def answers(self, candidate_id: str, recipe: dict, items: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        values = self.scorer.answers(candidate_id, recipe, items)
        self.seconds += time.perf_counter() - started
        self.store.add_answers(candidate_id, items.tolist(), values.tolist())
        return values

    def retain(self, recipes: list[dict]) -> None:
        """Tell the worker which recipes the population holds (its sub-recipe cache keeps
        only those)."""
        self.scorer.retain(recipes)

    def size(self, candidate_id: str, recipe: dict):
        started = time.perf_counter()
        try:
            return self.scorer.size(candidate_id, recipe)
        finally:
            self.seconds += time.perf_counter() - started


@dataclass
class Timings:
    wall: float = 0.0
    fitness: float = 0.0  # inside the fitness calls (merging + evaluating + IRT statistics)
    worker: float = 0.0  # inside the worker (merging + evaluating)

    @property
    def engine(self) -> float:
        return max(self.wall - self.fitness, 0.0)


@dataclass
class Setup:
    """Everything a run needs besides its config: sources, tasks, the worker."""

    space: MergeSpace
    scorer: object
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
        self.recorder = RecordingScorer(setup.scorer, store)
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
        for done, candidate in enumerate(candidates):
            self.progress("calibration (full evaluations)", done, len(candidates))
            self._timed_fitness(lambda c=candidate: self.fitness.add_full(c))
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
                self.progress("candidates this generation", done, total)))
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
        for done, identifier in enumerate(front):
            self.progress("final front (full + test)", done, len(front))
            candidate = Candidate(identifier, self.recipes[identifier])
            if self.results[identifier].stage != "full":
                self.results[identifier] = self._timed_fitness(
                    lambda c=candidate: self.fitness.add_full(c))
                self.store.add_evaluation(identifier, -1, "full",
                                          self.results[identifier].objectives,
                                          len(self.setup.task_of), None)
            self.store.add_report(identifier, "test", self._test_report(candidate))
        front = self._front(self._distinct(front))  # full results may now coincide
        self._save_generation(len(self.sizes) + 1, front)
        return front

    def _test_report(self, candidate: Candidate) -> dict:
        results = self._timed_fitness(lambda: self.setup.scorer.test_results(candidate.id,
                                                                             candidate.recipe))
        report = {}
        for result in results:
            p, n = result.accuracy, len(result)
            report[f"accuracy/{result.task}"] = (p, (p * (1 - p) / max(n, 1)) ** 0.5)
        accuracies = [report[f"accuracy/{r.task}"][0] for r in results]
        stderr = (sum(report[f"accuracy/{r.task}"][1] ** 2 for r in results) ** 0.5
                  / len(results))
        report["accuracy"] = (sum(accuracies) / len(accuracies), stderr)
        return report


def prepare(config: RunConfig, base_dir: Path | None = None) -> Setup:
    """Resolve sources and tasks, check they fit together, and build the local worker. Every
    check happens here, before any candidate is merged or scored."""
    from transformers import AutoConfig, AutoTokenizer

    from fitness.tasks import load_task
    from fitness.worker import LocalWorker
    from search_spaces.models import resolve_model

    names = (config.sources.base, *config.sources.experts)
    folders = {name: resolve_model(name, base_dir) for name in names}
    model_config = AutoConfig.from_pretrained(folders[config.sources.base], local_files_only=True)
    tasks = [load_task(t, base_dir, config.lm_eval.include_path, config.lm_eval.metric)
             for t in config.tasks]
    tokenizer = AutoTokenizer.from_pretrained(folders[config.sources.base], local_files_only=True)
    worker = LocalWorker(tasks, folders, config.sources.base, model_config, tokenizer,
                         device=config.device, memory_budget=config.memory_budget,
                         dtype=getattr(torch, config.dtype) if config.dtype else None)
    space = MergeSpace(config.sources.base, tuple(config.sources.experts),
                       worker.architecture.num_layers, tuple(config.operators.methods),
                       config.operators.crossover.compose)
    return Setup(space, worker, worker.task_of, tuple(t.name for t in tasks))
