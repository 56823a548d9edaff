"""The generalized task-arithmetic engine: trim -> elect -> aggregate -> rescale -> lambda.

    delta_i = model_i - base                       (task vector of expert i)
    delta_i = keep_i(delta_i)                      (trim: TIES magnitude, DARE random, breadcrumbs...)
    delta_i = w_i * delta_i                        (model weight; before or after the election)
    elect   = sign(sum_i delta_i)  or  majority of signs   (TIES "sum" / "count" consensus)
    mixed   = sum_i delta_i [sign(delta_i) == elect]  (disjoint sum; plain sum without consensus)
    mixed   = mixed / sum_i w_i [agree_i]          (disjoint mean, if normalize)
    result  = base + lambda * mixed

TIES, DARE-TIES, DARE-linear, breadcrumbs, DELLA and task arithmetic are configurations of it (see
`operators.methods`). With `weight_before_election` (mergekit's order, the default) the weights
enter before the vote; the TIES paper votes on unweighted trimmed deltas.

Per chunk the arithmetic is mergekit 0.1.5's, operation for operation, so results match it bit for
bit in float32; the chunking only keeps the temporaries in cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch

from operators.chunks import CHUNK_ELEMENTS, flat, spans, work_dtype
from operators.sparsify import Keep


class Consensus(StrEnum):
    SUM = "sum"
    COUNT = "count"


@dataclass(frozen=True)
class Aggregation:
    consensus: Consensus | None
    normalize: bool
    lam: float = 1.0
    weight_before_election: bool = True



def _elected_agreement(deltas: torch.Tensor, consensus: Consensus) -> torch.Tensor:
    """Mask of entries whose sign agrees with the elected sign (a zero never agrees)."""
    signs = deltas.sign()
    votes = deltas.sum(dim=0) if consensus is Consensus.SUM else signs.sum(dim=0)
    elected = (votes >= 0).to(deltas.dtype) * 2 - 1
    return signs == elected


def merge_task_vectors(base: torch.Tensor, models: Sequence[torch.Tensor], keeps: Sequence[Keep],
                       weights: Sequence[float], how: Aggregation) -> torch.Tensor:
    """Merge one tensor; `keeps` are the trims decided by `operators.sparsify` per model."""
    dtype = work_dtype(base.dtype)
    device = base.device
    n = len(models)
    if n == 0:
        return base.clone()
    base_flat, model_flats = flat(base), [flat(m) for m in models]
    mask_flats = [flat(k.mask) if k.mask is not None else None for k in keeps]
    weight_column = torch.tensor(list(weights), dtype=dtype, device=device).reshape(n, 1)
    out = torch.empty(base.numel(), dtype=base.dtype, device=device)
    # Scratch reused by every chunk: fresh buffers per chunk cost page faults, not arithmetic.
    width = min(base.numel(), CHUNK_ELEMENTS)
    delta_buffer = torch.empty((n, width), dtype=dtype, device=device)
    for start, stop in spans(base.numel()):
        b = base_flat[start:stop].to(dtype)
        deltas = delta_buffer[:, : stop - start]
        for i in range(n):
            torch.sub(model_flats[i][start:stop], b, out=deltas[i])
            if mask_flats[i] is not None:
                deltas[i].mul_(mask_flats[i][start:stop])
            if keeps[i].scale != 1.0:
                deltas[i].mul_(keeps[i].scale)
        if how.weight_before_election:
            deltas.mul_(weight_column)
        if how.consensus is not None:
            agree = _elected_agreement(deltas, how.consensus)
            if not how.weight_before_election:
                deltas.mul_(weight_column)
            mixed = deltas.mul_(agree).sum(dim=0)
            divisor = (weight_column * agree).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            if not how.weight_before_election:
                deltas.mul_(weight_column)
            mixed = deltas.sum(dim=0)
            divisor = weight_column.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if how.normalize:
            mixed /= divisor
        if how.lam != 1:
            mixed *= how.lam
        torch.add(b, mixed, out=out[start:stop])
    return out.reshape(base.shape)
