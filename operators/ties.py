"""The tie rule of every trim by rank: exactly its count kept, ties in flat index order.

A trim keeps entries by rank: TIES the k = max(1, int(density * n)) largest |delta| of a tensor,
breadcrumbs the ascending ranks [n_bot, n_bot + int(density * n)), PCB the k best scores (mergekit
0.1.5's counts). bf16 task vectors take few distinct values, so many entries share the boundary
value; keeping every entry at or past it overshoots the count. Here entries are ordered by score in
the trim's direction (descending for TIES and PCB, ascending for breadcrumbs, as mergekit sorts)
and, among equal scores, by flat index: the order `torch.sort(..., stable=True)` gives. The kept
count is exact and the choice deterministic on any device.

mergekit sorts with torch's unstable argsort, whose choice among ties no rule describes (it is not
the index order): where no tie straddles the boundary both keep the same entries, bit for bit;
`tie_break: mergekit` calls that argsort where one does, to reproduce mergekit exactly
(`operators.sparsify`).

How it streams: the boundary value comes from the exact selection; a counting pass (the C kernel,
or torch chunk by chunk) gives how many entries lie below it, how many equal it, and per block of
BLOCK entries how many equal it before the block. A `TieWindow` (skip, take) over the equal ones,
in index order, then lets every block or chunk decide its own entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

BLOCK = 512  # entries per block of the C kernels; CHUNK_ELEMENTS is a multiple of it


@dataclass(frozen=True)
class TieWindow:
    """Which entries equal to a boundary value are kept: positions [skip, skip + take) among
    them in flat index order; `prefix[b]` counts them before block b."""

    skip: int
    take: int
    prefix: torch.Tensor  # int64, blocks + 1 entries

    def kept(self, equal: torch.Tensor, start: int) -> torch.Tensor:
        """For a chunk starting at `start` (a multiple of BLOCK): 1.0 where an entry equal to the
        value is kept, 0.0 elsewhere (`equal`: the chunk's 0/1 float mask of such entries)."""
        before = self.prefix[start // BLOCK].to(equal.device)
        position = torch.cumsum(equal, 0, dtype=torch.int64).add_(before - 1)
        inside = (position >= self.skip) & (position < self.skip + self.take)
        return equal * inside


@dataclass(frozen=True)
class TieCount:
    """Entries of a tensor below a value and equal to it, and the equal ones' block prefix."""

    below: int
    equal: int
    prefix: torch.Tensor  # int64, blocks + 1 entries

    def window(self, first: int, count: int, descending: bool, numel: int) -> TieWindow | None:
        """The trim keeps ranks [first, first + count) in its order; the entries equal to the
        value hold `equal` consecutive ranks there. Their window, or None when all are kept."""
        before = numel - self.below - self.equal if descending else self.below
        return window(first, count, before, self.equal, self.prefix)


def window(first: int, count: int, before: int, equal: int, prefix: torch.Tensor
           ) -> TieWindow | None:
    """Ties at ranks [before, before + equal), kept ranks [first, first + count): the window over
    the ties, or None when every tie is kept."""
    skip = min(max(first - before, 0), equal)
    end = min(max(first + count - before, 0), equal)
    return None if (skip, end) == (0, equal) else TieWindow(skip, end - skip, prefix)


def blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def count_chunks(chunks: Callable[[], Iterator[tuple[int, torch.Tensor]]], numel: int,
                 value: float) -> TieCount:
    """`TieCount` of the values that `chunks()` yields as (start, chunk), in order (torch)."""
    per_block = torch.zeros(blocks(numel) + 1, dtype=torch.int64)
    below = 0
    for start, chunk in chunks():
        below += int(torch.count_nonzero(chunk < value))
        equal = (chunk == value).to(torch.int64)
        padded = torch.nn.functional.pad(equal, (0, (-equal.numel()) % BLOCK))
        first = start // BLOCK
        counts = padded.reshape(-1, BLOCK).sum(dim=1).cpu()
        per_block[first + 1:first + 1 + counts.numel()] = counts
    prefix = torch.cumsum(per_block, 0)
    return TieCount(below, int(prefix[-1]), prefix)
