"""Search quality with a known answer: GA vs random search vs optuna NSGA-II on NAS-Bench-Graph.

Each strategy gets the same budget of distinct architecture evaluations (table lookups) and the
same seeds. After every evaluation we compute the hypervolume of everything found so far
(validation accuracy up, parameters down, parameters normalized by the table's largest model),
as a fraction of the exact hypervolume of the whole table. The script prints the mean curves over
the seeds at a few budgets, and the GA's ratios to each peer: final value, area under the curve,
and how much smaller the GA's remaining gap to the exact front is (every strategy gets within a
few percent of it, so the gap is where they differ).
Run: ``python benchmarks/nas_search_quality.py [--datasets cora,citeseer] [--seeds 10]``.
"""

from __future__ import annotations

import argparse

import numpy as np

from evolve.selection import hypervolume
from evolve.strategies import GeneticStrategy, OptunaStrategy, RandomStrategy
from search_spaces.nas_bench_graph import CHOICES, GENES, NasBenchGraph

REFERENCE = np.array([0.0, 1.0])


def run_search(strategy, space: NasBenchGraph, budget: int) -> list[tuple[float, float]]:
    """Objective rows (normalized) of the distinct genomes evaluated, in evaluation order."""
    seen: dict = {}
    order: list[tuple[float, float]] = []
    while len(order) < budget:
        genomes = strategy.ask()
        rows = []
        for genome in genomes:
            if genome not in seen:
                accuracy, params = space.objectives(genome)
                seen[genome] = (accuracy, params / space.max_params)
                order.append(seen[genome])
            rows.append(seen[genome])
        strategy.tell(genomes, np.array(rows))
    return order[:budget]


def curve(order: list[tuple[float, float]], checkpoints: list[int]) -> np.ndarray:
    points = np.array(order)
    return np.array([hypervolume(points[:c], REFERENCE) for c in checkpoints])


def strategies(space: NasBenchGraph, seed: int) -> dict:
    return {"GA": GeneticStrategy(space, seed=seed),
            "random": RandomStrategy(space, batch=20, seed=seed),
            "optuna NSGA-II": OptunaStrategy([CHOICES] * GENES, "nsga2", batch=20,
                                             population=20, seed=seed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="cora,citeseer,pubmed")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budget", type=int, default=300)
    args = parser.parse_args()
    checkpoints = [c for c in (50, 100, 200, 300, 500, 1000) if c <= args.budget]
    for dataset in args.datasets.split(","):
        space = NasBenchGraph(dataset)
        exact = hypervolume(space.exact_front() / np.array([1.0, space.max_params]), REFERENCE)
        curves: dict[str, list[np.ndarray]] = {}
        for seed in range(args.seeds):
            for name, strategy in strategies(space, seed).items():
                order = run_search(strategy, space, args.budget)
                dense = curve(order, list(range(10, args.budget + 1, 10)))
                curves.setdefault(name, []).append(dense / exact)
        print(f"\n{dataset}: hypervolume / exact hypervolume, mean over {args.seeds} seeds "
              f"(budget = distinct evaluations)")
        print(f"{'strategy':16s}" + "".join(f"{c:>9d}" for c in checkpoints) + "      AUC")
        means = {name: np.mean(values, axis=0) for name, values in curves.items()}
        for name, mean in means.items():
            picks = [mean[c // 10 - 1] for c in checkpoints]
            print(f"{name:16s}" + "".join(f"{v:9.4f}" for v in picks) + f"{mean.mean():9.4f}")
        for peer in ("random", "optuna NSGA-II"):
            final = means["GA"][-1] / means[peer][-1]
            area = means["GA"].mean() / means[peer].mean()
            wins = sum(g[-1] > p[-1] for g, p in zip(curves["GA"], curves[peer], strict=True))
            gap = (1 - means[peer][-1]) / (1 - means["GA"][-1])
            print(f"GA / {peer}: final {final:.4f}x, area under curve {area:.4f}x, GA ahead at the "
                  f"end in {wins}/{args.seeds} seeds; final gap to the exact front "
                  f"{gap:.2f}x smaller")


if __name__ == "__main__":
    main()
