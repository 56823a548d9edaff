"""`evoforge fitness check [CONFIG]`: how good is reduced evaluation for a run's models and tasks,
measured, not assumed (the built-in zoo when no config is given).

1. A calibration population — the config's base and experts, its default merges and random merge
   recipes from the run's own search space (some mutated) — is evaluated on every item of every
   task's search split; an IRT model is fitted to those answers and the estimators' excess
   variance is calibrated by cross-fitting.
2. A separate held-out population of random merges and mutants is also evaluated fully.
3. For each item selection, reduced-set size and estimator, every held-out candidate is estimated
   from its answers to the reduced set alone (the same items for all: paired), and compared with
   its full-split accuracy: the cost ratio, mean and 95th-percentile absolute error, coverage of
   the ±2·stderr interval, and rank correlations.

Full answers are cached under `<cache>/fitness-check/`, keyed by the sources (paths, and each
file's size and modification time), the tasks, the dtype and the recipes, so changing the
table's options is fast and a checkpoint rewritten in place is evaluated anew.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from evolve.engine import Setup, worker_spec
from fitness.estimators import ESTIMATORS, ReducedEstimators, calibrate, task_accuracies
from fitness.irt import fit_irt
from fitness.pool import Job
from fitness.reduced_sets import select_items
from operators.cache import cache_dir
from operators.recipes import Recipe, merged_sources
from search_spaces.merge_space import MergeSpace, default_merge_recipes

Progress = Callable[[str, int, int], None]
ZOO_CONFIG = {"sources": {"base": "zoo/base",
                          "experts": ["zoo/rev", "zoo/sort", "zoo/inc", "zoo/cnt"]},
              "tasks": ["zoo/rev", "zoo/sort", "zoo/inc", "zoo/cnt"]}


@dataclass(frozen=True)
class Population:
    recipes: list[Recipe]
    responses: torch.Tensor  # (candidates × pool items), 0/1
    task_of: torch.Tensor  # (pool items,)
    tasks: tuple[str, ...]


def populations(space: MergeSpace, calibration: int, held_out: int, seed: int = 0
                ) -> tuple[list[Recipe], list[Recipe]]:
    """Calibration recipes (the sources, default merges, random merges) and held-out ones, all
    points of the run's search space (30 % of the random ones with weight noise)."""
    fixed: list[Recipe] = [{"model": name} for name in (space.base, *space.experts)]
    fixed += default_merge_recipes(space.base, space.experts)

    def draw(rng: random.Random) -> Recipe:
        recipe = space.random(rng)
        return space.mutate_weights(rng, recipe) if rng.random() < 0.3 else recipe
    rng = random.Random(f"calibration/{seed}")
    calibration_set = fixed + [draw(rng) for _ in range(max(calibration - len(fixed), 0))]
    rng = random.Random(f"held-out/{seed}")
    return calibration_set, [draw(rng) for _ in range(held_out)]


def sources_fingerprint(config, base_dir: Path | None = None) -> list:
    """What the answers depend on besides the recipes: each source's files (name, size, mtime),
    the tasks and the dtype."""
    files = []
    for name, folder in worker_spec(config, base_dir).folders:
        entries = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                         for f in os.scandir(folder) if f.is_file())
        files.append([name, folder, entries])
    return [files, list(config.tasks), config.dtype]


def evaluate_fully(recipes: list[Recipe], setup: Setup, fingerprint: list,
                   progress: Progress | None = None, label: str = "candidates") -> Population:
    """Every recipe's answers to every search-split item of the run's tasks (cached)."""
    key = hashlib.sha256(json.dumps([fingerprint, recipes], sort_keys=True).encode())
    cached = cache_dir() / "fitness-check" / f"{key.hexdigest()[:16]}.pt"
    if cached.is_file():
        return Population(recipes, torch.load(cached), setup.task_of, setup.task_names)
    every = tuple(range(len(setup.task_of)))
    jobs = {setup.pool.submit(Job(f"{label}-{k}", recipe, every, stage="calibration")): k
            for k, recipe in enumerate(recipes)}
    rows: dict[int, torch.Tensor] = {}
    for done, future in enumerate(setup.pool.completed(list(jobs)), start=1):
        rows[jobs[future]] = torch.tensor(future.result().values)
        if progress:
            progress(f"evaluating {label} fully", done, len(recipes))
    responses = torch.stack([rows[k] for k in range(len(recipes))])
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(responses, cached)
    return Population(recipes, responses, setup.task_of, setup.task_names)


def _parent_rows(recipe: Recipe, calibration: list[Recipe]) -> list[int]:
    """The calibration rows of the sources a recipe merges (mp-IRT's parents; none for a
    source itself)."""
    leaves = {r["model"]: i for i, r in enumerate(calibration) if "model" in r}
    return [] if "model" in recipe else [leaves[name] for name in merged_sources(recipe)]


@dataclass(frozen=True)
class CheckRow:
    selection: str
    per_task: int
    estimator: str
    cost_ratio: float
    mae: float
    p95: float
    coverage: float
    spearman: float
    kendall: float


def reduced_evaluation_table(calibration: Population, held_out: Population, dims: int,
                             sizes: list[int], selections: list[str], seed: int = 0
                             ) -> list[CheckRow]:
    """The check's table: one row per (selection, size, estimator), on the held-out candidates."""
    from scipy.stats import kendalltau, spearmanr

    irt = fit_irt(calibration.responses, dims)
    truth = task_accuracies(held_out.responses, held_out.task_of)[:, -1]
    calibration_parents = [_parent_rows(r, calibration.recipes) for r in calibration.recipes]
    held_parents = [_parent_rows(r, calibration.recipes) for r in held_out.recipes]
    pool = len(calibration.task_of)
    rows = []
    for selection in selections:
        for per_task in sizes:
            reduced = select_items(selection, irt, calibration.task_of, per_task, seed,
                                   responses=calibration.responses)
            excess = calibrate(calibration.responses, calibration.task_of, reduced,
                               [[calibration.responses[p] for p in parents]
                                for parents in calibration_parents], dims, seed=seed)
            estimators = ReducedEstimators(irt, calibration.task_of, reduced, excess)
            for name in ESTIMATORS:
                means, errors = [], []
                for m, parents in enumerate(held_parents):
                    answers = held_out.responses[m, reduced.indices]
                    estimate = estimators.estimate(
                        name, answers, irt.abilities[parents] if parents else None)
                    means.append(estimate.overall[0])
                    errors.append(estimate.overall[1])
                means_t = torch.tensor(means, dtype=torch.float64)
                deviation = (means_t - truth).abs()
                # the tolerance: a set that holds every item is exact up to rounding, stderr 0
                covered = deviation <= 2 * torch.tensor(errors, dtype=torch.float64) + 1e-9
                rows.append(CheckRow(
                    selection, per_task, name, pool / len(reduced),
                    float(deviation.mean()) * 100, float(deviation.quantile(0.95)) * 100,
                    float(covered.double().mean()), float(spearmanr(means, truth).statistic),
                    float(kendalltau(means, truth).statistic)))
    return rows
