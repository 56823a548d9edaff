"""The generalized task-arithmetic engine: trim -> elect -> aggregate -> rescale -> lambda.

    delta_i = model_i - base                       (task vector of expert i)
    delta_i = keep_i(delta_i)                      (trim: TIES magnitude, DARE random, ...)
    delta_i = w_i * delta_i                        (model weight; before or after the election)
    elect   = sign(sum_i delta_i)  or  majority of signs   (TIES "sum" / "count" consensus)
    mixed   = sum_i delta_i [sign(delta_i) == elect]  (disjoint sum; plain sum without consensus)
    mixed   = mixed / sum_i w_i [agree_i]          (disjoint mean, if normalize)
    result  = base + lambda * mixed

TIES, DARE-TIES, DARE-linear, breadcrumbs, DELLA and task arithmetic are configurations of it (see
`operators.methods`). With `weight_before_election` (mergekit's order, the default) the weights
enter before the vote; the TIES paper votes on unweighted trimmed deltas.

Per chunk the arithmetic is mergekit 0.1.5's, value for value, so results match it bit for bit in
float32. On the CPU in float32 the fused C kernel of `operators.native` runs the same steps in one
pass; the torch code below is the reference and the fallback. Its masks are float 0/1 tensors
(sign agreement is tested as delta * elected > 0, which is sign(delta) == elected for every
nonzero delta) and every step writes into workspace buffers: boolean tensors and fresh
allocations cost more than the arithmetic on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch

from operators import native
from operators.chunks import CHUNK_ELEMENTS, Workspace, flat, spans, work_dtype
from operators.sparsify import Keep


class Consensus(StrEnum):
    SUM = "sum"
    COUNT = "count"


_CONSENSUS_CODES = {None: 0, Consensus.SUM: 1, Consensus.COUNT: 2}


@dataclass(frozen=True)
class Aggregation:
    consensus: Consensus | None
    normalize: bool
    lam: float = 1.0
    weight_before_election: bool = True


def merge_task_vectors(base: torch.Tensor, models: Sequence[torch.Tensor], keeps: Sequence[Keep],
                       weights: Sequence[float], how: Aggregation,
                       ws: Workspace | None = None, out_dtype: torch.dtype | None = None
                       ) -> torch.Tensor:
    """Merge one tensor; `keeps` are the trims decided by `operators.sparsify` per model. The
    result is in `out_dtype` (default: the base's), rounded once from the work dtype."""
    dtype = work_dtype(base.dtype)
    out_dtype = out_dtype or base.dtype
    device = base.device
    ws = ws or Workspace(device)
    n = len(models)
    if n == 0:
        return base.to(out_dtype, copy=True)
    base_flat, model_flats = flat(base), [flat(m) for m in models]
    weight_column = torch.tensor(list(weights), dtype=dtype, device=device).reshape(n, 1)
    weight_total = weight_column.sum(dim=0)
    if weight_total.abs() < 1e-8:
        weight_total.fill_(1)
    masks = [keep.mask for keep in keeps]
    if n <= native.MAX_MODELS and native.readable(base_flat, *model_flats) \
            and native.usable(*masks):
        merged = native.merge_task_vectors(
            base_flat, model_flats, [keep.band for keep in keeps],
            [keep.windows for keep in keeps], masks,
            [keep.draw for keep in keeps], [keep.scale for keep in keeps], weights,
            _CONSENSUS_CODES[how.consensus], how.weight_before_election, how.normalize, how.lam,
            weight_total.item())
        return merged.to(out_dtype).reshape(base.shape)
    out = torch.empty(base.numel(), dtype=out_dtype, device=device)
    width = min(base.numel(), CHUNK_ELEMENTS)
    deltas_buffer = ws.get("ta-deltas", (n, width), dtype)
    agree_buffer = ws.get("ta-agree", (n, width), dtype)
    row_buffers = [ws.get(f"ta-row{i}", width, dtype) for i in range(4)]
    ones = ws.constant(f"ones-{dtype}", width, lambda size: torch.ones(size, dtype=dtype,
                                                                      device=device))
    for start, stop in spans(base.numel()):
        size = stop - start
        deltas, agree = deltas_buffer[:, :size], agree_buffer[:, :size]
        scratch, flags, votes, mixed = (buffer[:size] for buffer in row_buffers)
        unit = ones[:size]
        b = base_flat[start:stop].to(dtype)
        for i in range(n):
            torch.sub(model_flats[i][start:stop].to(dtype), b, out=deltas[i])
            keeps[i].apply_(deltas[i], start, stop, scratch, flags)
        if how.weight_before_election:
            deltas.mul_(weight_column)
        if how.consensus is None:
            if not how.weight_before_election:
                deltas.mul_(weight_column)
            torch.sum(deltas, dim=0, out=mixed)
            divisor = weight_total
        else:
            source = deltas if how.consensus is Consensus.SUM else torch.sign(deltas, out=agree)
            torch.sum(source, dim=0, out=votes)
            # +1 where votes >= 0, else -1. copysign differs from that only at votes == -0.0,
            # which needs every vote to be -0.0: no delta there can agree with either sign.
            elected = torch.copysign(unit, votes, out=votes)
            torch.gt(torch.mul(deltas, elected, out=agree), 0, out=agree)
            if not how.weight_before_election:
                deltas.mul_(weight_column)
            torch.sum(deltas.mul_(agree), dim=0, out=mixed)
            divisor = torch.sum(agree.mul_(weight_column), dim=0, out=votes)
            divisor.add_(torch.eq(divisor, 0, out=flags))  # 0 -> 1: nobody agrees, keep base
        if how.normalize:
            mixed.div_(divisor)
        if how.lam != 1:
            mixed.mul_(how.lam)
        torch.add(b, mixed, out=out[start:stop])
    return out.reshape(base.shape)
