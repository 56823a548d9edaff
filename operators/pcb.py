"""PCB: Parameter Competition Balancing (Du et al., NeurIPS 2024), our reading of it.

For one tensor with task vectors tau_1..tau_N (model - base):

0. Clip (released code): each |tau_i| is clipped to its own [q, 1 - q] quantiles (``clip`` = q,
   default 1e-4; 0 disables it), signs kept. It tames outliers before they dominate the scores.
1. Intra-balancing: beta_intra_i = softmax_j(N * Norm(tau_i * tau_i)), Norm = min-max scaling over
   the tensor's entries. N, the number of tasks, acts as an inverse temperature: the more tasks
   compete, the more an entry must stand out inside its own task to count. The softmax's
   denominator is a constant per task that step 3's min-max scaling cancels, so we use exp(...).
2. Inter-balancing, how much entry j of task i agrees with the same entry of the other tasks:
   ``inter: tanh`` (default, the authors' released code): tanh(tau_i * sum_k tau_k), so entries
   whose sign disagrees with the consensus score below zero; ``inter: softmax`` (the paper's
   formula): sum_k softmax_j(Norm(tau_i * tau_k)).
3. beta_i = beta_intra_i * beta_inter_i. Keep the top ``density`` fraction of beta_i (the paper's
   ratio r, typically 0.05-0.2), min-max scale the kept scores to [0, 1] from the threshold up,
   zero the rest: beta^_i. An entry kept by rank whose balance is 0 in every task (it sits on the
   threshold) takes the weighted mean of the kept values rather than 0/0.
4. tau_m = sum_i w_i * beta^_i * tau_i / sum_i beta^_i (element-wise; w_i = per-model ``weight``,
   default 1, the coefficients that PCB's optional evolutionary search tunes), theta = base +
   lambda * tau_m (lambda ~ 1-1.2 without search).

The paper flattens the whole model; like mergekit's TIES we balance per tensor, which streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

import torch

from operators.quantiles import kth_smallest

_TINY = 1e-12


class InterBalancing(StrEnum):
    TANH = "tanh"
    SOFTMAX = "softmax"


def _clip_magnitudes(tau: torch.Tensor, clip: float) -> tuple[torch.Tensor, float, float]:
    """tau with |tau| clipped to its [clip, 1 - clip] quantiles, and the clip bounds."""
    magnitudes = tau.abs()
    n = tau.numel()
    low = kth_smallest(magnitudes, int(n * clip), nonnegative=True)
    high = kth_smallest(magnitudes, max(0, int(n * (1 - clip)) - 1), nonnegative=True)
    return torch.sign(tau) * magnitudes.clamp_(low, high), low, high


def _min_max(values: torch.Tensor) -> torch.Tensor:
    low, high = values.min(), values.max()
    return (values - low) / (high - low).clamp_min(_TINY)


def _inter(taus: Sequence[torch.Tensor], i: int, mode: InterBalancing,
           total: torch.Tensor | None) -> torch.Tensor:
    if mode is InterBalancing.TANH:
        return torch.tanh(taus[i] * total)
    scores = torch.zeros_like(taus[i])
    for other in taus:
        scores += torch.softmax(_min_max(taus[i] * other).reshape(-1), dim=0).reshape(scores.shape)
    return scores


def pcb_merge(base: torch.Tensor, models: Sequence[torch.Tensor], *, densities: Sequence[float],
              weights: Sequence[float], lam: float = 1.0, clip: float = 1e-4,
              inter: InterBalancing = InterBalancing.TANH) -> torch.Tensor:
    """Merge one tensor with PCB; see the module docstring for each step."""
    base32 = base.to(torch.float32)
    n_tasks = len(models)
    taus, bounds = [], []
    for model in models:
        tau = model.to(torch.float32) - base32
        if clip > 0:
            tau, low, high = _clip_magnitudes(tau, clip)
        else:
            magnitudes = tau.abs()
            low, high = magnitudes.min().item(), magnitudes.max().item()
        taus.append(tau)
        bounds.append((low * low, high * high))
    total = torch.stack(taus).sum(0) if inter is InterBalancing.TANH else None

    numerator = torch.zeros_like(base32)
    denominator = torch.zeros_like(base32)
    # Entries kept by rank but scored exactly at the threshold get zero balance in every task
    # (0/0); they fall back to the weighted mean of the kept values instead of vanishing.
    kept_sum = torch.zeros_like(base32)
    kept_count = torch.zeros_like(base32)
    for i, tau in enumerate(taus):
        low2, high2 = bounds[i]
        intra = torch.exp(n_tasks * (tau * tau - low2) / max(high2 - low2, _TINY))
        scores = intra * _inter(taus, i, inter, total)
        keep = max(1, int(densities[i] * scores.numel()))
        threshold = kth_smallest(scores, scores.numel() - keep)
        kept = (scores >= threshold).to(torch.float32)
        span = max(scores.max().item() - threshold, _TINY)
        balanced = (scores.clamp_(min=threshold) - threshold) / span
        numerator += weights[i] * balanced * tau
        denominator += balanced
        kept_sum += weights[i] * kept * tau
        kept_count += kept
    fallback = torch.where(kept_count > 0, kept_sum / kept_count.clamp_min(1), 0.0)
    merged = torch.where(denominator > 0, numerator / denominator.clamp_min(_TINY), fallback)
    return (base32 + lam * merged).to(base.dtype)
