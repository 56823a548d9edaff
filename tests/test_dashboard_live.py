"""A running run with the dashboard open beside it: the run's results are those of the same run
alone, and the open page follows each new generation within seconds."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from tests.conftest import last_front, pick_task, small_run_config
from tests.dashboard_helpers import chromium, open_page, serving

FOLLOWS_WITHIN_S = 10.0  # the page polls every 2 s; this is "a few seconds", generously


def _run(config: Path, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.Popen([sys.executable, "-m", "evolve.cli", "run", str(config), "--run-dir",
                             str(run_dir)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _results(run_dir: Path) -> list:
    db = sqlite3.connect(f"file:{run_dir / 'run.db'}?mode=ro", uri=True)
    return [db.execute("SELECT id, generation, recipe, parents, operator FROM individuals "
                       "ORDER BY id").fetchall(),
            db.execute("SELECT id, stage, objectives FROM evaluations ORDER BY id").fetchall(),
            db.execute("SELECT generation, population, front, hypervolume FROM generations "
                       "ORDER BY generation").fetchall()]


def _wall(run_dir: Path) -> float:
    db = sqlite3.connect(f"file:{run_dir / 'run.db'}?mode=ro", uri=True)
    (timings,) = db.execute("SELECT value FROM meta WHERE key = 'timings'").fetchone()
    return json.loads(timings)["wall"]


def _generations(run_dir: Path) -> dict[int, float]:
    try:
        db = sqlite3.connect(f"file:{run_dir / 'run.db'}?mode=ro", uri=True)
        return dict(db.execute("SELECT generation, at FROM generations"))
    except sqlite3.Error:  # not created yet
        return {}


def test_the_dashboard_follows_a_run_without_changing_it(tiny_models, tmp_path):
    config = yaml.safe_load(small_run_config(tiny_models, pick_task(tmp_path), tmp_path,
                                             generations=8).read_text())
    config["population"] = 8  # about a second per generation on 2 cores
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(config))

    alone = _run(path, tmp_path / "alone" / "run")
    assert alone.wait(600) == 0, alone.stderr.read().decode()

    # the server alone, polled as an open page polls it (the browser elsewhere, as over SSH)
    polled_runs = tmp_path / "polled"
    polled = _run(path, polled_runs / "run")
    while not _generations(polled_runs / "run"):
        assert polled.poll() is None, polled.stderr.read().decode()
        time.sleep(0.05)
    with serving(polled_runs) as url:
        version = None
        while polled.poll() is None:
            now = json.loads(urllib.request.urlopen(f"{url}/api/runs/run/version").read())
            if now["version"] != version:  # what the page fetches when a generation lands
                version = now["version"]
                for path_ in ("", "/points?dominated=1", "/table?page=0"):
                    urllib.request.urlopen(f"{url}/api/runs/run{path_}").read()
            time.sleep(2.0)
    assert polled.returncode == 0, polled.stderr.read().decode()

    runs = tmp_path / "runs"
    watched_dir = runs / "watched"
    shown: list[tuple[float, str]] = []
    with chromium() as browser:
        watched = _run(path, watched_dir)
        while not _generations(watched_dir):  # the page opens on the first saved generation
            assert watched.poll() is None, watched.stderr.read().decode()
            time.sleep(0.05)
        with serving(runs) as url:
            page = open_page(browser, f"{url}/runs/watched")
            done_at = None
            while True:
                shown.append((time.time(), page.locator("#generations-done").inner_text()))
                if watched.poll() is not None:
                    done_at = done_at or time.time()
                    if shown[-1][1] == "8 / 8" or time.time() - done_at > FOLLOWS_WITHIN_S:
                        break
                time.sleep(0.1)
            page.close()
    assert watched.returncode == 0, watched.stderr.read().decode()

    # the run's results are the same as alone; its wall time is printed (no threshold)
    assert _results(watched_dir) == _results(tmp_path / "alone" / "run")
    assert last_front(watched_dir) == last_front(tmp_path / "alone" / "run")
    assert _results(polled_runs / "run") == _results(tmp_path / "alone" / "run")
    alone_s, polled_s, watched_s = (_wall(tmp_path / "alone" / "run"),
                                    _wall(polled_runs / "run"), _wall(watched_dir))
    print(f"\nthe run's own clock: alone {alone_s:.2f} s, beside the dashboard's server polled "
          f"as a page polls it {polled_s:.2f} s (ratio {polled_s / alone_s:.2f}), beside the "
          f"server and Chromium drawing the page on the same cores {watched_s:.2f} s (ratio "
          f"{watched_s / alone_s:.2f})")

    # the page showed each generation saved while it was open within seconds of its saving
    saved = _generations(watched_dir)
    followed = [g for g in range(1, 9) if saved[g] > shown[0][0]]
    assert len(followed) >= 2, f"the run saved {len(followed)} generations while the page was open"
    print(f"the page followed generations {followed}")
    for generation in followed:
        seen = next((at for at, text in shown if int(text.split(" / ")[0]) >= generation), None)
        assert seen is not None, f"generation {generation} never shown"
        lag = seen - saved[generation]
        assert lag < FOLLOWS_WITHIN_S, f"generation {generation} shown {lag:.1f} s after saved"
