"""The Ray backend on CPU with Ray's logical GPUs: placement, the same answers and front as the
local backend, and faults (a killed actor, a raising, a hanging and a worker-killing candidate,
a killed driver)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from fitness.errors import CandidateTimeout, FitnessError, WorkerDied  # noqa: E402
from fitness.pool import Job, LocalPool  # noqa: E402
from fitness.ray_pool import RayPool  # noqa: E402
from operators.recipes import RecipeError  # noqa: E402
from tests.conftest import (  # noqa: E402
    journal_only,
    last_front,
    pick_task,
    run_tables,
    small_run_config,
)
from tests.faulty_workers import FaultySpec  # noqa: E402

TIES = {"op": "merge", "method": "ties", "seed": 0, "base": {"model": "base"},
        "inputs": [{"model": "add"}, {"model": "sort"}],
        "params": {"weight": 0.5, "density": 0.5}}
ITEMS = tuple(range(20))


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return pick_task(tmp_path_factory.mktemp("ray"))


def _spec(tiny_models, task, **faults) -> FaultySpec:
    names = ("base", "add", "sort", "reverse")
    return FaultySpec(tuple((n, str(tiny_models[n])) for n in names), "base", (str(task),),
                      dtype="float32", **faults)


def _local(spec, jobs):
    pool = LocalPool(spec.build())
    futures = [pool.submit(job) for job in jobs]
    return [f.result() for f in pool.completed(futures)]


def _consume(pool, jobs):
    futures = [pool.submit(job) for job in jobs]
    consumed = list(pool.completed(futures))
    assert sorted(map(id, consumed)) == sorted(map(id, futures))  # each exactly once
    return futures


def test_actors_hold_distinct_gpus_and_answer_as_the_local_worker(cluster, tiny_models, task):
    spec = _spec(tiny_models, task)
    pool = RayPool(spec, 2, gpus_per_worker=1)
    try:
        assert sorted(pool.visible_devices()) == ["0", "1"]
        jobs = [Job(f"c{i}", TIES if i % 2 else {"model": "add"}, ITEMS) for i in range(4)]
        futures = _consume(pool, jobs)
        assert [f.result() for f in futures] == _local(spec, jobs)
    finally:
        pool.close()


def test_a_pool_the_cluster_cannot_hold_is_refused(cluster, tiny_models, task):
    with pytest.raises(FitnessError, match="needs 3 GPUs, but the Ray cluster has 2"):
        RayPool(_spec(tiny_models, task), 3, gpus_per_worker=1)


def test_a_killed_actor_is_replaced_and_its_job_retried(cluster, tiny_models, task):
    spec = _spec(tiny_models, task, slow=(("slow", 3.0),))
    events = []
    pool = RayPool(spec, 2, on_event=lambda kind, detail: events.append((kind, detail)))
    try:
        jobs = [Job("slow", TIES, ITEMS)] + [Job(f"c{i}", {"model": "sort"}, ITEMS)
                                              for i in range(3)]
        pids = pool.pids()  # (an actor answers calls in order: ask before it is busy)
        futures = [pool.submit(job) for job in jobs]
        pool._dispatch()
        victim = pool.activity().index("slow")
        ray.kill(pool._actors[victim])  # mid-evaluation: the job sleeps 3 s before answering
        consumed = list(pool.completed(futures))
        assert len(consumed) == 4
        assert [f.result() for f in futures] == _local(_spec(tiny_models, task), jobs)
        assert ("retry", "slow: attempt 2") in events
        assert pool.pids()[victim] != pids[victim]  # a new process took its place
    finally:
        pool.close()


def test_candidate_errors_timeouts_and_worker_killers_fail_only_their_candidate(
        cluster, tiny_models, task):
    spec = _spec(tiny_models, task, slow=(("hang", 120.0),), fatal=("killer",), buggy=("bug",))
    pool = RayPool(spec, 2, timeout=8.0, retries=1)
    try:
        bad_edit = {"op": "edit", "edits": [{"drop_layer": 9}], "input": {"model": "add"}}
        jobs = [Job("invalid", bad_edit, ITEMS), Job("hang", TIES, ITEMS),
                Job("killer", TIES, ITEMS), Job("bug", TIES, ITEMS), Job("fine", TIES, ITEMS)]
        invalid, hang, killer, bug, fine = _consume(pool, jobs)
        assert isinstance(invalid.exception(), RecipeError)
        assert isinstance(hang.exception(), CandidateTimeout)
        assert isinstance(killer.exception(), WorkerDied)
        assert "died 2 times" in str(killer.exception())
        assert isinstance(bug.exception(), KeyError)  # not a candidate error: the run stops
        assert any("raised in Ray worker" in note and "faulty_workers.py" in note
                   for note in bug.exception().__notes__)  # with the worker's traceback
        assert fine.result() == _local(_spec(tiny_models, task), jobs[4:])[0]
    finally:
        pool.close()


def _run_config(tiny_models, task, folder: Path) -> Path:
    return small_run_config(tiny_models, task, folder, generations=2)


def test_the_ray_backend_gives_the_local_front(cluster, tiny_models, task, tmp_path):
    from typer.testing import CliRunner

    from evolve.cli import app

    config = _run_config(tiny_models, task, tmp_path)
    runner = CliRunner()
    for name, extra in (("local", []), ("ray", ["--workers", "2"])):
        result = runner.invoke(app, ["run", str(config), "--run-dir", str(tmp_path / name),
                                     *extra])
        assert result.exit_code == 0, result.output
    assert "Ray: 2 workers started" in result.output
    assert last_front(tmp_path / "ray") == last_front(tmp_path / "local")


@pytest.mark.parametrize("mode", ["generational", "steady-state"])
def test_a_run_with_hanging_raising_and_worker_killing_candidates_completes(
        cluster, tiny_models, task, tmp_path, monkeypatch, mode):
    from typer.testing import CliRunner

    import fitness.worker_spec
    from evolve.cli import app
    from tests.faulty_workers import FaultyRunSpec

    monkeypatch.setattr(fitness.worker_spec, "WorkerSpec", FaultyRunSpec)
    config = _run_config(tiny_models, task, tmp_path)
    data = yaml.safe_load(config.read_text()) | {"workers": 2, "candidate_timeout": 20,
                                                 "worker_retries": 1, "mode": mode}
    config.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["run", str(config), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    db = sqlite3.connect(tmp_path / "run" / "run.db")
    errors = dict(db.execute("SELECT id, error FROM evaluations"))
    assert errors.pop("g1-1").startswith("CandidateTimeout")
    assert errors.pop("g1-2").startswith("WorkerDied")
    assert errors.pop("g1-3").startswith("CandidateOutOfMemory")
    assert not any(errors.values())  # every other candidate evaluated
    answered = [(c, i) for c, items in db.execute("SELECT candidate, items FROM answers "
                                                  "WHERE error IS NULL")
                for i in json.loads(items)]
    assert len(answered) == len(set(answered))
    restarts = db.execute("SELECT COUNT(*) FROM events WHERE kind = 'worker-restarted'")
    assert restarts.fetchone()[0] == 3  # the hang once, the killer twice


def _evoforge(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from evolve.cli import app; app()", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("mode", ["generational", "steady-state"])
def test_a_killed_driver_resumes_with_every_answer_once(tiny_models, task, tmp_path, mode):
    config = small_run_config(tiny_models, task, tmp_path, generations=6)
    run_dir = tmp_path / "run"
    driver = _evoforge("run", str(config), "--run-dir", str(run_dir), "--workers", "2",
                       "--mode", mode)
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:  # kill among the children
        try:
            if sqlite3.connect(run_dir / "run.db").execute(
                    "SELECT COUNT(*) FROM answers WHERE candidate LIKE 'g%'").fetchone()[0] >= 3:
                break
        except sqlite3.Error:  # the store is still being created
            pass
        time.sleep(0.02)
    assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
    driver.wait()
    db = sqlite3.connect(run_dir / "run.db")
    assert db.execute("SELECT COUNT(*) FROM evaluations WHERE generation > 0").fetchone()[0] < 24
    resumed = _evoforge("resume", str(run_dir))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]
    db = sqlite3.connect(run_dir / "run.db")
    assert json.loads(db.execute("SELECT value FROM meta WHERE key = 'status'").fetchone()[0]) \
        == "done"
    seen = set()
    for candidate, items in db.execute("SELECT candidate, items FROM answers WHERE error IS NULL"):
        for item in json.loads(items):
            assert (candidate, item) not in seen, (candidate, item)
            seen.add((candidate, item))
    for identifier, stage, error in db.execute("SELECT id, stage, error FROM evaluations"):
        assert (stage == "failed") == (error is not None), identifier
    if mode == "steady-state":  # its journal (Ray's order, the kill and all) replays exactly
        from typer.testing import CliRunner

        from evolve.cli import app

        replayed = journal_only(run_dir, tmp_path / "replayed")
        result = CliRunner().invoke(app, ["resume", str(replayed)])
        assert result.exit_code == 0, result.output
        assert run_tables(replayed) == run_tables(run_dir)


def test_the_driver_of_a_ray_run_builds_no_worker_and_applies_no_budget(
        cluster, tiny_models, task, tmp_path, monkeypatch):
    """The workers' memory budget is for the workers' devices (a bf16 model on a GPU): the driver
    maps the sources for checks and metadata only, so it never builds a worker (which would
    check that budget against a float32 CPU copy), and a worker that cannot hold a model says so
    through the driver."""
    import fitness.worker
    from evolve.config import load_config
    from evolve.engine import prepare

    def no_worker_here(*args, **kwargs):
        raise AssertionError("the driver built a worker")

    monkeypatch.setattr(fitness.worker.LocalWorker, "__init__", no_worker_here)
    path = _run_config(tiny_models, task, tmp_path)
    setup = prepare(load_config(path, {"workers": 2}), tmp_path)  # actors build theirs
    try:
        assert isinstance(setup.sources, fitness.worker.RunSources)
        assert len(setup.pool.pids()) == 2
    finally:
        setup.pool.close()
    monkeypatch.undo()
    with pytest.raises(FitnessError, match=r"a Ray worker could not start: .*MemoryBudgetError: "
                                           r"memory_budget"):
        prepare(load_config(path, {"workers": 2, "memory_budget": 1000}), tmp_path)
