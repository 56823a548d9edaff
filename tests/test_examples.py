"""The shipped example configs work as written against what the repo builds from code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evolve.cli import app
from search_spaces.families import main as build_family_main

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_the_real_checkpoint_example_runs_as_written(tmp_path):
    """examples/hf-checkpoints.yaml, with the family its first comment builds: bf16, sharded,
    tied Llama checkpoints, a JSONL task and an lm-eval task (one generation, to keep it short)."""
    pytest.importorskip("lm_eval")
    shutil.copy(EXAMPLES / "hf-checkpoints.yaml", tmp_path)
    shutil.copytree(EXAMPLES / "tasks", tmp_path / "tasks")
    build_family_main(["llama-tied", str(tmp_path / "models")])
    result = CliRunner().invoke(app, ["run", str(tmp_path / "hf-checkpoints.yaml"), "--run-dir",
                                      str(tmp_path / "run"), "--generations", "1"])
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.output
