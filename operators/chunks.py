"""Chunked iteration over flat tensors.

Merges are memory-bandwidth bound. Processing a tensor in cache-sized chunks keeps the temporaries
of a multi-step merge (deltas, masks, sign votes) in L2 instead of streaming each step through RAM,
and bounds the scratch memory to a few chunks whatever the tensor size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK_ELEMENTS = 1 << 18


def spans(numel: int, chunk: int = CHUNK_ELEMENTS) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering range(numel) in chunks."""
    for start in range(0, numel, chunk):
        yield start, min(numel, start + chunk)


def flat(tensor: torch.Tensor) -> torch.Tensor:
    """A flat view (a copy only if the tensor is not contiguous)."""
    return tensor.reshape(-1)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merge arithmetic runs in: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
