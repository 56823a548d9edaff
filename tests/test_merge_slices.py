"""`evoforge merge` of mergekit `slices:` that stack layer ranges: mergekit-yaml's bits, mergekit's
semantics (gradient positions inside a slice, embeddings from the first slice, head from the last),
config.json of the stacked model, and clear errors for bad slices."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from evolve.cli import app
from evolve.export import export_merge
from evolve.merge_config import load_merge_config
from operators.engine import MergeSpec
from operators.errors import MergeError, MergeInputError, MergeParameterError
from operators.slices import LayerPlanSource, LayerRange, OutputSlice, plan_slices
from operators.sources import StateDictSource
from tests.test_cli_merge import _load_all, _mergekit_yaml

# Depth up-scaling (overlapping ranges of one model) and a frankenmerge (then another model's
# layers): 8 layers from 4, the embeddings from `add`, the final norm and head from `sort`; the last
# slice scales its MLP (passthrough's one parameter).
PASSTHROUGH = """
merge_method: passthrough
slices:
  - sources: [{{model: {add}, layer_range: [0, 3]}}]
  - sources: [{{model: {add}, layer_range: [1, 4]}}]
  - sources: [{{model: {sort}, layer_range: [2, 4]}}]
    parameters: {{scale: [{{filter: mlp, value: 0.5}}]}}
dtype: float32
"""

# Ranges that differ per source, per-source gradients over each slice, slice-level parameters
# whose conditions fall through to the top level's, and a one-layer last slice (t = 1 there).
TIES = """
merge_method: ties
base_model: {base}
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 2]}}
      - {{model: {add}, layer_range: [0, 2], parameters: {{weight: [0.2, 0.9], density: 0.5}}}}
      - {{model: {sort}, layer_range: [2, 4], parameters: {{weight: 0.6, density: [0.3, 0.8]}}}}
  - sources:
      - {{model: {base}, layer_range: [1, 4]}}
      - model: {add}
        layer_range: [1, 4]
        parameters: {{weight: 0.5, density: [{{filter: mlp, value: 0.4}}, {{value: 0.7}}]}}
      - {{model: {reverse}, layer_range: [0, 3], parameters: {{weight: [1.0, 0.3, 0.6], density: 0.6}}}}
    parameters: {{lambda: [{{filter: self_attn, value: 0.8}}]}}
  - sources:
      - {{model: {base}, layer_range: [3, 4]}}
      - {{model: {sort}, layer_range: [3, 4], parameters: {{weight: [0.4, 0.9], density: 0.5}}}}
      - {{model: {reverse}, layer_range: [3, 4], parameters: {{weight: 0.7, density: [0.9, 0.2]}}}}
parameters: {{normalize: true, lambda: 1.1}}
dtype: float32
"""

# No top-level base: each slice names its own, and the sources' ranges differ.
TASK_ARITHMETIC = """
merge_method: task_arithmetic
slices:
  - base_model: {sort}
    sources:
      - {{model: {sort}, layer_range: [0, 2]}}
      - {{model: {add}, layer_range: [2, 4], parameters: {{weight: [0.3, 0.8]}}}}
  - base_model: {base}
    sources:
      - {{model: {base}, layer_range: [1, 4]}}
      - {{model: {reverse}, layer_range: [0, 3], parameters: {{weight: 0.5}}}}
parameters: {{lambda: 0.9}}
dtype: float32
"""


def _config(tmp_path: Path, text: str, models: dict[str, Path]) -> Path:
    path = tmp_path / "merge.yml"
    path.write_text(text.format(**{name: str(folder) for name, folder in models.items()}))
    return path


def _same_bits(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
    return (mine.dtype == theirs.dtype and mine.shape == theirs.shape
            and torch.equal(mine.contiguous().view(torch.uint8),
                            theirs.contiguous().view(torch.uint8)))


def _against_mergekit(config: Path, tmp_path: Path) -> Path:
    """Run both on `config`; assert the same tensor names, bits and depth; return our output."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    result = CliRunner().invoke(app, ["merge", str(config), "--out", str(ours)])
    assert result.exit_code == 0, result.output
    subprocess.run([_mergekit_yaml(), str(config), str(theirs)], check=True, capture_output=True)
    mine, reference = _load_all(ours), _load_all(theirs)
    assert set(mine) == set(reference)
    for name, tensor in reference.items():
        assert _same_bits(mine[name], tensor), name
    depth = json.loads((ours / "config.json").read_text())["num_hidden_layers"]
    assert depth == json.loads((theirs / "config.json").read_text())["num_hidden_layers"]
    return ours


def test_passthrough_stacking_equals_mergekit_yaml(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    ours = _against_mergekit(_config(tmp_path, PASSTHROUGH, tiny_models), tmp_path)
    merged = _load_all(ours)
    add, sort = _load_all(tiny_models["add"]), _load_all(tiny_models["sort"])
    plan = [(add, 0), (add, 1), (add, 2), (add, 1), (add, 2), (add, 3), (sort, 2), (sort, 3)]
    for out, (source, index) in enumerate(plan):
        name = "self_attn.q_proj.weight"
        assert torch.equal(merged[f"model.layers.{out}.{name}"], source[f"model.layers.{index}.{name}"])
    assert torch.equal(merged["model.embed_tokens.weight"], add["model.embed_tokens.weight"])
    for name in ("model.norm.weight", "lm_head.weight"):
        assert torch.equal(merged[name], sort[name])
    assert AutoModelForCausalLM.from_pretrained(ours).config.num_hidden_layers == 8


@pytest.mark.slow
@pytest.mark.parametrize("config", [TIES, TASK_ARITHMETIC], ids=["ties", "task_arithmetic"])
def test_multi_source_slices_equal_mergekit_yaml(config, tiny_models, tmp_path):
    _against_mergekit(_config(tmp_path, config, tiny_models), tmp_path)


def test_depth_upscaling_reindexes_per_layer_config_lists(tmp_path):
    """mergekit 0.1.5 sets only num_hidden_layers, and transformers 5 then refuses to save the
    config (layer_types no longer matches): evoforge moves each layer's entry with the layer."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kinds = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, layer_types=kinds, use_sliding_window=True,
        sliding_window=16)).save_pretrained(tmp_path / "qwen")
    config = tmp_path / "up.yml"
    config.write_text("merge_method: passthrough\nslices:\n"
                      "  - sources: [{model: qwen, layer_range: [0, 3]}]\n"
                      "  - sources: [{model: qwen, layer_range: [1, 4]}]\n")
    result = CliRunner().invoke(app, ["merge", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 6
    assert model.config.layer_types == kinds[0:3] + kinds[1:4]


def _ones(shape=(2,)) -> dict[str, torch.Tensor]:
    names = ["model.embed_tokens.weight", "model.norm.weight",
             *(f"model.layers.{i}.mlp.weight" for i in range(4))]
    return {name: torch.ones(shape) for name in names}


def test_gradients_run_over_each_slice_and_outside_tensors_sit_at_t0():
    """mergekit's positions: layer i of an n-layer slice at t = i / (n - 1), t = 1 in a one-layer
    slice, the embeddings and the head at t = 0 (a weight gradient [0, 1] shows t itself)."""
    model = StateDictSource(_ones(), "ones")
    spec = MergeSpec("linear", {"normalize": False}, [{"weight": [0.0, 1.0]}])
    slices = [OutputSlice(spec, [LayerRange(model, 1, 4)]), OutputSlice(spec, [LayerRange(model, 0, 1)])]
    merged = {name: tensor[0].item() for part in plan_slices(slices)
              for name, tensor in part.tensors()}
    assert merged == {"model.embed_tokens.weight": 0.0, "model.layers.0.mlp.weight": 0.0,
                      "model.layers.1.mlp.weight": 0.5, "model.layers.2.mlp.weight": 1.0,
                      "model.layers.3.mlp.weight": 1.0, "model.norm.weight": 0.0}


def test_layer_plan_source_renames_without_copying_and_takes_a_split():
    state = {"enc.block_0.w": torch.zeros(1), "enc.block_1.w": torch.ones(1), "head": torch.ones(2)}
    source = StateDictSource(state, "toy")

    def split(name: str) -> tuple[str, int, str] | None:
        if ".block_" not in name:
            return None
        prefix, rest = name.split(".block_")
        index, suffix = rest.split(".", 1)
        return f"{prefix}.block_", int(index), f".{suffix}"

    stacked = LayerPlanSource([(source, 1), (source, 0), (source, 1)], source, split=split)
    assert stacked.names() == ["head", "enc.block_0.w", "enc.block_1.w", "enc.block_2.w"]
    assert stacked.get("enc.block_2.w") is state["enc.block_1.w"]
    assert stacked.origin("enc.block_1.w") == (source, "enc.block_0.w")
    assert stacked.shape("head") == (2,)
    with pytest.raises(MergeInputError, match=r"toy has no layer 2; its layers are 0-1"):
        LayerPlanSource([(source, 2)], split=split)


BAD_CONFIGS = {
    "empty range": ("passthrough", "[{{model: {add}, layer_range: [2, 2]}}]",
                    r"slices\[0\]\.sources\[0\]: layer_range \[2, 2\] holds no layers"),
    "two sources in passthrough": (
        "passthrough", "[{{model: {add}, layer_range: [0, 2]}}, {{model: {sort}, layer_range: [0, 2]}}]",
        r"slices\[0\]: passthrough copies the layers of one source, this slice has 2"),
    "ranges of different lengths": (
        "linear", "[{{model: {add}, layer_range: [0, 2]}}, {{model: {sort}, layer_range: [0, 3]}}]",
        r"slices\[0\]: its sources take \[2, 3\] layers"),
    "unknown source key": ("passthrough", "[{{model: {add}, layers: [0, 2]}}]",
                           r"slices\[0\]\.sources\[0\]: unknown keys \['layers'\]"),
    "no layer_range": ("passthrough", "[{{model: {add}}}]", r"layer_range must be \[start, stop\]"),
    "model twice": (
        "linear", "[{{model: {add}, layer_range: [0, 2]}}, {{model: {add}, layer_range: [2, 4]}}]",
        r"slices\[0\]: a model is listed twice"),
    "base not in the slice": (
        "ties", "[{{model: {add}, layer_range: [0, 2]}}, {{model: {sort}, layer_range: [0, 2]}}]",
        r"slices\[0\]: the base model .* must be one of the slice's sources"),
    "unknown parameter": (
        "linear", "[{{model: {add}, layer_range: [0, 2], parameters: {{wieght: 1}}}}]",
        r"slices\[0\]: model #0: method 'linear' has no per-model parameter 'wieght'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_slices_are_refused_before_merging(case, tiny_models, tmp_path):
    method, sources, message = BAD_CONFIGS[case]
    text = f"merge_method: {method}\nbase_model: {{base}}\nslices:\n  - sources: {sources}\n"
    with pytest.raises(MergeParameterError, match=message):
        load_merge_config(_config(tmp_path, text, tiny_models))


def test_unknown_slice_key_and_more_sources_in_the_last_slice(tiny_models, tmp_path):
    one = "{{model: {add}, layer_range: [0, 1]}}"
    two = "[{{model: {add}, layer_range: [1, 2]}}, {{model: {sort}, layer_range: [1, 2]}}]"
    text = f"merge_method: linear\nslices:\n  - {{{{sources: [{one}], residual_weight: 0.5}}}}\n"
    with pytest.raises(MergeParameterError, match=r"slices\[0\]: unknown keys \['residual_weight'\]"):
        load_merge_config(_config(tmp_path, text, tiny_models))
    text = f"merge_method: linear\nslices:\n  - sources: [{one}]\n  - sources: {two}\n"
    with pytest.raises(MergeParameterError, match=r"the last slice has 2 sources and the first 1"):
        load_merge_config(_config(tmp_path, text, tiny_models))


@pytest.mark.parametrize(("slices", "message"), [
    ("[{{model: {add}, layer_range: [2, 6]}}]",
     r"slices\[0\]: layer_range \[2, 6\] is out of range: .*add has no layer 4; its layers are 0-3"),
    ("[{{model: {add}, layer_range: [1, 3], parameters: {{weight: [{{filter: layers.1., value: 2}}, "
     "{{value: 1}}]}}}}]", r"filter 'layers\.1\.' depends on the layer index"),
])
def test_bad_slices_found_in_the_checkpoints_stop_before_writing(slices, message, tiny_models,
                                                                 tmp_path):
    config = _config(tmp_path, f"merge_method: linear\nslices:\n  - sources: {slices}\n",
                     tiny_models)
    with pytest.raises(MergeError, match=message):
        export_merge(load_merge_config(config), tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.safetensors"))
    result = CliRunner().invoke(app, ["merge", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "error:" in result.output
