"""Exact order statistics of large float tensors in linear time.

Magnitude trimming (TIES, breadcrumbs) and PCB need the k-th largest value of a tensor. mergekit
sorts the whole tensor (O(n log n), the reason its TIES is slow); `torch.kthvalue` is a serial
quickselect. We select in two ways, both exact and deterministic:

- bracketing (the fast path): a strided sample of the values gives a narrow value range that holds
  the k-th value with overwhelming probability; one streaming pass counts the values below it and
  collects the few inside it, and `kthvalue` on those finishes the job. If the sample misled us
  (the counts say the k-th value is outside the range), we fall back to
- radix select: floats map to integers that sort in the same order, a 65,536-bucket histogram of
  the high 16 bits finds the bucket holding the k-th value, and a histogram of the low 16 bits
  inside that bucket finds the value. Two `bincount` passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

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


def _float_key(value: float) -> int:
    return torch.tensor(value, dtype=torch.float32).view(torch.int32).item()


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


def bracket_ranks(rank: int, total: int, m: int) -> tuple[int, int]:
    """Sample ranks whose values bracket the element of `rank` (out of `total`) in a sample of m,
    unless the sample is wildly unrepresentative: +-4 binomial standard deviations of the sample
    rank, plus slack. -1 and m stand for no bound below and above."""
    center = (rank + 0.5) * m / total
    margin = 4 * math.sqrt(max(center * (1 - center / m), 1.0)) + 4
    return max(-1, math.floor(center - margin)), min(m, math.ceil(center + margin))


def sample_bracket(sample: torch.Tensor, rank: int, total: int) -> tuple[float, float]:
    """The value range between a sample's `bracket_ranks`."""
    values = sample.reshape(-1).to(torch.float32)
    m = values.numel()
    low_index, high_index = bracket_ranks(rank, total, m)
    low = values.kthvalue(low_index + 1).values.item() if low_index >= 0 else -math.inf
    high = values.kthvalue(high_index + 1).values.item() if high_index < m else math.inf
    return low, high


def _in_range(chunk: torch.Tensor, low: float, high: float, nonnegative: bool,
              scratch: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(how many values are below `low`, the values inside [low, high]) for one chunk."""
    if low == -math.inf:
        return 0, chunk[chunk <= high]
    if high == math.inf:
        inside = chunk[chunk >= low]
        return chunk.numel() - inside.numel(), inside
    below = chunk.numel() - int(torch.ge(chunk, low, out=scratch).sum().item())
    if low > 0 or (nonnegative and low >= 0):
        # Floats >= +0 sort like their int32 bit patterns (negative ones land far outside), so
        # "low <= x <= high" is one unsigned comparison of bits(x) - bits(low) with the span.
        key_low = _float_key(low)
        span = _float_key(high) - key_low + 1
        offsets = torch.sub(chunk.view(torch.int32), key_low, out=scratch.view(torch.int32))
        return below, chunk[offsets.bitwise_xor_(-(2**31)) < span - 2**31]
    return below, chunk[(chunk >= low) & (chunk <= high)]


def kth_smallest_sampled(make_chunks: Callable[[], Iterable[torch.Tensor]], ranks: Sequence[int],
                         total: int, sample: torch.Tensor, nonnegative: bool = False
                         ) -> list[float]:
    """Exact values of the ascending `ranks` over the streamed chunks, all in one pass when
    `sample` (values spread over the data) brackets them; a rank it misjudged falls back to radix
    select (three passes)."""
    brackets = [sample_bracket(sample, rank, total) for rank in ranks]
    below = [0] * len(ranks)
    pools: list[list[torch.Tensor]] = [[] for _ in ranks]
    for chunk in make_chunks():
        scratch = torch.empty_like(chunk)
        for index, (low, high) in enumerate(brackets):
            count, inside = _in_range(chunk, low, high, nonnegative, scratch)
            below[index] += count
            pools[index].append(inside)
    values = []
    for rank, count, parts in zip(ranks, below, pools, strict=True):
        pool = torch.cat(parts) if parts else torch.empty(0)
        if count <= rank < count + pool.numel():
            values.append(pool.kthvalue(rank - count + 1).values.item())
        else:
            values.append(kth_smallest_streaming(make_chunks, rank, nonnegative))
    return values
