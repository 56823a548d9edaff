"""Merges that interpolate weights directly instead of task vectors: linear and SLERP.

Both follow mergekit 0.1.5's arithmetic step by step (float32 work, the same operation order), so
their results are bit-identical to mergekit's in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from operators.chunks import CHUNK_ELEMENTS, flat, spans, work_dtype

# mergekit computes SLERP norms and dots over chunks of this many elements; keeping the same
# chunking keeps the float32 rounding, hence the bits, identical.
_SLERP_CHUNK = 1024 * 1024



def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Weighted sum of the tensors, divided by the weight sum when `normalize`; in `out_dtype`
    (default: the inputs')."""
    first = tensors[0]
    dtype = work_dtype(first.dtype)
    out_dtype = out_dtype or first.dtype
    coefficients = torch.tensor(list(weights), dtype=dtype, device=first.device)
    denominator = coefficients.sum()
    out = torch.empty(first.shape, dtype=out_dtype, device=first.device)
    out_flat, sources = flat(out), [flat(t) for t in tensors]
    # Accumulate straight into the output when it has the work dtype: no scratch at all.
    scratch = None if out_dtype == dtype else torch.empty(
        min(first.numel(), CHUNK_ELEMENTS), dtype=dtype, device=first.device)
    (lead, lead_coefficient), *rest = zip(sources, coefficients.unbind(), strict=True)
    for start, stop in spans(first.numel()):
        acc = out_flat[start:stop] if scratch is None else scratch[: stop - start]
        if lead.dtype == dtype:  # 0 + x·c is x·c, one rounding either way: skip the zeroing
            torch.mul(lead[start:stop], lead_coefficient, out=acc)
        else:  # widened exactly, then one rounding of the product
            acc.copy_(lead[start:stop]).mul_(lead_coefficient)
        for source, coefficient in rest:
            acc.addcmul_(source[start:stop], coefficient)
        if normalize:
            acc.div_(denominator)
        if scratch is not None:
            out_flat[start:stop] = acc
    return out


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Spherical interpolation of the whole tensor from v0 (t=0) to v1 (t=1), in `out_dtype`
    (default: v0's).

    Falls back to linear interpolation when the tensors are (anti)collinear.
    """
    dtype = work_dtype(v0.dtype)
    a, b = flat(v0), flat(v1)
    if a.numel() == 0:
        return v0.to(out_dtype or v0.dtype, copy=True)
    a_norms, b_norms = [], []
    for start, stop in spans(a.numel(), _SLERP_CHUNK):
        a_norms.append(torch.linalg.vector_norm(a[start:stop].to(dtype)))
        b_norms.append(torch.linalg.vector_norm(b[start:stop].to(dtype)))
    norm_a = torch.linalg.vector_norm(torch.stack(a_norms))
    norm_b = torch.linalg.vector_norm(torch.stack(b_norms))
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dots = [((a[s:e].to(dtype) / norm_a) * (b[s:e].to(dtype) / norm_b)).sum()
            for s, e in spans(a.numel(), _SLERP_CHUNK)]
    dot = torch.stack(dots).sum().clamp(-1, 1)
    t_ = torch.tensor(t, dtype=dtype, device=v0.device)
    collinear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(collinear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(collinear, 1 - t_, torch.sin((1 - t_) * theta) / sin_theta)
    coef_b = torch.where(collinear, t_, torch.sin(t_ * theta) / sin_theta)
    out = torch.empty(v0.shape, dtype=dtype, device=v0.device)
    out_flat = flat(out)
    for start, stop in spans(a.numel(), _SLERP_CHUNK):
        out_flat[start:stop] = coef_a * a[start:stop].to(dtype) + coef_b * b[start:stop].to(dtype)
    return out.to(out_dtype or v0.dtype)
