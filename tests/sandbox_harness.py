"""A harness for the sandbox tests: build the candidate's `Net`, run it once, say its size."""

from __future__ import annotations

import torch


def build(names: dict, batch: int = 2) -> dict:
    net = names["Net"]()
    out = net(torch.zeros(batch, 1, 40))
    return {"params": sum(p.numel() for p in net.parameters()), "shape": list(out.shape)}


def large(names: dict, size: int) -> dict:
    """A reply larger than a pipe's buffer."""
    return {"blob": "x" * size}
