"""The tiny real-architecture families: each loads and generates like the checkpoint it imitates,
is sharded and tied the way transformers saves the real ones, its experts are small deltas of its
base, and a rebuild gives the same bytes (the merge tests compare outputs against stored folders).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from search_spaces.char_tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
from search_spaces.families import FAMILIES, LLAMA_05B, RECIPE_FILE, build_family, main

TIED = {"llama-tied", "qwen2", "qwen3", "gemma2", "gemma3"}
# Tensors each family has beyond Llama's, as they are named on disk in layer 0.
EXTRA_TENSORS = {
    "qwen2": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
    "qwen3": ["self_attn.q_norm.weight", "self_attn.k_norm.weight"],
    "gemma2": ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"],
    "gemma3": ["self_attn.q_norm.weight", "self_attn.k_norm.weight",
               "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"],
    "phi3": ["self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"],
}
families = pytest.mark.parametrize("family", sorted(FAMILIES))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("families")
    return {family: build_family(family, root, experts=2) for family in FAMILIES}


def disk_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(folder / shard))
    return tensors


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@families
def test_configs_are_tiny_versions_of_the_real_ones(family):
    config = FAMILIES[family]()
    assert config.hidden_size == 64 and 2 <= config.num_hidden_layers <= 4
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert VOCAB_SIZE <= config.vocab_size <= VOCAB_SIZE + 64
    assert config.max_position_embeddings >= 128
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert config.tie_word_embeddings == (family in TIED)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_sliding_window_families_have_their_attention_patterns(family):
    config = FAMILIES[family]()
    assert config.sliding_window < config.max_position_embeddings
    if family != "mistral":  # Mistral slides in every layer; Gemma mixes sliding and global layers
        assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    if family == "gemma2":
        assert config.final_logit_softcapping and config.attn_logit_softcapping


@families
def test_loads_in_bf16_and_generates(built, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("base", "expert1"):
        folder = built[family][name]
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        on_disk = disk_tensors(folder)
        loaded = model.state_dict()
        assert all(torch.equal(loaded[key], tensor) for key, tensor in on_disk.items())
        assert {tensor.dtype for tensor in loaded.values()} == {torch.bfloat16}
        prompt = AutoTokenizer.from_pretrained(folder)("12+3=", return_tensors="pt")
        output = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert output.shape == (1, prompt["input_ids"].shape[1] + 4)


@families
def test_heads_are_tied_like_transformers_saves_them(built, family):
    from transformers import AutoModelForCausalLM

    folder = built[family]["expert1"]
    names = disk_tensors(folder)
    assert ("lm_head.weight" in names) == (family not in TIED)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == (family in TIED)


@families
def test_checkpoints_are_sharded_with_an_index(built, family):
    for folder in built[family].values():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) >= 2
        assert not (folder / "model.safetensors").exists()
        tensors = disk_tensors(folder)
        assert set(tensors) == set(index["weight_map"])
        assert {tensor.dtype for tensor in tensors.values()} == {torch.bfloat16}
        prefix = "model.layers.0."
        assert all(prefix + extra in tensors for extra in EXTRA_TENSORS.get(family, []))


@families
def test_experts_are_small_distinct_deltas_of_the_base(built, family):
    base = disk_tensors(built[family]["base"])
    experts = [disk_tensors(built[family][f"expert{index}"]) for index in (1, 2)]
    for expert in experts:
        assert set(expert) == set(base)
        for name, tensor in base.items():
            change = (expert[name].float() - tensor.float()).norm() / tensor.float().norm()
            assert 0.015 < change < 0.05, (name, float(change))
    for name in base:
        assert not torch.equal(experts[0][name], experts[1][name])


@families
def test_a_rebuild_gives_the_same_bytes(built, family, tmp_path):
    again = build_family(family, tmp_path, experts=2)
    for name, folder in built[family].items():
        assert again[name].parent.name == folder.parent.name
        assert folder_bytes(again[name]) == folder_bytes(folder)


def test_a_built_family_is_reused_and_no_staging_is_left(tmp_path):
    first = build_family("phi3", tmp_path, experts=1)
    stamp = (first["base"].parent / RECIPE_FILE).stat().st_mtime_ns
    assert build_family("phi3", tmp_path, experts=1) == first
    assert (first["base"].parent / RECIPE_FILE).stat().st_mtime_ns == stamp
    assert [path.name for path in tmp_path.iterdir()] == [first["base"].parent.name]


def test_sizes_dtype_and_seed_are_arguments(tmp_path):
    from transformers import AutoConfig

    sizes = {"layers": 2, "hidden": 128, "vocab": 300, "intermediate": 256, "shard_bytes": 80_000}
    paths = build_family("llama-tied", tmp_path, experts=1, seed=1, dtype=torch.float32, **sizes)
    config = AutoConfig.from_pretrained(paths["base"])
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size,
            config.intermediate_size) == (2, 128, 300, 256)
    tensors = disk_tensors(paths["base"])
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float32}
    index = json.loads((paths["base"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    other_seed = build_family("llama-tied", tmp_path, experts=1, seed=2, dtype=torch.float32, **sizes)
    assert other_seed["base"].parent != paths["base"].parent
    assert not torch.equal(disk_tensors(other_seed["base"])["model.embed_tokens.weight"],
                           tensors["model.embed_tokens.weight"])


def test_the_benchmark_size_is_about_half_a_billion_parameters():
    from transformers import AutoModelForCausalLM

    sizes = {key: value for key, value in LLAMA_05B.items() if key != "shard_bytes"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(FAMILIES["llama"](**sizes))
    assert 0.45e9 < sum(parameter.numel() for parameter in model.parameters()) < 0.55e9


def test_unknown_family_is_an_error_that_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="llama-tied"):
        build_family("gpt2", tmp_path)


def test_main_prints_the_folders(tmp_path, capsys):
    main(["qwen3", str(tmp_path), "--experts", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["base", "expert1"]
    assert all(Path(line.split("\t")[1]).is_dir() for line in lines)
