"""Structured pruning of a decoder: every layer keeps its most important MLP neurons, or its most
important key/value head groups, so the model shrinks in fine steps (LLaMA-NAS's sub-network
space) and stays a model of its own architecture, which `transformers` loads with a smaller
`intermediate_size`, or fewer `num_key_value_heads` and `num_attention_heads` at the same
`head_dim`.

**MLP width.** A neuron j of a gated MLP reads the hidden state through row j of `gate_proj` and
`up_proj` and writes it through column j of `down_proj` (Phi-3 fuses gate and up in
`gate_up_proj`: gate rows first, then up rows). Its importance by weight magnitude is the product
of those three L2 norms: a neuron that cannot write (a zero column of `down_proj`) or cannot read
matters not at all, and removing it leaves the model's outputs as they were. Removed, exactly:
per layer, (intermediate_size − keep) × 3 × hidden_size, plus one per removed MLP bias entry.

**Attention heads, grouped-query aware.** With grouped-query attention, query head h reads key
and value head h // group (`transformers`' `repeat_kv`), so heads go in whole groups: one key
head, one value head and the `group` query heads that read them. A group writes to the residual
stream only through its value rows and the `o_proj` columns of its query heads, so its importance
is ‖value rows‖ · ‖o_proj columns‖: a group whose values or output columns are zero changes
nothing, and removing it leaves the outputs as they were. The ratio `group` and `head_dim` do not
change, so the pruned config stays valid for every architecture (Phi-3's fused `qkv_proj` holds
the query rows, then the key rows, then the value rows). Removed, exactly: per layer and group,
head_dim × hidden_size × (2·group + 2), plus head_dim × (group + 2) where q/k/v have biases.

Ties keep the lower index and kept units stay in their order, so pruning is a deterministic
function of the weights.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from huggingface_hub.errors import StrictDataclassError

MLP_TENSOR = re.compile(r"^.*\.layers\.(?P<layer>\d+)\.mlp\."
                        r"(?P<part>gate_proj|up_proj|down_proj|gate_up_proj)\.(?P<kind>weight|bias)$")
ATTENTION_TENSOR = re.compile(r"^.*\.layers\.(?P<layer>\d+)\.self_attn\."
                              r"(?P<part>q_proj|k_proj|v_proj|o_proj|qkv_proj)\."
                              r"(?P<kind>weight|bias)$")

PRUNE_FIELDS = ("mlp", "kv_heads")  # a prune recipe's cuts (disjoint tensors)
Parts = dict[tuple[str, str], str]  # (part, kind) -> tensor name, for one layer


class PruneError(ValueError):
    """The model or the requested width cannot be pruned (the message says why)."""


def kept_units(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` most important units, ties to the lower index, in their original order (a CPU
    index: each cut moves it to its tensor's device)."""
    values = importance.detach().float().cpu().tolist()
    order = sorted(range(len(values)), key=lambda j: (-values[j], j))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


def _by_layer(names: list[str], pattern: re.Pattern) -> dict[int, Parts]:
    found: dict[int, Parts] = {}
    for name in names:
        match = pattern.match(name)
        if match:
            found.setdefault(int(match["layer"]), {})[(match["part"], match["kind"])] = name
    return found


def _check_layers(layers: dict[int, Parts], names: list[str], module: str,
                  complete: Callable[[Parts], bool], allowed: Callable[[str], bool],
                  what: str) -> None:
    """Every layer has the full set of tensors a cut rewrites, and no other tensor of that
    module that the cut would leave at the wrong size (`allowed`: one that does not scale)."""
    for layer, parts in layers.items():
        if not complete(parts):
            raise PruneError(f"layer {layer}'s {module} has {sorted(p for p, _ in parts)}, not "
                             f"{what}: this model's {module} cannot be pruned")
    pattern = re.compile(rf"^.*\.layers\.\d+\.{module}\.")
    matched = {name for parts in layers.values() for name in parts.values()}
    for name in names:
        if pattern.match(name) and name not in matched and not allowed(name):
            raise PruneError(f"{name} would keep its size while the {module} shrinks: this "
                             f"model's {module} cannot be pruned")


def _rows(index: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of the kept units when each unit owns `size` consecutive rows."""
    return (index[:, None] * size + torch.arange(size, device=index.device)).reshape(-1)


@dataclass(frozen=True)
class HeadShape:
    """What a pruning keeps fixed in attention: each head's size and query heads per group."""

    head_dim: int
    group: int

    @classmethod
    def of(cls, config) -> HeadShape | None:
        """The config's head shape; None for a model without attention heads (Mamba, say)."""
        heads = getattr(config, "num_attention_heads", None)
        if not heads:
            return None
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(head_dim, heads // kv_heads)


class Cut(ABC):
    """One kind of structured pruning over a model's tensor names: which tensors each layer
    prunes, how many units a layer has, each unit's importance, and the pruned tensors."""

    kind: str
    layers: dict[int, Parts]

    @abstractmethod
    def units(self, shape: Callable[[str], tuple[int, ...]]) -> int:
        """Units per layer of the model whose tensor shapes `shape` gives."""

    @abstractmethod
    def importance(self, tensors: Mapping[str, torch.Tensor], parts: Parts, units: int
                   ) -> torch.Tensor:
        """Each unit's importance in one layer, from that layer's tensors."""

    @abstractmethod
    def shape(self, part: str, kind: str, shape: tuple[int, ...], units: int, keep: int
              ) -> tuple[int, ...]:
        """A tensor's shape once its layer keeps `keep` of its `units`."""

    @abstractmethod
    def cut(self, part: str, kind: str, tensor: torch.Tensor, index: torch.Tensor, units: int
            ) -> torch.Tensor:
        """One tensor cut to its layer's kept units `index`."""

    def check(self, units: int, keep: int) -> None:
        if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= units:
            raise PruneError(f"{self.kind} {keep!r}: this model has {units} per layer; keep "
                             f"between 1 and {units}")


class MlpWidth(Cut):
    """A gated MLP's intermediate neurons (see the module docstring)."""

    kind = "mlp"

    def __init__(self, names: list[str]):
        self.layers = _by_layer(names, MLP_TENSOR)
        if not self.layers:
            raise PruneError("no gated MLP tensors (layers.N.mlp.gate_proj/up_proj/down_proj or "
                             "gate_up_proj) in this model: its MLP width cannot be pruned")
        _check_layers(self.layers, names, "mlp", lambda parts: ("down_proj", "weight") in parts
                      and (("gate_up_proj", "weight") in parts or {("gate_proj", "weight"),
                                                                   ("up_proj", "weight")} <= set(parts)),
                      lambda name: False, "a gated MLP (gate, up and down projections)")

    def units(self, shape: Callable[[str], tuple[int, ...]]) -> int:
        return shape(next(iter(self.layers.values()))[("down_proj", "weight")])[1]

    def importance(self, tensors: Mapping[str, torch.Tensor], parts: Parts, units: int
                   ) -> torch.Tensor:
        if ("gate_up_proj", "weight") in parts:
            fused = tensors[parts[("gate_up_proj", "weight")]]
            gate, up = fused[:units], fused[units:]
        else:
            gate, up = tensors[parts[("gate_proj", "weight")]], tensors[parts[("up_proj", "weight")]]
        down = tensors[parts[("down_proj", "weight")]]
        return gate.float().norm(dim=1) * up.float().norm(dim=1) * down.float().norm(dim=0)

    def shape(self, part: str, kind: str, shape: tuple[int, ...], units: int, keep: int
              ) -> tuple[int, ...]:
        if part == "down_proj":
            return (shape[0], keep) if kind == "weight" else shape
        return (2 * keep if part == "gate_up_proj" else keep, *shape[1:])

    def cut(self, part: str, kind: str, tensor: torch.Tensor, index: torch.Tensor, units: int
            ) -> torch.Tensor:
        if part == "down_proj":
            return tensor.index_select(1, index) if kind == "weight" else tensor
        if part == "gate_up_proj":
            return tensor.index_select(0, torch.cat([index, index + units]))
        return tensor.index_select(0, index)


class AttentionHeads(Cut):
    """Key/value head groups with their query heads (see the module docstring)."""

    kind = "kv_heads"

    def __init__(self, names: list[str], shape: Callable[[str], tuple[int, ...]],
                 heads: HeadShape | None):
        self.layers = _by_layer(names, ATTENTION_TENSOR)
        if not self.layers:
            raise PruneError("no attention projections (layers.N.self_attn.q_proj/k_proj/v_proj/"
                             "o_proj or qkv_proj) in this model: its heads cannot be pruned")
        if heads is None:
            raise PruneError("pruning heads needs the model's head_dim and query heads per "
                             "key/value head (HeadShape.of(config)); none was given")
        self.heads = heads
        per_head = (heads.head_dim,)  # q/k norms over one head's features (Qwen3, Gemma3)
        _check_layers(self.layers, names, "self_attn", lambda parts: ("o_proj", "weight") in parts
                      and (("qkv_proj", "weight") in parts or {("q_proj", "weight"), (
                          "k_proj", "weight"), ("v_proj", "weight")} <= set(parts)),
                      lambda name: tuple(shape(name)) == per_head,
                      "separate or fused q/k/v projections and o_proj")

    def units(self, shape: Callable[[str], tuple[int, ...]]) -> int:
        parts = next(iter(self.layers.values()))
        if ("qkv_proj", "weight") in parts:
            rows = shape(parts[("qkv_proj", "weight")])[0]
            return rows // ((self.heads.group + 2) * self.heads.head_dim)
        return shape(parts[("k_proj", "weight")])[0] // self.heads.head_dim

    def _split(self, tensor: torch.Tensor, units: int) -> list[torch.Tensor]:
        """A fused qkv tensor as its query, key and value rows."""
        dim, group = self.heads.head_dim, self.heads.group
        return list(tensor.split([units * group * dim, units * dim, units * dim]))

    def importance(self, tensors: Mapping[str, torch.Tensor], parts: Parts, units: int
                   ) -> torch.Tensor:
        if ("qkv_proj", "weight") in parts:
            values = self._split(tensors[parts[("qkv_proj", "weight")]], units)[2]
        else:
            values = tensors[parts[("v_proj", "weight")]]
        output = tensors[parts[("o_proj", "weight")]]
        value_norm = values.float().reshape(units, -1).norm(dim=1)
        output_norm = output.float().t().reshape(units, -1).norm(dim=1)
        return value_norm * output_norm

    def shape(self, part: str, kind: str, shape: tuple[int, ...], units: int, keep: int
              ) -> tuple[int, ...]:
        if part == "o_proj":
            return (shape[0], shape[1] // units * keep) if kind == "weight" else shape
        return (shape[0] // units * keep, *shape[1:])

    def cut(self, part: str, kind: str, tensor: torch.Tensor, index: torch.Tensor, units: int
            ) -> torch.Tensor:
        dim, group = self.heads.head_dim, self.heads.group
        if part == "o_proj":
            return tensor.index_select(1, _rows(index, group * dim)) if kind == "weight" \
                else tensor
        if part == "q_proj":
            return tensor.index_select(0, _rows(index, group * dim))
        if part in ("k_proj", "v_proj"):
            return tensor.index_select(0, _rows(index, dim))
        query, key, value = self._split(tensor, units)
        return torch.cat([query.index_select(0, _rows(index, group * dim)),
                          key.index_select(0, _rows(index, dim)),
                          value.index_select(0, _rows(index, dim))])


def cut_for(kind: str, names: list[str], shape: Callable[[str], tuple[int, ...]],
            heads: HeadShape | None = None) -> Cut:
    """The cut a prune's field names: `mlp` (neurons) or `kv_heads` (head groups)."""
    if kind == "mlp":
        return MlpWidth(names)
    if kind == "kv_heads":
        return AttentionHeads(names, shape, heads)
    raise PruneError(f"unknown prune field {kind!r}; expected mlp or kv_heads")


def prunable_units(names: list[str], shape: Callable[[str], tuple[int, ...]],
                   heads: HeadShape | None, config=None) -> dict[str, int]:
    """Per cut this model allows (`mlp`, `kv_heads`), its units per layer. A cut whose tensors
    the model does not have in full is left out, and so are heads where `config` (the sources'
    transformers config) would not validate with fewer of them: Phi-3's long-context RoPE
    factors are sized by hidden_size / heads, so its pruned config would not load again."""
    units = {}
    for kind in PRUNE_FIELDS:
        try:
            units[kind] = cut_for(kind, names, shape, heads).units(shape)
        except PruneError:
            continue
    if "kv_heads" in units and config is not None:
        fewest = {"num_key_value_heads": 1, "num_attention_heads": heads.group,
                  "head_dim": heads.head_dim}
        try:
            type(config).from_dict(config.to_dict() | fewest)
        except (ValueError, TypeError, StrictDataclassError):  # transformers' config validation
            del units["kv_heads"]
    return units


def prune_state(state: Mapping[str, torch.Tensor], cut: Cut, keep: int
                ) -> dict[str, torch.Tensor]:
    """The state dict with every layer cut to its `keep` most important units (a whole model in
    memory: the reference for the streaming prune in `operators.recipes`)."""
    units = cut.units(lambda name: tuple(state[name].shape))
    cut.check(units, keep)
    out = dict(state)
    for parts in cut.layers.values():
        index = kept_units(cut.importance(state, parts, units), keep)
        for (part, kind), name in parts.items():
            out[name] = cut.cut(part, kind, state[name], index.to(state[name].device), units)
    return out


def removed_mlp_parameters(hidden_size: int, layers: int, intermediate_size: int, keep: int,
                           mlp_bias: bool = False) -> int:
    """Parameters that pruning the MLP to `keep` neurons removes (see the module docstring)."""
    return layers * (intermediate_size - keep) * (3 * hidden_size + (2 if mlp_bias else 0))


def removed_head_parameters(hidden_size: int, layers: int, heads: HeadShape, kv_heads: int,
                            keep: int, qkv_bias: bool = False) -> int:
    """Parameters that pruning attention to `keep` key/value groups removes (module docstring)."""
    per_group = heads.head_dim * hidden_size * (2 * heads.group + 2) \
        + (heads.head_dim * (heads.group + 2) if qkv_bias else 0)
    return layers * (kv_heads - keep) * per_group
