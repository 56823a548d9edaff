"""MLP-width pruning on the eight real architectures (random weights from their transformers
configs): the pruned model loads in `transformers` at its new width, loses exactly the computed
parameters, and, where the pruned neurons could not write (zero `down_proj` columns), computes
exactly what the unpruned model computes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from operators.prune import PruneError, kept_neurons, prune_mlp, removed_parameters
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
    pruned_state = prune_mlp(state, width, KEEP)
    for name, columns in silenced.items():  # exactly the silent neurons went
        assert pruned_state[name].shape[1] == KEEP
        kept = kept_neurons(torch.tensor([0.0 if j in columns else 1.0 for j in range(width)]),
                            KEEP)
        assert not set(kept.tolist()) & columns

    pruned_config = copy.deepcopy(config)
    pruned_config.intermediate_size = KEEP
    pruned = AutoModelForCausalLM.from_config(pruned_config).eval()
    pruned.load_state_dict(pruned_state, strict=True)
    bias = bool(getattr(config, "mlp_bias", False))
    assert _count(model) - _count(pruned) == removed_parameters(
        config.hidden_size, config.num_hidden_layers, width, KEEP, bias)

    tokens = torch.randint(0, 128, (2, 16), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens).logits, model(tokens).logits, rtol=1e-5,
                                   atol=1e-5)
    pruned.save_pretrained(tmp_path)  # and back, as an exported checkpoint is loaded
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.intermediate_size == KEEP and _count(again) == _count(pruned)


def test_the_least_important_neurons_go_first():
    config, model = _model("llama")
    state = model.state_dict()
    down = "model.layers.0.mlp.down_proj.weight"
    state[down][:, 5] *= 1e-3  # neuron 5 barely writes
    pruned = prune_mlp(state, config.intermediate_size, config.intermediate_size - 1)
    kept_columns = pruned[down]
    assert torch.equal(kept_columns[:, :5], state[down][:, :5])
    assert torch.equal(kept_columns[:, 5:], state[down][:, 6:])


def test_a_width_out_of_range_or_a_model_without_gated_mlp_is_refused():
    config, model = _model("llama")
    with pytest.raises(PruneError, match="keeps between 1 and 128"):
        prune_mlp(model.state_dict(), config.intermediate_size, 0)
    with pytest.raises(PruneError, match="no gated MLP"):
        prune_mlp({"model.embed_tokens.weight": torch.zeros(4, 4)}, 128, 64)


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2"])
def test_a_prune_recipe_streams_scores_and_exports(family, tmp_path_factory, tmp_path):
    """`{"op": "prune"}` around a merge of real bf16 sharded checkpoints: the stream equals the
    whole-state prune of the merge, the worker's resident model is built at the new width with
    the exact parameter count, and the export loads in transformers at that width (no mergekit
    YAML: mergekit has no prune)."""
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
    recipe = {"op": "prune", "mlp": keep, "input": merge}

    merged = {name: sources.source(merge).get(name) for name in sources.source(merge).names()}
    streamed = sources.source(recipe)
    expected = prune_mlp(merged, width, keep)
    assert set(streamed.names()) == set(expected)
    for name in streamed.names():
        assert tuple(streamed.shape(name)) == tuple(expected[name].shape), name
        assert torch.equal(streamed.get(name), expected[name]), name

    full = worker.size("merge", merge).params
    pruned = worker.size("pruned", recipe).params
    config = sources.config
    assert full - pruned == removed_parameters(config.hidden_size, config.num_hidden_layers,
                                               width, keep, bool(getattr(config, "mlp_bias", 0)))
    assert worker.resident.model.config.intermediate_size == keep

    out = tmp_path / "export"
    out.mkdir()
    run_config = SimpleNamespace(sources=SimpleNamespace(
        base=str(folders["base"]), experts=[str(folders[n]) for n in folders if n != "base"]))
    record = {"id": "pruned", "recipe": recipe, "parents": [], "operator": "edit",
              "generation": 1}
    export_individual(record, sources, run_config, out, None, {})
    assert not (out / "mergekit_config.yml").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == keep and _count(model) == pruned
    shards = {}
    for shard in out.glob("*.safetensors"):
        shards |= load_file(shard)
    assert all(torch.equal(shards[name], expected[name]) for name in shards)
