"""exp and tanh from IEEE basic operations only: the same bits on every device and kernel path.

Library exp/tanh differ in their last bits between CPU vector libraries, CUDA and C's libm, so a
merge that uses them (PCB's scores) would change with the machine. These versions use only
multiply, add, subtract, divide, round-to-nearest-even and exponent-bit assembly, each exactly
rounded by IEEE 754 on every device, in a fixed order with no fused multiply-add. The fused C
kernels (`native_kernels.c`) implement the identical sequence, so both give the same bits.

Accuracy (float32, tests/test_ieee_math.py): exp within 1.5 ulp on [-87, 88] (Cody-Waite reduction,
degree-7 Taylor on |r| <= ln2/2, evaluated by Estrin's scheme with the leading 1 added last: its
independent pairs overlap in vector units where a Horner chain waits on each step, which speeds up
PCB's scoring loop); tanh within 2.5 ulp (odd Taylor series to x^13 below |x| = 0.4,
1 - 2/(e^2|x| + 1) above).
"""

from __future__ import annotations

import torch

LOG2E = float.fromhex("0x1.715476p+0")
LN2_HI = float.fromhex("0x1.62e4p-1")  # trailing zero bits: k * LN2_HI is exact for |k| < 512
LN2_LO = float.fromhex("0x1.7f7d1cp-20")
EXP_TAYLOR = [float.fromhex(h) for h in  # 1/7!, 1/6!, ..., 1/2!, 1, 1 (Horner order)
              ("0x1.a01a02p-13", "0x1.6c16c2p-10", "0x1.111112p-7", "0x1.555556p-5", "0x1.555556p-3",
               "0x1p-1", "0x1p+0", "0x1p+0")]
TANH_TAYLOR = [float.fromhex(h) for h in  # 21844/6081075, ..., 2/15, -1/3 (Horner order)
               ("0x1.d6d3d0p-9", "-0x1.226e36p-7", "0x1.664f48p-6", "-0x1.ba1ba2p-5",
                "0x1.111112p-3", "-0x1.555556p-2")]
TANH_SMALL = 0.4


def exp(x: torch.Tensor) -> torch.Tensor:
    """exp of float32 `x` (clamped to [-87, 88], where float32 exp is normal and finite)."""
    x = x.clamp(-87.0, 88.0)
    k = torch.round(x * LOG2E)
    r = (x - k * LN2_HI) - k * LN2_LO
    r2 = r * r
    c7, c6, c5, c4, c3, c2, _, c0 = EXP_TAYLOR  # c1 = 1: r * c1 is r
    p = c0 + ((r + r2 * (c2 + r * c3)) + (r2 * r2) * ((c4 + r * c5) + r2 * (c6 + r * c7)))
    scale = ((k.to(torch.int32) + 127) << 23).view(torch.float32)
    return p * scale


def tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh of float32 `x`."""
    square = x * x
    p = torch.full_like(x, TANH_TAYLOR[0])
    for coefficient in TANH_TAYLOR[1:]:
        p = p * square + coefficient
    small = x + (x * square) * p
    magnitude = x.abs().clamp(max=9.0)
    large = 1.0 - 2.0 / (exp(magnitude * 2.0) + 1.0)
    large = torch.where(x < 0, -large, large)
    return torch.where(x.abs() < TANH_SMALL, small, large)
