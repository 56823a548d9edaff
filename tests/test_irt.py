"""IRT fitting on simulated responses with known parameters, and its bad input."""

from __future__ import annotations

import pytest
import torch

from fitness.irt import IRTError, fit_irt, simulate_responses


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_2pl_recovers_known_abilities_and_difficulties():
    responses, theta, alpha, beta = simulate_responses(300, 400, dims=1, seed=1)
    fit = fit_irt(responses, dims=1)
    assert _corr(fit.abilities[:, 0], theta[:, 0]) >= 0.95
    assert _corr(fit.difficulty, beta) >= 0.95
    assert _corr(fit.discrimination[:, 0], alpha[:, 0]) >= 0.7


def test_multidimensional_2pl_uses_its_extra_axes():
    # half the items measure one ability, half another: one axis cannot explain both
    generator = torch.Generator().manual_seed(2)
    theta = torch.randn(300, 2, generator=generator, dtype=torch.float64)
    alpha = torch.zeros(400, 2, dtype=torch.float64)
    alpha[:200, 0], alpha[200:, 1] = 1.5, 1.5
    beta = torch.randn(400, generator=generator, dtype=torch.float64)
    truth = torch.sigmoid(theta @ alpha.T - beta)
    responses = (torch.rand(truth.shape, generator=generator, dtype=torch.float64) < truth).double()
    one, two = fit_irt(responses, dims=1), fit_irt(responses, dims=2)
    fit_one = _corr(one.probabilities(one.abilities).flatten(), truth.flatten())
    fit_two = _corr(two.probabilities(two.abilities).flatten(), truth.flatten())
    assert fit_two >= 0.9 and fit_two > fit_one + 0.1
    assert _corr(two.difficulty, beta) >= 0.9


def test_missing_responses_are_skipped():
    responses, theta, _, _ = simulate_responses(200, 300, seed=3)
    holes = torch.rand(responses.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    fit = fit_irt(responses.masked_fill(holes, float("nan")))
    assert _corr(fit.abilities[:, 0], theta[:, 0]) >= 0.9


def test_constant_columns_fall_back_to_the_prior():
    responses, _, _, _ = simulate_responses(60, 50, seed=4)
    responses[:, 0] = 1.0
    responses[:, 1] = 0.0
    fit = fit_irt(responses)
    assert fit.constant_items == (0, 1)
    p = fit.probabilities(fit.abilities)
    assert torch.isfinite(p).all()
    assert 0.8 < float(p[:, 0].mean()) < 1 and 0 < float(p[:, 1].mean()) < 0.2


def test_ability_of_a_new_model_from_few_items():
    responses = simulate_responses(301, 400, seed=5)[0]
    fit = fit_irt(responses[1:])
    items = torch.arange(0, 400, 4)
    estimate, covariance = fit.fit_ability(responses[0, items], items)
    full, _ = fit.fit_ability(responses[0], torch.arange(400))
    assert abs(float(estimate[0] - full[0])) <= 3 * float(covariance[0, 0].sqrt())


def test_bad_response_matrices_are_refused():
    with pytest.raises(IRTError, match="too few for a 3-dimensional IRT model"):
        fit_irt(simulate_responses(12, 30, seed=7)[0], dims=3)
    with pytest.raises(IRTError, match=r"0 \(wrong\), 1 \(right\) or NaN"):
        fit_irt(torch.full((20, 5), 0.5))
    with pytest.raises(IRTError, match="2-D"):
        fit_irt(torch.ones(10))
    column = simulate_responses(20, 5, seed=8)[0]
    column[:, 2] = float("nan")
    with pytest.raises(IRTError, match="no response at all"):
        fit_irt(column)
