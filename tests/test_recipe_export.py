"""A recipe's mergekit config: mergekit-yaml reproduces our tensors, edits (slices) included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evolve.recipe_export import mergekit_config
from operators.architecture import Architecture
from operators.recipes import materialize


def _architecture(folder: Path) -> Architecture:
    from transformers import AutoConfig

    return Architecture.of(AutoConfig.from_pretrained(folder))


def _mergekit(config: dict, tmp_path: Path) -> dict[str, torch.Tensor]:
    path, out = tmp_path / "mk.yml", tmp_path / "mk"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    subprocess.run([str(Path(sys.executable).with_name("mergekit-yaml")), str(path), str(out)],
                   check=True, capture_output=True)
    return load_file(out / "model.safetensors")


def _ties(weights, densities) -> dict:
    return {"op": "merge", "method": "ties", "seed": 3, "base": {"model": "base"},
            "inputs": [{"model": "add"}, {"model": "sort"}, {"model": "reverse"}],
            "params": {"weight": weights, "density": densities, "lambda": 0.9}}


@pytest.mark.parametrize("layers", [[0, 2, 3], [0, 1, 1, 2, 3], [3, 1]])
def test_mergekit_reproduces_edited_merges_with_gradients(tiny_models, tmp_path, layers):
    merged = _ties([[0.3, 1.1], 0.8, [1.0, 0.2, 0.7]], [[0.3, 0.8], 0.6, 0.5])
    recipe = {"op": "edit", "layers": layers, "input": merged}
    config = mergekit_config(recipe, dict(tiny_models), "float32",
                             _architecture(tiny_models["base"]))
    assert len(config["slices"]) == len(layers)
    ours = materialize(recipe, lambda name: load_file(tiny_models[name] / "model.safetensors"))
    theirs = _mergekit(config, tmp_path)
    assert set(theirs) == set(ours)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_flat_merges_use_models_and_inexpressible_recipes_give_none(tiny_models):
    folders, architecture = dict(tiny_models), _architecture(tiny_models["base"])
    flat = mergekit_config(_ties([1.0, 0.5, 0.7], 0.4), folders, "bfloat16", architecture)
    assert [m["parameters"]["weight"] for m in flat["models"]] == [1.0, 0.5, 0.7]
    noisy = {"op": "mutate", "seed": 1, "sigma": 0.1, "rate": 0.1, "input": _ties(1.0, 0.4)}
    dare = {**_ties(1.0, 0.4), "method": "dare_ties"}  # mergekit draws its own masks
    filtered = _ties([[{"filter": "mlp", "value": 0.5}, {"value": 1.0}], 1.0, 1.0], 0.4)
    assert all(mergekit_config(r, folders, "bfloat16", architecture) is None
               for r in (noisy, dare, filtered))
