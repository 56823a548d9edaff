"""Search strategies, ask/tell: they propose, a driver evaluates, they hear the objectives.

Strategies never evaluate anything themselves. Every driver speaks one protocol, `Strategy`:
`ask(stream, size, population, matrix)` gives proposals (a genome, its parents, the operator),
`tell(proposals, rows)` their objective rows, in any order and any number at a time (a
generation's batch, or in steady-state mode one child as it finishes). Two drivers use it: runs
(`evolve.engine.Evolution`, `evoforge run`, over the merge space, where a genome is a recipe) and
the search-quality benchmark (`benchmarks/nas_search_quality.py`, over NAS-Bench-Graph, where a
genome is an architecture), so the GA the benchmark measures is the GA a run uses, behind the
same `Breeder`. `strategy:` in a run config picks one:
- `GeneticStrategy` (`ga`, default): tournaments on rank and crowding, then crossover, an
  architecture edit, weight noise or mutation; survival is the driver's NSGA-II selection;
- `MergeGeneStrategy` (`cmaes`, `tpe`, `nsga2`): nevergrad's CMA-ES or optuna's samplers over a
  flat merge's genes.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from evolve.selection import rank_and_crowding, tournament

if TYPE_CHECKING:
    from evolve.config import RunConfig
    from operators.recipes import Recipe
    from search_spaces.merge_space import MergeSpace


@dataclass(frozen=True)
class Proposal:
    """A child a strategy asks to evaluate: its genome (a recipe in runs), parents and the
    operator, and the strategy's own handle on it (an optuna trial, a nevergrad candidate) for
    `tell`."""

    genome: Any
    parents: tuple[str, ...]
    operator: str
    handle: object = field(default=None, compare=False, repr=False)


class Strategy(Protocol):
    """What a driver (a run's `Evolution`, the search-quality benchmark) drives.

    `ask` gets the current population (ids, with their objective rows to minimize) and returns
    `size` proposals, drawn from the random stream named `stream` (`gen/3` for a generation,
    `child/41` for one steady-state child: the same stream gives the same proposals on resume);
    `tell` gets proposals with one objective row each, None for a failed candidate. Survival
    (non-dominated sorting and crowding on stderr-aware rows) is the driver's, the same for every
    strategy, so the front is comparable across them.
    """

    def ask(self, stream: str, size: int, population: list[str],
            matrix: np.ndarray) -> list[Proposal]: ...

    def tell(self, proposals: list[Proposal], rows: list[np.ndarray | None]) -> None: ...


# Operators with a rate besides crossover, by name: the space's method that applies one. A space
# offers `crossover(rng, a, b)` and `mutate(rng, genome)` (the remainder), these only where their
# rate is above 0.
RATED_UNARY_OPERATORS = {"edit": "edit", "weight-noise": "mutate_weights"}


class GeneticStrategy:
    """The default: a GA over any space's genomes. Binary tournaments on non-domination rank and
    crowding pick parents; each child comes from one operator drawn by its rate (`rates`:
    crossover of two parents, `edit`, `weight-noise`); the remainder is mutation.
    A stream draws from `random.Random(f"{seed}/{stream}")`, so a resumed run replays it.
    """

    def __init__(self, space: Any, genomes: Mapping[str, Any], rates: Mapping[str, float],
                 seed: int = 0):
        unknown = set(rates) - {"crossover", *RATED_UNARY_OPERATORS}
        if unknown:
            raise ValueError(f"unknown operator rates {sorted(unknown)}: give crossover, edit "
                             "and weight-noise; mutation takes the remainder")
        if sum(rates.values()) > 1 + 1e-9:
            raise ValueError(f"operator rates sum to {sum(rates.values()):.3f} > 1")
        self.space, self.genomes, self.seed = space, genomes, seed
        self.rates = {name: rate for name, rate in rates.items() if rate > 0}

    def _child(self, rng: random.Random, pick) -> Proposal:
        first, roll = pick(), rng.random()
        genome = self.genomes[first]
        if roll < self.rates.get("crossover", 0.0):
            second = pick()
            for _ in range(3):  # a parent crossed with itself gives itself back
                if second != first:
                    break
                second = pick()
            return Proposal(self.space.crossover(rng, genome, self.genomes[second]),
                            (first, second), "crossover")
        roll -= self.rates.get("crossover", 0.0)
        for operator, method in RATED_UNARY_OPERATORS.items():
            if roll < self.rates.get(operator, 0.0):
                return Proposal(getattr(self.space, method)(rng, genome), (first,), operator)
            roll -= self.rates.get(operator, 0.0)
        return Proposal(self.space.mutate(rng, genome), (first,), "mutation")

    def ask(self, stream: str, size: int, population: list[str],
            matrix: np.ndarray) -> list[Proposal]:
        rng = random.Random(f"{self.seed}/{stream}")
        rank, crowding = rank_and_crowding(matrix)
        return [self._child(rng, lambda: population[tournament(rng, rank, crowding)])
                for _ in range(size)]

    def tell(self, proposals: list[Proposal], rows: list[np.ndarray | None]) -> None:
        """Nothing to learn: the GA's memory is the population the driver keeps."""


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
                    recipes: Mapping[str, Recipe]) -> Strategy:
    """The strategy a run config names (`strategy:`), over the run's space (a code search: the
    GA, crossover by its rate and mutation the rest)."""
    if config.search_space != "merge":
        return GeneticStrategy(space, recipes, {"crossover": config.operators.crossover.rate},
                               config.seed)
    if config.strategy == "ga":
        operators = config.operators
        return GeneticStrategy(space, recipes, {"crossover": operators.crossover.rate,
                                                "edit": operators.edit.rate,
                                                "weight-noise": operators.weight_noise.rate},
                               config.seed)
    objectives = list(config.objectives)
    return MergeGeneStrategy(config.strategy, space, len(objectives),
                             sum(config.generation_sizes()), config.seed,
                             objectives.index("accuracy") if "accuracy" in objectives else 0,
                             config.population)
