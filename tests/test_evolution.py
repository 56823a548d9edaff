"""End to end: a small evolution on the tiny models, its CLI, export, and kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from evolve.cli import app
from tests.conftest import last_front, pick_task, small_run_config, wait_for_row


@pytest.fixture(scope="module")
def config_path(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("evo")
    return small_run_config(tiny_models, pick_task(folder), folder, generations=3)



def test_run_front_status_export(config_path, tmp_path):
    runner = CliRunner()
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["run", str(config_path), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.output and "engine" in result.output
    from operators.recipes import canonical_key

    db = sqlite3.connect(run_dir / "run.db")
    keys = [canonical_key(json.loads(r)) for (r,) in db.execute("SELECT recipe FROM individuals")]
    assert len(keys) == len(set(keys))  # no recipe scored twice
    for command in (["status", str(run_dir)], ["front", str(run_dir)]):
        assert runner.invoke(app, command).exit_code == 0
    status = json.loads(runner.invoke(app, ["status", str(run_dir), "--json"]).stdout)
    assert status["schema"] == 1 and status["status"] == "done"
    assert status["generations"] == {"done": 3, "planned": 3}
    assert [g["generation"] for g in status["hypervolume"]] == [1, 2, 3]
    # the run's cost: each answer counted once, under the stage that asked for it
    asked, individuals = status["items_asked"], dict(db.execute(
        "SELECT id, generation FROM individuals"))
    calibrated = sum(generation == 0 for generation in individuals.values())
    children = len(individuals) - calibrated
    assert asked["calibration"] == calibrated * 20  # the bank: 20 of the task's 40 search items
    assert asked["reduced"] == children * 5  # items_per_task 5, one task
    pairs = {(c, i) for c, items in db.execute("SELECT candidate, items FROM answers")
             for i in json.loads(items)}
    assert sum(n for stage, n in asked.items() if stage != "test") == len(pairs)
    assert asked["test"] == 20 * db.execute("SELECT COUNT(*) FROM reports").fetchone()[0]
    assert status["items_if_full"] == len(individuals) * 40
    assert "fitness cost: " in " ".join(result.output.split())
    shown = json.loads(runner.invoke(app, ["front", str(run_dir), "--json"]).stdout)
    assert shown["final"] and sorted(m["id"] for m in shown["members"]) == sorted(
        i for i, _ in last_front(run_dir))
    for member in shown["members"]:
        assert set(member["objectives"]["accuracy"]) and member["test"]["accuracy"]
        assert "op" in member["recipe"] or "model" in member["recipe"]
    # export a front member: transformers loads it and it scores as in the run
    member = last_front(run_dir)[0][0]
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(run_dir), member, "--out", str(out),
                                 "--max-shard-gb", "0.0001"])  # 107 kB shards of a 0.5 MB model
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 2
    assert (out / "model.safetensors.index.json").is_file()
    (out / "notes.txt").write_text("mine")  # a non-empty --out is not replaced without --force
    again = runner.invoke(app, ["export", str(run_dir), member, "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    assert (out / "notes.txt").read_text() == "mine"
    forced = runner.invoke(app, ["export", str(run_dir), member, "--out", str(out), "--force",
                                 "--max-shard-gb", "0.0001"])
    assert forced.exit_code == 0 and not (out / "notes.txt").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".export")]  # no leftovers
    from fitness.causal_lm import CausalLMEvaluator
    from fitness.jsonl_tasks import load_jsonl_task

    task = load_jsonl_task(config_path.parent / "pick.jsonl")
    accuracy = CausalLMEvaluator.from_folder(out).evaluate(task.name, task.test).accuracy
    db = sqlite3.connect(run_dir / "run.db")
    report = json.loads(db.execute("SELECT objectives FROM reports WHERE id = ?",
                                   (member,)).fetchone()[0])
    assert accuracy == pytest.approx(report["accuracy"][0])
    assert "base_model" in (out / "README.md").read_text()


def test_exported_ties_merge_equals_mergekit(config_path, tmp_path):
    from safetensors.torch import load_file

    from tests.mergekit_reference import mergekit_merge

    run_dir = tmp_path / "run"
    assert CliRunner().invoke(app, ["run", str(config_path), "--run-dir", str(run_dir),
                                    "--generations", "1"]).exit_code == 0
    out = tmp_path / "ties"
    assert CliRunner().invoke(app, ["export", str(run_dir), "default-ties", "--out",
                                    str(out)]).exit_code == 0
    mk = yaml.safe_load((out / "mergekit_config.yml").read_text())
    base = load_file(Path(mk["base_model"]) / "model.safetensors")
    models = [load_file(Path(m["model"]) / "model.safetensors") for m in mk["models"]]
    per_model = {k: [m["parameters"][k] for m in mk["models"]] for k in ("weight", "density")}
    reference = mergekit_merge("ties", base, models, **per_model, **mk["parameters"])
    ours = load_file(out / "model.safetensors")
    assert all(torch.equal(ours[name], reference[name]) for name in reference)


def _default_sigint() -> None:
    """A shell that starts the suite in the background ignores SIGINT, and children inherit that;
    the run must see Ctrl-C as a user's terminal sends it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _evoforge(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.Popen([sys.executable, "-m", "evolve.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=_default_sigint)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_kill_and_resume_gives_the_same_front(config_path, tmp_path, stop):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _evoforge("run", str(config_path), "--run-dir", str(straight)).wait(300) == 0
    process = _evoforge("run", str(config_path), "--run-dir", str(killed))
    # kill once the first generation is under way
    wait_for_row(killed, "SELECT COUNT(*) FROM evaluations WHERE generation = 1")
    if stop == signal.SIGKILL:  # while it runs, a second driver is refused, naming the holder
        second = CliRunner().invoke(app, ["resume", str(killed)])
        assert second.exit_code == 2
        assert f"is being written by pid {process.pid}" in " ".join(second.output.split())
        onto = CliRunner().invoke(app, ["run", str(config_path), "--run-dir", str(killed)])
        assert onto.exit_code == 2 and "already holds a run" in " ".join(onto.output.split())
    process.send_signal(stop)
    assert process.wait(60) == (130 if stop == signal.SIGINT else -signal.SIGKILL)
    status = sqlite3.connect(killed / "run.db").execute(
        "SELECT value FROM meta WHERE key = 'status'").fetchone()[0]
    assert json.loads(status) == ("interrupted" if stop == signal.SIGINT else "running")
    said = CliRunner().invoke(app, ["status", str(killed)]).output
    assert ("interrupted: stopped by Ctrl-C" if stop == signal.SIGINT else
            "ended without finishing (killed?)") in " ".join(said.split())
    if stop == signal.SIGINT:  # Ctrl-C: a clean stop, recorded as such
        assert sqlite3.connect(killed / "run.db").execute(
            "SELECT COUNT(*) FROM events WHERE kind = 'interrupted'").fetchone()[0] == 1
    assert _evoforge("resume", str(killed)).wait(300) == 0
    assert last_front(killed) == last_front(straight)
    db = sqlite3.connect(killed / "run.db")
    asked = [(c, i) for c, items in db.execute("SELECT candidate, items FROM answers")
             for i in json.loads(items)]
    assert len(asked) == len(set(asked))  # no answer computed (or counted) twice


@pytest.mark.parametrize("strategy", ["cmaes", "tpe", "nsga2"])
def test_continuous_strategies_run_and_replay(config_path, tmp_path, strategy):
    config = yaml.safe_load(config_path.read_text())
    del config["generations"]
    config.update(strategy=strategy, evaluations=6,  # an evaluation budget: generations of 4, 2
                  tasks=[str(config_path.parent / "pick.jsonl")])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    fronts = []
    for attempt in ("a", "b"):
        result = CliRunner().invoke(app, ["run", str(path), "--run-dir", str(tmp_path / attempt)])
        assert result.exit_code == 0, result.output
        fronts.append(last_front(tmp_path / attempt))
        db = sqlite3.connect(tmp_path / attempt / "run.db")
        operators = [row[0] for row in db.execute(
            "SELECT operator FROM individuals WHERE generation > 0")]
        assert operators == [strategy] * 6
    assert fronts[0] == fronts[1]  # seeded: the same run twice gives the same front


@pytest.mark.parametrize("crash_at", [1, 2])
def test_a_crashed_run_says_so_and_resumes(config_path, tmp_path, monkeypatch, crash_at):
    """A bug mid-run: the run is marked failed with the reason, `front` says there is none yet
    (exit 1) or shows the last finished generation, and `resume` finishes the run."""
    from evolve.engine import Evolution

    save = Evolution._save_generation

    def crash(self, generation, population):
        if generation == crash_at:
            raise RuntimeError("an injected bug")
        save(self, generation, population)

    monkeypatch.setattr(Evolution, "_save_generation", crash)
    run_dir, runner = tmp_path / "run", CliRunner()
    result = runner.invoke(app, ["run", str(config_path), "--run-dir", str(run_dir)])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)
    said = " ".join(runner.invoke(app, ["status", str(run_dir)]).output.split())
    assert "failed: RuntimeError: an injected bug" in said
    assert f"generation {crash_at - 1}/3" in said
    front = runner.invoke(app, ["front", str(run_dir)])
    if crash_at == 1:
        assert front.exit_code == 1 and "has finished yet" in " ".join(front.output.split())
    else:
        assert front.exit_code == 0 and "front after generation 1 of 3" in front.output
    monkeypatch.undo()
    assert runner.invoke(app, ["resume", str(run_dir)]).exit_code == 0
    said = " ".join(runner.invoke(app, ["status", str(run_dir)]).output.split())
    assert ": done, generation 3/3" in said and "final (fully evaluated)" in said
    assert "final front, fully evaluated" in runner.invoke(app, ["front", str(run_dir)]).output


def test_too_small_a_calibration_is_refused_before_any_work(config_path, tmp_path):
    config = yaml.safe_load(config_path.read_text())
    config["fitness"] |= {"calibration": 2, "dims": 2}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", str(path), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and not (tmp_path / "run").exists()
    assert "set fitness.calibration to at least 11" in " ".join(result.output.split())


def test_an_older_store_is_migrated_and_a_resume_says_what_changed(config_path, tmp_path):
    """A schema-1 store (answers without the journal's columns) written under other versions:
    resume migrates it, says so and which versions changed, and reuses none of its old answers
    (they carry no recipe key)."""
    run_dir, runner = tmp_path / "run", CliRunner()
    assert runner.invoke(app, ["run", str(config_path), "--run-dir", str(run_dir),
                               "--generations", "1"]).exit_code == 0
    db = sqlite3.connect(run_dir / "run.db")
    with db:
        db.execute("CREATE TABLE old AS SELECT candidate, items, answers, at FROM answers")
        db.execute("DROP TABLE answers")
        db.execute("ALTER TABLE old RENAME TO answers")
        db.execute("DELETE FROM meta WHERE key = 'schema'")
        environment = json.loads(db.execute("SELECT value FROM meta WHERE key = 'environment'"
                                            ).fetchone()[0])
        db.execute("UPDATE meta SET value = ? WHERE key = 'environment'",
                   (json.dumps(environment | {"torch": "2.0.0"}),))
    legacy = db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    db.close()
    result = runner.invoke(app, ["resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "run store schema 1 -> 2" in said and "run store schema 2 -> 3" in said
    assert "torch 2.0.0 -> " in said
    db = sqlite3.connect(run_dir / "run.db")
    assert json.loads(db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]) \
        == 3
    assert db.execute("SELECT COUNT(*) FROM answers WHERE recipe IS NULL").fetchone()[0] == legacy
    assert db.execute("SELECT COUNT(*) FROM answers WHERE recipe IS NOT NULL").fetchone()[0] > 0
    # the legacy rows count as asked, by no recorded stage; the new ones by theirs
    asked = json.loads(CliRunner().invoke(app, ["status", str(run_dir), "--json"]).output)
    assert asked["items_asked"]["unrecorded"] > 0 and asked["items_asked"]["reduced"] > 0


@pytest.mark.parametrize("mode", ["generational", "steady-state"])
def test_full_evaluation_is_the_exact_baseline(config_path, tmp_path, mode):
    """`fitness.full_evaluation`: every candidate answers the whole search split, no IRT model
    is fitted (so no calibration beyond the seeds and default merges is needed), and the run's
    cost is exactly one full evaluation per candidate."""
    config = yaml.safe_load(config_path.read_text())
    config["fitness"] = {"full_evaluation": True, "calibration": 0}
    config["mode"] = mode
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(config))
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(path), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    status = json.loads(runner.invoke(app, ["status", str(tmp_path / "run"), "--json"]).stdout)
    db = sqlite3.connect(tmp_path / "run" / "run.db")
    stages = {stage for (stage,) in db.execute("SELECT stage FROM evaluations")}
    assert stages == {"full"}
    search = {k: v for k, v in status["items_asked"].items() if k != "test"}
    assert set(search) == {"calibration", "full"}
    assert sum(search.values()) == status["items_if_full"] == 40 * db.execute(
        "SELECT COUNT(*) FROM individuals").fetchone()[0]
