"""Selection on any number of signed objectives: non-dominated sorting and crowding (pymoo).

Accuracy-like objectives are estimates with standard errors. Selection ranks on a cautious value,
mean − `caution`·stderr for objectives to maximize (mean + … to minimize), so a lucky estimate from
a few items does not displace a member that was measured exactly: an exact result's stderr is the
item bank's sampling error alone (0 when the bank is the whole search split), which every estimate
carries too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pymoo.indicators.hv import HV
from pymoo.operators.survival.rank_and_crowding.metrics import calc_crowding_distance
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

Objectives = dict[str, tuple[float, float]]


def minimization_matrix(objectives: Sequence[Objectives], signs: dict[str, str],
                        caution: float = 1.0) -> np.ndarray:
    """Rows of objective values to minimize (maximized ones negated), cautious by stderr."""
    rows = []
    for values in objectives:
        row = []
        for name, sense in signs.items():
            mean, stderr = values[name]
            row.append(-(mean - caution * stderr) if sense == "max" else mean + caution * stderr)
        rows.append(row)
    return np.asarray(rows, dtype=float).reshape(len(rows), len(signs))


def rank_and_crowding(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-domination rank (0 = front) and crowding distance within the rank, per row."""
    rank = np.zeros(len(matrix), dtype=int)
    crowding = np.zeros(len(matrix))
    for level, members in enumerate(NonDominatedSorting().do(matrix)):
        rank[members] = level
        crowding[members] = calc_crowding_distance(matrix[members])
    return rank, crowding


def survivors(matrix: np.ndarray, count: int) -> list[int]:
    """NSGA-II survival: whole fronts in rank order, the last one cut by crowding distance."""
    rank, crowding = rank_and_crowding(matrix)
    order = sorted(range(len(matrix)), key=lambda i: (rank[i], -crowding[i], i))
    return order[:count]


def tournament(rng, rank: np.ndarray, crowding: np.ndarray) -> int:
    """Binary tournament: lower rank wins, then larger crowding distance."""
    a, b = rng.randrange(len(rank)), rng.randrange(len(rank))
    return a if (rank[a], -crowding[a]) <= (rank[b], -crowding[b]) else b


def hypervolume(matrix: np.ndarray, reference: np.ndarray) -> float:
    """Hypervolume dominated by the rows (to minimize) up to `reference`."""
    inside = matrix[(matrix < reference).all(axis=1)]
    return float(HV(ref_point=reference)(inside)) if len(inside) else 0.0
