"""`evoforge fitness check CONFIG`: the trust table for a user's own models and tasks."""

from __future__ import annotations

from typer.testing import CliRunner

from evolve.cli import app
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
