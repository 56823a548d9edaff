"""`evoforge fitness check CONFIG`: the trust table for a user's own models and tasks."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from evolve.cli import app
from evolve.fitness_check import Population, reduced_evaluation_table
from fitness.irt import fit_irt, simulate_responses
from fitness.reduced_sets import select_items
from operators.cache import cache_dir
from tests.conftest import pick_task, small_run_config


def test_fitness_check_runs_on_a_user_config(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOFORGE_CACHE", str(tmp_path / "cache"))
    config = small_run_config(tiny_models, pick_task(tmp_path), tmp_path, generations=1)
    args = ["fitness", "check", str(config), "--calibration", "16", "--held-out", "6",
            "--sizes", "5,10", "--selections", "random", "--dims", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for estimator in ("mean", "pirt", "gpirt", "mpirt", "gmpirt"):
        assert f"random │ 5 │ {estimator} │ 8x" in text  # 40 search items, 5 asked
        assert f"random │ 10 │ {estimator} │ 4x" in text
    cached = list((cache_dir() / "fitness-check").glob("*.pt"))
    assert len(cached) == 2  # calibration and held-out answers
    again = CliRunner().invoke(app, args)  # from the cache: the same table
    assert again.exit_code == 0
    table = [line for line in result.output.splitlines() if "│" in line]
    assert table == [line for line in again.output.splitlines() if "│" in line]


def test_fitness_check_says_what_is_wrong_with_a_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: {base: nowhere}\n")
    result = CliRunner().invoke(app, ["fitness", "check", str(bad)])
    assert result.exit_code == 2 and "experts" in result.output


def test_the_table_scores_estimates_against_the_full_split():
    responses = simulate_responses(130, 40, dims=1, seed=2)[0]
    task_of = torch.arange(40) % 2
    calibration = Population([{"model": f"c{i}"} for i in range(100)], responses[:100],
                             task_of, ("a", "b"))
    held_out = Population([{"model": f"h{i}"} for i in range(30)], responses[100:], task_of,
                          ("a", "b"))
    rows = {(r.per_task, r.estimator): r for r in reduced_evaluation_table(
        calibration, held_out, 1, [5, 20], ["random"])}
    truth = responses[100:].reshape(30, 20, 2).mean(1).mean(1)  # item j is task j % 2
    assert rows[5, "mean"].cost_ratio == 4.0 and rows[20, "mean"].cost_ratio == 1.0
    for estimator in ("mean", "pirt", "gpirt"):  # every item asked: exact, and covered
        whole = rows[20, estimator]
        assert whole.mae < 1e-9 and whole.coverage == 1.0  # (ties: rank correlation < 1)
    reduced = select_items("random", fit_irt(responses[:100], 1), task_of, 5)
    means = responses[100:][:, reduced.indices].mean(1)  # 5 items of each task, equal weights
    assert rows[5, "mean"].mae == pytest.approx(float((means - truth).abs().mean()) * 100)
