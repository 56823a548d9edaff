"""MLP-width and attention-head pruning on the eight real architectures (random weights from
their transformers configs, grouped-query attention in all of them): the pruned model loads in
`transformers` at its new width or head count, loses exactly the computed parameters, and, where
the pruned units could not write (zero `down_proj` columns, zero `o_proj` columns of a head
group), computes exactly what the unpruned model computes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from operators.prune import (
    AttentionHeads,
    HeadShape,
    MlpWidth,
    PruneError,
    kept_units,
    prune_state,
    removed_head_parameters,
    removed_mlp_parameters,
)
from search_spaces.families import FAMILIES

KEEP = 96  # of 128


def _model(family: str):
    torch.manual_seed(0)
    config = FAMILIES[family](hidden=64, layers=2, vocab=128)
    return config, AutoModelForCausalLM.from_config(config).eval()


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruned_model_loads_counts_and_computes_the_same(family, tmp_path):
    config, model = _model(family)
    width = config.intermediate_size
    generator = torch.Generator().manual_seed(1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    silenced = {}
    for name in state:  # neurons that cannot write: zero columns of down_proj
        if name.endswith("mlp.down_proj.weight"):
            columns = torch.randperm(width, generator=generator)[:width - KEEP]
            state[name][:, columns] = 0
            silenced[name] = set(columns.tolist())
    model.load_state_dict(state)
    pruned_state = prune_state(state, MlpWidth(list(state)), KEEP)
    for name, columns in silenced.items():  # exactly the silent neurons went
        assert pruned_state[name].shape[1] == KEEP
        kept = kept_units(torch.tensor([0.0 if j in columns else 1.0 for j in range(width)]),
                            KEEP)
        assert not set(kept.tolist()) & columns

    pruned_config = copy.deepcopy(config)
    pruned_config.intermediate_size = KEEP
    pruned = AutoModelForCausalLM.from_config(pruned_config).eval()
    pruned.load_state_dict(pruned_state, strict=True)
    bias = bool(getattr(config, "mlp_bias", False))
    assert _count(model) - _count(pruned) == removed_mlp_parameters(
        config.hidden_size, config.num_hidden_layers, width, KEEP, bias)

    tokens = torch.randint(0, 128, (2, 16), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens).logits, model(tokens).logits, rtol=1e-5,
                                   atol=1e-5)
    pruned.save_pretrained(tmp_path)  # and back, as an exported checkpoint is loaded
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.intermediate_size == KEEP and _count(again) == _count(pruned)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruned_heads_load_count_and_compute_the_same(family, tmp_path):
    """Key/value group 1 of every layer silenced (the o_proj columns of its query heads zeroed):
    pruning to one group keeps group 0, in every layer, at the same logits."""
    config, model = _model(family)
    heads = HeadShape.of(config)
    kv_heads = config.num_key_value_heads
    assert heads.group > 1 and kv_heads == 2  # grouped-query attention, as the real models
    state = {k: v.clone() for k, v in model.state_dict().items()}
    silent = slice(heads.group * heads.head_dim, 2 * heads.group * heads.head_dim)
    for name in state:
        if name.endswith("self_attn.o_proj.weight"):
            state[name][:, silent] = 0
    model.load_state_dict(state)
    cut = AttentionHeads(list(state), lambda name: tuple(state[name].shape), heads)
    pruned_state = prune_state(state, cut, 1)
    for parts in cut.layers.values():
        output = parts[("o_proj", "weight")]
        assert torch.equal(pruned_state[output], state[output][:, :silent.start])

    pruned_config = copy.deepcopy(config)
    pruned_config.head_dim = heads.head_dim
    pruned_config.num_key_value_heads, pruned_config.num_attention_heads = 1, heads.group
    pruned = AutoModelForCausalLM.from_config(pruned_config).eval()
    pruned.load_state_dict(pruned_state, strict=True)
    qkv_bias = any(name.endswith(("q_proj.bias", "qkv_proj.bias")) for name in state)
    assert _count(model) - _count(pruned) == removed_head_parameters(
        config.hidden_size, config.num_hidden_layers, heads, kv_heads, 1, qkv_bias)

    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens).logits, model(tokens).logits, rtol=1e-5,
                                   atol=1e-5)
    pruned.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.num_key_value_heads == 1 and _count(again) == _count(pruned)


def test_the_least_important_neurons_go_first():
    config, model = _model("llama")
    state = model.state_dict()
    down = "model.layers.0.mlp.down_proj.weight"
    state[down][:, 5] *= 1e-3  # neuron 5 barely writes
    pruned = prune_state(state, MlpWidth(list(state)), config.intermediate_size - 1)
    kept_columns = pruned[down]
    assert torch.equal(kept_columns[:, :5], state[down][:, :5])
    assert torch.equal(kept_columns[:, 5:], state[down][:, 6:])


def test_a_width_out_of_range_or_a_model_without_gated_mlp_is_refused():
    config, model = _model("llama")
    state = model.state_dict()
    with pytest.raises(PruneError, match="mlp 0: this model has 128 per layer; keep between"):
        prune_state(state, MlpWidth(list(state)), 0)
    with pytest.raises(PruneError, match="kv_heads 3: this model has 2 per layer"):
        prune_state(state, AttentionHeads(list(state), lambda n: tuple(state[n].shape),
                                          HeadShape.of(config)), 3)
    with pytest.raises(PruneError, match="no gated MLP"):
        MlpWidth(["model.embed_tokens.weight"])
    with pytest.raises(PruneError, match="no attention projections"):
        AttentionHeads(["model.embed_tokens.weight"], lambda n: (4, 4), HeadShape(16, 2))


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2", "qwen2"])
def test_a_prune_recipe_streams_scores_and_exports(family, tmp_path_factory, tmp_path):
    """`{"op": "prune", "mlp": …, "kv_heads": 1}` around a merge of real bf16 sharded
    checkpoints: the stream equals the whole-state prunes of the merge, the worker's resident
    model is built at the new width and head count with the exact parameter count, and the
    export loads in transformers at that shape (no mergekit YAML: mergekit has no prune)."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from evolve.recipe_export import export_individual
    from fitness.worker_spec import WorkerSpec
    from search_spaces.families import build_family

    folders = build_family(family, tmp_path_factory.mktemp(family), experts=2)
    names = tuple((name, str(folder)) for name, folder in folders.items())
    task = tmp_path / "t.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": "a:", "choices": ["x", "y"], "answer": 0,
                                           "split": split}) for split in ("search", "test")))
    spec = WorkerSpec(names, "base", (str(task),))
    worker = spec.build(tasks=spec.load_tasks())
    sources = worker.sources
    merge = {"op": "merge", "method": "ties", "seed": 0, "base": {"model": "base"},
             "inputs": [{"model": n} for n in folders if n != "base"],
             "params": {"weight": 1.0, "density": 0.5}}
    width = sources.config.intermediate_size
    keep = width * 3 // 4
    recipe = {"op": "prune", "mlp": keep, "kv_heads": 1, "input": merge}
    heads = HeadShape.of(sources.config)

    merged = {name: sources.source(merge).get(name) for name in sources.source(merge).names()}
    streamed = sources.source(recipe)
    expected = prune_state(prune_state(merged, MlpWidth(list(merged)), keep),
                           AttentionHeads(list(merged), lambda n: tuple(merged[n].shape), heads), 1)
    assert set(streamed.names()) == set(expected)
    for name in streamed.names():
        assert tuple(streamed.shape(name)) == tuple(expected[name].shape), name
        assert torch.equal(streamed.get(name), expected[name]), name

    full = worker.size("merge", merge).params
    pruned = worker.size("pruned", recipe).params
    config = sources.config
    qkv_bias = any(name.endswith(("q_proj.bias", "qkv_proj.bias")) for name in merged)
    assert full - pruned == removed_mlp_parameters(
        config.hidden_size, config.num_hidden_layers, width, keep,
        bool(getattr(config, "mlp_bias", 0))) + removed_head_parameters(
        config.hidden_size, config.num_hidden_layers, heads, config.num_key_value_heads, 1,
        qkv_bias)
    resident = worker.resident.model.config
    assert (resident.intermediate_size, resident.num_key_value_heads,
            resident.num_attention_heads) == (keep, 1, heads.group)

    out = tmp_path / "export"
    out.mkdir()
    run_config = SimpleNamespace(sources=SimpleNamespace(
        base=str(folders["base"]), experts=[str(folders[n]) for n in folders if n != "base"]))
    record = {"id": "pruned", "recipe": recipe, "parents": [], "operator": "edit",
              "generation": 1}
    export_individual(record, sources, run_config, out, None, {})
    assert not (out / "mergekit_config.yml").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.intermediate_size, model.config.num_key_value_heads) == (keep, 1)
    assert _count(model) == pruned
    shards = {}
    for shard in out.glob("*.safetensors"):
        shards |= load_file(shard)
    assert all(torch.equal(shards[name], expected[name]) for name in shards)


def test_a_run_proposes_prunes_whose_sizes_follow(tmp_path_factory, tmp_path):
    """A GA run over real bf16 sharded Qwen2 checkpoints (grouped-query attention, q/k/v biases)
    whose edits all prune (`operators.edit.prune: 1`): children with narrower MLPs and fewer
    head groups are bred, scored and stored, and each one's size objective is the parameter
    count computed from its layer plan and widths with the formulas above, independently of the
    worker that built it."""
    import sqlite3

    import yaml
    from typer.testing import CliRunner

    from evolve.cli import app
    from operators.recipes import layer_plan, pruned_widths
    from search_spaces.families import build_family
    from tests.conftest import pick_task

    folders = build_family("qwen2", tmp_path_factory.mktemp("qwen2"), experts=2)
    base = AutoModelForCausalLM.from_pretrained(folders["base"])
    config, heads = base.config, HeadShape.of(base.config)
    layer = _count(base.model.layers[0])
    run = {"sources": {"base": str(folders["base"]),
                       "experts": [str(folders[n]) for n in folders if n != "base"]},
           "tasks": [str(pick_task(tmp_path))], "population": 4, "generations": 3, "seed": 3,
           "operators": {"crossover": {"rate": 0.3}, "weight_noise": {"rate": 0.0},
                         "edit": {"rate": 0.6, "prune": 1.0}},
           "fitness": {"calibration": 6, "items_per_task": 5, "promote_items_per_task": 12,
                       "max_full_per_generation": 1, "dims": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "run.yaml"), "--run-dir",
                                      str(tmp_path / "run")])
    assert result.exit_code == 0, result.output

    db = sqlite3.connect(tmp_path / "run" / "run.db")
    sizes = {i: json.loads(o)["params"][0] for i, o in
             db.execute("SELECT id, objectives FROM evaluations")}
    seen = set()
    for identifier, recipe in db.execute("SELECT id, recipe FROM individuals"):
        recipe = json.loads(recipe)
        widths = pruned_widths(recipe)
        if not widths or identifier not in sizes:
            continue
        seen |= set(widths)
        kept = len(layer_plan(recipe, config.num_hidden_layers))
        removed = removed_mlp_parameters(config.hidden_size, 1, config.intermediate_size,
                                         widths.get("mlp", config.intermediate_size)) \
            + removed_head_parameters(config.hidden_size, 1, heads, config.num_key_value_heads,
                                      widths.get("kv_heads", config.num_key_value_heads),
                                      qkv_bias=True)
        expected = _count(base) - (config.num_hidden_layers - kept) * layer - kept * removed
        assert sizes[identifier] == expected, (identifier, recipe)
    assert seen == {"mlp", "kv_heads"}


def test_cuts_a_model_cannot_take_are_not_offered():
    """Only layers whose every tensor of the module is rewritten are cut: an MLP without a gate
    (Arcee), q/k norms over all heads (OLMo2), a packed W_pack (Baichuan) and an attention-free
    config each leave that cut out instead of failing a candidate later."""
    from types import SimpleNamespace

    from operators.prune import prunable_units

    hidden, dim = 16, 4
    shapes = {"model.layers.0.mlp.up_proj.weight": (32, hidden),
              "model.layers.0.mlp.down_proj.weight": (hidden, 32),
              "model.layers.0.self_attn.q_proj.weight": (4 * dim, hidden),
              "model.layers.0.self_attn.k_proj.weight": (2 * dim, hidden),
              "model.layers.0.self_attn.v_proj.weight": (2 * dim, hidden),
              "model.layers.0.self_attn.o_proj.weight": (hidden, 4 * dim),
              "model.layers.0.self_attn.q_norm.weight": (4 * dim,)}
    heads = HeadShape(dim, 2)
    assert prunable_units(list(shapes), shapes.__getitem__, heads) == {}
    with pytest.raises(PruneError, match=r"layer 0's mlp has .*not a gated MLP"):
        MlpWidth(list(shapes))
    with pytest.raises(PruneError, match=r"q_norm\.weight would keep its size"):
        AttentionHeads(list(shapes), shapes.__getitem__, heads)
    shapes["model.layers.0.self_attn.q_norm.weight"] = (dim,)  # per head: Qwen3, Gemma3
    assert prunable_units(list(shapes), shapes.__getitem__, heads) == {"kv_heads": 2}
    packed = {"model.layers.0.self_attn.W_pack.weight": (8 * dim, hidden),
              "model.layers.0.self_attn.o_proj.weight": (hidden, 4 * dim)}
    assert prunable_units(list(packed), packed.__getitem__, heads) == {}
    assert HeadShape.of(SimpleNamespace(hidden_size=hidden)) is None  # no attention (Mamba)


def test_heads_are_not_offered_where_the_pruned_config_would_not_load():
    """Phi-3's long-context RoPE factors are sized by hidden_size / heads: with fewer heads its
    config no longer validates, so the run does not offer head pruning (MLP width it does)."""
    from transformers import Phi3Config

    from operators.prune import prunable_units

    def phi3(rope: dict | None):
        return Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          vocab_size=128, num_attention_heads=8, num_key_value_heads=4,
                          pad_token_id=0, eos_token_id=2, bos_token_id=1,
                          max_position_embeddings=256, original_max_position_embeddings=64,
                          rope_parameters=rope)
    longrope = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    shapes = {"model.layers.0.self_attn.qkv_proj.weight": (16 * 8, 64),
              "model.layers.0.self_attn.o_proj.weight": (64, 8 * 8),
              "model.layers.0.mlp.gate_up_proj.weight": (256, 64),
              "model.layers.0.mlp.down_proj.weight": (64, 128)}
    for rope, offered in ((None, {"mlp": 128, "kv_heads": 4}), (longrope, {"mlp": 128})):
        config = phi3(rope)
        assert prunable_units(list(shapes), shapes.__getitem__, HeadShape.of(config),
                              config) == offered
