"""PCB as the authors' released code computes it (`variant: reference`; duguodong7/pcb-merging,
`PCB_merge`), per tensor or over the whole model (`scope: model`, as the code does on the
flattened model).

For task vectors τᵢ = modelᵢ − base, over the scope's entries:

1. |τᵢ| is clamped to its own order statistics at ranks ⌊d·clip⌋ and ⌊d·(1 − clip) − 1⌋ (low_i,
   high_i); the clipped vector is sign(τᵢ)·clamp(|τᵢ|).
2. intra = exp(N · ((clamp(|τᵢ|) − low_i) / (high_i − low_i))²): the clipped magnitude min-max
   normalized, *then* squared (our reading normalizes the square).
3. inter = tanh(τᵢ · Σₖ τₖ) on the *unclipped* task vectors.
4. score = intra · inter; it is clamped to [its order statistic at rank ⌊d·(1 − r)⌋ (the drop
   threshold), its maximum] and min-max normalized: entries at or below the threshold get
   scale 0, the largest gets 1.
5. merged = Σᵢ wᵢ·scaleᵢ·clippedᵢ / max(Σᵢ scaleᵢ, 1e-12) (0 where no task keeps the entry);
   result = base + λ·merged. wᵢ (per-model `weight`, default 1) is the coefficient that PCB's
   optional search tunes; the released code's merge is wᵢ = 1.

Where the released code divides 0 by 0 (a task vector constant over the scope, e.g. a tensor the
fine-tune left untouched, so high_i = low_i, or a score whose maximum equals its threshold), we
divide by 1e-12 instead: those entries get scale 0 rather than NaN.

Both scopes stream. Steps 1 and 4 need only per-task constants (low_i, high_i, threshold_i,
max_i); over the whole model they are exact order statistics found by streaming selection over
the tensors (`operators.quantiles.kth_smallest_streaming`, reading each tensor a few times), and
each tensor is then merged with them. Memory: the N task vectors of one tensor, in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from operators.finite import require_finite
from operators.quantiles import kth_smallest_streaming

_TINY = 1e-12
Pairs = Callable[[], Iterable[tuple[torch.Tensor, list[torch.Tensor]]]]  # (base, models) per tensor


@dataclass(frozen=True)
class Constants:
    """The scope's per-task constants: clip bounds of |τᵢ|, drop threshold and largest score."""

    low: tuple[float, ...]
    high: tuple[float, ...]
    threshold: tuple[float, ...]
    top: tuple[float, ...]


def _taus(base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
    b = base.reshape(-1).float()
    return torch.stack([m.reshape(-1).float() - b for m in models])


def _clipped_and_scores(taus: torch.Tensor, low: Sequence[float], high: Sequence[float]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    low_t = torch.tensor(low, dtype=torch.float32)[:, None]
    high_t = torch.tensor(high, dtype=torch.float32)[:, None]
    magnitude = torch.minimum(torch.maximum(taus.abs(), low_t), high_t)
    intra = torch.exp(len(taus) * ((magnitude - low_t) / (high_t - low_t).clamp_min(_TINY)) ** 2)
    inter = torch.tanh(taus * taus.sum(0))
    return torch.sign(taus) * magnitude, intra * inter


def constants(pairs: Pairs, numel: int, densities: Sequence[float], clip: float) -> Constants:
    """The scope's constants, streaming over its tensors (`pairs()` yields them, as often as
    asked); `numel` is the scope's entry count d."""
    n = len(densities)
    low_rank, high_rank = int(numel * clip), int(numel * (1 - clip) - 1)

    def magnitudes(i: int) -> Callable[[], Iterable[torch.Tensor]]:
        return lambda: ((m[i].reshape(-1).float() - b.reshape(-1).float()).abs()
                        for b, m in pairs())

    low = tuple(kth_smallest_streaming(magnitudes(i), low_rank, True) for i in range(n))
    high = tuple(kth_smallest_streaming(magnitudes(i), high_rank, True) for i in range(n))

    def scores(i: int) -> Callable[[], Iterable[torch.Tensor]]:
        return lambda: (_clipped_and_scores(_taus(b, m), low, high)[1][i] for b, m in pairs())

    threshold = tuple(kth_smallest_streaming(scores(i), min(int(numel * (1 - d)), numel - 1))
                      for i, d in enumerate(densities))
    top = tuple(max(float(s.max()) for s in scores(i)()) for i in range(n))
    return Constants(low, high, threshold, top)


def merge_with(base: torch.Tensor, models: Sequence[torch.Tensor], scope: Constants,
               weights: Sequence[float], lam: float, out_dtype: torch.dtype | None = None
               ) -> torch.Tensor:
    """One tensor merged with its scope's constants (steps 1-5)."""
    clipped, score = _clipped_and_scores(_taus(base, models), scope.low, scope.high)
    threshold = torch.tensor(scope.threshold, dtype=torch.float32)[:, None]
    top = torch.tensor(scope.top, dtype=torch.float32)[:, None]
    scale = (torch.minimum(torch.maximum(score, threshold), top) - threshold) / \
        (top - threshold).clamp_min(_TINY)
    w = torch.tensor(weights, dtype=torch.float32)[:, None]
    merged = (w * scale * clipped).sum(0) / scale.sum(0).clamp_min(_TINY)
    out = base.reshape(-1).float() + lam * merged
    return out.to(out_dtype or base.dtype).reshape(base.shape)


def pcb_reference_merge(base: torch.Tensor, models: Sequence[torch.Tensor], *,
                        densities: Sequence[float], weights: Sequence[float], lam: float = 1.0,
                        clip: float = 1e-4, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`scope: tensor`: the released code's formula with the tensor as its whole scope."""
    require_finite(base, *models)
    scope = constants(lambda: [(base, list(models))], base.numel(), densities, clip)
    return merge_with(base, models, scope, weights, lam, out_dtype)
