"""A search space with a known answer: NAS-Bench-Graph (Qin et al., NeurIPS 2022).

26,206 distinct graph neural network architectures, each trained on nine datasets; the
`nas-bench-graph` wheel ships the results tables (validation and test accuracy, parameters,
latency), so evaluating an architecture is a table lookup and the exact Pareto front of accuracy
against parameters is computable. That makes it a benchmark of *search quality*.

Genome: five integers, the macro link pattern (9 choices) and the operation of each of the 4
nodes (9 choices). Isomorphic genomes map to one table entry (the package's `valid_hash`); the
9 all-skip genomes have no entry and count as invalid.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache

import numpy as np

GENES = 5
CHOICES = 9
DATASETS = ("cora", "citeseer", "pubmed", "cs", "physics", "photo", "computers", "arxiv",
            "proteins")  # the nine the tables cover
Genome = tuple[int, ...]


@cache
def _table(dataset: str) -> dict:
    from nas_bench_graph.readbench import light_read

    return light_read(dataset)


@dataclass(frozen=True)
class NasBenchGraph:
    dataset: str = "cora"

    def lookup(self, genome: Genome) -> dict | None:
        return _table(self.dataset).get(self.canonical(genome))

    @staticmethod
    @cache
    def canonical(genome: Genome) -> str | tuple:
        """The architecture's isomorphism-invariant hash (the table's key): about 2.3 genomes
        share each architecture, and the GA spends no evaluation on a second copy."""
        from nas_bench_graph.architecture import Arch, gnn_list, link_list

        return Arch(list(link_list[genome[0]]), [gnn_list[g] for g in genome[1:]]).valid_hash()

    def objectives(self, genome: Genome) -> tuple[float, float]:
        """(−validation accuracy, parameters in millions): both minimized; invalid → worst."""
        entry = self.lookup(genome)
        if entry is None:
            return (0.0, self.max_params)
        return (-float(entry["valid_perf"]), float(entry["para"]))

    @property
    def max_params(self) -> float:
        return max(float(v["para"]) for v in _table(self.dataset).values())

    def exact_front(self) -> np.ndarray:
        """Every table entry as (−accuracy, params), for the exact hypervolume."""
        return np.array([(-float(v["valid_perf"]), float(v["para"]))
                         for v in _table(self.dataset).values()])

    # -- operators (the GA's) ------------------------------------------------------------

    @staticmethod
    def random(rng: random.Random) -> Genome:
        return tuple(rng.randrange(CHOICES) for _ in range(GENES))

    @staticmethod
    def crossover(rng: random.Random, a: Genome, b: Genome) -> Genome:
        return tuple(rng.choice(pair) for pair in zip(a, b, strict=True))

    @staticmethod
    def mutate(rng: random.Random, genome: Genome) -> Genome:
        """One gene changed for sure, each other with probability 1/GENES: mostly a neighbour,
        but every genome stays reachable, so a converged population still finds new ones."""
        child = list(genome)
        first = rng.randrange(GENES)
        for position in range(GENES):
            if position == first or rng.random() < 1 / GENES:
                child[position] = rng.choice([c for c in range(CHOICES)
                                              if c != genome[position]])
        return tuple(child)
