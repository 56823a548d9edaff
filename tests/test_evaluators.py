"""The evaluators against direct, unbatched computations on hand-made items."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fitness.causal_lm import CausalLMEvaluator, load_causal_lm
from fitness.classifier import ClassifierEvaluator
from fitness.errors import FitnessError, ItemTooLongError, ModelLoadError, TaskFormatError
from fitness.items import ChoiceItem, ClassificationItem, GenerationItem
from fitness.jsonl_tasks import load_jsonl_task
from fitness.tasks import load_task
from search_spaces.char_tokenizer import BOS_ID, EOS_ID, encode
from search_spaces.mnist1d_nets import REFERENCE_CNN, Mnist1dNet


@pytest.fixture(scope="module")
def lm(tiny_models):
    return load_causal_lm(tiny_models["add"])


def greedy_direct(model, prompt: str, bound: int) -> str:
    """Greedy decoding one token at a time, no cache, no batching: the definition."""
    ids = [BOS_ID, *encode(prompt)]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(bound):
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == EOS_ID:
                break
            out.append(token)
    from search_spaces.char_tokenizer import char_tokenizer

    return char_tokenizer().decode(out, skip_special_tokens=True).split("\n")[0].strip()


def loglik_direct(model, prompt: str, continuation: str) -> float:
    context, target = [BOS_ID, *encode(prompt)], encode(continuation)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([context + target])).logits[0], -1)
    return sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(target))


PROMPTS = ["12+34=", "rev:abc=", "sort:hgfe=", "x", "cnt:abba=", "a long prompt: 0123456789="]


def test_exact_match_agrees_with_direct_greedy_decoding(lm):
    model, tokenizer = lm
    bounds = [3, 5, 2, 4, 2, 6]
    truths = [greedy_direct(model, p, b) for p, b in zip(PROMPTS, bounds, strict=True)]
    # half the items carry the model's own greedy answer (correct), half a different one
    answers = [t if i % 2 == 0 and t else (t + "z")[-1:] + "q" for i, t in enumerate(truths)]
    items = [GenerationItem(p, a, b) for p, a, b in zip(PROMPTS, answers, bounds, strict=True)]
    results = CausalLMEvaluator(model, tokenizer, batch_size=4).evaluate("hand", items)
    generated = CausalLMEvaluator(model, tokenizer, batch_size=4,
                                  confirm_by_teacher_forcing=False).evaluate("hand", items)
    assert results == generated  # the shortcut never changes a result
    assert list(results.correct) == [truth == a for truth, a in zip(truths, answers, strict=True)]
    for prediction, truth, item, ok in zip(results.prediction, truths, items, results.correct,
                                           strict=True):
        assert prediction == (item.answer if ok else truth)
    for score, item in zip(results.score, items, strict=True):
        assert math.isclose(score, loglik_direct(model, item.prompt, item.answer), rel_tol=1e-4,
                            abs_tol=1e-4)


def test_batched_generation_equals_one_by_one(lm):
    model, tokenizer = lm
    items = [GenerationItem(p, "never", 6) for p in PROMPTS]
    batched = CausalLMEvaluator(model, tokenizer, batch_size=8).evaluate("t", items)
    single = CausalLMEvaluator(model, tokenizer, batch_size=1).evaluate("t", items)
    assert batched.prediction == single.prediction
    assert batched.prediction == tuple(greedy_direct(model, p, 6) for p in PROMPTS)


def test_multiple_choice_picks_the_highest_log_likelihood(lm):
    model, tokenizer = lm
    choices = ("12", "46", "x", "abc")
    items = [ChoiceItem(p, choices, i % len(choices)) for i, p in enumerate(PROMPTS)]
    results = CausalLMEvaluator(model, tokenizer, batch_size=3).evaluate("mc", items)
    for item, ok, score, prediction in zip(items, results.correct, results.score,
                                           results.prediction, strict=True):
        logliks = [loglik_direct(model, item.prompt, c) for c in choices]
        best = max(range(len(choices)), key=logliks.__getitem__)
        assert prediction == choices[best]
        assert ok == (best == item.answer)
        assert math.isclose(score, logliks[item.answer], rel_tol=1e-4, abs_tol=1e-4)


def test_classifier_results_per_item():
    torch.manual_seed(0)
    net = Mnist1dNet(REFERENCE_CNN).eval()
    signals = torch.randn(7, 40)
    with torch.no_grad():
        logprobs = torch.log_softmax(net(signals), -1)
    items = [ClassificationItem(tuple(s.tolist()), i % 10) for i, s in enumerate(signals)]
    results = ClassifierEvaluator(net, batch_size=3).evaluate("c", items)
    assert list(results.correct) == [int(logprobs[i].argmax()) == i % 10 for i in range(7)]
    assert results.score == pytest.approx([float(logprobs[i, i % 10]) for i in range(7)],
                                          abs=1e-5)
    assert results.accuracy == sum(results.correct) / 7


def test_user_jsonl_task_end_to_end(lm, tmp_path):
    model, tokenizer = lm
    path = tmp_path / "mine.jsonl"
    truth = greedy_direct(model, "12+34=", 4)
    lines = [{"prompt": "12+34=", "answer": truth or "0", "max_new_tokens": 4, "split": "search"},
             {"prompt": "rev:ab=", "answer": "ba", "max_new_tokens": 3, "split": "search"},
             {"prompt": "sort:ba=", "answer": "ab", "max_new_tokens": 3, "split": "test"}]
    path.write_text("// a comment\n" + "\n".join(json.dumps(line) for line in lines) + "\n\n")
    task = load_task(str(path))
    assert (task.name, task.format, len(task.search), len(task.test)) == ("mine", "generation",
                                                                          2, 1)
    results = CausalLMEvaluator(model, tokenizer).evaluate(task.name, task.search)
    assert len(results) == 2 and results.correct[0] == bool(truth)


def test_jsonl_without_splits_is_split_stably(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "choices": ["a", "b"],
                                          "answer": i % 2}) for i in range(40)))
    first, second = load_jsonl_task(path), load_jsonl_task(path)
    assert first == second and first.format == "choice"
    assert 8 <= len(first.search) <= 32 and len(first.search) + len(first.test) == 40


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "a", "answer": "b"', "line 2: not valid JSON"),
    ('{"format": "essay", "prompt": "a"}', "line 2: unknown format 'essay'"),
    ('{"prompt": "a", "choices": ["x", "y"], "answer": 5}', "line 2: 'answer' 5 is not an index"),
    ('{"prompt": "a"}', "line 2: a generation item needs ['answer']"),
    ('{"features": [1, "x"], "label": 1}', "line 2: 'features' must be"),
    ('{"prompt": "a", "answer": "b", "split": "train"}', "'split' must be 'search' or 'test'"),
    ('{"prompt": "a", "answer": "b", "colour": 1}', "unknown fields ['colour']"),
    ('[1, 2]', "line 2: each line must be a JSON object"),
])
def test_malformed_jsonl_names_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("// line 1 is a comment\n" + line + "\n")
    with pytest.raises(TaskFormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_jsonl_task(path)


def test_mixed_formats_and_empty_split_are_refused(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n{"features": [1.0], "label": 0}\n')
    with pytest.raises(TaskFormatError, match="line 2: classification item in a file of"):
        load_jsonl_task(path)
    path.write_text('{"prompt": "a", "answer": "b", "split": "search"}\n')
    with pytest.raises(TaskFormatError, match="the test split is empty"):
        load_jsonl_task(path)
    with pytest.raises(TaskFormatError, match="not a built-in task"):
        load_task("nonsense.txt")


def test_item_longer_than_the_context_names_the_item(lm):
    model, tokenizer = lm
    context = model.config.max_position_embeddings
    items = [GenerationItem("ok=", "1", 2), GenerationItem("1" * context, "2", 4)]
    with pytest.raises(ItemTooLongError, match=r"task 'long', item 1: needs \d+ tokens"):
        CausalLMEvaluator(model, tokenizer).evaluate("long", items)
    with pytest.raises(ItemTooLongError, match="item 0"):
        CausalLMEvaluator(model, tokenizer).evaluate(
            "long", [ChoiceItem("1" * context, ("a", "b"), 0)])


def test_answer_longer_than_its_bound_and_mixed_formats_are_refused(lm):
    model, tokenizer = lm
    evaluator = CausalLMEvaluator(model, tokenizer)
    with pytest.raises(FitnessError, match="item 0: the answer takes 3 tokens"):
        evaluator.evaluate("t", [GenerationItem("a", "123", 2)])
    with pytest.raises(FitnessError, match="one format per task"):
        evaluator.evaluate("t", [GenerationItem("a", "1"), ChoiceItem("a", ("x", "y"), 0)])


def test_model_folders_that_are_not_causal_lms(tmp_path):
    from transformers import ViTConfig

    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_causal_lm(tmp_path / "missing")
    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
              intermediate_size=8).save_pretrained(tmp_path / "vit")
    with pytest.raises(ModelLoadError, match="is not a causal language model"):
        load_causal_lm(tmp_path / "vit")
