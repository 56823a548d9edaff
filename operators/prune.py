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


def _layers(names: list[str]) -> dict[int, dict[tuple[str, str], str]]:
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


def prune_mlp(state: Mapping[str, torch.Tensor], intermediate_size: int, keep: int
              ) -> dict[str, torch.Tensor]:
    """The state dict with every layer's MLP cut to its `keep` most important neurons."""
    if not 1 <= keep <= intermediate_size:
        raise PruneError(f"keep {keep}: an MLP of {intermediate_size} neurons keeps between 1 and "
                         f"{intermediate_size}")
    layers = _layers(list(state))
    if not layers:
        raise PruneError("no gated MLP tensors (layers.N.mlp.gate_proj/up_proj/down_proj or "
                         "gate_up_proj) in this model: its MLP width cannot be pruned")
    out = dict(state)
    for parts in layers.values():
        index = kept_neurons(neuron_importance(state, parts, intermediate_size), keep)
        for (part, kind), name in parts.items():
            tensor = state[name]
            if part == "down_proj":
                out[name] = tensor.index_select(1, index) if kind == "weight" else tensor
            elif part == "gate_up_proj":
                out[name] = torch.cat([tensor.index_select(0, index),
                                       tensor.index_select(0, index + intermediate_size)])
            else:
                out[name] = tensor.index_select(0, index)
    return out


def removed_parameters(hidden_size: int, layers: int, intermediate_size: int, keep: int,
                       mlp_bias: bool = False) -> int:
    """Parameters that `prune_mlp` removes (see the module docstring)."""
    per_neuron = 3 * hidden_size + (2 if mlp_bias else 0)
    return layers * (intermediate_size - keep) * per_neuron
