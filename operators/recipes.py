"""Recipes: an individual is a small JSON tree, not a blob of weights.

Leaves name source models, `{"model": "zoo/rev"}`. Inner nodes are operations with their
parameters and seeds:

    {"op": "merge", "method": "ties", "seed": 77, "base": {"model": "zoo/base"},
     "inputs": [{"model": "zoo/rev"}, {"model": "zoo/sort"}],
     "params": {"weight": [0.7, 0.4], "density": 0.35, "lambda": 1.1}}
    {"op": "mutate", "seed": 9137, "sigma": 0.01, "rate": 0.05, "input": {...}}
    {"op": "edit", "layers": [0, 1, 1, 3], "input": {...}}  (decoder layers, by input index)
    {"op": "prune", "mlp": 96, "kv_heads": 2, "input": {...}}  (every layer keeps its 96 best MLP
        neurons and its 2 best key/value head groups; either field alone is a prune too)

An edit is mergekit's passthrough slicing: the output's decoder layers, in order, as indices into
the input's; leaving one out makes the model smaller, repeating one stacks it (depth up-scaling).
A prune cuts every layer's MLP to its most important neurons and its attention to its most
important key/value head groups, by weight magnitude (`operators.prune`); the model keeps its
architecture at a smaller `intermediate_size` or with fewer heads of the same size.

A recipe is materialized as a `TensorSource` (`recipe_source`): names, shapes and dtypes come
from the leaves' metadata, and each tensor is computed when asked, by asking the children for that
tensor only. So a nested recipe (a merge of merges) streams tensor by tensor like a flat one, and
nothing model-sized exists unless a caller keeps it (a worker's resident model, its cache).

Every node's tensors are in the node's dtype: merge arithmetic runs in float32 per tensor and is
rounded once to `dtype` (the run's dtype: what the candidate is scored and exported in), as if each
intermediate model had been saved and loaded again. The same recipe therefore gives the same bits
whether a sub-recipe is recomputed, cached, scored or exported. Every operator is seeded per
tensor, so a recipe is all a run needs to store, resume or export an individual.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from operators.engine import MergeSpec, MergeStream
from operators.errors import MergeParameterError
from operators.methods import get_method
from operators.mutation import mutate_tensor
from operators.prune import PRUNE_FIELDS, Cut, HeadShape, PruneError, cut_for, kept_units
from operators.settings import split_layer_name
from operators.sources import StateDictSource, TensorSource
from operators.sparsify import Sparsifier

Recipe = dict[str, Any]
StateDict = dict[str, torch.Tensor]


class RecipeError(ValueError):
    """A recipe is malformed (unknown op, missing field, layers out of range)."""


class LayerNaming(Protocol):
    """Where a tensor sits in the decoder-layer stack (an `Architecture`, or `NamePattern`)."""

    def locate(self, name: str) -> tuple[int, Any] | None: ...

    def rename(self, name: str, new_layer: int) -> str: ...


class NamePattern:
    """Layer positions read off tensor names (`layers.<i>.`), for in-memory state dicts that come
    without a config; checkpoints use their architecture's definition instead."""

    def locate(self, name: str) -> tuple[int, Any] | None:
        parts = split_layer_name(name)
        return None if parts is None else (parts[1], (parts[0], parts[2]))

    def rename(self, name: str, new_layer: int) -> str:
        prefix, _, suffix = split_layer_name(name)  # type: ignore[misc]
        return f"{prefix}{new_layer}{suffix}"


def recipe_key(recipe: Recipe) -> str:
    """The canonical text of a recipe: equal recipes, equal keys (cache and dedup key)."""
    return json.dumps(recipe, sort_keys=True, separators=(",", ":"))


def canonical_key(recipe: Recipe) -> str:
    """A key that two recipes share when they make the same model for the same reason: the
    recipe's key with the seed of every merge that draws nothing random left out (TIES, task
    arithmetic, PCB… give the same tensors whatever their seed; DARE, DELLA and weight noise
    do not) and without the record of who proposed it (`proposal`)."""
    return recipe_key(_without_idle_seeds(recipe))


def _without_idle_seeds(recipe: Recipe) -> Recipe:
    if "model" in recipe:
        return {key: value for key, value in recipe.items() if key != "proposal"}
    out = {key: value for key, value in recipe.items()
           if key not in ("input", "base", "inputs", "proposal")}
    if recipe.get("op") == "merge" and get_method(recipe["method"]).sparsifier not in (
            Sparsifier.RANDOM, Sparsifier.DELLA):
        out.pop("seed", None)
    for key in ("input", "base"):
        if key in recipe:
            out[key] = _without_idle_seeds(recipe[key])
    if "inputs" in recipe:
        out["inputs"] = [_without_idle_seeds(child) for child in recipe["inputs"]]
    return out


def tensors_cut_at_ties(recipe: Recipe, source_of: Callable[[str], TensorSource]) -> list[str]:
    """The tensors of a flat merge of source models (edited or not) whose magnitude trims cut
    through tied magnitudes: there mergekit's argsort keeps its own choice of the tied entries
    (`operators.ties`), so mergekit-yaml reproduces every other tensor exactly, not these."""
    core = recipe["input"] if recipe.get("op") == "edit" else recipe
    spec = MergeSpec.from_kwargs(core["method"], len(core["inputs"]), seed=core.get("seed", 0),
                                 **core.get("params", {}))
    base = source_of(core["base"]["model"]) if core.get("base") else None
    stream = MergeStream(spec, base, [source_of(i["model"]) for i in core["inputs"]],
                         dtype=torch.float32)
    return [name for name in stream.names if stream.cuts_ties(name)]


def sources_of(recipe: Recipe) -> list[str]:
    """The source models a recipe reaches, in first-seen order (its lineage's leaves)."""
    if "model" in recipe:
        return [recipe["model"]]
    found: list[str] = []
    for child in [recipe.get("base"), recipe.get("input"), *recipe.get("inputs", [])]:
        for name in sources_of(child) if child else []:
            if name not in found:
                found.append(name)
    return found


def merged_sources(recipe: Recipe) -> list[str]:
    """The source models a recipe merges, in first-seen order: its leaves reached through merge
    inputs, not through a merge's base (the base is what every task vector is taken from, not a
    parent). A source recipe merges itself."""
    if "model" in recipe:
        return [recipe["model"]]
    found: list[str] = []
    for child in [recipe.get("input"), *recipe.get("inputs", [])]:
        for name in merged_sources(child) if child else []:
            if name not in found:
                found.append(name)
    return found


def layer_plan(recipe: Recipe, num_layers: int) -> list[int]:
    """The source layer behind each output layer of a recipe (for per-layer config lists)."""
    op = recipe.get("op", "model" if "model" in recipe else None)
    if op == "model":
        return list(range(num_layers))
    if op == "edit":
        inner = layer_plan(recipe["input"], num_layers)
        return [inner[k] for k in recipe["layers"] if 0 <= k < len(inner)]
    child = recipe.get("input") or recipe.get("base") or recipe["inputs"][0]
    return layer_plan(child, num_layers)


def inner_recipes(recipe: Recipe) -> list[Recipe]:
    """Every operation node below the root (sub-recipes a cache may hold), deepest first."""
    found: list[Recipe] = []
    for child in [recipe.get("base"), recipe.get("input"), *recipe.get("inputs", [])]:
        if child and "op" in child:
            found += [*inner_recipes(child), child]
    return found


class _Node:
    """A recipe node as a TensorSource; subclasses compute `get`."""

    def __init__(self, label: str, reference: TensorSource, dtype: torch.dtype | None):
        self.label, self.reference, self.out_dtype = label, reference, dtype

    def names(self) -> list[str]:
        return self.reference.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.reference.shape(name))

    def dtype(self, name: str) -> torch.dtype:
        own = self.reference.dtype(name)
        return self.out_dtype if self.out_dtype is not None and own.is_floating_point else own

    def _rounded(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.out_dtype is not None and tensor.is_floating_point():
            return tensor.to(self.out_dtype)
        return tensor


class _Leaf(_Node):
    """A source model, its floating tensors cast to the recipe's dtype (mergekit's `dtype:`)."""

    def get(self, name: str) -> torch.Tensor:
        return self._rounded(self.reference.get(name))


class _Merge(_Node):
    def __init__(self, recipe: Recipe, base: TensorSource | None, inputs: list[TensorSource],
                 dtype: torch.dtype | None, device: torch.device | str):
        if not inputs:
            raise RecipeError(f"merge recipe without inputs: {recipe}")
        spec = MergeSpec.from_kwargs(recipe["method"], len(inputs), seed=recipe.get("seed", 0),
                                     **recipe.get("params", {}))
        self.stream = MergeStream(spec, base, inputs, device, torch.float32)
        super().__init__(f"merge:{recipe['method']}", base or inputs[0], dtype)

    def names(self) -> list[str]:
        return list(self.stream.names)

    def get(self, name: str) -> torch.Tensor:
        return self._rounded(self.stream.tensor(name))


class _Mutate(_Node):
    def __init__(self, recipe: Recipe, source: TensorSource, base: TensorSource | None,
                 dtype: torch.dtype | None):
        self.seed, self.sigma, self.rate = recipe["seed"], recipe["sigma"], recipe["rate"]
        if not 0 <= self.rate <= 1:
            raise MergeParameterError(f"mutation rate={self.rate}: the gene rate must lie in [0, 1]")
        if not self.sigma >= 0:
            raise MergeParameterError(f"mutation sigma={self.sigma}: must be non-negative")
        self.source, self.base = source, base
        super().__init__("mutate", source, dtype)

    def get(self, name: str) -> torch.Tensor:
        tensor = self.source.get(name)
        base = None if self.base is None else self.base.get(name)
        return self._rounded(mutate_tensor(tensor, name, seed=self.seed, sigma=self.sigma,
                                           rate=self.rate, base=base))


class _Edit(_Node):
    """The input's decoder layers `layers` (input indices, in output order; repeats allowed),
    renumbered 0..len-1; tensors outside the layer stack are kept (mergekit passthrough)."""

    def __init__(self, layers: list[int], source: TensorSource, naming: LayerNaming,
                 dtype: torch.dtype | None):
        super().__init__("edit", source, dtype)
        names = source.names()
        by_layer: dict[int, list[str]] = {}
        head, tail = [], []
        for name in names:
            where = naming.locate(name)
            if where is None:
                (tail if by_layer else head).append(name)
            else:
                by_layer.setdefault(where[0], []).append(name)
        total = max(by_layer) + 1 if by_layer else 0
        if not layers or any(not isinstance(k, int) or not 0 <= k < total for k in layers):
            raise RecipeError(f"edit layers {layers}: the input has layers 0..{total - 1}; list "
                              "at least one of them")
        self.origin = {name: name for name in head + tail}
        for new, old in enumerate(layers):
            for name in by_layer[old]:
                self.origin[naming.rename(name, new)] = name
        self._names = head + [n for n in self.origin if n not in head and n not in tail] + tail
        self.source = source

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.source.shape(self.origin[name]))

    def dtype(self, name: str) -> torch.dtype:
        return super().dtype(self.origin[name])

    def get(self, name: str) -> torch.Tensor:
        return self._rounded(self.source.get(self.origin[name]))


class _Prune(_Node):
    """The input with every decoder layer cut to its most important units: `keep` maps a cut
    (`mlp`, `kv_heads`) to the units each layer keeps. A layer's kept units are found from its
    tensors of that cut when one of them is first asked for; those tensors are kept until asked
    for, so the input (a merge, say) computes each once, and the stream holds one layer's
    tensors of one cut at a time."""

    def __init__(self, keep: dict[str, int], source: TensorSource, heads: HeadShape | None,
                 dtype: torch.dtype | None):
        super().__init__("prune", source, dtype)
        self.source = source
        self.cuts: list[tuple[Cut, int, int]] = []  # (cut, units per layer, kept)
        self.part_of: dict[str, tuple[int, int, str, str]] = {}  # name -> (cut, layer, part, kind)
        try:
            for kind, kept in keep.items():
                cut = cut_for(kind, source.names(), source.shape, heads)
                units = cut.units(source.shape)
                cut.check(units, kept)
                for layer, parts in cut.layers.items():
                    for (part, tensor_kind), name in parts.items():
                        self.part_of[name] = (len(self.cuts), layer, part, tensor_kind)
                self.cuts.append((cut, units, kept))
        except PruneError as error:
            raise RecipeError(f"prune: {error}") from None
        self._index: tuple[int, int, torch.Tensor] | None = None  # (cut, layer, kept units)
        self._read: dict[str, torch.Tensor] = {}  # that layer's tensors of that cut, unserved

    def shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.source.shape(name))
        if name not in self.part_of:
            return shape
        which, _, part, kind = self.part_of[name]
        cut, units, kept = self.cuts[which]
        return cut.shape(part, kind, shape, units, kept)

    def _kept(self, which: int, layer: int) -> torch.Tensor:
        if self._index is None or self._index[:2] != (which, layer):
            cut, units, kept = self.cuts[which]
            parts = cut.layers[layer]
            self._read = {name: self.source.get(name) for name in parts.values()}
            self._index = (which, layer, kept_units(cut.importance(self._read, parts, units),
                                                    kept))
        return self._index[2]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.part_of:
            return self._rounded(self.source.get(name))
        which, layer, part, kind = self.part_of[name]
        index = self._kept(which, layer)
        tensor = self._read.pop(name, None)
        if tensor is None:  # asked again, or after another layer's
            tensor = self.source.get(name)
        cut, units, _ = self.cuts[which]
        return self._rounded(cut.cut(part, kind, tensor, index.to(tensor.device), units))


def pruned_widths(recipe: Recipe) -> dict[str, int]:
    """The units per layer a recipe's model keeps after its prunes (`mlp`, `kv_heads`; a cut
    absent: the sources' own)."""
    if not isinstance(recipe, Mapping) or "model" in recipe:
        return {}
    widths: dict[str, int] = {}
    for child in [recipe.get("input"), recipe.get("base"), *recipe.get("inputs", [])]:
        if child:
            for kind, kept in pruned_widths(child).items():
                widths[kind] = min(kept, widths.get(kind, kept))
    if recipe.get("op") == "prune":
        for kind in PRUNE_FIELDS:
            if kind in recipe:
                widths[kind] = min(recipe[kind], widths.get(kind, recipe[kind]))
    return widths


def recipe_source(recipe: Recipe, leaf: Callable[[str], TensorSource], *,
                  dtype: torch.dtype | None = None, naming: LayerNaming | None = None,
                  cached: Callable[[str], TensorSource | None] | None = None,
                  device: torch.device | str = "cpu",
                  heads: HeadShape | None = None) -> TensorSource:
    """`recipe` as a TensorSource whose tensors are computed on demand (see the module doc).

    `leaf(name)` gives a source model; `cached(key)` a materialized sub-recipe, if any (by
    `recipe_key`); `dtype` is every operation's output dtype (None: the inputs' own); `heads`
    the sources' attention shape, which a prune of `kv_heads` needs (`HeadShape.of(config)`).
    """
    naming = naming or NamePattern()

    def build(node: Recipe) -> TensorSource:
        if not isinstance(node, Mapping):
            raise RecipeError(f"a recipe node must be a mapping, got {node!r}")
        op = node.get("op", "model" if "model" in node else None)
        if op == "model":
            source = leaf(node["model"])
            return source if dtype is None else _Leaf(source.label, source, dtype)
        if cached is not None and (hit := cached(recipe_key(node))) is not None:
            return hit
        try:
            if op == "merge":
                base = build(node["base"]) if node.get("base") else None
                return _Merge(node, base, [build(c) for c in node["inputs"]], dtype, device)
            if op == "mutate":
                base = build(node["base"]) if node.get("base") else None
                return _Mutate(node, build(node["input"]), base, dtype)
            if op == "edit":
                return _Edit(list(node["layers"]), build(node["input"]), naming, dtype)
            if op == "prune":
                keep = {kind: node[kind] for kind in PRUNE_FIELDS if kind in node}
                if not keep:
                    raise RecipeError(f"prune recipe without {' or '.join(PRUNE_FIELDS)}: {node}")
                return _Prune(keep, build(node["input"]), heads, dtype)
        except KeyError as error:
            raise RecipeError(f"{op} recipe without {error}: {node}") from None
        raise RecipeError(f"unknown recipe op {op!r} in {node}; expected model, merge, mutate, "
                          "edit or prune")
    return build(recipe)


def materialize(recipe: Recipe, load: Callable[[str], Mapping[str, torch.Tensor]],
                dtype: torch.dtype | None = None, heads: HeadShape | None = None) -> StateDict:
    """The weights of `recipe` as a state dict, from in-memory source state dicts
    (`load(name)`); the Python-API form of `recipe_source`."""
    source = recipe_source(recipe, lambda name: StateDictSource(load(name), name), dtype=dtype,
                           heads=heads)
    return {name: source.get(name) for name in source.names()}



