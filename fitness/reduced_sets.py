"""Choosing the few items a candidate is scored on, and their weights.

Items of all tasks form one pool (index j, task `task_of[j]`); a reduced set keeps `per_task` items
of each task. Each kept item gets a weight, its share of its task (weights sum to 1 within a task),
so the weighted mean of a candidate's answers estimates its accuracy on the whole task:

- `random`: a seeded uniform sample; every weight is 1/n. Unbiased.
- `stratified`: items sorted by IRT difficulty cut into n equal strata, one random item from each,
  weighted by its stratum's share. Unbiased, lower variance when difficulty predicts outcomes.
- `anchor`: tinyBenchmarks' anchor points. Items are clustered (k-means, k = n) on their IRT
  parameters, or on their correctness patterns over the calibration models; each cluster is
  represented by the item nearest its centre, weighted by the cluster's share.
- `informative`: the n items with the most Fisher information, Σ |αⱼ|² pⱼ(θ)(1 − pⱼ(θ)), summed
  over the abilities of the current population. Best for IRT estimators; their plain weighted
  mean (uniform weights) is biased, since informative items are the uncertain ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fitness.errors import FitnessError
from fitness.irt import IRTModel

SELECTIONS = ("random", "stratified", "anchor", "informative")


@dataclass(frozen=True)
class ReducedSet:
    indices: torch.Tensor  # (n,) indices into the task_of it was drawn from, grouped by task
    weights: torch.Tensor  # (n,) share of its task; sums to 1 within each task
    method: str

    def __len__(self) -> int:
        return len(self.indices)


def kmeans(points: torch.Tensor, k: int, seed: int, iterations: int = 50) -> torch.Tensor:
    """Cluster labels of `points` (n × d) into k groups: k-means++ seeding, then Lloyd steps."""
    generator = torch.Generator().manual_seed(seed)
    centres = points[torch.randint(len(points), (1,), generator=generator)]
    for _ in range(1, k):
        distance = torch.cdist(points, centres).min(1).values.pow(2)
        if float(distance.sum()) == 0:
            pick = torch.randint(len(points), (1,), generator=generator)
        else:
            pick = torch.multinomial(distance / distance.sum(), 1, generator=generator)
        centres = torch.cat([centres, points[pick]])
    labels = torch.cdist(points, centres).argmin(1)
    for _ in range(iterations):
        for c in range(k):
            members = points[labels == c]
            if len(members):
                centres[c] = members.mean(0)
        new = torch.cdist(points, centres).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def _pick(task_items: torch.Tensor, n: int, method: str, irt: IRTModel, seed: int,
          abilities: torch.Tensor | None, responses: torch.Tensor | None, anchor_space: str
          ) -> tuple[torch.Tensor, torch.Tensor]:
    size = len(task_items)
    generator = torch.Generator().manual_seed(seed)
    if method == "random":
        chosen = task_items[torch.randperm(size, generator=generator)[:n]]
        return chosen, torch.full((n,), 1.0 / n, dtype=torch.float64)
    if method == "stratified":
        difficulty = irt.difficulty[task_items] / irt.discrimination[task_items].norm(dim=1)
        ordered = task_items[torch.argsort(difficulty, stable=True)]
        strata = torch.tensor_split(ordered, n)
        picks = [s[torch.randint(len(s), (1,), generator=generator)] for s in strata]
        shares = torch.tensor([len(s) / size for s in strata], dtype=torch.float64)
        return torch.cat(picks), shares
    if method == "anchor":
        if anchor_space == "responses":
            if responses is None:
                raise FitnessError("anchor points on correctness patterns need the calibration "
                                   "responses")
            points = responses[:, task_items].T.double().nan_to_num(0.5)
        else:
            points = torch.cat([irt.discrimination[task_items],
                                irt.difficulty[task_items, None]], dim=1)
            points = (points - points.mean(0)) / points.std(0).clamp_min(1e-9)
        labels = kmeans(points, n, seed)
        chosen, shares = [], []
        for cluster in range(n):
            members = torch.nonzero(labels == cluster).flatten()
            if len(members) == 0:
                continue
            centre = points[members].mean(0)
            nearest = members[torch.cdist(points[members], centre[None]).flatten().argmin()]
            chosen.append(task_items[nearest])
            shares.append(len(members) / size)
        return torch.stack(chosen), torch.tensor(shares, dtype=torch.float64)
    population = abilities if abilities is not None else irt.abilities
    p = irt.probabilities(population, task_items)
    information = (p * (1 - p)).sum(0) * irt.discrimination[task_items].pow(2).sum(1)
    chosen = task_items[torch.argsort(information, descending=True, stable=True)[:n]]
    return chosen, torch.full((n,), 1.0 / n, dtype=torch.float64)


def select_items(method: str, irt: IRTModel, task_of: torch.Tensor, per_task: int, seed: int = 0,
                 abilities: torch.Tensor | None = None, responses: torch.Tensor | None = None,
                 anchor_space: str = "irt") -> ReducedSet:
    """`per_task` items of every task by `method` (see the module docstring), with weights."""
    if method not in SELECTIONS:
        raise FitnessError(f"unknown item selection {method!r}; use one of {SELECTIONS}")
    if per_task < 1:
        raise FitnessError(f"a reduced set needs at least 1 item per task, got {per_task}")
    indices, weights = [], []
    for task in torch.unique(task_of).tolist():
        task_items = torch.nonzero(task_of == task).flatten()
        n = min(per_task, len(task_items))
        chosen, shares = _pick(task_items, n, method, irt, seed + task, abilities, responses,
                               anchor_space)
        indices.append(chosen)
        weights.append(shares)
    return ReducedSet(torch.cat(indices), torch.cat(weights), method)


def item_bank(task_of: torch.Tensor, per_task: int, seed: int) -> torch.Tensor:
    """The calibrated item bank: a seeded uniform sample of `per_task` pool items of every task
    (all of a task's items when it has fewer), sorted.

    A run's IRT model, reduced sets and exact scores live on the bank, not on the whole search
    split: calibrating 100 items per task costs a quarter of calibrating 400, and a uniform sample
    estimates the split's accuracy without bias, with a finite-population variance that
    `bank_variance` adds to every reported stderr: at most 4.3 points per task for 100 of 400
    items (p = 0.5), half that for the mean of four tasks.
    """
    if per_task < 1:
        raise FitnessError(f"an item bank needs at least 1 item per task, got {per_task}")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for task in torch.unique(task_of).tolist():
        task_items = torch.nonzero(task_of == task).flatten()
        order = torch.randperm(len(task_items), generator=generator)
        chosen.append(task_items[order[:per_task]])
    return torch.sort(torch.cat(chosen)).values


def bank_variance(accuracy: torch.Tensor, bank_task_of: torch.Tensor, pool_task_of: torch.Tensor
                  ) -> torch.Tensor:
    """The variance a uniform bank's accuracy adds as an estimate of the whole split's, per task
    and for the mean over tasks: p(1 − p)/n · (N − n)/(N − 1), with p the task's accuracy
    (smoothed to (pn + 1)/(n + 2), so a bank answered all alike claims no certainty it lacks).
    Zero where the bank holds the whole task."""
    tasks = len(accuracy) - 1
    n = torch.bincount(bank_task_of, minlength=tasks).double()
    total = torch.bincount(pool_task_of, minlength=tasks).double()
    per_task = smoothed_spread(accuracy[:tasks].double() * n, n) * finite_population(n, total)
    return torch.cat([per_task, per_task.sum()[None] / tasks ** 2])


def smoothed_spread(successes: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """p(1 − p) of 0/1 answers, p smoothed to (k + 1)/(n + 2): 0/n or n/n answers do not claim
    zero variance."""
    p = (successes + 1) / (n + 2)
    return p * (1 - p)


def finite_population(n: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """(N − n)/(n(N − 1)): times p(1 − p), the variance of the mean of n items drawn uniformly
    without replacement from N (0 when n is all of them)."""
    return (size - n).clamp_min(0) / (n * (size - 1).clamp_min(1))
