"""Each estimator against hand computation, and all of them against simulated ground truth."""

from __future__ import annotations

import math

import pytest
import torch

from fitness.errors import FitnessError
from fitness.estimators import (
    ESTIMATORS,
    Conventions,
    ReducedEstimators,
    calibrate,
    task_accuracies,
)
from fitness.irt import IRTModel, fit_irt, simulate_responses
from fitness.reduced_sets import SELECTIONS, ReducedSet, select_items

F64 = torch.float64


def _flat_irt(n_items: int) -> IRTModel:
    """Every item: α = 1, β = 0."""
    return IRTModel(torch.ones(n_items, 1, dtype=F64), torch.zeros(n_items, dtype=F64),
                    torch.zeros(1, 1, dtype=F64))


def _solve(f, low=-10.0, high=10.0) -> float:
    for _ in range(200):  # bisection on a decreasing function
        mid = (low + high) / 2
        low, high = (mid, high) if f(mid) > 0 else (low, mid)
    return (low + high) / 2


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


TASK_OF = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
REDUCED = ReducedSet(torch.tensor([0, 2, 4, 5, 6]), torch.tensor([0.5, 0.5, 1 / 3, 1 / 3, 1 / 3],
                                                              dtype=F64), "random")
ANSWERS = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])


def test_weighted_mean_by_hand():
    estimate = ReducedEstimators(_flat_irt(8), TASK_OF, REDUCED).estimate("mean", ANSWERS)
    # task 0: (1 + 0)/2; smoothed p = 2/4; variance 0.25/2 · (4 − 2)/(4 − 1)
    # task 1: 2/3; smoothed p = 3/5; variance 0.24/3 · (4 − 3)/(4 − 1)
    v0, v1 = 0.25 / 2 * 2 / 3, 0.24 / 3 / 3
    assert estimate.mean.tolist() == pytest.approx([0.5, 2 / 3, (0.5 + 2 / 3) / 2])
    assert estimate.stderr.tolist() == pytest.approx([math.sqrt(v0), math.sqrt(v1),
                                                      math.sqrt(v0 + v1) / 2])


def test_pirt_by_hand():
    estimate = ReducedEstimators(_flat_irt(8), TASK_OF, REDUCED).estimate("pirt", ANSWERS)
    # MAP θ: Σ (y − σ(θ)) − θ = 0 with 3 of 5 right
    theta = _solve(lambda t: 3 - 5 * _sigmoid(t) - t)
    p = _sigmoid(theta)
    task0, task1 = (1 + 0 + 2 * p) / 4, (2 + p) / 4
    assert estimate.mean.tolist() == pytest.approx([task0, task1, (task0 + task1) / 2])
    variance_theta = 1 / (5 * p * (1 - p) + 1)
    slope = p * (1 - p)
    v0 = (2 * slope / 4) ** 2 * variance_theta + 2 * slope / 16
    assert float(estimate.stderr[0]) == pytest.approx(math.sqrt(v0))


def test_mpirt_by_hand():
    parents = torch.tensor([[-1.0], [2.0]], dtype=F64)
    estimate = ReducedEstimators(_flat_irt(8), TASK_OF, REDUCED).estimate("mpirt", ANSWERS,
                                                                         parents)
    # θ = −c₁ + 2c₂, prior c ~ N(1/2, 1); at the MAP the c-gradient vanishes:
    # Σ(y − σ(θ))·(−1) − (c₁ − ½) = 0 and Σ(y − σ(θ))·2 − (c₂ − ½) = 0 → c₁ − ½ = −g, c₂ − ½ = 2g
    # with g = 3 − 5σ(θ), so θ = −(½ − g) + 2(½ + 2g) = ½ + 5g
    theta = _solve(lambda t: 0.5 + 5 * (3 - 5 * _sigmoid(t)) - t)
    p = _sigmoid(theta)
    assert float(estimate.mean[0]) == pytest.approx((1 + 2 * p) / 4)
    assert float(estimate.mean[1]) == pytest.approx((2 + p) / 4)


@pytest.mark.parametrize(("blend", "model"), [("gpirt", "pirt"), ("gmpirt", "mpirt")])
def test_blends_weight_by_inverse_variance(blend, model):
    parents = torch.tensor([[-1.0], [2.0]], dtype=F64)
    estimators = ReducedEstimators(_flat_irt(8), TASK_OF, REDUCED)
    mean, mean_var = estimators.raw("mean", ANSWERS)
    irt, irt_var = estimators.raw(model, ANSWERS, parents)
    result = estimators.estimate(blend, ANSWERS, parents)
    share = irt_var / (irt_var + mean_var)
    assert torch.allclose(result.mean, share * mean + (1 - share) * irt)
    assert torch.allclose(result.stderr.pow(2), share**2 * mean_var + (1 - share) ** 2 * irt_var)


def _two_dimensional_irt() -> IRTModel:
    """Eight items that load on two axes differently, with varied difficulty."""
    alpha = torch.tensor([[1.2, 0.1], [0.4, 0.9], [0.8, -0.3], [1.5, 0.6], [0.2, 1.1],
                          [0.9, 0.9], [1.1, -0.5], [0.6, 0.3]], dtype=F64)
    beta = torch.tensor([0.3, -0.8, 1.1, 0.0, -0.4, 0.7, -1.2, 0.5], dtype=F64)
    return IRTModel(alpha, beta, torch.zeros(1, 2, dtype=F64))


def _merge3_by_hand(irt: IRTModel, answers: torch.Tensor, parents: torch.Tensor) -> list[float]:
    """MERGE³'s mp-IRT as its released code computes it, independently of ours: λ by
    unconstrained maximum likelihood (scipy's BFGS from 1/K), θ = Σ λₖθₖ, then p-IRT's count
    of the seen answers plus the predicted probability of every unseen item, per task."""
    from scipy.optimize import minimize

    alpha, beta = irt.discrimination.numpy(), irt.difficulty.numpy()
    seen = REDUCED.indices.numpy()
    y, theta_k = answers.numpy(), parents.numpy()

    def negative_log_likelihood(lam):
        logits = alpha[seen] @ (theta_k.T @ lam) - beta[seen]
        return float(sum(math.log1p(math.exp(-z)) if yj else math.log1p(math.exp(z))
                         for z, yj in zip(logits, y, strict=True)))

    k = len(theta_k)
    lam = minimize(negative_log_likelihood, [1 / k] * k, method="BFGS", options={"gtol": 1e-10}).x
    theta = theta_k.T @ lam
    p = [_sigmoid(float(alpha[j] @ theta - beta[j])) for j in range(8)]
    filled = dict(zip(seen.tolist(), y.tolist(), strict=True))
    tasks = [sum(filled.get(j, p[j]) for j in range(t * 4, t * 4 + 4)) / 4 for t in (0, 1)]
    return [*tasks, sum(tasks) / 2]


def test_mpirt_without_the_lambda_prior_is_merge3s_maximum_likelihood():
    irt = _two_dimensional_irt()
    parents = torch.tensor([[0.9, -0.4], [-0.3, 1.2]], dtype=F64)
    ours = ReducedEstimators(irt, TASK_OF, REDUCED, conventions=Conventions(lambda_prior=False))
    expected = _merge3_by_hand(irt, ANSWERS, parents)
    assert ours.estimate("mpirt", ANSWERS, parents).mean.tolist() == pytest.approx(expected,
                                                                                    abs=1e-6)
    # the prior (our default) pulls λ towards 1/K: a different, documented estimate
    with_prior = ReducedEstimators(irt, TASK_OF, REDUCED).estimate("mpirt", ANSWERS, parents)
    assert abs(float(with_prior.mean[-1]) - expected[-1]) > 1e-3


def test_merge3s_one_parent_rule_and_half_blend():
    irt = _two_dimensional_irt()
    parent = torch.tensor([[0.5, -0.2]], dtype=F64)
    estimators = ReducedEstimators(irt, TASK_OF, REDUCED, conventions=Conventions.merge3())
    # one parent: its θ as is, nothing fitted
    p = torch.sigmoid(irt.discrimination @ parent[0] - irt.difficulty)
    filled = p.clone()
    filled[REDUCED.indices] = ANSWERS.double()
    tasks = [float(filled[:4].mean()), float(filled[4:].mean())]
    result = estimators.estimate("mpirt", ANSWERS, parent)
    assert result.mean.tolist() == pytest.approx([*tasks, sum(tasks) / 2])
    # gmp-IRT: a fixed half of the weighted mean and half of mp-IRT
    mean, _ = estimators.raw("mean", ANSWERS)
    blended = estimators.estimate("gmpirt", ANSWERS, parent)
    assert torch.allclose(blended.mean, 0.5 * mean + 0.5 * result.mean)
    # ours fits a scale c·θ: another estimate
    scaled = ReducedEstimators(irt, TASK_OF, REDUCED).estimate("mpirt", ANSWERS, parent)
    assert abs(float(scaled.mean[-1]) - float(result.mean[-1])) > 1e-3


def test_maximum_likelihood_stays_finite_when_the_answers_separate():
    irt = _two_dimensional_irt()
    parents = torch.tensor([[0.9, -0.4], [-0.3, 1.2]], dtype=F64)
    estimators = ReducedEstimators(irt, TASK_OF, REDUCED, conventions=Conventions.merge3())
    for answers in (torch.ones(5), torch.zeros(5)):
        estimate = estimators.estimate("gmpirt", answers, parents)
        assert torch.isfinite(estimate.mean).all() and torch.isfinite(estimate.stderr).all()
    with pytest.raises(FitnessError, match="one_parent"):
        Conventions(one_parent="mean")


@pytest.mark.parametrize("selection", SELECTIONS)
def test_estimators_are_unbiased_within_their_stated_error(selection):
    responses, _, _, _ = simulate_responses(260, 600, dims=1, seed=11)
    task_of = torch.arange(600) % 3
    calibration, held = responses[:160], responses[160:]
    irt = fit_irt(calibration)
    reduced = select_items(selection, irt, task_of, 20, seed=1, responses=calibration)
    excess = calibrate(calibration, task_of, reduced, [[]] * 160)
    estimators = ReducedEstimators(irt, task_of, reduced, excess)
    truth = task_accuracies(held, task_of)[:, -1]
    for name in ("pirt", "gpirt") + (("mean",) if selection != "informative" else ()):
        estimates = [estimators.estimate(name, row[reduced.indices]).overall for row in held]
        means = torch.tensor([m for m, _ in estimates], dtype=F64)
        stderr = torch.tensor([s for _, s in estimates], dtype=F64)
        # one fixed item set serves every model (paired), so its sampling error is shared: the
        # bias over the population must stay within the stated error, not shrink with its size
        bias = float((means - truth).mean())
        assert abs(bias) <= float(stderr.mean()), (name, bias, float(stderr.mean()))
        covered = float(((means - truth).abs() <= 2 * stderr).double().mean())
        assert covered >= 0.85, (name, covered)


def test_bad_input_is_refused_not_passed_on_as_nan():
    irt = _flat_irt(8)
    with pytest.raises(FitnessError, match="reduced item set is empty"):
        ReducedEstimators(irt, TASK_OF, ReducedSet(torch.tensor([], dtype=torch.long),
                                                   torch.tensor([], dtype=F64), "random"))
    with pytest.raises(FitnessError, match="at least 1 item per task"):
        select_items("random", irt, TASK_OF, 0)
    estimators = ReducedEstimators(irt, TASK_OF, REDUCED)
    with pytest.raises(FitnessError, match="missing"):
        estimators.estimate("pirt", torch.tensor([1.0, float("nan"), 1.0, 0.0, 0.0]))
    with pytest.raises(FitnessError, match="expected 5 answers"):
        estimators.estimate("pirt", torch.ones(3))
    with pytest.raises(FitnessError, match="unknown estimator"):
        estimators.estimate("magic", ANSWERS)
    with pytest.raises(FitnessError, match="no item of some task"):
        ReducedEstimators(irt, TASK_OF, ReducedSet(torch.tensor([0]), torch.ones(1, dtype=F64),
                                                   "random"))
    assert set(ESTIMATORS) == {"mean", "pirt", "gpirt", "mpirt", "gmpirt"}
