"""The run's GA and the benchmark's peers on NAS-Bench-Graph (table lookups: a search space
with a known answer), driven through the one ask/tell protocol runs use."""

from __future__ import annotations

import random

import numpy as np
import pytest

from benchmarks.nas_search_quality import (
    Evaluations,
    OptunaSampler,
    PymooNSGA2,
    RandomSearch,
    run_ga,
    run_peer,
)
from evolve.selection import hypervolume
from evolve.strategies import GeneticStrategy
from search_spaces.nas_bench_graph import CHOICES, GENES, NasBenchGraph


def test_table_lookups_and_invalid_genomes():
    space = NasBenchGraph("cora")
    accuracy, params = space.objectives((8, 0, 1, 2, 3))
    assert -1 < accuracy < 0 and params > 0
    assert space.objectives((0, 8, 8, 8, 8)) == (0.0, space.max_params)  # all skip: no entry
    assert len(space.exact_front()) == 26206


def test_budget_counts_distinct_architectures():
    space = NasBenchGraph("cora")
    rng, classes = random.Random(0), {}
    while not any(len(genomes) > 1 for genomes in classes.values()):
        genome = NasBenchGraph.random(rng)
        classes.setdefault(space.canonical(genome), set()).add(genome)
    twins = next(genomes for genomes in classes.values() if len(genomes) > 1)
    evaluate = Evaluations(space)
    for genome in twins:
        evaluate(genome)
    assert len(evaluate.order) == 1  # isomorphic genomes are one architecture: one evaluation


class CountingEvaluations(Evaluations):
    def __init__(self, space):
        super().__init__(space)
        self.asked = 0

    def __call__(self, genome):
        self.asked += 1
        return super().__call__(genome)


def test_the_breeder_keeps_the_ga_from_asking_a_known_architecture():
    space = NasBenchGraph("cora")
    ga, rs = CountingEvaluations(space), CountingEvaluations(space)
    run_ga(0, ga, 300)
    run_peer(RandomSearch(0), rs, 300, 20)
    assert ga.asked == len(ga.order) >= 300  # every genome the GA asked was a new architecture
    assert rs.asked > len(rs.order)  # random search meets isomorphic copies (answered free)


@pytest.mark.parametrize("peer", ["random", "nsga2", "tpe", "pymoo"])
def test_peers_speak_the_protocol(peer):
    space = NasBenchGraph("citeseer")
    strategy = {"random": lambda: RandomSearch(0), "nsga2": lambda: OptunaSampler("nsga2", 0),
                "tpe": lambda: OptunaSampler("tpe", 0), "pymoo": lambda: PymooNSGA2(0)}[peer]()
    proposals = strategy.ask("", 20, [], np.empty((0, 2)))
    assert len(proposals) == 20
    assert all(len(p.genome) == GENES and all(0 <= v < CHOICES for v in p.genome)
               for p in proposals)
    evaluate = Evaluations(space)
    strategy.tell(proposals, [evaluate(p.genome) for p in proposals])
    run_peer(strategy, evaluate, 60, 20)
    assert len(evaluate.order) >= 60


def test_ga_beats_random_search():
    space = NasBenchGraph("citeseer")

    def mean_hypervolume(search) -> float:
        values = []
        for seed in range(4):
            evaluate = Evaluations(space)
            search(seed, evaluate)
            values.append(hypervolume(np.array(evaluate.order[:150]), np.array([0.0, 1.0])))
        return float(np.mean(values))
    ga = mean_hypervolume(lambda seed, evaluate: run_ga(seed, evaluate, 150))
    rs = mean_hypervolume(lambda seed, evaluate: run_peer(RandomSearch(seed), evaluate, 150, 20))
    assert ga > rs


def test_operator_rates_are_checked():
    with pytest.raises(ValueError, match="unknown operator rates"):
        GeneticStrategy(NasBenchGraph(), {}, {"weight_noise": 0.1})
    with pytest.raises(ValueError, match=r"sum to 1\.200"):
        GeneticStrategy(NasBenchGraph(), {}, {"crossover": 0.7, "edit": 0.5})
    rng = random.Random(0)
    genomes = {"a": NasBenchGraph.random(rng), "b": NasBenchGraph.random(rng)}
    strategy = GeneticStrategy(NasBenchGraph(), genomes, {"crossover": 0.0}, seed=1)
    proposals = strategy.ask("gen/1", 10, ["a", "b"], np.array([[-0.5, 0.2], [-0.6, 0.3]]))
    assert {p.operator for p in proposals} == {"mutation"}  # the remainder
