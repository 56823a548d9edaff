"""mp-IRT sees every parent: calibration merges, GA children and gene-strategy children, before
and after the IRT model is refitted, with the ids a real run gives its candidates."""

from __future__ import annotations

import sqlite3

import pytest
import torch
import yaml
from typer.testing import CliRunner

import fitness.reduced_fitness as reduced_fitness
from evolve.cli import app
from fitness.estimators import ReducedEstimators
from tests.conftest import pick_task, small_run_config


@pytest.fixture
def spied(monkeypatch):
    """Records, for every estimate a run makes, the candidate's parents and how many parent
    abilities reached the estimator; for every cross-fit, each calibration candidate's parent
    rows; and the refits."""
    seen: dict[str, list] = {"estimates": [], "cross-fits": [], "refits": 0, "calibrated": []}
    estimate, estimator_estimate = reduced_fitness.ReducedFitness.estimate, \
        ReducedEstimators.estimate
    calibrate, refit = reduced_fitness.calibrate, reduced_fitness.ReducedFitness.refit

    def fitness_estimate(self, candidate, estimators, budget, stage):
        seen["current"] = (candidate, set(self.calibration_ids))
        return estimate(self, candidate, estimators, budget, stage)

    def estimators_estimate(self, name, answers, parents=None):
        candidate, calibrated = seen["current"]
        seen["estimates"].append((candidate.id, candidate.parents,
                                  0 if parents is None else len(parents),
                                  [p for p in candidate.parents if p not in calibrated]))
        return estimator_estimate(self, name, answers, parents)

    def spy_calibrate(responses, task_of, reduced, parent_rows, *args, **kwargs):
        seen["cross-fits"].append(parent_rows)
        return calibrate(responses, task_of, reduced, parent_rows, *args, **kwargs)

    def spy_refit(self):
        seen["refits"] += 1
        seen["calibrated"] = list(zip(self.calibration_ids, self.calibration_parents,
                                      strict=True))
        return refit(self)

    monkeypatch.setattr(reduced_fitness.ReducedFitness, "estimate", fitness_estimate)
    monkeypatch.setattr(ReducedEstimators, "estimate", estimators_estimate)
    monkeypatch.setattr(reduced_fitness, "calibrate", spy_calibrate)
    monkeypatch.setattr(reduced_fitness.ReducedFitness, "refit", spy_refit)
    return seen


@pytest.mark.parametrize("strategy", ["ga", "cmaes"])
def test_every_merge_child_reaches_its_parents_abilities(tiny_models, tmp_path, spied, strategy):
    config = yaml.safe_load(small_run_config(tiny_models, pick_task(tmp_path), tmp_path,
                                             generations=4).read_text())
    config["fitness"] |= {"estimator": "gmpirt", "max_full_per_generation": 1}
    config["strategy"] = strategy
    config["population"] = 6
    path = tmp_path / "mp.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", str(path), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output

    experts = {f"seed-{name}" for name in ("add", "sort", "reverse")}
    # calibration merges name the experts' seed candidates, and the cross-fits get their rows
    merges = [(cid, parents) for cid, parents in spied["calibrated"]
              if cid.startswith(("default-", "cal-"))]
    assert merges and all(set(parents) == experts for _, parents in merges)
    for parent_rows in spied["cross-fits"]:  # rows in calibration order: 4 seeds, the merges,
        seeds, calibration, children = (parent_rows[:4], parent_rows[4:4 + len(merges)],
                                        parent_rows[4 + len(merges):])  # then full children
        assert seeds == [[]] * 4
        assert all(len(rows) == 3 and not torch.isnan(torch.stack(rows)).any()
                   for rows in calibration)
        assert all(rows for rows in children)  # their parents' answers, partial or full

    # every child estimated had parents, and every one of them reached mp-IRT
    children = [e for e in spied["estimates"] if not e[0].startswith(("seed-", "default-",
                                                                      "cal-"))]
    assert children
    assert all(parents and used == len(parents) for _, parents, used, _ in children)
    if strategy == "cmaes":  # gene strategies breed from the experts: their seeds' ids
        assert all(set(parents) == experts for _, parents, _, _ in children)
    else:  # GA children of survivors scored on reduced sets only, estimated after a refit
        assert spied["refits"] >= 2
        assert any(outside for *_, outside in children)

    # the store's lineage names candidates of the run, never a bare model path
    db = sqlite3.connect(tmp_path / "run" / "run.db")
    ids = {row[0] for row in db.execute("SELECT id FROM individuals")}
    for (parents,) in db.execute("SELECT parents FROM individuals"):
        assert set(yaml.safe_load(parents)) <= ids
