"""Ask/tell strategies on NAS-Bench-Graph (table lookups: a search space with a known answer)."""

from __future__ import annotations

import numpy as np
import pytest

from evolve.selection import hypervolume
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
    # never two genomes of one architecture (isomorphic genomes share a table entry)
    assert len({space.canonical(g) for g in seen}) == len(seen)
    best = min(seen.values())[0]
    assert min(strategy.scores[g][0] for g in strategy.population) == best  # elitism


def test_ga_reaches_a_higher_hypervolume_than_random_search():
    space = NasBenchGraph("citeseer")
    reference = np.array([0.0, space.max_params])

    def mean_hypervolume(make) -> float:
        return float(np.mean([hypervolume(np.array(list(_search(make(seed), space, 150)
                                                        .values()))[:150], reference)
                              for seed in range(4)]))
    ga = mean_hypervolume(lambda seed: GeneticStrategy(space, seed=seed))
    rs = mean_hypervolume(lambda seed: RandomStrategy(space, seed=seed))
    assert ga > rs


def test_optuna_strategy_runs_ask_tell():
    space = NasBenchGraph("cora")
    seen = _search(OptunaStrategy([CHOICES] * GENES, "nsga2", batch=10, population=10, seed=0),
                   space, 30)
    assert len(seen) >= 30
    with pytest.raises(ValueError, match="unknown optuna sampler"):
        OptunaStrategy([CHOICES] * GENES, "annealing")
