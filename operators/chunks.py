"""Chunked iteration over flat tensors.

Merges are memory-bandwidth bound. Processing a tensor in cache-sized chunks keeps the temporaries
of a multi-step merge (deltas, masks, sign votes) in L2 instead of streaming each step through RAM,
and bounds the scratch memory to a few chunks whatever the tensor size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

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


class Workspace:
    """Scratch buffers reused by every chunk and every tensor of one merge.

    torch's CPU allocator returns large blocks to the OS, so a fresh temporary per step pays page
    faults that cost more than the arithmetic. Buffers here are allocated once, grown when a larger
    request comes, and handed out as views; ops write into them with ``out=``. Memory: a few
    chunks per buffer name, whatever the tensor sizes (unless a caller asks for tensor-sized ones).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._constants: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...] | int, dtype: torch.dtype = torch.float32
            ) -> torch.Tensor:
        """A buffer of `shape` (contents undefined) that stays valid until the next `get(name)`."""
        shape = (shape,) if isinstance(shape, int) else shape
        numel = 1
        for size in shape:
            numel *= size
        buffer = self._buffers.get((name, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=self.device)
            self._buffers[(name, dtype)] = buffer
        return buffer[:numel].view(shape)

    def constant(self, name: str, numel: int, make: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """A cached tensor of at least `numel` elements, for values whose prefixes stay valid
        (like an arange): built by `make(numel)` once, rebuilt only when a longer one is needed."""
        tensor = self._constants.get(name)
        if tensor is None or tensor.numel() < numel:
            tensor = make(numel)
            self._constants[name] = tensor
        return tensor
