"""`evoforge eval` on a model folder and a user JSONL task, and its errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from evolve.cli import app


def test_eval_prints_accuracy_and_writes_per_item_results(tiny_models, tmp_path):
    task = tmp_path / "mine.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1),
                                          "max_new_tokens": 3, "split": "test"})
                              for i in range(5)) + '\n{"prompt": "x", "answer": "y", '
                    '"split": "search"}\n')
    out = tmp_path / "items.jsonl"
    result = CliRunner().invoke(app, ["eval", str(tiny_models["add"]), "-t", str(task),
                                      "--split", "test", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "mine" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["item"] for r in rows] == list(range(5))
    assert {"correct", "score", "prediction"} <= rows[0].keys()


def test_eval_errors_are_one_clear_line(tiny_models, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": \n')
    result = CliRunner().invoke(app, ["eval", str(tiny_models["add"]), "-t", str(bad)])
    assert result.exit_code == 2
    assert "line 2: not valid JSON" in result.output
