"""Bad input to a run: clear errors, and a failing candidate does not end the run."""

from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

from evolve.cli import app
from fitness.errors import CandidateOutOfMemory
from fitness.pool import LocalPool
from fitness.reduced_fitness import Budget, Candidate, ReducedFitness
from fitness.size import Size
from operators.errors import MergeInputError
from operators.recipes import RecipeError


def _run(tmp_path, config: dict, run_dir=None):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return CliRunner().invoke(app, ["run", str(path), "--run-dir",
                                    str(run_dir or tmp_path / "run")])


def _said(result) -> str:
    """The CLI's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


@pytest.fixture
def task_file(tmp_path):
    """A small user task (never a zoo task: that would build the zoo in CI)."""
    path = tmp_path / "pick.jsonl"
    path.write_text('{"prompt": "a", "answer": "b", "split": "search"}\n'
                    '{"prompt": "c", "answer": "d", "split": "test"}\n')
    return path


def _config(base, experts, tasks):
    return {"sources": {"base": str(base), "experts": [str(e) for e in experts]},
            "tasks": [str(t) for t in tasks]}


def test_unknown_model_and_task(tmp_path, tiny_models, task_file):
    result = _run(tmp_path, _config("/nowhere/model", [tiny_models["add"], tiny_models["sort"]],
                                    [task_file]))
    assert result.exit_code == 2 and "not found" in _said(result)
    task = tmp_path / "t.jsonl"
    task.write_text('{"prompt": "a", "answer": "b", "split": "search"}\n')
    result = _run(tmp_path, _config(tiny_models["base"], [tiny_models["add"],
                                                          tiny_models["sort"]], [str(task)]),
                  run_dir=tmp_path / "again")
    assert result.exit_code == 2 and "the test split is empty" in _said(result)


def test_incompatible_sources(tmp_path, tiny_models, task_file):
    from search_spaces.tiny_llama import build_family

    other = build_family(tmp_path / "other", hidden=32)
    result = _run(tmp_path, _config(tiny_models["base"], [tiny_models["add"], other["add"]],
                                    [task_file]))
    assert result.exit_code == 2
    assert "must share the base's architecture" in _said(result)


def test_unwritable_run_dir(tmp_path, tiny_models, task_file):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = _run(tmp_path, _config(tiny_models["base"], [tiny_models["add"],
                                                          tiny_models["sort"]], [task_file]),
                  run_dir=blocker / "run")
    assert result.exit_code == 2 and "cannot write the run directory" in _said(result)


class FlakyScorer:
    """Answers from a fixed matrix, but one candidate's worker raises `error`."""

    def __init__(self, error: Exception):
        generator = torch.Generator().manual_seed(0)
        self.responses = (torch.rand(40, 60, generator=generator) < 0.5).double()
        self.error = error

    def answers(self, candidate_id, recipe, items):
        if candidate_id == "broken":
            raise self.error
        return self.responses[recipe["row"], items]

    def size(self, candidate_id, recipe):
        return Size(100, 200, 100)


def _evaluate_with(error: Exception):
    fitness = ReducedFitness(LocalPool(FlakyScorer(error)), torch.arange(60) % 2, ("a", "b"), dims=1)
    fitness.add_full([Candidate(f"c{i}", {"row": i}) for i in range(20)])
    fitness.refit()
    return fitness.evaluate([Candidate("fine", {"row": 30}), Candidate("broken", {"row": 31})],
                            Budget(items_per_task=5, promote_items_per_task=10))


@pytest.mark.parametrize("error", [
    MergeInputError("tensor 'w' of merge:ties holds 3 NaN/Inf values"),
    RecipeError("edit layers [9]: the input has layers 0..3"),
    CandidateOutOfMemory("task 't', an item of 900 tokens runs out of memory at batch 1")])
def test_a_candidate_that_fails_for_its_own_reason_is_marked_and_the_rest_go_on(error):
    results = _evaluate_with(error)
    assert results[0].ok and results[0].objectives["accuracy"][1] >= 0
    assert results[1].stage == "failed" and str(error) in results[1].error


@pytest.mark.parametrize("error", [KeyError("model.layers.0.mlp"), TypeError("bad call"),
                                   torch.OutOfMemoryError("CUDA out of memory")])
def test_programming_errors_and_raw_out_of_memory_stop_the_run(error):
    with pytest.raises(type(error)):
        _evaluate_with(error)


def test_invalid_config_names_the_key(tmp_path, tiny_models, task_file):
    config = _config(tiny_models["base"], [tiny_models["add"], tiny_models["sort"]], [task_file])
    config["population"] = 1
    result = _run(tmp_path, config)
    assert result.exit_code == 2 and "population" in _said(result)


@pytest.mark.parametrize("command", ["status", "front", "resume"])
def test_unknown_run(command, tmp_path):
    result = CliRunner().invoke(app, [command, str(tmp_path / "nope")])
    assert result.exit_code != 0 and "no run at" in _said(result)
