"""The users' world in miniature: tiny models of each real architecture, bf16, sharded, tied where
the family ties, through `evoforge run` → `front` → `export`; transformers loads and generates the
export, and the export scores exactly what the run reported."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from evolve.cli import app
from fitness.causal_lm import CausalLMEvaluator
from fitness.jsonl_tasks import load_jsonl_task
from search_spaces.families import FAMILIES, build_family

TIED = {"llama-tied", "qwen2", "qwen3", "gemma2", "gemma3"}


def _task(folder: Path) -> Path:
    rng = random.Random(1)
    lines = [{"prompt": f"w{rng.randint(0, 99)}:", "choices": ["ab", "ba", "cc"],
              "answer": rng.randint(0, 2), "split": "search" if i < 30 else "test"}
             for i in range(45)]
    path = folder / "pick.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return path


def _names_on_disk(folder: Path) -> set[str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return set(handle.keys())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_run_front_export_on_each_architecture(family, tmp_path_factory, tmp_path):
    folders = build_family(family, tmp_path_factory.mktemp(family), experts=3)
    assert (folders["base"] / "model.safetensors.index.json").exists()  # sharded, bf16
    config = {"sources": {"base": str(folders["base"]),
                          "experts": [str(folders[n]) for n in folders if n != "base"]},
              "tasks": [str(_task(tmp_path))], "population": 4, "generations": 2, "seed": 3,
              "operators": {"crossover": {"rate": 0.4}, "edit": {"rate": 0.5}},
              "fitness": {"calibration": 10, "items_per_task": 5, "promote_items_per_task": 12,
                          "max_full_per_generation": 1, "dims": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    runner, run_dir = CliRunner(), tmp_path / "run"
    result = runner.invoke(app, ["run", str(tmp_path / "run.yaml"), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["front", str(run_dir)]).exit_code == 0
    db = sqlite3.connect(run_dir / "run.db")
    front = json.loads(db.execute("SELECT front FROM generations ORDER BY generation DESC "
                                  "LIMIT 1").fetchone()[0])
    task = load_jsonl_task(tmp_path / "pick.jsonl")
    for identifier in front:
        out = tmp_path / f"export-{identifier}"
        result = runner.invoke(app, ["export", str(run_dir), identifier, "--out", str(out)])
        assert result.exit_code == 0, result.output
        on_disk = _names_on_disk(out)
        assert ("lm_head.weight" in on_disk) == (family not in TIED)
        evaluator = CausalLMEvaluator.from_folder(out)  # float32 on the CPU, as the run scored
        assert evaluator.model.config.tie_word_embeddings == (family in TIED)
        reported = json.loads(db.execute("SELECT objectives FROM reports WHERE id = ?",
                                         (identifier,)).fetchone()[0])
        accuracy = evaluator.evaluate(task.name, task.test).accuracy
        assert accuracy == reported[f"accuracy/{task.name}"][0], identifier
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        tokens = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, min_new_tokens=3,
                                do_sample=False)
        assert tokens.shape == (1, 6)


def _run_config(tmp_path: Path, base: Path, experts: list[Path], **extra) -> Path:
    config = {"sources": {"base": str(base), "experts": [str(e) for e in experts]},
              "tasks": [str(_task(tmp_path))], "population": 4, "generations": 1,
              "fitness": {"calibration": 10, "dims": 1}, **extra}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _said(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, root, experts=2) for name in ("llama", "llama-tied")} | {
        "llama-wide-vocab": build_family("llama", root, experts=2, vocab=80)}


@pytest.mark.parametrize(("base", "expert", "expected"), [
    ("llama-tied", "llama", "ties lm_head.weight to model.embed_tokens.weight"),
    ("llama", "llama-wide-vocab", "the vocabularies differ")])
def test_sources_that_cannot_be_merged_fail_before_any_work(families, tmp_path, base, expert,
                                                            expected):
    path = _run_config(tmp_path, families[base]["base"], [families[base]["expert1"],
                                                           families[expert]["expert1"]])
    result = CliRunner().invoke(app, ["run", str(path), "--run-dir", str(tmp_path / "run")])
    said = _said(result)
    assert result.exit_code == 2 and expected in said, said
    assert "calibration" not in said  # refused before the first candidate
    if expert == "llama-wide-vocab":
        assert "model.embed_tokens.weight" in said and "[80, 64]" in said


def test_an_architecture_without_a_definition_is_named(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    from search_spaces.char_tokenizer import save_char_tokenizer

    config = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                       num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32)
    folders = []
    for name in ("base", "a", "b"):
        OPTForCausalLM(config).save_pretrained(tmp_path / name)
        save_char_tokenizer(tmp_path / name)
        folders.append(tmp_path / name)
    path = _run_config(tmp_path, folders[0], folders[1:])
    result = CliRunner().invoke(app, ["run", str(path), "--run-dir", str(tmp_path / "run")])
    said = _said(result)
    assert result.exit_code == 2 and "OPTForCausalLM" in said and "no mergekit definition" in said


def test_a_memory_budget_smaller_than_one_model_is_refused(families, tmp_path):
    folders = families["llama"]
    path = _run_config(tmp_path, folders["base"], [folders["expert1"], folders["expert2"]],
                       memory_budget="100kB")
    result = CliRunner().invoke(app, ["run", str(path), "--run-dir", str(tmp_path / "run")])
    said = _said(result)
    assert result.exit_code == 2 and "smaller than one resident model" in said, said


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_edits_keep_per_layer_config_lists_with_their_layers(family, tmp_path):
    """A dropped, repeated and moved layer keeps its own attention type in the config; the
    export loads in transformers, generates, and holds the tensors the worker scored."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from evolve.recipe_export import export_individual
    from fitness.worker import LocalWorker, RunSources

    built = build_family(family, tmp_path / "family", experts=2)
    folders = {str(path): path for path in built.values()}  # named as a run config names them
    base, one, two = map(str, built.values())
    config = AutoConfig.from_pretrained(base)
    types = list(config.layer_types)
    assert len(set(types)) == 2  # the family mixes sliding and full attention
    plan = [3, 0, 0, 1]
    merged = {"op": "merge", "method": "ties", "base": {"model": base},
              "inputs": [{"model": one}, {"model": two}], "params": {"weight": 1.0, "density": 0.5}}
    recipe = {"op": "edit", "layers": plan, "input": merged}
    task = load_jsonl_task(_task(tmp_path))
    sources = RunSources(folders, base, config, AutoTokenizer.from_pretrained(base))
    worker = LocalWorker([task], sources)
    scored = worker.test_results("x", recipe)[0]
    assert worker.resident.model.config.layer_types == [types[k] for k in plan]

    run = SimpleNamespace(sources=SimpleNamespace(base=base, experts=[one, two]))
    record = {"id": "x", "recipe": recipe, "generation": 1, "operator": "edit", "parents": []}
    export_individual(record, sources, run, tmp_path / "out", None, {})
    exported = AutoConfig.from_pretrained(tmp_path / "out")
    assert exported.num_hidden_layers == 4 and exported.layer_types == [types[k] for k in plan]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    generated = model.generate(torch.tensor([[1, 5]]), max_new_tokens=2, min_new_tokens=2,
                               do_sample=False)
    assert generated.shape == (1, 4)
    again = CausalLMEvaluator.from_folder(tmp_path / "out").evaluate(task.name, task.test)
    assert again.correct == scored.correct and again.prediction == scored.prediction
