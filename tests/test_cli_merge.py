"""`evoforge merge` on a mergekit YAML gives mergekit-yaml's tensors and a loadable checkpoint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from evolve.cli import app

CONFIGS = {
    "ties": """
merge_method: ties
base_model: {base}
models:
  - model: {base}
  - model: {add}
    parameters: {{weight: 0.6, density: [0.3, 0.8]}}
  - model: {sort}
    parameters:
      weight: [{{filter: self_attn, value: 0.3}}, {{value: 0.5}}]
      density: 0.5
parameters: {{normalize: true}}
dtype: float32
""",
    "slerp": """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {reverse}
        layer_range: [0, 4]
merge_method: slerp
base_model: {base}
parameters:
  t: [{{filter: mlp, value: [0.1, 0.9]}}, {{value: 0.4}}]
dtype: float32
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {add}
    parameters: {{weight: 0.5}}
  - model: {reverse}
    parameters: {{weight: 0.7}}
parameters: {{lambda: 0.9}}
dtype: float32
""",
}


def _load_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _mergekit_yaml() -> str:
    found = shutil.which("mergekit-yaml") or str(Path(sys.executable).with_name("mergekit-yaml"))
    return found


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_evoforge_merge_equals_mergekit_yaml(method, tiny_models, tmp_path):
    config = tmp_path / "merge.yml"
    config.write_text(CONFIGS[method].format(**{k: str(v) for k, v in tiny_models.items()}))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    result = CliRunner().invoke(app, ["merge", str(config), "--out", str(ours)])
    assert result.exit_code == 0, result.output
    subprocess.run([_mergekit_yaml(), str(config), str(theirs), "--copy-tokenizer"], check=True,
                   capture_output=True)
    mine, reference = _load_all(ours), _load_all(theirs)
    assert set(reference) <= set(mine)
    for name, tensor in reference.items():
        assert torch.equal(mine[name], tensor), name
    for file in ("config.json", "tokenizer.json", "mergekit_config.yml", "README.md"):
        assert (ours / file).exists(), file
    card = (ours / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "library_name: transformers" in card


def test_merged_checkpoint_loads_and_generates(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = tmp_path / "merge.yml"
    config.write_text(CONFIGS["ties"].format(**{k: str(v) for k, v in tiny_models.items()}))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["merge", str(config), "--out", str(out),
                                      "--max-shard-gb", "0.0002"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors.index.json").exists()  # sharded: ~200 KiB shards
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    inputs = tokenizer("12+34=", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 5
    merged = _load_all(out)
    assert all(torch.equal(p.detach(), merged[n]) for n, p in model.named_parameters())


def test_cli_reports_bad_config_without_traceback(tmp_path):
    config = tmp_path / "merge.yml"
    config.write_text("merge_method: ties\nmodels: [{model: x}]\n")
    result = CliRunner().invoke(app, ["merge", str(config), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "needs base_model" in result.output
