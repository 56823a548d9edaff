"""Weight mutation: seeded, sparse Gaussian noise on a model's task vector.

A mutation is stored as three numbers, (seed, sigma, rate), never as weights. For every floating
tensor, each entry is a "gene" that mutates with probability `rate`; a mutated entry gets
N(0, 1) * sigma * scale added, where scale is the RMS of the tensor's task vector (model - base),
so sigma is relative: 0.1 perturbs each task vector by about 10 % of its typical entry. Without a
base (or where the task vector is zero) the scale is the RMS of the weights themselves.

Gene masks and noise come from `operators.rng`'s counter-based streams keyed by (seed, tensor
name), so a mutation is reproducible bit for bit on any worker and in any tensor order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from operators import rng
from operators.chunks import flat, spans
from operators.errors import MergeParameterError


def _rms(tensor: torch.Tensor, base: torch.Tensor | None = None) -> float:
    """RMS of tensor - base (of tensor without a base), squares summed in float64 chunk by
    chunk: no tensor-sized temporary (a float64 copy of a 128k-vocabulary embedding is 4 GiB)."""
    n = tensor.numel()
    if n == 0:
        return 0.0
    values, reference = flat(tensor), None if base is None else flat(base)
    total = 0.0
    for start, stop in spans(n):
        chunk = values[start:stop].float()
        if reference is not None:
            chunk = chunk - reference[start:stop].float()
        total += float(chunk.to(torch.float64).pow_(2).sum())
    return math.sqrt(total / n)


def mutate_tensor(tensor: torch.Tensor, name: str, *, seed: int, sigma: float, rate: float,
                  base: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor with masked Gaussian noise; non-floating tensors come back unchanged. Noise is
    drawn chunk by chunk (the streams are counter-based, so chunks give the whole tensor's
    draws): memory is the result plus a few chunks, whatever the tensor's size."""
    if not tensor.is_floating_point() or rate == 0 or sigma == 0:
        return tensor
    scale = _rms(tensor, base) if base is not None else 0.0
    if scale == 0.0:
        scale = _rms(tensor)
    gene_key = rng.stream_key(seed, name, "mutate:gene")
    noise_key = rng.stream_key(seed, name, "mutate:noise")
    values = flat(tensor)
    out = torch.empty(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    for start, stop in spans(tensor.numel()):
        genes = rng.uniform(gene_key, start, stop - start, tensor.device) < rate
        noise = rng.normal(noise_key, start, stop - start, tensor.device)
        noise.mul_(genes).mul_(sigma * scale)
        out[start:stop] = values[start:stop].float() + noise
    return out.reshape(tensor.shape)


def mutate(state: Mapping[str, torch.Tensor], *, seed: int, sigma: float, rate: float,
           base: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Mutate every floating tensor of `state` (see the module docstring)."""
    if not 0 <= rate <= 1:
        raise MergeParameterError(f"mutation rate={rate}: the gene rate must lie in [0, 1]")
    if not sigma >= 0:
        raise MergeParameterError(f"mutation sigma={sigma}: must be a non-negative number")
    return {name: mutate_tensor(tensor, name, seed=seed, sigma=sigma, rate=rate,
                                base=None if base is None else base[name])
            for name, tensor in state.items()}
