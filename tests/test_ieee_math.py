"""The device-independent exp and tanh are accurate to a few float32 ulps."""

from __future__ import annotations

import torch

from operators import ieee_math


def _ulps(ours: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    spacing = torch.nextafter(exact.abs().float(), torch.tensor(float("inf"))) - exact.abs().float()
    return ((ours.double() - exact).abs() / spacing.double())


def test_exp_within_one_and_a_half_ulps():
    x = torch.cat([torch.linspace(-87, 88, 200_001), torch.randn(100_000) * 3]).float()
    assert _ulps(ieee_math.exp(x), torch.exp(x.double())).max().item() <= 1.5


def test_tanh_within_two_and_a_half_ulps():
    x = torch.cat([torch.linspace(-12, 12, 200_001), torch.randn(100_000) * 1e-3,
                   torch.tensor([0.0, -0.0, 0.25, -0.25, 1e-30])]).float()
    exact = torch.tanh(x.double())
    nonzero = exact != 0
    assert _ulps(ieee_math.tanh(x), exact)[nonzero].max().item() <= 2.5
    assert torch.equal(ieee_math.tanh(torch.tensor([0.0])), torch.tensor([0.0]))
