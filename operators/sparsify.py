"""Which entries of a task vector survive, and how survivors are rescaled.

A sparsifier looks at one model's whole task vector for one tensor (delta = model - base) once, and
returns a `Keep`: a mask (bool, or float when survivors get per-entry scales) plus a scalar rescale.
The merge engine then streams the tensor chunk by chunk and applies the `Keep` to each chunk.

- ``magnitude`` (TIES): keep the k = max(1, int(density * n)) largest |delta| of the tensor.
- ``magnitude_outliers`` (Model Breadcrumbs): drop the int(gamma * n) largest as outliers and the
  smallest, keeping a band of int(density * n).
- ``random`` (DARE): keep each entry with probability `density`, from the counter-based stream of
  (seed, tensor, model), so masks are the same on any device.
- ``della_magprune`` (DELLA): keep probability rises linearly with the magnitude rank inside each
  row, from density - epsilon to density + epsilon.

Rescaling of random survivors (a documented convention switch, ``rescale_mode``):
``l1`` multiplies them so the L1 norm matches the unpruned delta (mergekit 0.1.5), ``inverse_p``
divides each survivor by its keep probability (the DARE and DELLA papers).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

from operators import rng
from operators.quantiles import kth_largest, kth_smallest

_L1_EPS = 1e-7  # below this L1 norm mergekit skips rescaling; so do we


class Sparsifier(StrEnum):
    MAGNITUDE = "magnitude"
    MAGNITUDE_OUTLIERS = "magnitude_outliers"
    RANDOM = "random"
    DELLA = "della_magprune"


class RescaleMode(StrEnum):
    L1 = "l1"
    INVERSE_P = "inverse_p"


@dataclass
class Keep:
    """Survivors of one task vector: delta_kept = delta * mask * scale."""

    mask: torch.Tensor | None  # None: keep everything
    scale: float = 1.0


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """Top-k by magnitude; ties at the threshold are all kept (exact top-k without ties)."""
    if density >= 1:
        return None
    magnitudes = delta.abs()
    k = max(1, int(density * delta.numel()))
    return magnitudes >= kth_largest(magnitudes, k, nonnegative=True)


def band_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """Breadcrumbs: keep ascending magnitude ranks [n_bot, n_bot + int(density * n))."""
    if density >= 1:
        return None
    n = delta.numel()
    keep = int(density * n)
    if keep == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    bottom = max(0, n - keep - int(gamma * n))
    magnitudes = delta.abs()
    low = kth_smallest(magnitudes, bottom, nonnegative=True)
    high = kth_smallest(magnitudes, bottom + keep - 1, nonnegative=True)
    return (magnitudes >= low) & (magnitudes <= high)


def random_keep_probability_mask(
    key: int, delta: torch.Tensor, probability: torch.Tensor | float
) -> torch.Tensor:
    """Keep entry j when its counter-based uniform u_j < p_j (p scalar or per-entry)."""
    uniforms = rng.uniform(key, 0, delta.numel(), delta.device).reshape(delta.shape)
    return uniforms < probability


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA keep probabilities: linear in the magnitude rank within each row (mergekit's form)."""
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    normalized = ((ranks - low) / (high - low)).clamp(0, 1)
    return ((density - epsilon) + normalized * 2 * epsilon).reshape(delta.shape)


def l1_rescale(delta: torch.Tensor, mask: torch.Tensor) -> float:
    """Factor that restores the L1 norm of `delta` after masking (float64 sums: any device)."""
    before = delta.abs().sum(dtype=torch.float64).item()
    after = (delta * mask).abs().sum(dtype=torch.float64).item()
    if before < _L1_EPS or after < _L1_EPS:
        return 1.0
    return before / after


def sparsify(
    delta: torch.Tensor,
    method: Sparsifier,
    *,
    density: float,
    gamma: float = 0.0,
    epsilon: float = 0.0,
    rescale: bool = False,
    rescale_mode: RescaleMode = RescaleMode.L1,
    key: int = 0,
) -> Keep:
    """Decide the survivors of one task vector (`key` seeds the random methods)."""
    if method is Sparsifier.MAGNITUDE:
        mask = magnitude_mask(delta, density)
    elif method is Sparsifier.MAGNITUDE_OUTLIERS:
        mask = band_mask(delta, density, gamma)
    elif density >= 1:
        mask = None
    elif method is Sparsifier.RANDOM:
        mask = random_keep_probability_mask(key, delta, density)
        if rescale and rescale_mode is RescaleMode.INVERSE_P:
            return Keep(mask, 1.0 / density)
    else:
        probabilities = della_probabilities(delta, density, epsilon)
        mask = random_keep_probability_mask(key, delta, probabilities)
        if rescale and rescale_mode is RescaleMode.INVERSE_P:
            return Keep(mask / probabilities)
    if mask is None or not rescale:
        return Keep(mask)
    return Keep(mask, l1_rescale(delta, mask))
