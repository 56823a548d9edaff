"""Counter-based randomness that gives the same bits on every device and in every order.

DARE, DELLA and weight mutation draw one random number per parameter. A recipe must materialize
bit-identically on any worker, CPU or GPU, whichever tensor it happens to process first, so we do
not use torch's generators (CPU uses MT19937, CUDA uses Philox: different streams). Instead each
element's random number is a hash of (stream key, element index), computed with 32-bit integer
multiplies, xors and masked shifts: integer arithmetic is exact and identical on every device.

The stream key is derived from (recipe seed, tensor name, purpose), so two tensors or two models of
a merge never share a stream, and any chunk of a tensor can be generated independently (the merge
engine streams tensors chunk by chunk).
"""

from __future__ import annotations

import hashlib
import math

import torch

UNIFORM_BITS = 24
_UNIFORM_SCALE = 2.0**-UNIFORM_BITS
_GOLDEN = -1640531535  # 0x9E3779B1 as int32: spreads consecutive indices over the word
_MIX1 = 0x7FEB352D  # multipliers of the "lowbias32" finalizer (Wellons), good avalanche
_MIX2 = -2073254261  # 0x846CA68B as int32


def stream_key(seed: int, name: str, purpose: str) -> int:
    """A 32-bit key (as a signed int) for one random stream: stable across Python runs."""
    digest = hashlib.blake2b(f"{seed}\x00{purpose}\x00{name}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little", signed=True)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int32 lanes; shifts are masked so they act as logical shifts."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MIX1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _MIX2
    return x ^ ((x >> 16) & 0xFFFF)


def random_bits(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`count` uniform integers in [0, 2**24) for elements start..start+count of stream `key`."""
    index = torch.arange(start, start + count, dtype=torch.int64, device=device).to(torch.int32)
    mixed = _hash32(index * _GOLDEN + key)
    return (_hash32(mixed ^ key) >> (32 - UNIFORM_BITS)) & ((1 << UNIFORM_BITS) - 1)


def uniform(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform float32 numbers in [0, 1), exactly k / 2**24, identical on every device."""
    return random_bits(key, start, count, device).to(torch.float32) * _UNIFORM_SCALE


def normal(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal float32 numbers by Box-Muller on two independent uniform streams.

    The transcendental functions run in float64 and round once to float32, so CPU and GPU agree
    except when a float64 result lies within 1 ulp(f64) of a float32 rounding boundary.
    """
    u1 = (random_bits(key, start, count, device).to(torch.float64) + 1.0) * _UNIFORM_SCALE
    u2 = random_bits(key ^ 0x5BD1E995, start, count, device).to(torch.float64) * _UNIFORM_SCALE
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return (radius * torch.cos((2.0 * math.pi) * u2)).to(torch.float32)
