"""The asynchronous steady-state mode and resume by journal replay, in process.

Results reach an asynchronous driver in whatever order the workers finish. `ShuffledPool` is the
local worker with that order made arbitrary (seeded), so that a test can show the run depends on
it, and that a resume served from the journal retraces the run whatever order the live pool
would have given."""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
from concurrent.futures import Future
from pathlib import Path

import pytest
import yaml

from evolve.config import load_config
from evolve.engine import Evolution, prepare
from evolve.store import RunStore
from fitness.errors import CandidateOutOfMemory
from fitness.journal import ResumeMismatch
from fitness.pool import Job, run_job
from fitness.reduced_sets import item_bank
from tests.conftest import journal_only, pick_task, run_tables, small_run_config

FAILING = "g2-1"


class ShuffledPool:
    """`workers` slots over one real worker: each wait finishes a random one of the jobs waited
    for. Candidate FAILING runs out of memory at batch 1 (a candidate error)."""

    def __init__(self, worker, workers: int, seed: int):
        self.worker, self.workers, self.rng = worker, workers, random.Random(seed)
        self.jobs: dict[Future, Job] = {}
        self.ran: list[tuple[str, bool]] = []  # (candidate, test-split job?)
        self.waits: list[int] = []  # how many children's jobs each wait was over

    def submit(self, job: Job) -> Future:
        future: Future = Future()
        self.jobs[future] = job
        return future

    def completed(self, futures):
        waiting = list(futures)
        if any(self.jobs[f].candidate_id.startswith("g") for f in waiting if f in self.jobs):
            self.waits.append(len(waiting))
        while waiting:
            future = waiting.pop(self.rng.randrange(len(waiting)))
            if not future.done():
                job = self.jobs.pop(future)
                self.ran.append((job.candidate_id, job.test))
                if job.candidate_id == FAILING and not job.test:
                    future.set_exception(CandidateOutOfMemory("out of memory at batch 1"))
                else:
                    future.set_result(run_job(self.worker, job))
            yield future

    def retain(self, recipes) -> None:
        self.worker.retain(recipes)

    def activity(self):
        return [None] * self.workers

    def busy_seconds(self):
        return [0.0] * self.workers

    def close(self) -> None:
        self.jobs.clear()


@pytest.fixture(scope="module")
def config_path(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("steady")
    path = small_run_config(tiny_models, pick_task(folder, seed=1), folder, generations=3)
    config = yaml.safe_load(path.read_text()) | {"mode": "steady-state"}
    path.write_text(yaml.safe_dump(config))
    return path


def _run(config_path: Path, run_dir: Path, seed: int) -> ShuffledPool:
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "config.yaml").exists():
        shutil.copy(config_path, run_dir / "config.yaml")
    config = load_config(run_dir / "config.yaml")
    setup = prepare(config, config_path.parent)
    setup.pool = pool = ShuffledPool(setup.pool.worker, workers=3, seed=seed)
    store = RunStore(run_dir)
    Evolution(config, setup, store).run()
    store.close()
    return pool


def test_each_scored_child_joins_the_population_and_frees_its_worker(config_path, tmp_path):
    pool = _run(config_path, tmp_path / "run", seed=1)
    db = sqlite3.connect(tmp_path / "run" / "run.db")
    children = [row[0] for row in db.execute("SELECT id FROM individuals WHERE generation > 0")]
    assert sorted(children) == sorted(f"g{g}-{k}" for g in (1, 2, 3) for k in range(4))
    errors = dict(db.execute("SELECT id, error FROM evaluations WHERE error IS NOT NULL"))
    assert errors == {FAILING: "CandidateOutOfMemory: out of memory at batch 1"}
    # one child per worker in flight until the last child is bred, then the stragglers: every
    # wait is over three children's jobs, then fewer and fewer
    tail = next(i for i, waiting in enumerate(pool.waits) if waiting < 3)
    assert pool.waits[0] == 3 and set(pool.waits[:tail]) == {3}
    assert pool.waits[tail:] == sorted(pool.waits[tail:], reverse=True)
    assert [row[0] for row in db.execute("SELECT generation FROM generations")] == [1, 2, 3, 4]


def test_the_order_results_arrive_in_decides_the_run(config_path, tmp_path):
    _run(config_path, tmp_path / "a", seed=1)
    _run(config_path, tmp_path / "b", seed=2)
    assert run_tables(tmp_path / "a") != run_tables(tmp_path / "b")


def test_a_resume_replays_the_journal_in_its_order_whatever_the_pool_does(config_path, tmp_path):
    _run(config_path, tmp_path / "original", seed=1)
    # the journal alone, and a live pool that would finish jobs in another order
    journal_only(tmp_path / "original", tmp_path / "resumed")
    journal = sqlite3.connect(tmp_path / "resumed" / "run.db").execute(
        "SELECT COUNT(*) FROM answers").fetchone()[0]
    pool = _run(config_path, tmp_path / "resumed", seed=2)
    assert run_tables(tmp_path / "resumed") == run_tables(tmp_path / "original")
    assert pool.ran and all(test for _, test in pool.ran)  # only the front's test reports ran
    assert sqlite3.connect(tmp_path / "resumed" / "run.db").execute(
        "SELECT COUNT(*) FROM answers").fetchone()[0] == journal  # nothing journaled twice


def test_a_journal_cut_mid_run_resumes_and_completes(config_path, tmp_path):
    _run(config_path, tmp_path / "original", seed=1)
    shutil.copytree(tmp_path / "original", tmp_path / "cut")
    db = sqlite3.connect(tmp_path / "cut" / "run.db")
    failure = db.execute("SELECT rowid FROM answers WHERE candidate = ?", (FAILING,)).fetchone()[0]
    with db:  # the results consumed after the failure and two more are lost
        lost = db.execute("DELETE FROM answers WHERE rowid > ?", (failure + 2,)).rowcount
    db.close()
    assert lost >= 3
    pool = _run(config_path, tmp_path / "cut", seed=2)
    assert FAILING not in [c for c, _ in pool.ran]  # its recorded failure was served again
    db = sqlite3.connect(tmp_path / "cut" / "run.db")
    asked = [(c, i) for c, items in db.execute("SELECT candidate, items FROM answers WHERE "
                                               "error IS NULL") for i in json.loads(items)]
    assert len(asked) == len(set(asked))
    assert {row[0] for row in db.execute("SELECT id FROM evaluations")} == \
        {row[0] for row in sqlite3.connect(tmp_path / "original" / "run.db").execute(
            "SELECT id FROM evaluations")}


def test_a_resume_that_meets_another_recipe_under_a_recorded_id_is_refused(config_path,
                                                                           tmp_path):
    _run(config_path, tmp_path / "run", seed=1)
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    config["operators"] = {"crossover": {"rate": 0.0}, "edit": {"rate": 0.9}}
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ResumeMismatch, match="another recipe than the one this run recorded"):
        _run(config_path, tmp_path / "run", seed=1)


def test_every_item_asked_is_in_the_runs_item_bank(config_path, tmp_path):
    _run(config_path, tmp_path / "run", seed=1)
    config = load_config(config_path)
    task_of = prepare(config, config_path.parent).task_of
    bank = set(item_bank(task_of, config.fitness.bank_items_per_task, config.seed).tolist())
    assert len(bank) == 20 < len(task_of)
    db = sqlite3.connect(tmp_path / "run" / "run.db")
    asked = {i for (items,) in db.execute("SELECT items FROM answers WHERE error IS NULL")
             for i in json.loads(items)}
    assert asked == bank  # calibration answers the whole bank, and nothing else is asked
    full = [(json.loads(objectives)["accuracy"], items) for objectives, items in db.execute(
        "SELECT objectives, items FROM evaluations WHERE stage = 'full'")]
    # exact on the bank (20 items), an estimate of the 40-item split, with the bank's error
    assert full and all(items == 20 and stderr > 0 for (_, stderr), items in full)


def test_promote_z_sets_how_optimistic_promotion_is(config_path, tmp_path):
    config = yaml.safe_load(config_path.read_text())
    config["fitness"]["promote_z"] = 1000.0  # no estimate is dominated with that much optimism
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    _run(path, tmp_path / "run", seed=1)
    stages = dict(sqlite3.connect(tmp_path / "run" / "run.db").execute(
        "SELECT id, stage FROM evaluations WHERE generation > 0 AND error IS NULL"))
    assert stages and set(stages.values()) <= {"promoted", "full"}
