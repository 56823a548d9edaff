"""What a checkpoint's tensors are, from mergekit's architecture definitions instead of regexes.

mergekit keeps a definition per architecture (Llama, Qwen2/3, Mistral, Gemma2/3, Phi-3 and
dozens more): the weights before the decoder layers, each layer's weights as a template, the
weights after them, which are optional (biases, an `lm_head` that tied checkpoints leave out) and
which are tied to which. evoforge reads a checkpoint's tensors through it, so:

- a layer edit renames `model.layers.5.self_attn.q_proj.weight` by the template's position, not a
  guess at the naming scheme;
- tensors a definition does not describe, required tensors that are missing, and checkpoints that
  differ in tying are found before any work, with messages that name the tensor;
- config lists with one entry per decoder layer (`layer_types`, sliding-window patterns) follow
  the layers when an edit drops, repeats or reorders them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from operators.errors import CheckpointError


@dataclass(frozen=True)
class Weight:
    name: str
    optional: bool = False
    tied_to: tuple[str, ...] = ()
    vocab_axis: int | None = None  # the axis indexed by token ids (embeddings, lm_head)


@dataclass(frozen=True)
class Architecture:
    """One model's architecture: weight names by position (pre, per layer, post)."""

    name: str  # e.g. LlamaForCausalLM
    num_layers: int
    layers_key: str  # the config key holding the number of decoder layers
    pre: tuple[Weight, ...]
    post: tuple[Weight, ...]
    layer_weights: tuple[tuple[Weight, ...], ...]  # per layer, template order

    @classmethod
    def of(cls, config) -> Architecture:
        """The architecture of a transformers config; a clear error where mergekit has none."""
        from mergekit.architecture import arch_info_for_config

        names = list(getattr(config, "architectures", None) or [])
        if len(names) != 1:
            raise CheckpointError(
                f"config.json lists architectures {names}; evoforge needs exactly one (e.g. "
                "LlamaForCausalLM) to know the checkpoint's tensors")
        info = arch_info_for_config(config)
        if info is None or "default" not in info.modules:
            raise CheckpointError(
                f"architecture {names[0]} ({config.model_type!r}) has no mergekit definition, so "
                "evoforge cannot tell its decoder layers from its other tensors. Supported: "
                f"{', '.join(supported_architectures()[:12])}, … (mergekit's architecture list); "
                "add a JSON definition to mergekit or convert the model to a supported one")
        module = info.modules["default"].architecture
        prefix = info.modules["default"].weight_prefix or ""
        layers_key = module.num_layers_config_key()
        num_layers = int(getattr(config, layers_key))

        def weights(found) -> tuple[Weight, ...]:
            return tuple(Weight(prefix + w.name, w.optional,
                                tuple(prefix + t for t in w.tied_names or ()), w.vocabulary_axis)
                         for w in found)
        return cls(names[0], num_layers, layers_key, weights(module.pre_weights(config)),
                   weights(module.post_weights(config)),
                   tuple(weights(module.layer_weights(i, config)) for i in range(num_layers)))

    # -- names -------------------------------------------------------------------------------

    def layer_names(self, index: int) -> tuple[str, ...]:
        """Layer `index`'s weight names in template order (extrapolated past the source depth)."""
        if index < self.num_layers:
            return tuple(w.name for w in self.layer_weights[index])
        template = self.layer_weights[0]
        return tuple(_renumber(w.name, 0, index) for w in template)

    def locate(self, name: str) -> tuple[int, int] | None:
        """(layer, position in the layer's template) of a layer tensor; None outside the layers."""
        return self._positions.get(name)

    @cached_property
    def _positions(self) -> dict[str, tuple[int, int]]:
        return {w.name: (i, k) for i, layer in enumerate(self.layer_weights)
                for k, w in enumerate(layer)}

    def rename(self, name: str, new_layer: int) -> str:
        """The name of layer tensor `name` when its layer sits at `new_layer` of the output."""
        _, position = self.locate(name)  # type: ignore[misc]
        return self.layer_names(new_layer)[position]

    def check_tensors(self, names: Iterable[str], label: str) -> None:
        """Every tensor is described by the definition and every required one is present."""
        names = set(names)
        described = {w.name for w in (*self.pre, *self.post)} | set(self._positions)
        unknown = sorted(names - described)
        if unknown:
            raise CheckpointError(
                f"{label}: tensors {unknown[:4]}{' …' if len(unknown) > 4 else ''} are not in "
                f"mergekit's {self.name} definition; the checkpoint is not a plain {self.name} "
                "(an adapter, a vision tower, another architecture?). Give a checkpoint of the "
                "architecture config.json names")
        required = [w.name for layer in ((*self.pre, *self.post), *self.layer_weights)
                    for w in layer if not w.optional]
        missing = [n for n in required if n not in names]
        if missing:
            raise CheckpointError(
                f"{label}: required tensors {missing[:4]} are missing; the checkpoint is "
                "incomplete (re-save it with save_pretrained)")

    def tied_missing(self, names: Iterable[str]) -> dict[str, str]:
        """{weight left out of the checkpoint: the weight it is tied to} (e.g. lm_head)."""
        names = set(names)
        return {w.name: next(t for t in w.tied_to if t in names)
                for w in (*self.pre, *self.post)
                if w.name not in names and any(t in names for t in w.tied_to)}


def _renumber(name: str, old: int, new: int) -> str:
    marker = f".{old}."
    at = name.index(marker)
    return f"{name[:at]}.{new}.{name[at + len(marker):]}"


def supported_architectures() -> list[str]:
    from mergekit.architecture.json_definitions import NAME_TO_ARCH

    return sorted(NAME_TO_ARCH)


def per_layer_keys(config: Mapping[str, Any], depth: int) -> list[str]:
    """Config keys that hold one entry per decoder layer (`layer_types`, sliding-window
    patterns): lists as long as the model is deep; token-id lists and `architectures` are not
    per layer, whatever their length."""
    return [key for key, value in config.items() if isinstance(value, list | tuple)
            and len(value) == depth and key != "architectures"
            and not key.endswith(("_id", "_ids"))]


def edited_config(config, layers: Sequence[int], architecture: Architecture):
    """A copy of `config` for a model whose decoder layers are `layers` (source indices, in
    output order): the layer count, and every per-layer list reindexed so each layer keeps its
    own settings (a sliding-window layer stays sliding wherever it moves)."""
    out = copy.deepcopy(config)
    depth = getattr(config, architecture.layers_key)
    for key in per_layer_keys(vars(config), depth):
        value = getattr(config, key)
        setattr(out, key, type(value)(value[k] for k in layers))
    setattr(out, architecture.layers_key, len(layers))
    return out


def check_compatible(base, others: Sequence, architecture: Architecture) -> None:
    """The sources can be merged: each is described by the architecture, ties its embeddings as
    the base does, and has the base's tensors and shapes (vocabulary size included). Each
    message names the tensor, both sides and the fix."""
    names = set(base.names())
    architecture.check_tensors(names, base.label)
    base_tied = architecture.tied_missing(names)
    for other in others:
        found = set(other.names())
        architecture.check_tensors(found, other.label)
        tied = architecture.tied_missing(found)
        for weight in sorted(set(base_tied) ^ set(tied)):
            tied_side, full_side = (base, other) if weight in base_tied else (other, base)
            raise CheckpointError(
                f"{tied_side.label} ties {weight} to {(base_tied | tied)[weight]} (no {weight} "
                f"on disk) but {full_side.label} stores its own {weight}: they differ in tying "
                "(tie_word_embeddings). Merge models that tie alike: save the tied one untied "
                f"(set tie_word_embeddings=false and save_pretrained, which writes {weight})")
        if found != names:
            raise CheckpointError(
                f"{other.label} and {base.label} have different tensors (only in "
                f"{other.label}: {sorted(found - names)[:3]}; missing there: "
                f"{sorted(names - found)[:3]}); experts must be fine-tunes of the base")
        vocab_axes = {w.name: w.vocab_axis for w in (*architecture.pre, *architecture.post)}
        order = [w.name for w in architecture.pre] + sorted(names)
        for name in [n for n in order if n in names]:
            theirs, ours = tuple(other.shape(name)), tuple(base.shape(name))
            if theirs != ours:
                axis = vocab_axes.get(name)
                vocab = axis is not None and len(theirs) == len(ours) and all(
                    a == b for k, (a, b) in enumerate(zip(theirs, ours, strict=True)) if k != axis)
                fix = ("the vocabularies differ: resize the expert's embeddings to the base's "
                       "(model.resize_token_embeddings) or pick experts with the base's "
                       "tokenizer" if vocab else "experts must share the base's architecture")
                raise CheckpointError(
                    f"tensor {name}: shape {list(other.shape(name))} in {other.label} but "
                    f"{list(base.shape(name))} in {base.label}; {fix}")
