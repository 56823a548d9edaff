"""Counter-based randomness that gives the same bits on every device and in every order.

DARE, DELLA and weight mutation draw one random number per parameter. A recipe must materialize
bit-identically on any worker, CPU or GPU, whichever tensor it happens to process first, so we do
not use torch's generators (CPU uses MT19937, CUDA uses Philox: different streams). Instead each
element's random number is a hash of (stream key, element index), computed with 32-bit integer
multiplies, xors and masked shifts: integer arithmetic is exact and identical on every device.

The stream key is derived from (recipe seed, tensor name, purpose), so two tensors or two models of
a merge never share a stream, and any chunk of a tensor can be generated independently (the merge
engine streams tensors chunk by chunk). The hash is Wellons' "lowbias32" applied to
(index * golden ratio + key); every step runs in place, so a chunk costs about a dozen cheap
passes over an L2-resident buffer.
"""

from __future__ import annotations

import hashlib
import math

import torch

UNIFORM_BITS = 24
_UNIFORM_SCALE = 2.0**-UNIFORM_BITS
_GOLDEN = -1640531535  # 0x9E3779B1 as int32: spreads consecutive indices over the word
_MIX1 = 0x7FEB352D  # multipliers of the lowbias32 finalizer, good avalanche
_MIX2 = -2073254261  # 0x846CA68B as int32


def stream_key(seed: int, name: str, purpose: str) -> int:
    """A 32-bit key (as a signed int) for one random stream: stable across Python runs."""
    digest = hashlib.blake2b(f"{seed}\x00{purpose}\x00{name}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little", signed=True)


def _xorshift_(x: torch.Tensor, shift: int, scratch: torch.Tensor) -> None:
    """x ^= x >>> shift (a logical shift, emulated on signed int32 by masking)."""
    torch.bitwise_right_shift(x, shift, out=scratch)
    scratch.bitwise_and_((1 << (32 - shift)) - 1)
    x.bitwise_xor_(scratch)


def _wrap32(value: int) -> int:
    return (value + 2**31) % 2**32 - 2**31


def _hashed(key: int, start: int, count: int, device: torch.device | str,
            out: torch.Tensor | None, scratch: torch.Tensor | None,
            spread: torch.Tensor | None) -> torch.Tensor:
    """lowbias32(index * golden + key) for the elements start..start+count, as signed int32.

    `spread` (optional) holds arange(count) * golden, which callers reuse across chunks: the
    element index enters as a constant offset, one add instead of a fresh arange per chunk.
    """
    if out is None:
        out = torch.empty(count, dtype=torch.int32, device=device)
    if scratch is None:
        scratch = torch.empty_like(out)
    offset = _wrap32(start * _GOLDEN + key)
    if spread is None:
        torch.arange(count, dtype=torch.int32, device=out.device, out=out).mul_(_GOLDEN)
        out.add_(offset)
    else:
        torch.add(spread[:count], offset, out=out)
    _xorshift_(out, 16, scratch)
    out.mul_(_MIX1)
    _xorshift_(out, 15, scratch)
    out.mul_(_MIX2)
    _xorshift_(out, 16, scratch)
    return out


def golden_spread(count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """arange(count) * golden (int32, wrapping): the reusable index term of every stream."""
    return torch.arange(count, dtype=torch.int32, device=device).mul_(_GOLDEN)


def random_bits(key: int, start: int, count: int, device: torch.device | str = "cpu"
                ) -> torch.Tensor:
    """`count` uniform integers in [0, 2**24) for elements start..start+count of stream `key`:
    the hash's top 24 bits."""
    hashed = _hashed(key, start, count, device, None, None, None)
    return hashed.bitwise_right_shift_(32 - UNIFORM_BITS).add_(1 << (UNIFORM_BITS - 1))


def keep_threshold(probability: float) -> int:
    """The integer t such that "bits < t" holds exactly when bits / 2**24 < float32(probability)."""
    p32 = float(torch.tensor(probability, dtype=torch.float32))
    return math.ceil(p32 * 2**UNIFORM_BITS)


def keep_mask(key: int, start: int, count: int, probability: float,
              device: torch.device | str = "cpu", out: torch.Tensor | None = None,
              bits: torch.Tensor | None = None, scratch: torch.Tensor | None = None,
              spread: torch.Tensor | None = None) -> torch.Tensor:
    """Float 0/1 mask: 1 where this stream's uniform is below `probability` (DARE's keep draw).

    Equal to ``uniform(...) < probability`` in float32, computed without leaving int32: the top
    24 bits of the hash, shifted arithmetically, are the uniform's bits minus 2**23.
    `out`, `bits`, `scratch` and `spread` (see `golden_spread`) make it allocation-free.
    """
    hashed = _hashed(key, start, count, device, bits, scratch, spread)
    hashed.bitwise_right_shift_(32 - UNIFORM_BITS)
    if out is None:
        out = torch.empty(count, dtype=torch.float32, device=hashed.device)
    return torch.lt(hashed, keep_threshold(probability) - (1 << (UNIFORM_BITS - 1)), out=out)


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
