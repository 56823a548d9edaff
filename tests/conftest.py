"""Shared fixtures: random Llama-shaped state dicts and the tiny built-in Llama family."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
import torch
import yaml

SHAPES = {
    "model.embed_tokens.weight": (40, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.mlp.up_proj.weight": (32, 16),
    "model.layers.1.self_attn.q_proj.weight": (16, 16),
    "model.layers.1.mlp.up_proj.weight": (32, 16),
    "model.layers.2.mlp.up_proj.weight": (32, 16),
    "model.norm.weight": (16,),
}


def make_family(n_models: int, seed: int = 0, scale: float = 0.1,
                dtype: torch.dtype = torch.float32) -> tuple[dict, list[dict]]:
    generator = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=generator) for k, s in SHAPES.items()}
    models = [{k: v + scale * torch.randn(v.shape, generator=generator) for k, v in base.items()}
              for _ in range(n_models)]
    return ({k: v.to(dtype) for k, v in base.items()},
            [{k: v.to(dtype) for k, v in m.items()} for m in models])


@pytest.fixture
def family():
    return make_family(3)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from search_spaces.tiny_llama import build_family

    return build_family(tmp_path_factory.mktemp("tiny"))


def pick_task(folder: Path, seed: int = 0) -> Path:
    """A two-choice JSONL task of 60 random items (40 search, 20 test) at `folder`/pick.jsonl."""
    import random

    rng = random.Random(seed)
    lines = [{"prompt": f"q{i}:{rng.randint(0, 999)}=", "choices": ["a", "b"],
              "answer": rng.randint(0, 1), "split": "search" if i < 40 else "test"}
             for i in range(60)]
    path = folder / "pick.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return path


def small_run_config(tiny_models, task: Path, folder: Path, generations: int) -> Path:
    """A small evolution over the tiny models (population 4, a 10-recipe calibration), as YAML.
    Its item bank (20 per task) is a strict part of a task's 40 search items, so that bank and
    pool indices differ in every run a test makes of it."""
    config = {
        "sources": {"base": str(tiny_models["base"]),
                    "experts": [str(tiny_models[n]) for n in ("add", "sort", "reverse")]},
        "tasks": [str(task)], "population": 4, "generations": generations, "seed": 5,
        "dtype": "float32",
        "fitness": {"calibration": 10, "items_per_task": 5, "promote_items_per_task": 12,
                    "bank_items_per_task": 20, "max_full_per_generation": 1, "dims": 1},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_for_row(run_dir: Path, count_sql: str, timeout: float = 300) -> None:
    """Until `count_sql` counts a row in the run's store (a run started in another process)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if sqlite3.connect(run_dir / "run.db").execute(count_sql).fetchone()[0]:
                return
        except sqlite3.Error:  # not created yet
            pass
        time.sleep(0.05)


def last_front(run_dir: Path) -> list[tuple[str, str]]:
    """The run's final front: (id, objectives JSON) pairs, sorted."""
    db = sqlite3.connect(run_dir / "run.db")
    front = json.loads(db.execute("SELECT front FROM generations ORDER BY generation DESC "
                                  "LIMIT 1").fetchone()[0])
    return sorted((i, db.execute("SELECT objectives FROM evaluations WHERE id = ?",
                                 (i,)).fetchone()[0]) for i in front)


DERIVED = ("individuals", "evaluations", "generations", "reports")  # rebuilt by a resume


def run_tables(run_dir: Path) -> dict[str, list]:
    """What a run decided: its individuals, their evaluations, and each generation's population,
    front and hypervolume."""
    db = sqlite3.connect(run_dir / "run.db")
    return {table: db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("individuals", "evaluations")} | {
        "generations": db.execute("SELECT generation, population, front, hypervolume FROM "
                                  "generations ORDER BY 1").fetchall()}


def journal_only(run_dir: Path, copy: Path) -> Path:
    """A copy of the run with its journal and nothing it decided (as if the driver had died
    before writing anything but results)."""
    import shutil

    shutil.copytree(run_dir, copy)
    db = sqlite3.connect(copy / "run.db")
    with db:
        for table in DERIVED:
            db.execute(f"DELETE FROM {table}")
    db.close()
    return copy


HOSTILE = '<img src=x onerror="window.__pwned=1">'  # HTML in names a run stores and pages show


@pytest.fixture(scope="session")
def finished_run(tiny_models, tmp_path_factory) -> Path:
    """A real 3-generation run over the tiny models, for the dashboard's tests. Its task file and
    its run folder are named with HTML, so every page that shows them is an injection test."""
    from typer.testing import CliRunner

    from evolve.cli import app

    folder = tmp_path_factory.mktemp("dashboard")
    task = pick_task(folder)
    task = task.rename(task.with_name(f"pick{HOSTILE}.jsonl"))
    config = small_run_config(tiny_models, task, folder, generations=3)
    run_dir = folder / "runs" / f"run{HOSTILE}"
    result = CliRunner().invoke(app, ["run", str(config), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    return run_dir
