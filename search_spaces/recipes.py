"""Recipes: an individual is a small JSON tree, not a blob of weights.

Leaves name source models, `{"model": "zoo/rev"}`. Inner nodes are operations with their
parameters and seeds:

    {"op": "merge", "method": "ties", "seed": 77, "base": {"model": "zoo/base"},
     "inputs": [{"model": "zoo/rev"}, {"model": "zoo/sort"}],
     "params": {"weight": [0.7, 0.4], "density": 0.35, "lambda": 1.1}}
    {"op": "mutate", "seed": 9137, "sigma": 0.01, "rate": 0.05, "input": {...}}
    {"op": "edit", "layers": [0, 1, 1, 3], "input": {...}}  (decoder layers, by input index)

An edit is mergekit's passthrough slicing: the output's decoder layers, in order, as indices into
the input's; leaving one out makes the model smaller, repeating one stacks it (depth up-scaling).

`materialize` turns a recipe into a state dict, deterministically (the operators are seeded per
tensor), so a recipe is all a run needs to store, resume or export an individual. The parents of
a recipe, for lineage and for mp-IRT, are the source models its tree reaches.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch

import operators
from operators.settings import count_layers, split_layer_name

Recipe = dict[str, Any]
StateDict = dict[str, torch.Tensor]


class RecipeError(ValueError):
    """A recipe is malformed (unknown op, missing field)."""


class StateCache:
    """Materialized sub-recipes, least recently used first out: composed recipes (children of
    children) reuse their parents' weights instead of re-merging the whole tree."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._states: OrderedDict[str, StateDict] = OrderedDict()

    def get(self, key: str) -> StateDict | None:
        if key in self._states:
            self._states.move_to_end(key)
        return self._states.get(key)

    def put(self, key: str, state: StateDict) -> None:
        self._states[key] = state
        self._states.move_to_end(key)
        while len(self._states) > self.capacity:
            self._states.popitem(last=False)


def materialize(recipe: Recipe, load: Callable[[str], Mapping[str, torch.Tensor]],
                cache: StateCache | None = None) -> StateDict:
    """The weights of `recipe`; `load(name)` gives a source model's state dict (cache it)."""
    op = recipe.get("op", "model" if "model" in recipe else None)
    if op == "model":
        return dict(load(recipe["model"]))
    key = json.dumps(recipe, sort_keys=True)
    if cache is not None and (hit := cache.get(key)) is not None:
        return hit
    if op == "merge":
        base = materialize(recipe["base"], load, cache) if recipe.get("base") else None
        inputs = [materialize(child, load, cache) for child in recipe["inputs"]]
        state = operators.merge(recipe["method"], base, inputs, seed=recipe.get("seed", 0),
                                **recipe.get("params", {}))
    elif op == "mutate":
        base = recipe.get("base")
        state = operators.mutate(materialize(recipe["input"], load, cache), seed=recipe["seed"],
                                 sigma=recipe["sigma"], rate=recipe["rate"],
                                 base=materialize(base, load, cache) if base else None)
    elif op == "edit":
        state = select_layers(materialize(recipe["input"], load, cache), recipe["layers"])
    else:
        raise RecipeError(f"unknown recipe op {op!r} in {recipe}; expected model, merge, mutate "
                          "or edit")
    if cache is not None:
        cache.put(key, state)
    return state


def select_layers(state: Mapping[str, torch.Tensor], layers: list[int]) -> StateDict:
    """The decoder layers `layers` (input indices, in output order; repeats allowed), renumbered
    0..len-1; tensors outside the layer stack are kept (mergekit passthrough slices)."""
    total = count_layers(state)
    if not layers or any(not 0 <= k < total for k in layers):
        raise RecipeError(f"edit layers {layers}: the input has layers 0..{total - 1}; list at "
                          "least one of them")
    by_layer: dict[int, list[tuple[str, str, torch.Tensor]]] = {}
    out: StateDict = {}
    for name, tensor in state.items():
        parts = split_layer_name(name)
        if parts is None:
            out[name] = tensor
        else:
            prefix, index, suffix = parts
            by_layer.setdefault(index, []).append((prefix, suffix, tensor))
    for new, old in enumerate(layers):
        for prefix, suffix, tensor in by_layer[old]:
            out[f"{prefix}{new}{suffix}"] = tensor
    return out


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
