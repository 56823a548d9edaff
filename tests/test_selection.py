"""Non-dominated sorting, crowding, survival and hypervolume on hand-made fronts."""

from __future__ import annotations

import random

import numpy as np
import pytest

from evolve.selection import (
    hypervolume,
    minimization_matrix,
    rank_and_crowding,
    survivors,
    tournament,
)


def test_cautious_matrix_negates_maxima_and_charges_stderr():
    matrix = minimization_matrix([{"accuracy": (0.6, 0.1), "params": (2.0, 0.0)}],
                                 {"accuracy": "max", "params": "min"})
    assert matrix.tolist() == [[-0.5, 2.0]]


def test_ranks_crowding_and_survival():
    # three on the front (to minimize), one dominated
    matrix = np.array([[0.0, 3.0], [1.0, 1.0], [3.0, 0.0], [2.0, 2.0]])
    rank, crowding = rank_and_crowding(matrix)
    assert rank.tolist() == [0, 0, 0, 1]
    assert np.isinf(crowding[0]) and np.isinf(crowding[2]) and np.isfinite(crowding[1])
    assert survivors(matrix, 3) == [0, 2, 1]
    rng = random.Random(0)
    picks = [tournament(rng, rank, crowding) for _ in range(200)]
    assert picks.count(3) < picks.count(0)


def test_hypervolume_by_hand():
    matrix = np.array([[-0.5, 0.5], [-0.2, 0.2]])
    # union of [−0.5, 0] × [0.5, 1] and [−0.2, 0] × [0.2, 1] = 0.25 + 0.2·0.3
    assert hypervolume(matrix, np.array([0.0, 1.0])) == pytest.approx(0.25 + 0.06)
    assert hypervolume(np.array([[1.0, 2.0]]), np.array([0.0, 1.0])) == 0.0
