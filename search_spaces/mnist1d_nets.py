"""MNIST-1D classifiers described by a small, editable architecture spec.

An architecture is data (`NetSpec`: convolution layers, then hidden widths), so the NAS zoo's
reference models are points of a search space that mutations and architecture edits can move
through, and any spec builds the same `torch` module on any worker.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

SIGNAL_LENGTH = 40
CLASSES = 10


@dataclass(frozen=True)
class ConvLayer:
    channels: int
    kernel: int
    stride: int


@dataclass(frozen=True)
class NetSpec:
    convs: tuple[ConvLayer, ...] = ()
    hidden: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


# The reference models of the MNIST-1D paper (Greydanus, 2020): a 3-layer CNN and a 3-layer MLP.
REFERENCE_CNN = NetSpec(convs=(ConvLayer(25, 5, 2), ConvLayer(25, 3, 2), ConvLayer(25, 3, 2)))
REFERENCE_MLP = NetSpec(hidden=(100, 100))


class Mnist1dNet(nn.Module):
    """Conv1d + ReLU layers (padding 1), flattened, then Linear + ReLU layers, then 10 logits."""

    def __init__(self, spec: NetSpec):
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = []
        channels, length = 1, SIGNAL_LENGTH
        for conv in spec.convs:
            layers += [nn.Conv1d(channels, conv.channels, conv.kernel, conv.stride, padding=1),
                       nn.ReLU()]
            channels, length = conv.channels, (length + 2 - conv.kernel) // conv.stride + 1
            if length < 1:
                raise ValueError(f"architecture {spec}: the signal shrinks to nothing")
        layers.append(nn.Flatten())
        width = channels * length
        for hidden in spec.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, CLASSES))
        self.layers = nn.Sequential(*layers)

    def forward(self, signals: torch.Tensor) -> torch.Tensor:
        return self.layers(signals.unsqueeze(1) if self.spec.convs else signals)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
