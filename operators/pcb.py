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
   ratio r, typically 0.05-0.2: exactly k = max(1, int(density * n)) entries, those scored at the
   threshold taken in flat index order, `operators.ties`), min-max scale the kept scores to
   [0, 1] from the threshold up
   (times the float32 reciprocal of max - threshold), zero the rest: beta^_i. An entry kept by
   rank whose balance is 0 in every task (it sits on the threshold) takes the weighted mean of
   the kept values rather than 0/0.
4. tau_m = sum_i w_i * beta^_i * tau_i / sum_i beta^_i (element-wise; w_i = per-model ``weight``,
   default 1, the coefficients that PCB's optional evolutionary search tunes), theta = base +
   lambda * tau_m (lambda ~ 1-1.2 without search).

The paper flattens the whole model; like mergekit's TIES we balance per tensor, which streams.
In the tanh mode, exp and tanh come from `operators.ieee_math` (IEEE basic operations only), so
the scores are the same bits on every device (the softmax mode uses torch's softmax). With the
default ``inter: tanh`` every step runs chunk by chunk: the clip bounds and the drop thresholds are
exact order statistics found by streaming selection, and the only tensor-sized buffers are the N
score tensors beta_i. The fused C kernels of `operators.native` store not even those (see
`_fused_tanh_merge`): three passes, with the same order statistics and so the same bits.
``inter: softmax`` needs tensor-wide normalizers per task pair and computes its scores on whole
tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

import numpy as np
import torch

from operators import ieee_math, native
from operators.chunks import CHUNK_ELEMENTS, Workspace, flat, spans
from operators.finite import require_finite
from operators.quantiles import kth_smallest_sampled
from operators.sparsify import kept_count, kth_magnitudes, trim_rank
from operators.ties import count_chunks

_TINY = 1e-12
_SAMPLE = 1 << 14


class InterBalancing(StrEnum):
    TANH = "tanh"
    SOFTMAX = "softmax"


def _clip_ranks(n: int, clip: float) -> tuple[int, int]:
    """Ascending ranks of the [clip, 1 - clip] quantiles among n values (min, max at clip 0)."""
    return int(n * clip), max(0, int(n * (1 - clip)) - 1)


def _clip_bounds(model: torch.Tensor, base: torch.Tensor, clip: float, ws: Workspace
                 ) -> tuple[float, float]:
    """The [clip, 1 - clip] quantiles of |tau| (min and max when clip is 0)."""
    low, high = kth_magnitudes(model, base, list(_clip_ranks(model.numel(), clip)), ws)
    return low, high


def _clipped_taus(models: Sequence[torch.Tensor], base: torch.Tensor, start: int, stop: int,
                  bounds: Sequence[tuple[float, float]], taus: torch.Tensor,
                  scratch: torch.Tensor) -> None:
    """taus[i] = sign(tau_i) * clamp(|tau_i|, bounds_i) for one chunk (in place, no allocation)."""
    b = base[start:stop].float()
    for i, model in enumerate(models):
        tau = torch.sub(model[start:stop].float(), b, out=taus[i])
        magnitude = torch.abs(tau, out=scratch).clamp_(*bounds[i])
        tau.sign_().mul_(magnitude)


def _min_max(values: torch.Tensor) -> torch.Tensor:
    low, high = values.min(), values.max()
    return (values - low) / (high - low).clamp_min(_TINY)


def _softmax_scores(models, base, bounds, n_tasks, scores: torch.Tensor, ws: Workspace) -> None:
    """The paper's scores on whole tensors: exp(N Norm(tau_i^2)) * sum_k softmax(Norm(tau_i tau_k))."""
    numel = base.numel()
    taus = ws.get("pcb-softmax-taus", (n_tasks, numel))
    _clipped_taus(models, base, 0, numel, bounds, taus, ws.get("pcb-softmax-scratch", numel))
    for i in range(n_tasks):
        low2, high2 = bounds[i][0] ** 2, bounds[i][1] ** 2
        intra = torch.exp(n_tasks * (taus[i] * taus[i] - low2) / max(high2 - low2, _TINY))
        inter = torch.zeros_like(intra)
        for k in range(n_tasks):
            inter += torch.softmax(_min_max(taus[i] * taus[k]), dim=0)
        torch.mul(intra, inter, out=scores[i])


def _score_constants(bounds: Sequence[tuple[float, float]], n_tasks: int
                     ) -> tuple[list[float], list[float]]:
    """low_i^2 and N / (high_i^2 - low_i^2) per task, rounded as float32 arithmetic rounds them,
    so that the torch and C paths start from the same numbers."""
    low2, factors = [], []
    for low, high in bounds:
        low_sq = np.float32(low) * np.float32(low)
        span = np.float32(high) * np.float32(high) - low_sq
        low2.append(float(low_sq))
        factors.append(float(np.float32(n_tasks) / max(span, np.float32(_TINY))))
    return low2, factors


def _tanh_scores(models, base, bounds, n_tasks, scores: torch.Tensor, ws: Workspace) -> None:
    """scores_i = exp(N Norm(tau_i^2)) * tanh(tau_i * sum_k tau_k), chunk by chunk, with the
    device-independent exp and tanh of `operators.ieee_math`."""
    low2, factors = _score_constants(bounds, n_tasks)
    if n_tasks <= native.MAX_MODELS and native.readable(base, *models):
        native.pcb_scores(base, models, bounds, low2, factors, scores)
        return
    width = min(base.numel(), CHUNK_ELEMENTS)
    taus_buffer = ws.get("pcb-taus", (n_tasks, width))
    scratch_buffer, total_buffer = ws.get("pcb-scratch", width), ws.get("pcb-total", width)
    for start, stop in spans(base.numel()):
        size = stop - start
        taus, scratch, total = taus_buffer[:, :size], scratch_buffer[:size], total_buffer[:size]
        _clipped_taus(models, base, start, stop, bounds, taus, scratch)
        total.zero_()  # summed left to right, as the C kernel adds (torch.sum may pair them)
        for tau in taus:
            total.add_(tau)
        for i in range(n_tasks):
            intra = ieee_math.exp((taus[i] * taus[i] - low2[i]) * factors[i])
            torch.mul(intra, ieee_math.tanh(taus[i] * total), out=scores[i, start:stop])


def _drop_threshold(scores: torch.Tensor, density: float) -> float:
    """The score of the k-th best entry, k = max(1, int(density * n)): the lowest one kept."""
    n = scores.numel()
    rank = trim_rank(n, density)
    if native.usable(scores):
        return native.select_ranks(scores, None, [rank])[0]
    sample = scores[:: max(1, n // _SAMPLE)]
    return kth_smallest_sampled(lambda: (scores[a:b] for a, b in spans(n)), [rank], n,
                                sample)[0]


def _inverse_spans(maxima: Sequence[float], thresholds: Sequence[float]) -> list[float]:
    """1 / (largest score - drop threshold) per task, rounded to float32 as both paths use it:
    the min-max scaling of the kept scores multiplies by it (a divide per entry and task costs
    several multiplies)."""
    return [float(np.float32(1) / np.float32(max(top - threshold, _TINY)))
            for top, threshold in zip(maxima, thresholds, strict=True)]


def _fused_tanh_merge(base: torch.Tensor, models: Sequence[torch.Tensor],
                      densities: Sequence[float], weights: Sequence[float], lam: float,
                      clip: float) -> torch.Tensor | None:
    """The C kernels' three passes, nothing tensor-sized stored between them: all models' clip
    quantiles (heaps), then every drop threshold and largest score (scores computed, counted
    within sample brackets or, where ties defeat the sample, in two radix passes, dropped),
    then the mix (scores recomputed, same bits). The values are the exact order statistics the
    stored path finds, so the result is the same; None when the clip quantiles lie too far in
    for heaps, and the caller stores the scores. The first pass also rejects NaN/Inf inputs
    (`NonFiniteInput`)."""
    n = base.numel()
    if n < native.FUSED_SELECT_MIN:  # small tensors: the sample brackets would not pay
        return None
    low_rank, high_rank = _clip_ranks(n, clip)
    bounds = native.magnitude_extremes(base, models, low_rank + 1, n - high_rank)
    if bounds is None:
        return None
    low2, factors = _score_constants(bounds, len(models))
    thresholds, maxima = native.pcb_thresholds(base, models, bounds, low2, factors,
                                               [trim_rank(n, d) for d in densities])
    counts = native.count_ties(base, models, thresholds,
                               ([b[0] for b in bounds], [b[1] for b in bounds], low2, factors))
    windows = [count.window(0, kept_count(n, d), descending=True, numel=n)
               for count, d in zip(counts, densities, strict=True)]
    return native.pcb_mix_recomputed(base, models, bounds, low2, factors, thresholds, windows,
                                     _inverse_spans(maxima, thresholds), weights, lam)


def pcb_merge(base: torch.Tensor, models: Sequence[torch.Tensor], *, densities: Sequence[float],
              weights: Sequence[float], lam: float = 1.0, clip: float = 1e-4,
              inter: InterBalancing = InterBalancing.TANH,
              ws: Workspace | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Merge one tensor with PCB; see the module docstring for each step.

    PCB checks its own inputs (`Method.checks_inputs`): NaN/Inf raise `NonFiniteInput`, found by
    the fused kernels' first pass, or else by a separate check before the stored path. The
    result is in `out_dtype` (default: the base's)."""
    ws = ws or Workspace(base.device)
    shape, dtype = base.shape, out_dtype or base.dtype
    base, models = flat(base), [flat(m) for m in models]
    n_tasks, numel = len(models), base.numel()
    fused = len(models) <= native.MAX_MODELS and native.readable(base, *models)
    if fused and inter is InterBalancing.TANH:
        merged = _fused_tanh_merge(base, models, densities, weights, lam, clip)
        if merged is not None:
            return merged.to(dtype).reshape(shape)
    require_finite(base, *models)
    bounds = [_clip_bounds(model, base, clip, ws) for model in models]
    scores = ws.get("pcb-scores", (n_tasks, numel))
    fill = _tanh_scores if inter is InterBalancing.TANH else _softmax_scores
    fill(models, base, bounds, n_tasks, scores, ws)
    thresholds = [_drop_threshold(scores[i], densities[i]) for i in range(n_tasks)]
    windows = [count_chunks(lambda row=scores[i]: ((a, row[a:b]) for a, b in spans(numel)),
                            numel, thresholds[i]).window(0, kept_count(numel, densities[i]),
                                                         descending=True, numel=numel)
               for i in range(n_tasks)]
    inverse_spans = _inverse_spans([row.max().item() for row in scores], thresholds)
    if fused:
        merged = native.pcb_mix(base, models, bounds, scores, thresholds, windows,
                                inverse_spans, weights, lam)
        return merged.to(dtype).reshape(shape)

    out = torch.empty(numel, dtype=dtype, device=base.device)
    width = min(numel, CHUNK_ELEMENTS)
    taus_buffer = ws.get("pcb-taus", (n_tasks, width))
    rows = [ws.get(f"pcb-row{j}", width) for j in range(6)]
    for start, stop in spans(numel):
        size = stop - start
        taus = taus_buffer[:, :size]
        scratch, balanced, numerator, denominator, kept_sum, kept_entries = (r[:size] for r in rows)
        _clipped_taus(models, base, start, stop, bounds, taus, scratch)
        for row in (numerator, denominator, kept_sum, kept_entries):
            row.zero_()
        for i in range(n_tasks):
            score = scores[i, start:stop]
            # Entries kept by rank but scored exactly at the threshold get zero balance in every
            # task (0/0); they fall back to the weighted mean of the kept values.
            # Separate multiplies and adds (no fused alpha): the same rounding as the C kernel.
            kept = torch.gt(score, thresholds[i], out=scratch)
            at_threshold = torch.eq(score, thresholds[i]).to(kept.dtype)
            kept.add_(windows[i].kept(at_threshold, start) if windows[i] else at_threshold)
            kept_entries.add_(kept)
            kept_sum.add_(kept.mul_(taus[i]).mul_(weights[i]))
            torch.clamp_min(score, thresholds[i], out=balanced).sub_(thresholds[i])
            balanced.mul_(inverse_spans[i])
            denominator.add_(balanced)
            numerator.add_(balanced.mul_(taus[i]).mul_(weights[i]))
        # merged = numerator / denominator where some task gives weight, else the kept mean
        # (0 where nothing is kept); selected with exact 0/1 float masks.
        has_weight = torch.gt(denominator, 0, out=balanced)
        numerator.div_(denominator.clamp_min_(_TINY)).mul_(has_weight)
        kept_sum.div_(kept_entries.clamp_min_(1)).mul_(has_weight.sub_(1).neg_())
        merged = numerator.add_(kept_sum)
        torch.add(base[start:stop].float(), merged.mul_(lam), out=out[start:stop])
    return out.reshape(shape)
