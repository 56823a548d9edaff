"""The dashboard's API over a store written by a real run: every figure it serves is checked
against the store's rows, read here with plain SQL and computed the slow, obvious way."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.testclient import TestClient
from typer.testing import CliRunner

import dashboards.__main__ as dashboard_main
from dashboards.app import _finite, create_app
from dashboards.run_index import pareto_front
from evolve.cli import app as cli
from evolve.store import RunStore
from tests.conftest import HOSTILE
from tests.dashboard_helpers import brute_front

ROOT = Path(__file__).resolve().parent.parent


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=40),
       st.sampled_from(["max", "min"]), st.sampled_from(["max", "min"]))
def test_pareto_front_is_the_set_nothing_dominates(points, first, second):
    found = set(pareto_front(points, (first, second)))
    expected = brute_front(dict(enumerate(points)), (first, second))
    assert found == expected


@pytest.fixture(scope="module")
def client(finished_run):
    return TestClient(create_app(finished_run.parent), base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def db(finished_run):
    return sqlite3.connect(f"file:{finished_run / 'run.db'}?mode=ro", uri=True)


def _objectives(db) -> dict[str, dict]:
    return {i: json.loads(o) for i, o in db.execute(
        "SELECT id, objectives FROM evaluations WHERE error IS NULL")}


def test_runs_lists_the_run_as_its_store_says(client, db, finished_run):
    (run,) = client.get("/api/runs").json()["runs"]
    assert run["run"] == finished_run.name and HOSTILE in run["run"]
    assert run["state"] == "done" and run["generations"] == {"done": 3, "planned": 3}
    assert run["individuals"] == db.execute("SELECT COUNT(*) FROM individuals").fetchone()[0]
    assert run["hypervolume"] == db.execute(
        "SELECT hypervolume FROM generations WHERE generation = 3").fetchone()[0]
    reports = {i: json.loads(o)["accuracy"] for i, o in db.execute(
        "SELECT id, objectives FROM reports")}
    best = max(reports, key=lambda i: reports[i][0])
    assert run["best_test"]["value"] == reports[best]


def test_front_of_every_generation_is_the_populations_front(client, db, finished_run):
    objectives = _objectives(db)
    born = dict(db.execute("SELECT id, generation FROM individuals"))
    generations = db.execute("SELECT generation, population FROM generations").fetchall()
    assert len(generations) == 4  # three generations and the final front
    for generation, population in generations:
        points = client.get(f"/api/runs/{finished_run.name}/points",
                            params={"generation": generation, "dominated": 1}).json()
        kept = {i: (objectives[i]["params"][0], objectives[i]["accuracy"][0])
                for i in json.loads(population) if i in objectives}
        assert set(points["front"]["ids"]) == brute_front(kept, ("min", "max"))
        scored = {i for i in objectives if born[i] <= generation}
        assert set(points["dominated"]["ids"]) == scored - set(points["front"]["ids"])
        for column, name in (("x", "params"), ("y", "accuracy")):
            assert points["front"][column] == [objectives[i][name][0]
                                               for i in points["front"]["ids"]]
            assert points["front"][f"{column}_err"] == [objectives[i][name][1]
                                                        for i in points["front"]["ids"]]
    # the final front, with the run's final estimates, is the one the run stored
    (stored,) = db.execute("SELECT front FROM generations ORDER BY generation DESC LIMIT 1"
                           ).fetchone()
    assert set(points["front"]["ids"]) == set(json.loads(stored))


def test_any_two_objectives(client, db, finished_run):
    objectives = _objectives(db)
    task = next(name for name in next(iter(objectives.values())) if name.startswith("accuracy/"))
    assert HOSTILE in task
    points = client.get(f"/api/runs/{finished_run.name}/points",
                        params={"x": "bytes", "y": task}).json()
    (last,) = db.execute("SELECT population FROM generations ORDER BY generation DESC LIMIT 1"
                         ).fetchone()
    kept = {i: (objectives[i]["bytes"][0], objectives[i][task][0]) for i in json.loads(last)}
    assert set(points["front"]["ids"]) == brute_front(kept, ("min", "max"))
    assert points["directions"] == ["min", "max"]


def test_table_is_sorted_and_paged_on_the_server(client, db, finished_run):
    objectives = _objectives(db)
    everyone = {i for (i,) in db.execute("SELECT id FROM individuals")}
    for sort, descending in (("accuracy", True), ("params", False), ("id", False)):
        first = client.get(f"/api/runs/{finished_run.name}/table",
                           params={"sort": sort, "order": "desc" if descending else "asc"}).json()
        rows = [row for page in range(first["pages"]) for row in client.get(
            f"/api/runs/{finished_run.name}/table",
            params={"sort": sort, "order": "desc" if descending else "asc", "page": page}
        ).json()["rows"]]
        assert first["total"] == len(everyone) == len(rows)
        assert {row["id"] for row in rows} == everyone
        assert all(len(r) <= 50 for r in [first["rows"]])
        if sort == "id":
            keys = [row["id"] for row in rows]
        else:
            keys = [objectives[row["id"]][sort][0] for row in rows if row["id"] in objectives]
            assert all(row["id"] in objectives for row in rows[:len(keys)])  # unscored last
        assert keys == sorted(keys, reverse=descending)
    front = client.get(f"/api/runs/{finished_run.name}/table", params={"front": 1}).json()
    (stored,) = db.execute("SELECT front FROM generations ORDER BY generation DESC LIMIT 1"
                           ).fetchone()
    assert {row["id"] for row in front["rows"]} == set(json.loads(stored))


def _answers(db, candidate: str) -> dict[str, float]:
    scores = {}
    for items, values in db.execute("SELECT items, answers FROM answers WHERE candidate = ? "
                                    "AND error IS NULL ORDER BY rowid", (candidate,)):
        scores.update(zip(json.loads(items), json.loads(values), strict=True))
    return scores


def test_individual_lineage_scores_and_agreement(client, db, finished_run):
    children: dict[str, list[str]] = {}
    rows = db.execute("SELECT id, parents, recipe FROM individuals ORDER BY rowid").fetchall()
    for identifier, parents, _ in rows:
        for parent in json.loads(parents):
            children.setdefault(parent, []).append(identifier)
    checked_agreement = 0
    for identifier, parents, recipe in rows:
        data = client.get(f"/api/runs/{finished_run.name}/individuals/{identifier}").json()
        assert [p["id"] for p in data["parents"]] == json.loads(parents)
        assert data["children"] == children.get(identifier, [])
        assert data["recipe"] == json.loads(recipe)
        mine = _answers(db, identifier)
        assert data["answered"] == len(mine)
        for parent in data["parents"]:
            theirs = _answers(db, parent["id"])
            common = set(mine) & set(theirs)
            assert parent["agreement"]["items"] == len(common)
            if common:
                checked_agreement += 1
                assert parent["agreement"]["agree"] == pytest.approx(
                    sum(mine[i] == theirs[i] for i in common) / len(common))
                assert parent["agreement"]["gained"] == sum(mine[i] > theirs[i] for i in common)
    assert checked_agreement > 5
    assert client.get(f"/api/runs/{finished_run.name}/individuals/nobody").status_code == 404


def test_per_task_scores_and_the_export_command_work(client, db, finished_run, tmp_path,
                                                     monkeypatch):
    member, test = db.execute("SELECT id, objectives FROM reports LIMIT 1").fetchone()
    data = client.get(f"/api/runs/{finished_run.name}/individuals/{member}").json()
    (task,) = data["tasks"]
    assert task["task"].endswith(f"pick{HOSTILE}")
    assert task["test"] == json.loads(test)[f"accuracy/{task['task']}"]
    assert task["search"] == _objectives(db)[member][f"accuracy/{task['task']}"]
    monkeypatch.chdir(tmp_path)  # the command writes exports/<id> where it is run
    command = shlex.split(data["export"])
    assert command[:2] == ["evoforge", "export"]
    result = CliRunner().invoke(cli, command[1:])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "exports" / member / "config.json").is_file()


def test_cost_is_the_items_the_journal_holds(client, db, finished_run):
    cost = client.get(f"/api/runs/{finished_run.name}").json()["cost"]
    by_stage: dict[str, int] = {}
    for stage, items in db.execute("SELECT stage, items FROM answers"):
        by_stage[stage] = by_stage.get(stage, 0) + len(json.loads(items))
    assert {k: v for k, v in cost["items_asked"].items() if k != "test"} == by_stage


# -- security ---------------------------------------------------------------------------------

def test_no_path_outside_the_runs_folder_can_be_read(client, finished_run):
    outside = finished_run.parent.parent / "outside-run"  # a real store next to the runs folder
    outside.mkdir()
    for name in ("run.db", "config.yaml"):
        (outside / name).write_bytes((finished_run / name).read_bytes())
    secret = (finished_run / "config.yaml").read_text()
    attempts = ["/api/runs/..%2Foutside-run", "/api/runs/../outside-run", "/runs/..%2Foutside-run",
                "/api/runs/%2E%2E%2Foutside-run/points", "/api/compare?run=../outside-run",
                "/api/compare?run=%2Fetc", "/static/..%2Fapp.py", "/static/%2e%2e%2fapp.py",
                "/static/../../evolve/store.py", "/static/run.html", "/runs/..%2F..%2Fetc%2Fpasswd",
                f"/api/runs/{finished_run.name}/individuals/..%2F..%2Fconfig.yaml",
                "/..%2f..%2fetc%2fpasswd", "/%2e%2e/%2e%2e/etc/passwd"]
    for attempt in attempts:
        response = client.get(attempt)
        assert response.status_code == 404, attempt
        assert "root:" not in response.text and secret not in response.text, attempt
        assert "outside-run" not in json.dumps(client.get("/api/runs").json())


def test_nothing_can_write_the_store_through_the_app(client, finished_run):
    path = finished_run / "run.db"
    before = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns
    name = finished_run.name
    for url in ("/api/runs", f"/api/runs/{name}", f"/api/runs/{name}/points?dominated=1",
                f"/api/runs/{name}/table", f"/api/runs/{name}/version", f"/api/compare?run={name}"):
        assert client.get(url).status_code == 200
        for method in ("post", "put", "delete", "patch"):
            assert getattr(client, method)(url).status_code == 405, (method, url)
    assert (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns) == before
    reader = RunStore.reader(finished_run)
    with pytest.raises(sqlite3.OperationalError, match=r"readonly|read-only"):
        reader.db.execute("DELETE FROM individuals")


def test_pages_run_no_inline_script_and_say_so(client, finished_run):
    for url in ("/", f"/runs/{finished_run.name}", "/compare"):
        response = client.get(url)
        assert response.status_code == 200
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy.split(
            "script-src")[1].split(";")[0]
        assert response.headers["x-content-type-options"] == "nosniff"
        for line in response.text.splitlines():  # every script comes from a file of the server
            assert "<script" not in line or 'src="/static/' in line


def test_the_host_header_is_checked_against_the_bound_address(finished_run):
    local = TestClient(create_app(finished_run.parent), base_url="http://127.0.0.1")
    assert local.get("/api/runs").status_code == 200
    assert local.get("/api/runs", headers={"host": "evil.example"}).status_code == 400
    exposed = TestClient(create_app(finished_run.parent, host="0.0.0.0"),
                         base_url="http://box.example")
    assert exposed.get("/api/runs").status_code == 200


def test_the_cli_binds_loopback_and_warns_otherwise(finished_run, monkeypatch, capsys):
    served = []
    monkeypatch.setattr(dashboard_main.uvicorn, "run",
                        lambda app, host, port, **_: served.append((host, port)))
    assert dashboard_main.main([str(finished_run.parent)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert dashboard_main.main([str(finished_run.parent), "--host", "0.0.0.0", "--port", "9000"]) == 0
    assert "warning" in capsys.readouterr().err
    assert served == [("127.0.0.1", 8321), ("0.0.0.0", 9000)]
    assert dashboard_main.main([str(finished_run.parent / "nothing")]) == 2
    assert "no runs folder" in capsys.readouterr().err


def test_evoforge_dashboard_starts_the_dashboard_program(finished_run, monkeypatch):
    started = []
    monkeypatch.setattr(os, "execv", lambda path, argv: started.append(argv))
    result = CliRunner().invoke(cli, ["dashboard", str(finished_run.parent), "--port", "9001"])
    assert result.exit_code == 0, result.output
    (argv,) = started
    assert argv[1:] == ["-m", "dashboards", str(finished_run.parent), "--port", "9001", "--host",
                        "127.0.0.1"]
    missing = subprocess.run([sys.executable, "-m", "evolve.cli", "dashboard",
                              str(finished_run.parent / "nothing")], capture_output=True,
                             text=True, cwd=ROOT)
    assert missing.returncode == 2 and "no runs folder" in missing.stderr


def test_json_has_no_nan():
    assert _finite({"a": [math.nan, 1.0], "b": math.inf}) == {"a": [None, 1.0], "b": None}
