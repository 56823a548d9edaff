"""Item response theory: 2PL and multidimensional 2PL, fitted in torch by MAP.

P(model i answers item j correctly) = σ(αⱼ·θᵢ − βⱼ), with θᵢ ∈ ℝᴰ the model's ability, αⱼ ∈ ℝᴰ
the item's discrimination and βⱼ its difficulty. D = 1 is the classic 2PL; D > 1 is the
multidimensional 2PL (tinyBenchmarks, MERGE³).

Priors make the fit well-posed with few models: θ ~ N(0, I), βⱼ ~ N(0, 3²) and αⱼ ~ N(e₁, I)
(mean 1 on the first axis, whose sign the fit anchors to the models' success rates). They are
also the documented fallback for items every calibration model answers alike (a constant
column): the likelihood alone would push βⱼ to ±∞; the prior keeps it finite and large, so such
an item predicts "always right" (or "always wrong") with high but not absolute confidence. They
are listed in `IRTModel.constant_items`.

The fit alternates batched Newton steps: all abilities given the items, then all items given the
abilities, each a batch of small ridge-logistic problems. After each ability step the abilities are
standardized (the prior's location and scale) and the items absorb the shift, which removes the
direction plain alternation crawls along: about ten rounds converge. Missing responses (NaN) are
skipped. A 500 × 5,000 matrix fits in about a second on 2 CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fitness.errors import FitnessError

DIFFICULTY_PRIOR_SD = 3.0
MODELS_PER_DIMENSION = 5


class IRTError(FitnessError):
    """An IRT model cannot be fitted or used as asked."""


@dataclass(frozen=True)
class IRTModel:
    discrimination: torch.Tensor  # (items, D)
    difficulty: torch.Tensor  # (items,)
    abilities: torch.Tensor  # (calibration models, D)
    constant_items: tuple[int, ...] = ()

    @property
    def dims(self) -> int:
        return self.discrimination.shape[1]

    @property
    def n_items(self) -> int:
        return self.difficulty.shape[0]

    def probabilities(self, abilities: torch.Tensor, items: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """P(correct) of each ability row on each item (all items, or the `items` indices)."""
        alpha = self.discrimination if items is None else self.discrimination[items]
        beta = self.difficulty if items is None else self.difficulty[items]
        return torch.sigmoid(abilities @ alpha.T - beta)

    def fit_ability(self, responses: torch.Tensor, items: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MAP ability from 0/1 answers to `items` (item parameters fixed) and its covariance.

        The covariance is the Laplace approximation: the inverse posterior precision at the MAP.
        """
        alpha, beta = self.discrimination[items], self.difficulty[items]
        y = responses.double().cpu()[None, :]
        weight = torch.ones(1, len(items), dtype=torch.float64)
        theta = torch.zeros(1, self.dims, dtype=torch.float64)
        ones = torch.ones(self.dims, dtype=torch.float64)
        for _ in range(50):  # Newton on a concave log-posterior
            new, _ = _newton_rows(alpha, theta, y, weight, -beta, 0.0, ones)
            converged = (new - theta).abs().max() < 1e-10
            theta = new
            if converged:
                break
        _, precision = _newton_rows(alpha, theta, y, weight, -beta, 0.0, ones)
        return theta[0], torch.linalg.inv(precision[0])


def _check_responses(responses: torch.Tensor, dims: int) -> torch.Tensor:
    if responses.dim() != 2 or responses.numel() == 0:
        raise IRTError(f"the response matrix must be 2-D (models × items) and non-empty, got "
                       f"shape {tuple(responses.shape)}")
    values = responses.double()
    observed = ~torch.isnan(values)
    if not bool(((values[observed] == 0) | (values[observed] == 1)).all()):
        raise IRTError("responses must be 0 (wrong), 1 (right) or NaN (not asked)")
    needed = MODELS_PER_DIMENSION * (dims + 1)
    if responses.shape[0] < needed:
        raise IRTError(
            f"{responses.shape[0]} calibration models are too few for a {dims}-dimensional IRT "
            f"model: it needs at least {needed} ({MODELS_PER_DIMENSION} per parameter of an item)."
            " Evaluate more calibration candidates fully, or lower the dimensions")
    if bool((observed.sum(0) == 0).any()):
        raise IRTError("some items have no response at all; drop them or evaluate them")
    return values


def _newton_rows(design: torch.Tensor, params: torch.Tensor, y: torch.Tensor,
                 weight: torch.Tensor, offset: torch.Tensor | float, prior_mean: torch.Tensor | float,
                 prior_precision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Newton step for every row of `params` at once: independent ridge-logistic problems.

    Row r's logits are design @ params[r] + offset; the prior on a row is N(prior_mean,
    1/prior_precision). Returns the stepped rows and each row's negative Hessian (its posterior
    precision at the old point), a batch of small K × K matrices.
    """
    p = torch.sigmoid(params @ design.T + offset)
    k = design.shape[1]
    gradient = (weight * (y - p)) @ design - prior_precision * (params - prior_mean)
    outer = (design[:, :, None] * design[:, None, :]).reshape(-1, k * k)
    precision = ((weight * p * (1 - p)) @ outer).reshape(-1, k, k) + torch.diag_embed(
        prior_precision.expand_as(params))
    step = torch.linalg.solve(precision, gradient.unsqueeze(-1)).squeeze(-1)
    return params + step.clamp(-2.0, 2.0), precision


def fit_irt(responses: torch.Tensor, dims: int = 1, max_rounds: int = 60,
            tolerance: float = 1e-6) -> IRTModel:
    """MAP fit of a (multidimensional) 2PL model to a models × items 0/1/NaN matrix.

    Runs on the matrix's device (CPU or GPU); the fitted parameters come back on the CPU.

    Alternating Newton: all abilities given the items, then all items given the abilities, each
    a batch of small ridge-logistic Newton steps. One-dimensional fits converge in a few dozen
    rounds. With several dimensions and few models per item parameter the posterior is nearly
    flat along some directions, and the steps crawl along them without meeting the tolerance;
    `max_rounds` then acts as early stopping. 60 rounds gave the same fitness-check accuracy as
    200 for random / gpirt at 20× (MAE 1.16 vs 1.15 points, Spearman 0.854 vs 0.855) in a third
    of the time.
    """
    if dims < 1:
        raise IRTError(f"dims must be >= 1, got {dims}")
    values = _check_responses(responses, dims)
    device = values.device
    observed = ~torch.isnan(values)
    weight = observed.double()
    y = torch.where(observed, values, torch.zeros_like(values))
    n_models, n_items = values.shape
    generator = torch.Generator().manual_seed(0)
    # abilities start at the models' (standardized) success rates, which fixes the axis' sign
    rate = torch.logit((y.sum(1) / weight.sum(1)).clamp(0.02, 0.98))
    theta = 0.1 * torch.randn(n_models, dims, generator=generator, dtype=torch.float64).to(device)
    theta[:, 0] = (rate - rate.mean()) / (rate.std() + 1e-6) if n_models > 1 else 0.0
    # item parameters φⱼ = (αⱼ, βⱼ); the logit is (θᵢ, −1)·φⱼ
    item_prior_mean = torch.zeros(dims + 1, dtype=torch.float64, device=device)
    item_prior_mean[0] = 1.0
    item_precision = torch.ones(dims + 1, dtype=torch.float64, device=device)
    item_precision[-1] = DIFFICULTY_PRIOR_SD ** -2
    items = item_prior_mean.repeat(n_items, 1)
    # small random loadings on the extra axes: at exactly zero they would stay zero (no gradient)
    items[:, 1:-1] = 0.1 * torch.randn(n_items, dims - 1, generator=generator,
                                       dtype=torch.float64).to(device)
    items[:, -1] = -torch.logit((y.sum(0) / weight.sum(0)).clamp(0.02, 0.98))
    ones = torch.ones(dims, dtype=torch.float64, device=device)
    for _ in range(max_rounds):
        previous = items.clone()
        alphas, betas = items[:, :-1], items[:, -1]
        # abilities: logits = θ·α − β, so the design is α with the offset −β folded into y's fit
        theta, _ = _newton_rows(alphas, theta, y, weight, -betas, 0.0, ones)
        if n_models > 2:  # pin the location and scale of θ (the prior's convention), moving the
            # same amount into the items; removes the direction alternating steps crawl along
            mean, scale = theta.mean(0), theta.std(0).clamp_min(1e-3)
            theta = (theta - mean) / scale
            items[:, -1] -= items[:, :-1] @ mean
            items[:, :-1] *= scale
        design = torch.cat([theta, -torch.ones(n_models, 1, dtype=torch.float64, device=device)],
                           dim=1)
        items, _ = _newton_rows(design, items, y.T, weight.T, 0.0, item_prior_mean,
                                item_precision)
        if (items - previous).abs().max() < tolerance:
            break
    if not (torch.isfinite(items).all() and torch.isfinite(theta).all()):
        raise IRTError("the IRT fit diverged (non-finite parameters); check the responses")
    column_sum = (y * weight).sum(0)
    constant = torch.nonzero((column_sum == 0) | (column_sum == weight.sum(0))).flatten()
    return IRTModel(items[:, :-1].cpu(), items[:, -1].cpu(), theta.cpu(),
                    tuple(int(i) for i in constant))


def simulate_responses(n_models: int, n_items: int, dims: int = 1, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A response matrix drawn from a known 2PL model: (responses, θ, α, β), for tests."""
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(n_models, dims, generator=generator, dtype=torch.float64)
    if dims == 1:
        alpha = torch.exp(0.4 * torch.randn(n_items, 1, generator=generator, dtype=torch.float64))
    else:
        alpha = torch.randn(n_items, dims, generator=generator, dtype=torch.float64).abs()
    beta = 1.5 * torch.randn(n_items, generator=generator, dtype=torch.float64)
    p = torch.sigmoid(theta @ alpha.T - beta)
    responses = (torch.rand(p.shape, generator=generator, dtype=torch.float64) < p).double()
    return responses, theta, alpha, beta
