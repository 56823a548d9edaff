"""Ask/tell strategies on NAS-Bench-Graph (table lookups: a search space with a known answer)."""

from __future__ import annotations

import numpy as np
import pytest

from evolve.strategies import GeneticStrategy, OptunaStrategy, RandomStrategy
from search_spaces.nas_bench_graph import CHOICES, GENES, NasBenchGraph


def _search(strategy, space, budget):
    seen = {}
    while len(seen) < budget:
        genomes = strategy.ask()
        assert all(len(g) == GENES and all(0 <= v < CHOICES for v in g) for g in genomes)
        rows = [seen.setdefault(g, space.objectives(g)) for g in genomes]
        strategy.tell(genomes, np.array(rows))
    return seen


def test_table_lookups_and_invalid_genomes():
    space = NasBenchGraph("cora")
    accuracy, params = space.objectives((8, 0, 1, 2, 3))
    assert -1 < accuracy < 0 and params > 0
    assert space.objectives((0, 8, 8, 8, 8)) == (0.0, space.max_params)  # all skip: no entry
    assert len(space.exact_front()) == 26206


def test_ga_asks_fresh_genomes_and_keeps_the_best():
    space = NasBenchGraph("cora")
    strategy = GeneticStrategy(space, seed=0)
    seen = _search(strategy, space, 120)
    assert len(seen) >= 120
    best = min(seen.values())[0]
    assert min(strategy.scores[g][0] for g in strategy.population) == best  # elitism


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ga_beats_random_search_on_the_best_accuracy(seed):
    space = NasBenchGraph("citeseer")
    ga = _search(GeneticStrategy(space, seed=seed), space, 150)
    rs = _search(RandomStrategy(space, seed=seed), space, 150)
    assert min(v[0] for v in ga.values()) <= min(v[0] for v in rs.values())


def test_optuna_strategy_runs_ask_tell():
    space = NasBenchGraph("cora")
    seen = _search(OptunaStrategy([CHOICES] * GENES, "nsga2", batch=10, population=10, seed=0),
                   space, 30)
    assert len(seen) >= 30
    with pytest.raises(ValueError, match="unknown optuna sampler"):
        OptunaStrategy([CHOICES] * GENES, "annealing")
