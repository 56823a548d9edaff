"""NaN/Inf detection for merge inputs: one cheap pass, an exact count only when something is off."""

from __future__ import annotations

import torch

from operators.errors import NonFiniteInput


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many NaN/Inf entries `tensor` holds. A sum (one pass, no allocation) is finite unless
    the tensor holds NaN/Inf (or sums past 3e38, which real weights never do); only then count."""
    if not tensor.is_floating_point() or torch.isfinite(tensor.sum()):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def require_finite(*tensors: torch.Tensor) -> None:
    """Raise `NonFiniteInput` if any tensor holds NaN/Inf (for methods that check their inputs)."""
    if any(nonfinite_count(tensor) for tensor in tensors):
        raise NonFiniteInput("an input tensor holds NaN/Inf values")
