"""Code-level NAS on MNIST-1D: the heuristic code mutator's children, SEARCH/REPLACE edits, a
real run through the CLI (store, front, test reports, kill and resume, export) and the failures
a generated candidate can bring."""

from __future__ import annotations

import ast
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from evolve.cli import app
from evolve.config import ConfigError, load_config
from fitness.code_worker import CodeWorker
from fitness.errors import CandidateCodeError
from operators.code_edits import CodeMutator, EditError, apply_edits, edit_text, source_key
from operators.sandbox import Limits, check_source
from search_spaces.mnist1d_code import REFERENCE_CNN, REFERENCE_MLP, CodeSpace
from search_spaces.nas_zoo import mnist1d_arrays
from tests.conftest import last_front, wait_for_row

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("width", "scaled", "kernel", "stride", "dropped", "inserted", "crossover", "LU ->")


def _net(source: str) -> torch.nn.Module:
    """The network a (trusted, generated-here) source defines, with its lazy layers built."""
    names: dict = {}
    exec(compile(source, "<child>", "exec"), names)
    net = names["Net"]()
    net(torch.zeros(3, 40))
    return net


def test_the_reference_cnn_is_the_papers():
    assert sum(p.numel() for p in _net(REFERENCE_CNN).parameters()) == 5210
    assert sum(p.numel() for p in _net(REFERENCE_MLP).parameters()) == 15210


def test_every_mutation_and_crossover_is_a_valid_applied_edit():
    mutator, rng = CodeMutator(40), random.Random(0)
    parents = [REFERENCE_CNN, REFERENCE_MLP]
    changes = set()
    for k in range(150):
        if k % 3 == 2:
            first, second = rng.sample(parents, 2)
            child = mutator.crossover(rng, first, second)
        else:
            first = rng.choice(parents)
            child = mutator.mutate(rng, first)
        check_source(child.source)  # what the sandbox admits
        if child.edit:
            assert apply_edits(first, child.edit) == child.source
        assert source_key(child.source) != source_key(first) or "crossover" in child.change
        assert _net(child.source)(torch.zeros(2, 40)).shape == (2, 10), child.change
        changes |= {kind for kind in KINDS if kind in child.change}
        parents.append(child.source)
    assert changes == set(KINDS), changes


def test_a_scaled_child_keeps_its_parents_shape():
    """Every width times one factor, the output layer's 10 logits untouched, nothing else moved."""
    mutator, rng = CodeMutator(40), random.Random(0)
    scaled = next(child for child in (mutator.mutate(rng, REFERENCE_CNN) for _ in range(200))
                  if "scaled" in child.change)
    factor = float(scaled.change.rsplit(" ", 1)[1])
    parent, child = _net(REFERENCE_CNN).layers, _net(scaled.source).layers
    assert [type(m) for m in parent] == [type(m) for m in child]
    for old, new in zip(parent, child, strict=True):
        if isinstance(old, torch.nn.Conv1d):
            assert new.out_channels == max(1, round(old.out_channels * factor))
            assert (new.kernel_size, new.stride, new.padding) == \
                (old.kernel_size, old.stride, old.padding)
    assert child[-1].out_features == 10


def test_free_form_source_gets_a_literal_mutated():
    source = ("import torch\nfrom torch import nn\n\n\nclass Net(nn.Module):\n"
              "    def __init__(self):\n        super().__init__()\n"
              "        self.a = nn.Linear(40, 64)\n        self.b = nn.Linear(64, 10)\n\n"
              "    def forward(self, x):\n        return self.b(torch.relu(self.a(x)))\n")
    child = CodeMutator(40).mutate(random.Random(1), source)
    assert child.source != source and "argument" in child.change
    assert apply_edits(source, child.edit) == child.source


def test_edits_that_do_not_apply_say_why():
    with pytest.raises(EditError, match="no SEARCH/REPLACE block"):
        apply_edits(REFERENCE_CNN, "rewrite it all")
    with pytest.raises(EditError, match="block 1: its SEARCH text does not occur"):
        apply_edits(REFERENCE_CNN, edit_text("nn.Conv2d(3, 3)", "nn.Conv2d(3, 4)"))
    with pytest.raises(EditError, match="occurs 3 times"):  # three ReLUs
        apply_edits(REFERENCE_CNN, edit_text("nn.ReLU(),", "nn.GELU(),"))


def test_the_duplicate_key_ignores_comments_and_layout():
    assert source_key(REFERENCE_CNN) == source_key(REFERENCE_CNN.replace(
        "super().__init__()", "super().__init__()  # the module's state"))
    assert source_key(REFERENCE_CNN) != source_key(REFERENCE_CNN.replace("25, 5", "24, 5"))


def _worker(steps: int = 5) -> CodeWorker:
    space = CodeSpace()
    harness, arguments, files = space.harness(steps, 0)
    return CodeWorker(space.task, harness, arguments, files, Limits(cpu_seconds=60,
                                                                    wall_seconds=120))


@pytest.mark.parametrize("source, said", [
    ("import os\nclass Net: pass", "rejected: line 1: import os is not allowed"),
    (REFERENCE_CNN.replace("nn.LazyLinear(10)", "nn.LazyLinear(7)"),
     "error: ValueError: Net returned shape (100, 7)"),
    (REFERENCE_CNN.replace("x.unsqueeze(1)", "x.unsqueeze(1) @ x"),
     "error: RuntimeError"),
])
def test_a_broken_candidate_fails_with_what_the_proposer_is_told(source, said):
    with pytest.raises(CandidateCodeError, match=said.replace("(", r"\(").replace(")", r"\)")):
        _worker().size("g1-0", {"op": "code", "source": source})


def test_code_config_reads_only_its_keys(tmp_path):
    def config(**extra) -> Path:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"search_space": "mnist1d-code"} | extra))
        return path
    loaded = load_config(config())
    assert loaded.fitness.full_evaluation and loaded.fitness.calibration == 0
    assert loaded.tasks == ["nas/mnist1d"] and loaded.code.steps == 6000
    for extra, said in (({"sources": {"base": "a", "experts": ["b", "c"]}}, "sources"),
                        ({"operators": {"edit": {"rate": 0.1}}}, "operators.edit"),
                        ({"workers": 2}, "one local worker"),
                        ({"fitness": {"full_evaluation": False}}, "full_evaluation"),
                        ({"tasks": ["zoo/rev"]}, "nas/mnist1d")):
        with pytest.raises(ConfigError, match=said):
            load_config(config(**extra))


def _evoforge(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "evolve.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def code_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("code") / "mnist1d.yaml"
    path.write_text(yaml.safe_dump({"search_space": "mnist1d-code", "population": 4,
                                    "generations": 2, "code": {"steps": 40}, "seed": 3}))
    return path


@pytest.fixture(scope="module")
def code_run(code_config) -> Path:
    run_dir = code_config.parent / "straight"
    process = _evoforge("run", str(code_config), "--run-dir", str(run_dir))
    assert process.wait(600) == 0, process.stderr.read().decode()
    return run_dir


def test_a_code_run_breeds_scores_and_reports(code_run):
    db = sqlite3.connect(code_run / "run.db")
    recipes = {i: json.loads(r) for i, r in db.execute("SELECT id, recipe FROM individuals")}
    assert {"seed-reference-cnn", "seed-reference-mlp"} <= set(recipes)
    children = [i for i in recipes if i.startswith("g")]
    assert len(children) == 8 and all(recipes[i]["op"] == "code" for i in children)
    assert all(recipes[i]["change"] for i in children)
    sizes = {i: json.loads(o)["params"][0] for i, o in db.execute(
        "SELECT id, objectives FROM evaluations WHERE error IS NULL")}
    assert sizes["seed-reference-cnn"] == 5210
    for identifier in children:  # the stored size is the source's own parameter count
        if identifier in sizes:
            assert sizes[identifier] == sum(p.numel() for p in _net(
                recipes[identifier]["source"]).parameters())
    front = [i for i, _ in last_front(code_run)]
    reported = {i for (i,) in db.execute("SELECT id FROM reports WHERE split = 'test'")}
    assert reported == set(front)
    scores = {i: (json.loads(o)["accuracy"][0], json.loads(o)["params"][0]) for i, o in
              db.execute("SELECT id, objectives FROM evaluations WHERE error IS NULL")}
    undominated = {score for score in scores.values() if not any(
        other != score and other[0] >= score[0] and other[1] <= score[1]
        for other in scores.values())}
    assert {scores[i] for i in front} == undominated  # the archive: every scored candidate
    assert len(front) == len(undominated)  # one member per distinct score
    said = CliRunner().invoke(app, ["front", str(code_run)]).output
    assert all(i in said for i in front)


def test_the_export_is_the_network_the_run_scored(code_run, tmp_path):
    db = sqlite3.connect(code_run / "run.db")
    member = last_front(code_run)[0][0]
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", str(code_run), member, "--out", str(out)])
    assert result.exit_code == 0, result.output
    net = _net((out / "model.py").read_text())
    net.load_state_dict(load_file(out / "model.safetensors"))
    net.eval()
    data = mnist1d_arrays()
    with torch.no_grad():
        predicted = net(torch.tensor(data["x_test"][500:], dtype=torch.float32)).argmax(1)
    accuracy = (predicted.numpy() == data["y_test"][500:]).mean()
    reported = json.loads(db.execute("SELECT objectives FROM reports WHERE id = ?",
                                     (member,)).fetchone()[0])["accuracy"][0]
    assert accuracy == pytest.approx(reported, abs=1e-12)
    assert "Parameters:" in (out / "README.md").read_text()


def test_a_killed_code_run_resumes_to_the_same_front(code_config, code_run):
    killed = code_config.parent / "killed"
    process = _evoforge("run", str(code_config), "--run-dir", str(killed))
    # kill once the first generation is under way
    wait_for_row(killed, "SELECT COUNT(*) FROM answers WHERE stage = 'full'")
    process.send_signal(signal.SIGKILL)
    process.wait(60)
    resumed = _evoforge("resume", str(killed))
    assert resumed.wait(600) == 0, resumed.stderr.read().decode()
    assert last_front(killed) == last_front(code_run)
    db = sqlite3.connect(killed / "run.db")
    asked = [(c, i) for c, items in db.execute("SELECT candidate, items FROM answers")
             for i in json.loads(items)]
    assert len(asked) == len(set(asked))  # nothing trained and counted twice


def test_the_dashboard_shows_a_code_run(code_run):
    from starlette.testclient import TestClient

    from dashboards.app import create_app

    client = TestClient(create_app(code_run.parent), base_url="http://127.0.0.1")
    member = last_front(code_run)[0][0]
    data = client.get(f"/api/runs/{code_run.name}/individuals/{member}").json()
    assert data["recipe"]["op"] == "code" and "class Net" in data["recipe"]["source"]
    assert ast.parse(data["recipe"]["source"])


def test_the_example_config_is_valid():
    config = load_config(ROOT / "examples" / "mnist1d.yaml")
    assert config.search_space == "mnist1d-code" and config.code.steps == 6000


def test_the_individual_page_shows_the_program(code_run):
    from tests.dashboard_helpers import chromium, open_page, serving

    member = last_front(code_run)[0][0]
    with serving(code_run.parent) as url, chromium() as browser:
        page = open_page(browser, f"{url}/runs/{code_run.name}/individuals/{member}")
        source = json.loads(sqlite3.connect(code_run / "run.db").execute(
            "SELECT recipe FROM individuals WHERE id = ?", (member,)).fetchone()[0])["source"]
        assert page.locator("#source").inner_text().strip() == source.strip()
        assert not page.errors, page.errors
        page.close()
