"""Search quality with a known answer: evoforge's GA against optuna's NSGA-II and TPE samplers,
pymoo's NSGA-II and random search on NAS-Bench-Graph's nine datasets.

Budget = distinct architectures, for every strategy alike: about 2.3 genomes share each
architecture (the table's isomorphism hash, `NasBenchGraph.canonical`), and a genome whose
architecture was evaluated already costs nothing and is answered from the table again. The GA is
the one `evoforge run` uses (`evolve.strategies.GeneticStrategy` behind `evolve.breeder.Breeder`,
driven through the same ask/tell protocol with the run's NSGA-II survival); the peers are the
libraries' own algorithms, each run the way its users run it (optuna's NSGA-II with a population
of 20, TPE one trial at a time, pymoo's NSGA-II with its integer operators and duplicate
elimination).

After every evaluation we know the hypervolume of everything found so far (validation accuracy
up, parameters down, normalized by the table's largest model) as a fraction of the exact front's.
The script prints the mean over the seeds at 100, 300 and 1,000 architectures, per dataset, and
a summary: on how many datasets the GA's mean is ahead of each peer's at each budget.
Run: ``python benchmarks/nas_search_quality.py [--datasets cora,citeseer] [--seeds 5]
[--results nas.json]``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from evolve.breeder import Breeder
from evolve.selection import hypervolume, survivors
from evolve.strategies import GeneticStrategy, Proposal, Strategy
from search_spaces.nas_bench_graph import CHOICES, DATASETS, GENES, Genome, NasBenchGraph

REFERENCE = np.array([0.0, 1.0])
CHECKPOINTS = (100, 300, 1000)
POPULATION = 20  # the GA's population and generation, optuna's and pymoo's NSGA-II population
GA_RATES = {"crossover": 0.5}  # the remainder is mutation


class RandomSearch:
    """Uniform genomes: the baseline every search must beat."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def ask(self, stream: str, size: int, population: list[str],
            matrix: np.ndarray) -> list[Proposal]:
        return [Proposal(NasBenchGraph.random(self.rng), (), "random") for _ in range(size)]

    def tell(self, proposals: list[Proposal], rows: list[np.ndarray | None]) -> None:
        """Learns nothing."""


class OptunaSampler:
    """optuna's ask/tell: one categorical parameter per gene."""

    def __init__(self, sampler: str, seed: int):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        make = {"nsga2": lambda: optuna.samplers.NSGAIISampler(population_size=POPULATION,
                                                                seed=seed),
                "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True)}
        self.study = optuna.create_study(directions=["minimize", "minimize"],
                                         sampler=make[sampler]())

    def ask(self, stream: str, size: int, population: list[str],
            matrix: np.ndarray) -> list[Proposal]:
        proposals = []
        for _ in range(size):
            trial = self.study.ask()
            genome = tuple(trial.suggest_categorical(f"g{i}", list(range(CHOICES)))
                           for i in range(GENES))
            proposals.append(Proposal(genome, (), "optuna", trial))
        return proposals

    def tell(self, proposals: list[Proposal], rows: list[np.ndarray | None]) -> None:
        for proposal, row in zip(proposals, rows, strict=True):
            self.study.tell(proposal.handle, [float(v) for v in row])


class PymooNSGA2:
    """pymoo's NSGA-II through its ask/tell interface, with the integer operators its docs give
    (SBX and polynomial mutation rounded to integers) and its own duplicate elimination."""

    def __init__(self, seed: int):
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.repair.rounding import RoundingRepair
        from pymoo.operators.sampling.rnd import IntegerRandomSampling

        self.problem = Problem(n_var=GENES, n_obj=2, xl=0, xu=CHOICES - 1, vtype=int)
        self.algorithm = NSGA2(pop_size=POPULATION, sampling=IntegerRandomSampling(),
                               crossover=SBX(prob=1.0, eta=3.0, vtype=float,
                                             repair=RoundingRepair()),
                               mutation=PM(prob=1.0, eta=3.0, vtype=float,
                                           repair=RoundingRepair()),
                               eliminate_duplicates=True)
        self.algorithm.setup(self.problem, termination=("n_gen", 10**9), seed=seed,
                             verbose=False)

    def ask(self, stream: str, size: int, population: list[str],
            matrix: np.ndarray) -> list[Proposal]:
        batch = self.algorithm.ask()  # its population's offspring: POPULATION at a time
        return [Proposal(tuple(int(v) for v in x), (), "pymoo", batch) for x in batch.get("X")]

    def tell(self, proposals: list[Proposal], rows: list[np.ndarray | None]) -> None:
        from pymoo.core.evaluator import Evaluator
        from pymoo.problems.static import StaticProblem

        batch = proposals[0].handle
        Evaluator().eval(StaticProblem(self.problem, F=np.array(rows)), batch)
        self.algorithm.tell(infills=batch)


class Evaluations:
    """The budget: distinct architectures evaluated, in order; a repeat is answered free."""

    def __init__(self, space: NasBenchGraph):
        self.space = space
        self.rows: dict = {}  # canonical key -> normalized objective row
        self.order: list[np.ndarray] = []

    def __call__(self, genome: Genome) -> np.ndarray:
        key = self.space.canonical(genome)
        if key not in self.rows:
            accuracy, params = self.space.objectives(genome)
            self.rows[key] = np.array([accuracy, params / self.space.max_params])
            self.order.append(self.rows[key])
        return self.rows[key]


def run_peer(strategy: Strategy, evaluate: Evaluations, budget: int, step: int) -> None:
    """A library's algorithm asks `step` genomes at a time and hears their rows."""
    for _ in range(100 * budget):  # a sampler stuck on known architectures stops here
        if len(evaluate.order) >= budget:
            return
        proposals = strategy.ask("", step, [], np.empty((0, 2)))
        strategy.tell(proposals, [evaluate(p.genome) for p in proposals])


def run_ga(seed: int, evaluate: Evaluations, budget: int) -> None:
    """The run's GA, driven the way `evolve.engine.Evolution` drives it in generational mode:
    a population of random architectures, then generations of checked proposals, each followed
    by NSGA-II survival over the population and its children."""
    space = evaluate.space
    genomes: dict[str, Genome] = {}
    strategy = GeneticStrategy(space, genomes, GA_RATES, seed)
    breeder = Breeder(strategy, space.canonical, lambda child, reason: None)
    rng, population = random.Random(f"{seed}/seeds"), []
    while len(population) < POPULATION:
        genome = space.random(rng)
        if space.canonical(genome) not in breeder.keys:
            identifier = f"seed-{len(population)}"
            genomes[identifier] = genome
            breeder.known(identifier, genome)
            population.append(identifier)
    rows = {identifier: evaluate(genomes[identifier]) for identifier in population}
    for generation in range(1, 100 * budget):  # a GA stuck on known architectures stops
        if len(evaluate.order) >= budget:
            return
        ids = [f"g{generation}-{k}" for k in range(POPULATION)]
        proposals = breeder.propose(f"gen/{generation}", ids, population,
                                    np.array([rows[p] for p in population]), rows.get)
        for identifier, proposal in zip(ids, proposals, strict=True):
            genomes[identifier] = proposal.genome
            rows[identifier] = evaluate(proposal.genome)
        strategy.tell(proposals, [rows[i] for i in ids])
        pool = population + ids
        population = [pool[i] for i in survivors(np.array([rows[p] for p in pool]),
                                                 POPULATION)]


def strategies(seed: int) -> dict[str, Callable[[Evaluations, int], None]]:
    return {
        "evoforge GA": lambda evaluate, budget: run_ga(seed, evaluate, budget),
        "optuna NSGA-II": lambda evaluate, budget: run_peer(OptunaSampler("nsga2", seed),
                                                            evaluate, budget, POPULATION),
        "optuna TPE": lambda evaluate, budget: run_peer(OptunaSampler("tpe", seed), evaluate,
                                                        budget, 1),
        "pymoo NSGA-II": lambda evaluate, budget: run_peer(PymooNSGA2(seed), evaluate, budget,
                                                           POPULATION),
        "random": lambda evaluate, budget: run_peer(RandomSearch(seed), evaluate, budget,
                                                    POPULATION),
    }


def curve(order: list[np.ndarray], checkpoints: tuple[int, ...]) -> np.ndarray:
    points = np.array(order)
    return np.array([hypervolume(points[:c], REFERENCE) for c in checkpoints])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--strategies", default=",".join(strategies(0)),
                        help="comma-separated names, as printed")
    parser.add_argument("--budget", type=int, default=max(CHECKPOINTS),
                        help="architectures per search (the checkpoints up to it are printed)")
    parser.add_argument("--results", type=Path,
                        help="a JSON file of finished searches (dataset, strategy, seed): those "
                             "found there are read instead of searched again (optuna's TPE takes "
                             "minutes per search at 1,000 trials), new ones are added")
    parser.add_argument("--fresh", default="",
                        help="comma-separated strategies to search again even if --results "
                             "holds them (after changing the GA, say)")
    args = parser.parse_args()
    names, fresh = args.strategies.split(","), set(filter(None, args.fresh.split(",")))
    results = json.loads(args.results.read_text()) if args.results and args.results.exists() \
        else {}
    budget = args.budget
    checkpoints = tuple(c for c in CHECKPOINTS if c <= budget)
    ahead: dict[str, np.ndarray] = {}  # peer -> datasets where the GA's mean is ahead, per budget
    gaps: dict[str, list[np.ndarray]] = {}  # name -> per dataset, its mean gap to exact
    seconds: dict[str, list[float]] = {}
    datasets = args.datasets.split(",")
    for dataset in datasets:
        space = NasBenchGraph(dataset)
        exact = hypervolume(space.exact_front() / np.array([1.0, space.max_params]), REFERENCE)
        curves: dict[str, list[np.ndarray]] = {}
        for seed in range(args.seeds):
            for name, run in strategies(seed).items():
                key = f"{dataset}/{name}/{seed}/{budget}"
                if name not in names:
                    continue
                if key not in results or name in fresh:
                    evaluate, start = Evaluations(space), time.perf_counter()
                    run(evaluate, budget)
                    results[key] = {"hypervolume": list(curve(evaluate.order, checkpoints)
                                                        / exact),
                                    "seconds": time.perf_counter() - start}
                    if args.results:  # merged into what is there: another process may share it
                        saved = json.loads(args.results.read_text()) \
                            if args.results.exists() else {}
                        args.results.write_text(json.dumps(saved | {key: results[key]},
                                                           indent=1))
                seconds.setdefault(name, []).append(results[key]["seconds"])
                curves.setdefault(name, []).append(np.array(results[key]["hypervolume"]))
        means = {name: np.mean(values, axis=0) for name, values in curves.items()}
        print(f"\n{dataset}: hypervolume / exact, mean over {args.seeds} seeds, at "
              "distinct architectures")
        print(f"{'strategy':16s}" + "".join(f"{c:>9d}" for c in checkpoints))
        for name, mean in means.items():
            print(f"{name:16s}" + "".join(f"{v:9.4f}" for v in mean))
        for name, mean in means.items():
            gaps.setdefault(name, []).append(1 - mean)
        if "evoforge GA" in means:
            for name, mean in means.items():
                if name != "evoforge GA":
                    ahead[name] = ahead.get(name, 0) + (means["evoforge GA"] > mean)
    print(f"\nthe GA's mean ahead of the peer's, datasets out of {len(datasets)}, at "
          + ", ".join(str(c) for c in checkpoints) + " architectures:")
    for name, count in ahead.items():
        print(f"  vs {name:16s}" + "".join(f"{int(c):>5d}" for c in count))
    if "evoforge GA" in gaps:
        print("the peer's gap to the exact front over the GA's, summed over the datasets (above 1: "
              "the GA is closer):")
        ours = np.sum(gaps["evoforge GA"], axis=0)
        for name in ahead:
            print(f"  vs {name:16s}" + "".join(f"{r:7.2f}x"
                                               for r in np.sum(gaps[name], axis=0) / ours))
    print(f"seconds per search of {budget} architectures: "
          + ", ".join(f"{name} {np.mean(s):.2f}" for name, s in seconds.items()))


if __name__ == "__main__":
    main()
