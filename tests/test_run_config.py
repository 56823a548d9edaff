"""Run configs: valid ones load, invalid ones say which key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evolve.config import ConfigError, RunConfig, load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_default_run_config_is_valid():
    config = load_config(EXAMPLES / "zoo.yaml")
    assert config.sources.base == "zoo/base" and len(config.sources.experts) == 4
    assert config.objectives == {"accuracy": "max", "params": "min"}


@pytest.mark.parametrize(("text", "message"), [
    ("sources: {base: a, experts: [b, c]}\ntasks: [t]\npopulaton: 3", "populaton: Extra inputs"),
    ("sources: {base: a, experts: [b]}\ntasks: [t]", "sources.experts"),
    ("sources: {base: a, experts: [b, c]}\ntasks: [t]\noperators: {crossover: {rate: 2}}",
     "operators.crossover.rate"),
    ("sources: {base: a, experts: [b, c]}\ntasks: [t]\nobjectives: {speed: max}",
     "unknown objectives ['speed']"),
    ("sources: {base: a, experts: [b, c]}\ntasks: [t]\nfitness: {estimator: oracle}",
     "fitness.estimator"),
    ("sources: {base: a, experts: [b, c]}\ntasks: [t]\nfitness: {bank_items_per_task: 50}",
     "promote_items_per_task (100) <= bank_items_per_task (50)"),
    ("sources: {base: a, experts: [b, c]}\ntasks: [t]\nfitness: {promote_z: -1}",
     "fitness.promote_z"),
    ("sources: {base: a, experts: [b, c]}\ntasks: [t]\noperators: {methods: [magic]}",
     "operators.methods.0"),
    ("sources: {base: a, experts: [b, c]}\ntasks: [t]\ngenerations: 3\nevaluations: 40",
     "give generations or evaluations, not both"),
    ("sources: {base: a, experts: [b, c]}\ntasks: [t]\nstrategy: hillclimb", "strategy"),
    ("sources: {base: a, experts: [b, c]}\ntasks: [t]\n"
     "operators: {crossover: {rate: 0.8}, edit: {rate: 0.3}}",
     "crossover 0.8 + edit 0.3 + weight_noise 0.1 = 1.2; they are shares of the children and "
     "must sum to at most 1 (mutation takes the rest)"),
    ("sources: {base: a, experts: [b, c]}\ntasks: [t]\noperators: {mutation: {rate: 0.3}}",
     "mutation of the merge genes takes the share the other operators leave"),
    ("sources: {base: a, experts: [b, c]}\ntasks: [t, u]\nfitness: {calibration: 10}",
     "fitness.calibration: 10 is too few. A 2-dimensional IRT model (one per task) needs 19 "
     "fully evaluated candidates; the base, the experts and the default merges give 7, so set "
     "fitness.calibration to at least 12"),
    ("tasks: [t]", "a merge run needs sources"),
    ("- a\n- b", "must be a mapping"),
    ("sources: {base: [", "not valid YAML"),
])
def test_invalid_configs_name_the_key(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in str(caught.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the run config"):
        load_config(tmp_path / "nope.yaml")


def test_an_evaluation_budget_sets_the_generations(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("sources: {base: a, experts: [b, c]}\ntasks: [t]\npopulation: 16\n"
                    "evaluations: 40")
    assert load_config(path).generation_sizes() == [16, 16, 8]
    assert load_config(path, {"generations": 2}).generation_sizes() == [16, 16]  # CLI override
    path.write_text("sources: {base: a, experts: [b, c]}\ntasks: [t]\npopulation: 8\n"
                    "generations: 3")
    assert load_config(path).generation_sizes() == [8, 8, 8]


def test_edit_keys_a_gene_strategy_would_not_read_are_refused():
    config = {"sources": {"base": "zoo/base", "experts": ["zoo/rev", "zoo/sort"]},
              "tasks": ["zoo/rev"], "strategy": "tpe",
              "operators": {"edit": {"rate": 0.1, "proposer": "llm", "llm": {
                  "base_url": "http://127.0.0.1:8000/v1", "model": "m"}}}}
    with pytest.raises(ValueError, match="strategy tpe breeds no edit children"):
        RunConfig(**config)
    config["operators"] = {"edit": {"rate": 0.1, "prune": 0.5, "proposer": "heuristic"}}
    RunConfig(**config)  # every key at its value, as a run's own config.yaml lists them


def test_a_saved_run_without_the_bank_key_keeps_the_whole_split(tmp_path):
    saved = yaml.safe_load((EXAMPLES / "zoo.yaml").read_text())
    del saved["fitness"]["bank_items_per_task"]  # a run saved before the key existed
    saved["fitness"]["promote_items_per_task"] = 200  # more than the new default bank
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    assert load_config(path, saved_run=True).fitness.bank_items_per_task is None
    with pytest.raises(ConfigError, match="bank_items_per_task \\(100\\)"):
        load_config(path)  # as a new config, the default bank is too small for that set
    saved["fitness"]["bank_items_per_task"] = 64
    path.write_text(yaml.safe_dump(saved | {"fitness": saved["fitness"] | {
        "promote_items_per_task": 32}}))
    assert load_config(path, saved_run=True).fitness.bank_items_per_task == 64


def test_full_evaluation_does_not_check_the_sets_it_never_draws():
    config = RunConfig.model_validate({
        "sources": {"base": "a", "experts": ["b", "c"]}, "tasks": ["t"],
        "fitness": {"full_evaluation": True, "promote_items_per_task": 500}})
    assert config.fitness.full_evaluation
    code = RunConfig.model_validate({"search_space": "mnist1d-code"})
    assert code.fitness.full_evaluation
