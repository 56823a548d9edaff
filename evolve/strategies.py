"""Search strategies, ask/tell: they propose, a driver evaluates, they hear the objectives.

Strategies never evaluate anything themselves. Two drivers use them:

**Runs** (`evolve.engine.Evolution`, `evoforge run`) drive a `RecipeStrategy` over the merge
space: `ask(stream, size, population, matrix)` gives proposals (recipe, parents, operator),
`tell(proposals, rows)` their objective rows, in any order and any number at a time (a
generation's batch, or in steady-state mode one child as it finishes). `strategy:` in the run
config picks one:
- `RecipeGeneticStrategy` (`ga`, default): tournaments on rank and crowding, then crossover, an
  architecture edit, weight noise or gene mutation; survival is the engine's NSGA-II selection;
- `MergeGeneStrategy` (`cmaes`, `tpe`, `nsga2`): nevergrad's CMA-ES or optuna's samplers over a
  flat merge's genes.

**Benchmarks with a known answer** (`benchmarks/nas_search_quality.py`) drive genome strategies,
`ask()` → genomes, `tell(genomes, objectives)`, on any space that gives `random`, `crossover`
and `mutate`:
- `GeneticStrategy`: the same tournaments and NSGA-II survival (pymoo) as a run. It never re-asks
  a genome equivalent to one already evaluated: a space may define `canonical(genome)` (e.g.
  isomorphic architectures share one), so every evaluation of the budget is spent on something
  new;
- `RandomStrategy`: uniform samples, the baseline every search must beat;
- `OptunaStrategy`: optuna's multi-objective samplers (NSGA-II, TPE) through its ask/tell API.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from evolve.selection import rank_and_crowding, survivors, tournament

if TYPE_CHECKING:
    from evolve.config import RunConfig
    from operators.recipes import Recipe
    from search_spaces.merge_space import MergeSpace


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


@dataclass(frozen=True)
class Proposal:
    """A child a merge strategy asks to evaluate: its recipe, parents and the operator, and the
    strategy's own handle on it (an optuna trial, a nevergrad candidate) for `tell`."""

    recipe: Recipe
    parents: tuple[str, ...]
    operator: str
    handle: object = field(default=None, compare=False, repr=False)


class RecipeStrategy(Protocol):
    """What `evolve.engine.Evolution` drives, whatever the strategy.

    `ask` gets the current population (ids, with their objective rows to minimize) and returns
    `size` proposals, drawn from the random stream named `stream` (`gen/3` for a generation,
    `child/41` for one steady-state child: the same stream gives the same proposals on resume);
    `tell` gets proposals with one objective row each, None for a failed candidate. Survival
    (non-dominated sorting and crowding on stderr-aware rows) is the engine's, the same for every
    strategy, so the front is comparable across them.
    """

    def ask(self, stream: str, size: int, population: list[str],
            matrix: np.ndarray) -> list[Proposal]: ...

    def tell(self, proposals: list[Proposal], rows: list[np.ndarray | None]) -> None: ...


class RecipeGeneticStrategy:
    """The default: the GA over recipes. Binary tournaments on non-domination rank and crowding
    pick parents; each child comes from one operator drawn by its rate: crossover (of two
    parents), an architecture edit, weight noise, or else mutation of the merge genes.
    A stream draws from `random.Random(f"{seed}/{stream}")`, so a resumed run replays it.
    """

    def __init__(self, space: MergeSpace, recipes: Mapping[str, Recipe], crossover: float,
                 edit: float, weight_noise: float, seed: int = 0):
        self.space, self.recipes, self.seed = space, recipes, seed
        self.rates = {"crossover": crossover, "edit": edit, "weight-noise": weight_noise}

    def _child(self, rng: random.Random, pick) -> Proposal:
        first, roll = pick(), rng.random()
        recipe = self.recipes[first]
        if roll < self.rates["crossover"]:
            second = pick()
            for _ in range(3):  # a parent crossed with itself gives itself back
                if second != first:
                    break
                second = pick()
            return Proposal(self.space.crossover(rng, recipe, self.recipes[second]),
                            (first, second), "crossover")
        roll -= self.rates["crossover"]
        if roll < self.rates["edit"]:
            return Proposal(self.space.edit(rng, recipe), (first,), "edit")
        if roll < self.rates["edit"] + self.rates["weight-noise"]:
            return Proposal(self.space.mutate_weights(rng, recipe), (first,), "weight-noise")
        return Proposal(self.space.mutate_genes(rng, recipe), (first,), "mutation")

    def ask(self, stream: str, size: int, population: list[str],
            matrix: np.ndarray) -> list[Proposal]:
        rng = random.Random(f"{self.seed}/{stream}")
        rank, crowding = rank_and_crowding(matrix)
        return [self._child(rng, lambda: population[tournament(rng, rank, crowding)])
                for _ in range(size)]

    def tell(self, proposals: list[Proposal], rows: list[np.ndarray | None]) -> None:
        """Nothing to learn: the GA's memory is the population the engine keeps."""


class MergeGeneStrategy:
    """CMA-ES (nevergrad) or optuna's TPE / NSGA-II samplers over a flat merge's genes.

    The genes are those of `MergeSpace`: a method (categorical), per expert and layer group a
    weight in [0, 1.5] and a density in [0.05, 1], and λ in [0.2, 1.5]. They propose flat merges
    from their own model of the search, not from the population. optuna's samplers are
    multi-objective and see the whole row; CMA-ES minimizes one number, the row's `primary`
    column (the accuracy). All are seeded, so a run replays exactly on resume. Both libraries
    take results in any order, so several proposals may be out at once (steady-state mode).
    """

    KINDS = ("cmaes", "tpe", "nsga2")

    def __init__(self, kind: str, space: MergeSpace, objectives: int, budget: int,
                 seed: int = 0, primary: int = 0, population: int = 16):
        if kind not in self.KINDS:
            raise ValueError(f"unknown gene strategy {kind!r}; use one of {list(self.KINDS)}")
        self.kind, self.space, self.primary, self.seed = kind, space, primary, seed
        experts, groups = len(space.experts), space.groups
        self.bounds = ({f"w{e}.{g}": (0.0, 1.5) for e in range(experts) for g in range(groups)}
                       | {f"d{e}.{g}": (0.05, 1.0) for e in range(experts)
                          for g in range(groups)} | {"lambda": (0.2, 1.5)})
        if kind == "cmaes":
            import nevergrad as ng

            parametrization = ng.p.Dict(method=ng.p.Choice(list(space.methods)),
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

    def _genes(self, method: str, values: dict[str, float]) -> dict:
        def anchors(prefix: str, expert: int) -> list[float]:
            return [values[f"{prefix}{expert}.{g}"] for g in range(self.space.groups)]
        experts = self.space.experts
        return {"method": method,
                "weights": {e: anchors("w", i) for i, e in enumerate(experts)},
                "densities": {e: anchors("d", i) for i, e in enumerate(experts)},
                "lambda": values["lambda"]}

    def _ask_genes(self) -> tuple[object, dict]:
        """One proposal's handle and genes."""
        if self.kind == "cmaes":
            candidate = self.optimizer.ask()
            return candidate, self._genes(candidate.value["method"], {
                name: low + float(u) * (high - low)
                for (name, (low, high)), u in zip(self.bounds.items(), candidate.value["unit"],
                                                  strict=True)})
        trial = self.study.ask()
        return trial, self._genes(trial.suggest_categorical("method", list(self.space.methods)),
                                  {name: trial.suggest_float(name, low, high)
                                   for name, (low, high) in self.bounds.items()})

    def ask(self, stream: str, size: int, population: list[str],
            matrix: np.ndarray) -> list[Proposal]:
        rng = random.Random(f"{self.seed}/{stream}")  # the merges' own seeds
        proposals = []
        for _ in range(size):
            handle, genes = self._ask_genes()
            proposals.append(Proposal(self.space.from_genes(genes, rng.randrange(2**31)),
                                      tuple(self.space.experts), self.kind, handle))
        return proposals

    def tell(self, proposals: list[Proposal], rows: list[np.ndarray | None]) -> None:
        for proposal, row in zip(proposals, rows, strict=True):
            if self.kind == "cmaes":  # a failed candidate: worse than any accuracy
                self.optimizer.tell(proposal.handle,
                                    1.0 if row is None else float(row[self.primary]))
            elif row is None:
                import optuna

                self.study.tell(proposal.handle, state=optuna.trial.TrialState.FAIL)
            else:
                self.study.tell(proposal.handle, [float(v) for v in row])


def recipe_strategy(config: RunConfig, space: MergeSpace,
                    recipes: Mapping[str, Recipe]) -> RecipeStrategy:
    """The strategy a run config names (`strategy:`), over the run's merge space."""
    if config.strategy == "ga":
        operators = config.operators
        return RecipeGeneticStrategy(space, recipes, operators.crossover.rate,
                                     operators.edit.rate, operators.weight_noise.rate,
                                     config.seed)
    objectives = list(config.objectives)
    return MergeGeneStrategy(config.strategy, space, len(objectives),
                             sum(config.generation_sizes()), config.seed,
                             objectives.index("accuracy") if "accuracy" in objectives else 0,
                             config.population)
