"""Recipes: an individual is a small JSON tree, not a blob of weights.

Leaves name source models, `{"model": "zoo/rev"}`. Inner nodes are operations with their
parameters and seeds:

    {"op": "merge", "method": "ties", "seed": 77, "base": {"model": "zoo/base"},
     "inputs": [{"model": "zoo/rev"}, {"model": "zoo/sort"}],
     "params": {"weight": [0.7, 0.4], "density": 0.35, "lambda": 1.1}}
    {"op": "mutate", "seed": 9137, "sigma": 0.01, "rate": 0.05, "input": {...}}

`materialize` turns a recipe into a state dict, deterministically (the operators are seeded per
tensor), so a recipe is all a run needs to store, resume or export an individual. The parents of
a recipe, for lineage and for mp-IRT, are the source models its tree reaches.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import torch

import operators

Recipe = dict[str, Any]
StateDict = dict[str, torch.Tensor]
MERGE_METHODS = ("task_arithmetic", "ties", "dare_ties", "pcb")


class RecipeError(ValueError):
    """A recipe is malformed (unknown op, missing field)."""


def materialize(recipe: Recipe, load: Callable[[str], Mapping[str, torch.Tensor]]) -> StateDict:
    """The weights of `recipe`; `load(name)` gives a source model's state dict (cache it)."""
    op = recipe.get("op", "model" if "model" in recipe else None)
    if op == "model":
        return dict(load(recipe["model"]))
    if op == "merge":
        base = materialize(recipe["base"], load) if recipe.get("base") else None
        inputs = [materialize(child, load) for child in recipe["inputs"]]
        return operators.merge(recipe["method"], base, inputs, seed=recipe.get("seed", 0),
                               **recipe.get("params", {}))
    if op == "mutate":
        state = materialize(recipe["input"], load)
        base = recipe.get("base")
        return operators.mutate(state, seed=recipe["seed"], sigma=recipe["sigma"],
                                rate=recipe["rate"],
                                base=materialize(base, load) if base else None)
    raise RecipeError(f"unknown recipe op {op!r} in {recipe}; expected model, merge or mutate")


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


def random_merge_recipe(rng: random.Random, base: str, experts: list[str],
                        mutation_rate: float = 0.3) -> Recipe:
    """A random merge of a random subset of `experts` (≥ 2), sometimes mutated."""
    chosen = sorted(rng.sample(experts, rng.randint(2, len(experts))), key=experts.index)
    method = rng.choice(MERGE_METHODS)
    params: dict[str, Any] = {"weight": [round(rng.uniform(0.2, 1.2), 3) for _ in chosen],
                              "lambda": round(rng.uniform(0.3, 1.0), 3)}
    if method != "task_arithmetic":
        params["density"] = round(rng.uniform(0.2, 0.9), 3)
    recipe: Recipe = {"op": "merge", "method": method, "seed": rng.randrange(2**31),
                      "base": {"model": base}, "inputs": [{"model": m} for m in chosen],
                      "params": params}
    if rng.random() < mutation_rate:
        recipe = {"op": "mutate", "seed": rng.randrange(2**31),
                  "sigma": round(rng.uniform(0.02, 0.2), 3), "rate": round(rng.uniform(0.05, 0.5), 3),
                  "base": {"model": base}, "input": recipe}
    return recipe
