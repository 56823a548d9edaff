"""The one-call fitness: staged, paired evaluation on a population with known answers."""

from __future__ import annotations

import pytest
import torch

from fitness.errors import FitnessError
from fitness.estimators import task_accuracies
from fitness.irt import simulate_responses
from fitness.pool import LocalPool
from fitness.reduced_fitness import Budget, Candidate, FitnessResult, ReducedFitness, promotable
from fitness.reduced_sets import bank_variance, item_bank
from fitness.size import Size


class TableScorer:
    """Answers looked up in a fixed response matrix (one row per candidate id), sizes by id."""

    def __init__(self, responses: torch.Tensor):
        self.responses = responses
        self.asked: dict[str, list[int]] = {}

    def answers(self, candidate_id, recipe, items):
        self.asked.setdefault(candidate_id, []).extend(items.tolist())
        return self.responses[recipe["row"], items]

    def size(self, candidate_id, recipe):
        params = recipe.get("params", 1000 + recipe["row"])
        return Size(params, 2 * params, params - 10)


@pytest.fixture
def world():
    responses = simulate_responses(90, 400, dims=2, seed=21)[0]
    task_of = torch.arange(400) % 4
    scorer = TableScorer(responses)
    fitness = ReducedFitness(LocalPool(scorer), task_of, ("a", "b", "c", "d"), dims=2, seed=3)
    fitness.add_full([Candidate(f"c{i}", {"row": i}) for i in range(60)])
    fitness.refit()
    return responses, task_of, scorer, fitness


def test_one_call_gives_estimates_with_stderr_and_stages(world):
    responses, task_of, scorer, fitness = world
    # a front member at 99 % accuracy and 800 parameters: the small half of the generation can
    # reach the front, the large half cannot
    generation = [Candidate(f"g{i}", {"row": 60 + i, "params": 500 + i if i % 2 else 5000},
                            parents=("c0", "c1")) for i in range(30)]
    anchor = fitness.exact["c0"]
    member = type(anchor)("m", {"accuracy": (0.99, 0.0), "params": (800.0, 0.0)}, "full",
                          anchor.asked, anchor.answers)
    budget = Budget(items_per_task=10, promote_items_per_task=40, max_full_per_call=2)
    results = fitness.evaluate(generation, budget, front=[member])
    truth = task_accuracies(responses[60:], task_of)[:, -1]
    assert [r.candidate_id for r in results] == [c.id for c in generation]
    stages = {r.candidate_id: r.stage for r in results}
    assert {stages[f"g{i}"] for i in range(0, 30, 2)} == {"reduced"}
    assert {stages[f"g{i}"] for i in range(1, 30, 2)} <= {"promoted", "full"}
    for stage, size in (("reduced", 40), ("promoted", 160)):
        asked = {tuple(r.asked.tolist()) for r in results if r.stage == stage}
        assert len(asked) == 1 and len(next(iter(asked))) == size  # paired: the same items
    full = [r for r in results if r.stage == "full"]
    assert len(full) == 2
    errors = []
    for result, true in zip(results, truth.tolist(), strict=True):
        value, stderr = result.objectives["accuracy"]
        assert torch.isfinite(torch.tensor([value, stderr])).all()
        if result.stage == "full":
            assert stderr == 0 and value == pytest.approx(true)
        else:
            errors.append(abs(value - true) <= 2 * stderr)
        i = int(result.candidate_id[1:])
        assert result.objectives["params"] == (500.0 + i if i % 2 else 5000.0, 0.0)
        assert {f"accuracy/{t}" for t in "abcd"} <= result.objectives.keys()
    assert sum(errors) / len(errors) >= 0.8
    # full evaluations join the calibration matrix and the next call refits on them
    assert len(fitness.calibration_rows) == 60 + len(full)
    fitness.evaluate(generation[:3], budget)
    assert fitness._fitted_on == 60 + len(full)
    # cached answers: nobody was asked the same item twice
    assert all(len(asked) == len(set(asked)) for asked in scorer.asked.values())


def test_each_job_is_charged_to_the_stage_that_asked_it(world):
    """The run's cost accounting: a job's items are the ones its stage still needed."""
    _, _, _, fitness = world
    charged: dict[str, list[tuple[str, int]]] = {}
    fitness.journal = lambda job, future, error: charged.setdefault(job.candidate_id, []).append(
        (job.stage, len(job.items)))
    anchor = fitness.exact["c0"]  # a front at 99 %: the large half stays at the reduced stage
    member = type(anchor)("m", {"accuracy": (0.99, 0.0), "params": (800.0, 0.0)}, "full",
                          anchor.asked, anchor.answers)
    generation = [Candidate(f"g{i}", {"row": 60 + i, "params": 500 + i if i % 2 else 5000})
                  for i in range(12)]
    results = fitness.evaluate(generation, Budget(items_per_task=10, promote_items_per_task=40,
                                                  max_full_per_call=2), front=[member])
    assert {r.stage for r in results} == {"reduced", "promoted", "full"}
    reduced, promoted = ({int(i) for i in next(r for r in results if r.stage == stage).asked}
                         for stage in ("reduced", "promoted"))
    expected = {"reduced": [("reduced", 40)]}
    expected["promoted"] = expected["reduced"] + [("promoted", len(promoted - reduced))]
    expected["full"] = expected["promoted"] + [("full", 400 - len(promoted | reduced))]
    for result in results:
        assert charged[result.candidate_id] == expected[result.stage]
    fitness.add_full([Candidate("late", {"row": 80})], "final")
    assert charged["late"] == [("final", 400)]


def test_the_default_front_is_everything_evaluated_exactly(world):
    responses, task_of, _, fitness = world
    front = fitness.exact_front()
    accuracy = task_accuracies(responses[:60], task_of)[:, -1]
    assert front and all(r.stage == "full" for r in front)
    assert max(r.objectives["accuracy"][0] for r in front) == pytest.approx(float(accuracy.max()))
    # a clone of a calibration model, only bigger, cannot be promoted past it
    best = max(range(60), key=lambda i: float(accuracy[i]))
    results = fitness.evaluate([Candidate("clone", {"row": best, "params": 10**6})],
                               Budget(items_per_task=25, promote_items_per_task=50))
    assert results[0].stage in ("reduced", "promoted")
    assert results[0].stage != "full"


def test_uncalibrated_or_bad_budgets_are_refused():
    fitness = ReducedFitness(LocalPool(TableScorer(torch.zeros(3, 8))), torch.arange(8) % 2, ("a", "b"))
    with pytest.raises(FitnessError, match="not calibrated"):
        fitness.evaluate([Candidate("x", {"row": 0})], Budget())
    with pytest.raises(FitnessError, match="too few"):
        fitness.add_full([Candidate("x", {"row": 0})])
        fitness.refit()
    with pytest.raises(FitnessError, match="unknown estimator"):
        Budget(estimator="oracle")
    with pytest.raises(FitnessError, match="items_per_task"):
        Budget(items_per_task=0)


def test_local_worker_answers_sizes_and_reports(tiny_models):
    """The resident model scores what an independently built model with the same weights
    scores; sizes count the materialized tensors; edits change depth."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from fitness.causal_lm import CausalLMEvaluator, load_causal_lm
    from fitness.items import GenerationItem, Task
    from fitness.worker import LocalWorker, RunSources
    from operators.recipes import materialize

    model, tokenizer = load_causal_lm(tiny_models["base"])
    tasks = [Task("t", "generation", tuple(GenerationItem(f"{i}+1=", str(i + 1), 3)
                                           for i in range(6)),
                  (GenerationItem("9+1=", "10", 3),))]
    config = AutoConfig.from_pretrained(tiny_models["base"])
    worker = LocalWorker(tasks, RunSources(tiny_models, "base", config, tokenizer))
    recipe = {"op": "merge", "method": "ties", "base": {"model": "base"},
              "inputs": [{"model": "add"}, {"model": "sort"}],
              "params": {"weight": 1.0, "density": 0.5}}
    answers = worker.answers("m", recipe, torch.tensor([5, 0, 2]))
    state = materialize(recipe, lambda name: load_file(tiny_models[name] / "model.safetensors"))
    independent = AutoModelForCausalLM.from_config(config)
    independent.load_state_dict(state)
    direct = CausalLMEvaluator(independent.eval(), tokenizer).evaluate(
        "t", [tasks[0].search[i] for i in (5, 0, 2)])
    assert answers.tolist() == [float(c) for c in direct.correct]
    assert all(torch.equal(p, state[n]) for n, p in worker.resident.model.state_dict().items())
    size = worker.size("m", recipe)
    assert size.params == sum(p.numel() for p in model.parameters())
    assert size.bytes == 4 * size.params  # float32 sources, float32 run
    assert size.nonzero == sum(int(torch.count_nonzero(t)) for t in state.values())
    assert len(worker.test_results("m", recipe)[0]) == 1
    smaller = {"op": "edit", "layers": [0, 2, 3], "input": recipe}
    assert worker.size("s", smaller).params < size.params
    assert worker.answers("s", smaller, torch.tensor([0, 1])).shape == (2,)
    assert worker.resident.model.config.num_hidden_layers == 3
    deeper = {"op": "edit", "layers": [0, 1, 1, 2, 3], "input": recipe}  # a stacked layer
    assert worker.size("d", deeper).params > size.params
    assert worker.answers("d", deeper, torch.tensor([0, 1])).shape == (2,)


def test_item_bank_is_a_seeded_uniform_sample_of_every_task():
    task_of = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    bank = item_bank(task_of, 10, seed=4)
    assert torch.equal(bank, torch.sort(bank).values)
    assert torch.bincount(task_of[bank]).tolist() == [10, 10, 5]  # a short task is used whole
    assert len(set(bank.tolist())) == len(bank)
    assert torch.equal(bank, item_bank(task_of, 10, seed=4))
    assert not torch.equal(bank, item_bank(task_of, 10, seed=5))
    # every item of a task is as likely to be banked: over many seeds, each is drawn 10/50 times
    draws = torch.zeros(len(task_of))
    for seed in range(400):
        draws[item_bank(task_of, 10, seed)] += 1
    assert (draws[:50] / 400 - 0.2).abs().max() < 0.1
    with pytest.raises(FitnessError, match="at least 1 item"):
        item_bank(task_of, 0, seed=0)


def test_bank_variance_is_the_finite_population_variance():
    task_of = torch.tensor([0] * 10 + [1] * 20)
    bank_task_of = torch.tensor([0] * 4 + [1] * 20)  # task 1 is banked whole
    variance = bank_variance(torch.tensor([0.5, 0.25, 0.375]), bank_task_of, task_of)
    # task 0: p smoothed to (0.5·4 + 1)/6 = 0.5; 0.25/4 · (10 − 4)/(10 − 1)
    assert variance[0].item() == pytest.approx(0.25 / 4 * 6 / 9)
    assert variance[1].item() == 0.0
    assert variance[2].item() == pytest.approx(variance[0].item() / 4)
    # all wrong on the bank still leaves the split's accuracy uncertain
    assert bank_variance(torch.zeros(3), bank_task_of, task_of)[0] > 0


def test_a_banked_fitness_asks_only_bank_items_and_carries_the_bank_error():
    responses = simulate_responses(60, 800, dims=1, seed=8)[0]
    task_of = torch.arange(800) % 2
    bank = item_bank(task_of, 100, seed=1)
    scorer = TableScorer(responses)
    fitness = ReducedFitness(LocalPool(scorer), task_of, ("a", "b"), dims=1, seed=0, bank=bank)
    results = fitness.add_full([Candidate(f"c{i}", {"row": i}) for i in range(20)])
    assert sorted(scorer.asked["c3"]) == bank.tolist()  # "full" is the whole bank, in pool ids
    truth = task_accuracies(responses[3:4, bank], task_of[bank])[0]
    spread = bank_variance(truth, task_of[bank], task_of)
    # exact on the bank; as an estimate of the whole split it carries the bank's sampling error
    for k, name in enumerate(("accuracy/a", "accuracy/b", "accuracy")):
        assert results[3].objectives[name] == (pytest.approx(truth[k].item()),
                                               pytest.approx(spread[k].sqrt().item()))
    assert results[3].objectives["params"][1] == 0.0
    fitness.refit()
    assert fitness.irt.n_items == 200  # calibrated on the bank's columns
    child = [Candidate("g", {"row": 40}, parents=("c0", "c1"))]
    result = fitness.evaluate(child, Budget(items_per_task=10, promote_items_per_task=20,
                                            estimator="gmpirt"), front=[])[0]
    assert set(scorer.asked["g"]) <= set(bank.tolist())
    assert result.stage == "full"  # nothing to beat: it goes all the way, on the bank
    assert len(scorer.asked["g"]) == 200


def test_promotion_takes_z_stderrs_of_optimism():
    def scored(accuracy, stderr, params):
        return FitnessResult("x", {"accuracy": (accuracy, stderr), "params": (params, 0.0)},
                             "reduced", torch.zeros(0), torch.zeros(0))

    front = [scored(0.70, 0.0, 1000.0)]
    child = scored(0.60, 0.06, 1000.0)  # 0.60 + 1·0.06 < 0.70 <= 0.60 + 2·0.06
    assert promotable(child, front, z=2.0)
    assert not promotable(child, front, z=1.0)
    assert promotable(scored(0.60, 0.06, 900.0), front, z=0.0)  # smaller: not dominated at all
