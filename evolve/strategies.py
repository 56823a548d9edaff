"""Search strategies behind one ask/tell interface.

`ask()` returns genomes to evaluate; `tell(genomes, objectives)` gives their objective rows (to
minimize). Strategies never evaluate anything themselves, so the same driver runs any of them on
any space (a space gives `random`, `crossover` and `mutate`; optuna needs the gene ranges).

- `GeneticStrategy` (default): NSGA-II-style. Binary tournaments on rank and crowding pick parents;
  children come from crossover then mutation; parents and children compete for survival by
  non-dominated sorting and crowding (pymoo). It never re-asks a genome equivalent to one already
  evaluated: a space may define `canonical(genome)` (e.g. isomorphic architectures share one), so
  every evaluation of the budget is spent on something new.
- `RandomStrategy`: uniform samples, the baseline every search must beat.
- `OptunaStrategy`: optuna's multi-objective samplers (NSGA-II, TPE) through its ask/tell API.
"""

from __future__ import annotations

import random
from typing import Protocol

import numpy as np

from evolve.selection import rank_and_crowding, survivors, tournament


class Space(Protocol):
    def random(self, rng: random.Random): ...

    def crossover(self, rng: random.Random, a, b): ...

    def mutate(self, rng: random.Random, genome): ...

    # optional: `canonical(genome)`, one key per class of equivalent genomes (default: itself)


class GeneticStrategy:
    def __init__(self, space: Space, population: int = 12, crossover: float = 0.7,
                 mutation: float = 0.7, seed: int = 0):
        self.space, self.size = space, population
        self.crossover_rate, self.mutation_rate = crossover, mutation
        self.rng = random.Random(seed)
        self.population: list = []
        self.scores: dict = {}
        self.canonical = getattr(space, "canonical", lambda genome: genome)
        self.evaluated: set = set()  # canonical keys of everything told

    def _fresh(self, make) -> object:
        for _ in range(100):  # avoid re-asking evaluated (or equivalent) genomes
            genome = make()
            if self.canonical(genome) not in self.evaluated:
                return genome
        return genome

    def ask(self) -> list:
        if not self.population:
            return [self._fresh(lambda: self.space.random(self.rng)) for _ in range(self.size)]
        rank, crowding = rank_and_crowding(np.array([self.scores[g] for g in self.population]))

        def child():
            first = self.population[tournament(self.rng, rank, crowding)]
            genome = first
            if self.rng.random() < self.crossover_rate:
                second = self.population[tournament(self.rng, rank, crowding)]
                genome = self.space.crossover(self.rng, first, second)
            if genome == first or self.rng.random() < self.mutation_rate:
                genome = self.space.mutate(self.rng, genome)
            return genome
        batch: list = []
        keys: set = set()
        while len(batch) < self.size:
            genome = self._fresh(child)
            if self.canonical(genome) not in keys:
                batch.append(genome)
                keys.add(self.canonical(genome))
        return batch

    def tell(self, genomes: list, objectives: np.ndarray) -> None:
        for genome, row in zip(genomes, objectives, strict=True):
            self.scores[genome] = tuple(row)
            self.evaluated.add(self.canonical(genome))
        pool = list(dict.fromkeys(self.population + list(genomes)))
        keep = survivors(np.array([self.scores[g] for g in pool]), self.size)
        self.population = [pool[i] for i in keep]


class RandomStrategy:
    def __init__(self, space: Space, batch: int = 20, seed: int = 0):
        self.space, self.batch, self.rng = space, batch, random.Random(seed)
        self.seen: set = set()

    def ask(self) -> list:
        out = []
        for _ in range(100 * self.batch):
            if len(out) == self.batch:
                break
            genome = self.space.random(self.rng)
            if genome not in self.seen and genome not in out:
                out.append(genome)
        return out

    def tell(self, genomes: list, objectives: np.ndarray) -> None:
        self.seen.update(genomes)


class OptunaStrategy:
    """optuna's ask/tell with one categorical parameter per gene (`choices[i]` values)."""

    def __init__(self, choices: list[int], sampler: str = "nsga2", batch: int = 20,
                 population: int = 20, seed: int = 0, objectives: int = 2):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        samplers = {"nsga2": lambda: optuna.samplers.NSGAIISampler(population_size=population,
                                                                    seed=seed),
                    "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True)}
        if sampler not in samplers:
            raise ValueError(f"unknown optuna sampler {sampler!r}; use one of {list(samplers)}")
        self.study = optuna.create_study(directions=["minimize"] * objectives,
                                         sampler=samplers[sampler]())
        self.choices, self.batch = choices, batch
        self._trials: list = []

    def ask(self) -> list:
        self._trials = [self.study.ask() for _ in range(self.batch)]
        return [tuple(t.suggest_categorical(f"g{i}", list(range(n)))
                      for i, n in enumerate(self.choices)) for t in self._trials]

    def tell(self, genomes: list, objectives: np.ndarray) -> None:
        for trial, row in zip(self._trials, objectives, strict=True):
            self.study.tell(trial, [float(v) for v in row])


class MergeGeneStrategy:
    """CMA-ES (nevergrad) or optuna's TPE / NSGA-II samplers over a flat merge's genes.

    The genes are those of `MergeSpace`: a method (categorical), per expert and layer group a
    weight in [0, 1.5] and a density in [0.05, 1], and λ in [0.2, 1.5]. `ask(n)` returns gene
    dicts for `MergeSpace.from_genes`; `tell(rows)` takes one objective row (to minimize) per
    asked dict, None for a candidate that failed. optuna's samplers are multi-objective and see
    the whole row; CMA-ES minimizes one number, the row's `primary` column (the accuracy). All
    are seeded, so a run replays exactly on resume.
    """

    KINDS = ("cmaes", "tpe", "nsga2")

    def __init__(self, kind: str, experts: tuple[str, ...], methods: tuple[str, ...],
                 groups: int, objectives: int, budget: int, seed: int = 0, primary: int = 0,
                 population: int = 16):
        if kind not in self.KINDS:
            raise ValueError(f"unknown gene strategy {kind!r}; use one of {list(self.KINDS)}")
        self.kind, self.experts, self.methods, self.primary = kind, experts, methods, primary
        self.bounds = ({f"w{e}.{g}": (0.0, 1.5) for e in range(len(experts))
                        for g in range(groups)}
                       | {f"d{e}.{g}": (0.05, 1.0) for e in range(len(experts))
                          for g in range(groups)} | {"lambda": (0.2, 1.5)})
        self.groups = groups
        if kind == "cmaes":
            import nevergrad as ng

            parametrization = ng.p.Dict(method=ng.p.Choice(list(methods)),
                                        unit=ng.p.Array(shape=(len(self.bounds),), lower=0.0,
                                                        upper=1.0))
            parametrization.random_state = np.random.RandomState(seed)
            self.optimizer = ng.optimizers.CMA(parametrization=parametrization, budget=budget,
                                               num_workers=population)
        else:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            sampler = (optuna.samplers.TPESampler(seed=seed, multivariate=True) if kind == "tpe"
                       else optuna.samplers.NSGAIISampler(population_size=population, seed=seed))
            self.study = optuna.create_study(directions=["minimize"] * objectives,
                                             sampler=sampler)
        self._pending: list = []

    def _genes(self, method: str, values: dict[str, float]) -> dict:
        def anchors(prefix: str, expert: int) -> list[float]:
            return [values[f"{prefix}{expert}.{g}"] for g in range(self.groups)]
        return {"method": method,
                "weights": {e: anchors("w", i) for i, e in enumerate(self.experts)},
                "densities": {e: anchors("d", i) for i, e in enumerate(self.experts)},
                "lambda": values["lambda"]}

    def ask(self, n: int) -> list[dict]:
        if self.kind == "cmaes":
            self._pending = [self.optimizer.ask() for _ in range(n)]
            return [self._genes(c.value["method"], {
                name: low + float(u) * (high - low)
                for (name, (low, high)), u in zip(self.bounds.items(), c.value["unit"],
                                                  strict=True)}) for c in self._pending]
        self._pending = [self.study.ask() for _ in range(n)]
        return [self._genes(t.suggest_categorical("method", list(self.methods)),
                            {name: t.suggest_float(name, low, high)
                             for name, (low, high) in self.bounds.items()})
                for t in self._pending]

    def tell(self, rows: list[np.ndarray | None]) -> None:
        for pending, row in zip(self._pending, rows, strict=True):
            if self.kind == "cmaes":  # a failed candidate: worse than any accuracy
                self.optimizer.tell(pending, 1.0 if row is None else float(row[self.primary]))
            elif row is None:
                import optuna

                self.study.tell(pending, state=optuna.trial.TrialState.FAIL)
            else:
                self.study.tell(pending, [float(v) for v in row])
