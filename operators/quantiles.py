"""Exact order statistics of large float tensors in linear time.

Magnitude trimming (TIES, breadcrumbs) and PCB need the k-th largest value of a tensor. mergekit
sorts the whole tensor (O(n log n), the reason its TIES is slow); `torch.kthvalue` is a serial
quickselect. We use a two-level radix select over the float's bit pattern instead: floats map to
integers that sort in the same order, a 65,536-bucket histogram of the high 16 bits finds the bucket
holding the k-th value, and a histogram of the low 16 bits inside that bucket finds the value. Two
`bincount` passes, exact, deterministic, the same result on CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

_HALF = 1 << 16


def sortable_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered like the float32 values (for non-NaN floats), as unsigned-offset ints.

    Non-negative floats keep their bit pattern; negative ones get their magnitude bits flipped,
    which reverses their order and keeps them below every non-negative float.
    """
    bits = values.to(torch.float32).contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _key_to_float(key: int) -> float:
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def _select_in_histogram(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bucket holding the element of 0-based `rank`, and how many elements lie below it."""
    cumulative = counts.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, torch.tensor([rank], device=counts.device),
                                    right=True).item())
    below = int(cumulative[bucket - 1].item()) if bucket > 0 else 0
    return bucket, below


def _keys_and_high(chunk: torch.Tensor, nonnegative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sortable keys and their high 16 bits as bucket indices in [0, 65536)."""
    if nonnegative:  # the bit pattern of a non-negative float already sorts: no remapping
        keys = chunk.to(torch.float32).contiguous().view(torch.int32).reshape(-1)
        return keys, keys >> 16
    keys = sortable_keys(chunk).reshape(-1)
    return keys, (keys >> 16) + (_HALF // 2)


def kth_smallest_streaming(make_chunks: Callable[[], Iterable[torch.Tensor]], rank: int,
                           nonnegative: bool = False) -> float:
    """Exact value of 0-based ascending `rank` over all chunks that `make_chunks()` yields.

    Reads the chunks twice (a histogram of high bits, then of low bits in one bucket), holding one
    chunk at a time: how the whole-model TIES trim finds its threshold while streaming.
    `nonnegative` (magnitudes) skips the remapping of negative floats.
    """
    counts = None
    total = 0
    single = None
    for chunk in make_chunks():
        keys, high = _keys_and_high(chunk, nonnegative)
        total += keys.numel()
        histogram = torch.bincount(high, minlength=_HALF)
        counts = histogram if counts is None else counts + histogram
        single = (keys, high) if single is None else False
    if counts is None or not 0 <= rank < total:
        raise IndexError(f"rank {rank} out of range for {total} values")
    bucket, below = _select_in_histogram(counts, rank)
    offset = 0 if nonnegative else _HALF // 2
    if single:  # one chunk: reuse its keys instead of reading it again
        keys, high = single
        low_counts = torch.bincount(keys[high == bucket] & 0xFFFF, minlength=_HALF)
    else:
        low_counts = torch.zeros(_HALF, dtype=torch.int64, device=counts.device)
        for chunk in make_chunks():
            keys, high = _keys_and_high(chunk, nonnegative)
            low_counts += torch.bincount(keys[high == bucket] & 0xFFFF, minlength=_HALF)
    low_bucket, _ = _select_in_histogram(low_counts, rank - below)
    return _key_to_float(((bucket - offset) << 16) | low_bucket)


def kth_smallest(values: torch.Tensor, rank: int, nonnegative: bool = False) -> float:
    """The value of 0-based ascending `rank` among `values` (any shape, no NaN), exactly."""
    return kth_smallest_streaming(lambda: (values,), rank, nonnegative)


def kth_largest(values: torch.Tensor, k: int, nonnegative: bool = False) -> float:
    """The k-th largest value (k >= 1) of `values`, exactly."""
    return kth_smallest(values, values.numel() - k, nonnegative)
