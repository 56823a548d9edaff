"""Full-split accuracy from a reduced set of answers, each estimate with a standard error.

Targets are each task's accuracy on its full search split and their mean (the fitness); inside
a run that "split" is the item bank, whose sampling error `fitness.reduced_fitness` adds. A
candidate answers only the reduced set S; y are its 0/1 answers there.

- `mean` — the weighted mean Σ vⱼ yⱼ of the reduced set (weights from the item selection). Its
  variance is the sampling variance: p(1 − p)/n with the finite-population correction for a random
  set, Σ vⱼ² p(1 − p) for weighted sets (p smoothed as (k + 1)/(n + 2) so that 0/n or n/n answers
  do not claim zero variance).
- `pirt` — p-IRT (tinyBenchmarks): fit the candidate's ability θ̂ from y (item parameters fixed,
  MAP with a N(0, I) prior), then count the answered items as answered and predict the rest:
  (Σ_S yⱼ + Σ_{not S} pⱼ(θ̂)) / N. Variance: the delta method through θ̂'s Laplace covariance, plus
  the Bernoulli variance of the predicted items.
- `gpirt` — gp-IRT (tinyBenchmarks): λ·mean + (1 − λ)·pirt, with λ the inverse-variance weight
  Vₚ/(Vₚ + Vₘ) of the two calibrated variances: the weighted mean is unbiased but noisy, p-IRT
  precise but biased where the IRT model is wrong; the blend takes the better of each.
- `mpirt` — mp-IRT (MERGE³): a merge's ability is a combination of its parents' abilities,
  θ = Σₖ cₖ θₖ; the few answers fit the K coefficients c instead of a free θ, which is far better
  determined from a few dozen answers. Then as p-IRT. Without parents it is p-IRT.
- `gmpirt` — gmp-IRT (MERGE³): the gp-IRT blend of `mean` and `mpirt`.

**Conventions** (`Conventions`; each switch names the source it follows, defaults are ours):
- `lambda_prior`: on (ours) puts a N(1/K, 1) prior on the coefficients c, which keeps the fit
  finite when a candidate answers every reduced item alike; off is MERGE³'s released code
  (mergenetic): unconstrained maximum likelihood from c = 1/K (it may run far when the answers
  separate; the Newton steps are clamped, so it stays finite, and the cross-fitted τ² says how
  far off that leaves it).
- `one_parent`: `scale` (ours) fits c·θ₁ (a merge of one parent and the base moves along its
  parent's ability); `parent` is MERGE³'s: the parent's θ as is, nothing fitted.
- `blend`: `variance` (ours, tinyBenchmarks' spirit) weights the two parts of gp-IRT and
  gmp-IRT by their calibrated variances; `half` is MERGE³'s fixed 0.5.

**Honest uncertainty.** Model-based variances ignore that the IRT model is wrong in places. Each
estimator is therefore calibrated on the calibration candidates by cross-fitting: the IRT model is
refitted without a fold of candidates, the held-out candidates are estimated from their reduced
answers, and the excess of the squared errors over the model-based variances (τ², per target)
is added to every later variance: stderr = √(V + τ²).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fitness.errors import FitnessError
from fitness.irt import MODELS_PER_DIMENSION, IRTModel, _newton_rows, fit_irt
from fitness.reduced_sets import ReducedSet, finite_population, smoothed_spread

ESTIMATORS = ("mean", "pirt", "gpirt", "mpirt", "gmpirt")
BLENDS = {"gpirt": "pirt", "gmpirt": "mpirt"}
ONE_PARENT_RULES = ("scale", "parent")
BLEND_RULES = ("variance", "half")


@dataclass(frozen=True)
class Conventions:
    """How mp-IRT and the blends are computed; see the module docstring for each switch's source.
    `Conventions.merge3()` is MERGE³'s released code."""

    lambda_prior: bool = True
    one_parent: str = "scale"
    blend: str = "variance"

    def __post_init__(self) -> None:
        if self.one_parent not in ONE_PARENT_RULES:
            raise FitnessError(f"one_parent: {self.one_parent!r} is not a rule; use one of "
                               f"{ONE_PARENT_RULES}")
        if self.blend not in BLEND_RULES:
            raise FitnessError(f"blend: {self.blend!r} is not a rule; use one of {BLEND_RULES}")

    @classmethod
    def merge3(cls) -> Conventions:
        return cls(lambda_prior=False, one_parent="parent", blend="half")


@dataclass(frozen=True)
class Estimate:
    """Per target (each task, then the mean over tasks): an estimate and its standard error."""

    mean: torch.Tensor  # (tasks + 1,)
    stderr: torch.Tensor  # (tasks + 1,)

    @property
    def overall(self) -> tuple[float, float]:
        return float(self.mean[-1]), float(self.stderr[-1])


def task_accuracies(responses: torch.Tensor, task_of: torch.Tensor) -> torch.Tensor:
    """(models × items) answers → (models × (tasks + 1)) full-split accuracies and their mean."""
    tasks = int(task_of.max()) + 1
    per_task = torch.stack([responses[:, task_of == t].double().mean(1) for t in range(tasks)], 1)
    return torch.cat([per_task, per_task.mean(1, keepdim=True)], 1)


class ReducedEstimators:
    """The estimators for one IRT model and one reduced set (shared by a generation)."""

    def __init__(self, irt: IRTModel, task_of: torch.Tensor, reduced: ReducedSet,
                 excess: dict[str, torch.Tensor] | None = None,
                 conventions: Conventions = Conventions()):
        if len(reduced) == 0:
            raise FitnessError("the reduced item set is empty: nothing to estimate from; use at "
                               "least one item per task")
        if irt.n_items != len(task_of):
            raise FitnessError(f"the IRT model has {irt.n_items} items but the pool has "
                               f"{len(task_of)}; refit it on this pool")
        self.irt, self.task_of, self.reduced = irt, task_of, reduced
        self.conventions = conventions
        self.tasks = int(task_of.max()) + 1
        self.sizes = torch.bincount(task_of, minlength=self.tasks).double()
        self.reduced_task = task_of[reduced.indices]
        if set(self.reduced_task.tolist()) != set(range(self.tasks)):
            raise FitnessError("the reduced set has no item of some task; every task needs one")
        self.unasked = torch.ones(len(task_of), dtype=torch.bool)
        self.unasked[reduced.indices] = False
        zero = torch.zeros(self.tasks + 1, dtype=torch.float64)
        self.excess = {name: zero for name in ESTIMATORS} | (excess or {})

    # -- raw estimators: (mean, model-based variance) per target ----------------------------

    def _mean(self, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, v = answers.double(), self.reduced.weights
        means, variances = torch.zeros(self.tasks), torch.zeros(self.tasks)
        means, variances = means.double(), variances.double()
        for t in range(self.tasks):
            here = self.reduced_task == t
            n = here.sum().double()
            means[t] = (v[here] * y[here]).sum()
            spread = smoothed_spread(y[here].sum(), n)
            if self.reduced.method == "random":
                variances[t] = spread * finite_population(n, self.sizes[t])
            else:
                variances[t] = spread * v[here].pow(2).sum()
        return (torch.cat([means, means.mean()[None]]),
                torch.cat([variances, variances.sum()[None] / self.tasks ** 2]))

    def _predict(self, answers: torch.Tensor, theta: torch.Tensor, covariance: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.irt.probabilities(theta[None])[0]
        filled = p.clone()
        filled[self.reduced.indices] = answers.double()
        spread = torch.where(self.unasked, p * (1 - p), torch.zeros_like(p))
        slopes = spread[:, None] * self.irt.discrimination  # d p / d θ on unasked items
        means, gradients, noise = [], [], []
        for t in range(self.tasks):
            here = self.task_of == t
            means.append(filled[here].sum() / self.sizes[t])
            gradients.append(slopes[here].sum(0) / self.sizes[t])
            noise.append(spread[here].sum() / self.sizes[t] ** 2)
        means.append(torch.stack(means).mean())
        gradients.append(torch.stack(gradients).mean(0))
        noise.append(torch.stack(noise).sum() / self.tasks ** 2)
        g = torch.stack(gradients)
        variances = (g @ covariance * g).sum(1) + torch.stack(noise)
        return torch.stack(means), variances

    def _pirt(self, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta, covariance = self.irt.fit_ability(answers, self.reduced.indices)
        return self._predict(answers, theta, covariance)

    def _mpirt(self, answers: torch.Tensor, parents: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if parents is None or len(parents) == 0:
            return self._pirt(answers)
        parents = parents.double()
        if len(parents) == 1 and self.conventions.one_parent == "parent":
            return self._predict(answers, parents[0], torch.zeros(self.irt.dims, self.irt.dims,
                                                                  dtype=torch.float64))
        k = len(parents)
        items = self.reduced.indices
        design = self.irt.discrimination[items] @ parents.T  # logit_j = c·(Θ αⱼ) − βⱼ
        coefficients = torch.full((1, k), 1.0 / k, dtype=torch.float64)
        y = answers.double()[None]
        weight = torch.ones_like(y)
        # off: no prior; 1e-10 only keeps the Newton system solvable when parents coincide
        precision_prior = torch.full((k,), 1.0 if self.conventions.lambda_prior else 1e-10,
                                     dtype=torch.float64)
        offset = -self.irt.difficulty[items]
        for _ in range(50):
            new, _ = _newton_rows(design, coefficients, y, weight, offset, 1.0 / k,
                                  precision_prior)
            done = (new - coefficients).abs().max() < 1e-10
            coefficients = new
            if done:
                break
        _, precision = _newton_rows(design, coefficients, y, weight, offset, 1.0 / k,
                                    precision_prior)
        # without the prior the information can be singular (parents' abilities in line)
        covariance = parents.T @ torch.linalg.pinv(precision[0]) @ parents
        return self._predict(answers, parents.T @ coefficients[0], covariance)

    def _blend(self, base: tuple[torch.Tensor, torch.Tensor], name: str,
               model: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mean_variance = base[1] + self.excess["mean"]
        model_variance = model[1] + self.excess[name]
        if self.conventions.blend == "half":
            share = torch.full_like(mean_variance, 0.5)
        else:
            share = model_variance / (model_variance + mean_variance).clamp_min(1e-12)
        return (share * base[0] + (1 - share) * model[0],
                share.pow(2) * mean_variance + (1 - share).pow(2) * model_variance)

    def raw(self, name: str, answers: torch.Tensor, parents: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "mean":
            return self._mean(answers)
        if name == "pirt":
            return self._pirt(answers)
        if name == "mpirt":
            return self._mpirt(answers, parents)
        if name in BLENDS:
            model = self._pirt(answers) if name == "gpirt" else self._mpirt(answers, parents)
            return self._blend(self._mean(answers), BLENDS[name], model)
        raise FitnessError(f"unknown estimator {name!r}; use one of {ESTIMATORS}")

    def estimate(self, name: str, answers: torch.Tensor, parents: torch.Tensor | None = None
                 ) -> Estimate:
        """Estimate (with calibrated stderr) from the answers to the reduced set, in its order."""
        if answers.shape != (len(self.reduced),):
            raise FitnessError(f"expected {len(self.reduced)} answers (one per reduced item), "
                               f"got shape {tuple(answers.shape)}")
        if torch.isnan(answers.double()).any():
            raise FitnessError("an answer is missing (NaN); evaluate every item of the reduced set")
        mean, variance = self.raw(name, answers, parents)
        stderr = (variance + self.excess[name]).clamp_min(0).sqrt()
        if not (torch.isfinite(mean).all() and torch.isfinite(stderr).all()):
            raise FitnessError(f"estimator {name} produced a non-finite estimate; refusing to "
                               "pass it to selection")
        return Estimate(mean.clamp(0, 1), stderr)


def calibrate(responses: torch.Tensor, task_of: torch.Tensor, reduced: ReducedSet,
              parent_rows: Sequence[Sequence[torch.Tensor]], dims: int = 1, folds: int = 5,
              seed: int = 0,
              conventions: Conventions = Conventions()) -> dict[str, torch.Tensor]:
    """τ² per estimator and target, by cross-fitting on fully evaluated calibration candidates.

    `parent_rows[m]` holds the answers of candidate m's parents over the whole pool (NaN where a
    parent was not asked; empty for seeds); their abilities come from those answers under each
    fold's IRT model.
    """
    n = len(responses)
    needed = math.ceil(MODELS_PER_DIMENSION * (dims + 1) * folds / (folds - 1))
    if n < needed:
        raise FitnessError(
            f"{n} fully evaluated calibration candidates are too few to cross-fit the standard "
            f"errors of a {dims}-dimensional IRT model: each fold's fit needs "
            f"{MODELS_PER_DIMENSION * (dims + 1)}, so calibrate with at least {needed} (or fewer "
            "dimensions)")
    truth = task_accuracies(responses, task_of)
    raw: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {e: [None] * n for e in ESTIMATORS}
    models = {}
    for held, irt in _fold_fits(responses, dims, folds, seed):
        estimators = ReducedEstimators(irt, task_of, reduced, conventions=conventions)
        for m in held.tolist():
            answers = responses[m, reduced.indices]
            parents = torch.stack([_ability(irt, row) for row in parent_rows[m]]) \
                if parent_rows[m] else None
            for name in ("mean", "pirt", "mpirt"):
                raw[name][m] = estimators.raw(name, answers, parents)
            models[m] = (estimators, answers, parents)
    excess = {name: _excess(raw[name], truth) for name in ("mean", "pirt", "mpirt")}
    for blend, component in BLENDS.items():
        for m, (estimators, _answers, _parents) in models.items():
            estimators.excess = excess | {e: torch.zeros_like(excess["mean"]) for e in BLENDS}
            raw[blend][m] = estimators._blend(raw["mean"][m], component, raw[component][m])
        excess[blend] = _excess(raw[blend], truth)
    return excess


def _ability(irt: IRTModel, row: torch.Tensor) -> torch.Tensor:
    """The ability behind a row of answers over the pool (NaN: not asked)."""
    asked = ~torch.isnan(row)
    return irt.fit_ability(row[asked], torch.nonzero(asked).flatten())[0]


_FOLD_FITS: dict[tuple, list[tuple[torch.Tensor, IRTModel]]] = {}


def _fold_fits(responses: torch.Tensor, dims: int, folds: int, seed: int
               ) -> list[tuple[torch.Tensor, IRTModel]]:
    """(held-out rows, IRT fitted without them) per fold; memoized on the matrix's content,
    since every stage and generation between two refits cross-fits the same matrix."""
    key = (dims, folds, seed, tuple(responses.shape),
           hashlib.sha256(responses.double().numpy().tobytes()).hexdigest())
    if key not in _FOLD_FITS:
        order = torch.randperm(len(responses), generator=torch.Generator().manual_seed(seed))
        fits = []
        for fold in range(folds):
            held = order[fold::folds]
            kept = torch.ones(len(responses), dtype=torch.bool)
            kept[held] = False
            fits.append((held, fit_irt(responses[kept], dims)))
        _FOLD_FITS.clear()  # one matrix at a time: the calibration matrix only grows
        _FOLD_FITS[key] = fits
    return _FOLD_FITS[key]


def _excess(results: list[tuple[torch.Tensor, torch.Tensor]], truth: torch.Tensor) -> torch.Tensor:
    means = torch.stack([r[0] for r in results])
    variances = torch.stack([r[1] for r in results])
    squared = (means.clamp(0, 1) - truth).pow(2)
    return (squared.mean(0) - variances.mean(0)).clamp_min(0)
