"""Structured pruning of a decoder's MLP width: every layer keeps its `keep` most important
intermediate neurons, so the model shrinks in fine steps (LLaMA-NAS's sub-network space) and stays
a model of its own architecture, which `transformers` loads with `intermediate_size = keep`.

A neuron j of a gated MLP reads the hidden state through row j of `gate_proj` and `up_proj` and
writes it through column j of `down_proj` (Phi-3 fuses gate and up in `gate_up_proj`: gate rows
first, then up rows). Its importance by weight magnitude is the product of those three L2 norms:
a neuron that cannot write (a zero column of `down_proj`) or cannot read matters not at all, and
removing it leaves the model's outputs as they were. Ties keep the lower index, and kept neurons
stay in their order, so pruning is a deterministic function of the weights.

Parameters removed, exactly: for every layer, (intermediate_size − keep) × 3 × hidden_size, plus
one per removed entry of any MLP bias.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

MLP_TENSOR = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.mlp\.)"
                        r"(?P<part>gate_proj|up_proj|down_proj|gate_up_proj)\.(?P<kind>weight|bias)$")


class PruneError(ValueError):
    """The model or the requested width cannot be pruned (the message says why)."""


def mlp_layers(names: list[str]) -> dict[int, dict[tuple[str, str], str]]:
    """Per decoder layer, its gated-MLP tensors by (part, kind): ('down_proj', 'weight')…"""
    found: dict[int, dict[tuple[str, str], str]] = {}
    for name in names:
        match = MLP_TENSOR.match(name)
        if match:
            found.setdefault(int(match["layer"]), {})[(match["part"], match["kind"])] = name
    return found


def _rows(state: Mapping[str, torch.Tensor], parts: dict, width: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up rows of one layer (split or fused)."""
    if ("gate_up_proj", "weight") in parts:
        fused = state[parts[("gate_up_proj", "weight")]]
        return fused[:width], fused[width:]
    return state[parts[("gate_proj", "weight")]], state[parts[("up_proj", "weight")]]


def neuron_importance(state: Mapping[str, torch.Tensor], parts: dict, width: int
                      ) -> torch.Tensor:
    """Per intermediate neuron of one layer: |gate row| · |up row| · |down column|."""
    gate, up = _rows(state, parts, width)
    down = state[parts[("down_proj", "weight")]]
    return (gate.float().norm(dim=1) * up.float().norm(dim=1) * down.float().norm(dim=0))


def kept_neurons(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` most important neurons, ties to the lower index, in their original order."""
    order = sorted(range(len(importance)), key=lambda j: (-float(importance[j]), j))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


def check_width(layers: dict, intermediate_size: int, keep: int) -> None:
    if not layers:
        raise PruneError("no gated MLP tensors (layers.N.mlp.gate_proj/up_proj/down_proj or "
                         "gate_up_proj) in this model: its MLP width cannot be pruned")
    if not isinstance(keep, int) or not 1 <= keep <= intermediate_size:
        raise PruneError(f"keep {keep}: an MLP of {intermediate_size} neurons keeps between 1 and "
                         f"{intermediate_size}")


def pruned_shape(part: str, kind: str, shape: tuple[int, ...], keep: int) -> tuple[int, ...]:
    """A tensor's shape once its layer keeps `keep` neurons."""
    if part == "down_proj":
        return (shape[0], keep) if kind == "weight" else shape
    rows = 2 * keep if part == "gate_up_proj" else keep
    return (rows, *shape[1:])


def prune_tensor(part: str, kind: str, tensor: torch.Tensor, index: torch.Tensor,
                 intermediate_size: int) -> torch.Tensor:
    """One MLP tensor cut to the kept neurons `index` of its layer."""
    if part == "down_proj":
        return tensor.index_select(1, index) if kind == "weight" else tensor
    if part == "gate_up_proj":
        return torch.cat([tensor.index_select(0, index),
                          tensor.index_select(0, index + intermediate_size)])
    return tensor.index_select(0, index)


def prune_mlp(state: Mapping[str, torch.Tensor], intermediate_size: int, keep: int
              ) -> dict[str, torch.Tensor]:
    """The state dict with every layer's MLP cut to its `keep` most important neurons."""
    layers = mlp_layers(list(state))
    check_width(layers, intermediate_size, keep)
    out = dict(state)
    for parts in layers.values():
        index = kept_neurons(neuron_importance(state, parts, intermediate_size), keep)
        for (part, kind), name in parts.items():
            out[name] = prune_tensor(part, kind, state[name], index, intermediate_size)
    return out


def removed_parameters(hidden_size: int, layers: int, intermediate_size: int, keep: int,
                       mlp_bias: bool = False) -> int:
    """Parameters that `prune_mlp` removes (see the module docstring)."""
    per_neuron = 3 * hidden_size + (2 if mlp_bias else 0)
    return layers * (intermediate_size - keep) * per_neuron
