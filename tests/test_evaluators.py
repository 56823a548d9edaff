"""The evaluators against direct, unbatched computations on hand-made items."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from fitness.causal_lm import CausalLMEvaluator, _Continuation, load_causal_lm
from fitness.classifier import ClassifierEvaluator
from fitness.errors import (
    CandidateOutOfMemory,
    FitnessError,
    ItemTooLongError,
    ModelLoadError,
    TaskFormatError,
)
from fitness.items import ChoiceItem, ClassificationItem, GenerationItem
from fitness.jsonl_tasks import load_jsonl_task
from fitness.tasks import load_task
from search_spaces.builtin_tasks import BUILTIN_TASKS
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


def _half_right_generation_items(model) -> tuple[list[GenerationItem], list[str]]:
    """Items of PROMPTS, half carrying the model's own greedy answer (correct), half another."""
    bounds = [3, 5, 2, 4, 2, 6]
    truths = [greedy_direct(model, p, b) for p, b in zip(PROMPTS, bounds, strict=True)]
    answers = [t if i % 2 == 0 and t else (t + "z")[-1:] + "q" for i, t in enumerate(truths)]
    return ([GenerationItem(p, a, b) for p, a, b in zip(PROMPTS, answers, bounds, strict=True)],
            truths)


def test_exact_match_agrees_with_direct_greedy_decoding(lm):
    model, tokenizer = lm
    items, truths = _half_right_generation_items(model)
    results = CausalLMEvaluator(model, tokenizer, batch_size=4).evaluate("hand", items)
    generated = CausalLMEvaluator(model, tokenizer, batch_size=4,
                                  confirm_by_teacher_forcing=False).evaluate("hand", items)
    assert results == generated  # the shortcut never changes a result
    assert list(results.correct) == [truth == item.answer
                                     for truth, item in zip(truths, items, strict=True)]
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


def full_log_softmax(model, rows: list[tuple[list[int], list[int]]],
                     pad_id: int) -> list[_Continuation]:
    """How the evaluator scored rows before it kept only the logits it needs: one right-padded
    batch, a float32 log-softmax over every position and the whole vocabulary."""
    width = max(len(prompt) + len(continuation) for prompt, continuation in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, continuation) in enumerate(rows):
        ids[row, :len(prompt) + len(continuation)] = torch.tensor(prompt + continuation)
        mask[row, :len(prompt) + len(continuation)] = 1
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logprobs, greedy = torch.log_softmax(logits, dim=-1), logits.argmax(dim=-1)
    out = []
    for row, (prompt, continuation) in enumerate(rows):
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(continuation) - 1)
        targets = torch.tensor(continuation, dtype=torch.long)
        out.append(_Continuation(float(logprobs[row, positions, targets].sum()),
                                 bool((greedy[row, positions] == targets).all()),
                                 int(greedy[row, len(prompt) + len(continuation) - 1])))
    return out


class FullLogSoftmaxEvaluator(CausalLMEvaluator):
    """The evaluator with its teacher-forced pass replaced by the reference, all rows at once."""

    def _continuations(self, task, rows, items):
        return full_log_softmax(self.model, rows, self.pad_id)


def one_batch(model, tokenizer, **options) -> CausalLMEvaluator:
    """An evaluator that puts every row of the tests' items in one batch, as the reference does."""
    return CausalLMEvaluator(model, tokenizer, batch_size=1000, max_batch_tokens=10**6, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("score_chunk_rows", [1, 3, 1000])
def test_chunked_scores_are_a_full_log_softmax_bit_for_bit(lm, dtype, score_chunk_rows):
    """Given the logits, scoring the kept positions a chunk at a time gives the very bits of a
    float32 log-softmax (and argmax) over the whole tensor: rows are independent."""
    model, tokenizer = lm
    logits = (torch.randn(5, 7, 50_000, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    rows, columns = [0, 0, 1, 3, 3, 3, 4, 2], [0, 6, 2, 1, 2, 3, 6, 5]
    targets = torch.randint(50_000, (len(rows),), generator=torch.Generator().manual_seed(1))
    evaluator = CausalLMEvaluator(model, tokenizer, score_chunk_rows=score_chunk_rows)
    logprobs, greedy = evaluator._score(logits, rows, columns, targets)
    full = logits.float()
    assert torch.equal(logprobs, full.log_softmax(-1)[rows, columns, targets])
    assert torch.equal(greedy, full.argmax(-1)[rows, columns])


def close_to(reference: list[_Continuation]):
    """What the teacher-forced pass may differ in from the full computation: the float32 rounding
    of logits that an lm_head product over fewer rows gives (see the module docstring)."""
    return [(c.greedy_follows, c.next_token, pytest.approx(c.loglik, rel=1e-6, abs=1e-6))
            for c in reference]


@pytest.fixture(scope="module")
def scored_rows(lm) -> list[tuple[list[int], list[int]]]:
    """Prompt and continuation ids with the edge cases: an empty continuation and greedy's own."""
    model, _ = lm
    return [([BOS_ID, *encode(p)], encode(c)) for p in PROMPTS
            for c in ("", "1", "46", "abc", greedy_direct(model, p, 4))]


@pytest.mark.parametrize(("batch_size", "score_chunk_rows"), [(1000, 1), (1000, 3), (1000, 1000),
                                                              (1, 2)])
def test_teacher_forced_scores_equal_a_full_log_softmax(lm, scored_rows, batch_size,
                                                        score_chunk_rows):
    model, tokenizer = lm
    evaluator = CausalLMEvaluator(model, tokenizer, batch_size=batch_size, max_batch_tokens=10**6,
                                  score_chunk_rows=score_chunk_rows)
    batches = [scored_rows] if batch_size > 1 else [[row] for row in scored_rows]
    reference = [c for batch in batches for c in full_log_softmax(model, batch, tokenizer.pad_token_id)]
    assert any(c.greedy_follows for c in reference) and not all(c.greedy_follows for c in reference)
    scored = evaluator._continuations("t", scored_rows, list(range(len(scored_rows))))
    assert [(c.greedy_follows, c.next_token, c.loglik) for c in scored] == close_to(reference)


def test_item_results_equal_the_full_log_softmax_evaluator(lm):
    model, tokenizer = lm
    generation, truths = _half_right_generation_items(model)
    choice = [ChoiceItem(p, ("12", "46", "x", "abc", t or "0"), i % 4)
              for i, (p, t) in enumerate(zip(PROMPTS, truths, strict=True))]
    for items in (generation, choice):
        reference = FullLogSoftmaxEvaluator(model, tokenizer, batch_size=1000,
                                            max_batch_tokens=10**6).evaluate("t", items)
        results = one_batch(model, tokenizer, score_chunk_rows=2).evaluate("t", items)
        assert (results.correct, results.prediction) == (reference.correct, reference.prediction)
        assert results.score == pytest.approx(reference.score, rel=1e-6, abs=1e-6)


def watch_forward(model, monkeypatch, limit: float = math.inf) -> list[tuple[int, int, int]]:
    """Records each forward pass of `model` as (rows, input width, attended width) and raises
    torch.OutOfMemoryError, as a device would, when rows × attended width exceeds `limit`."""
    calls = []
    forward = model.forward

    @functools.wraps(forward)  # generate() reads forward's signature
    def watched(*args, **kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        attended = ids.shape[1] if mask is None else mask.shape[1]
        calls.append((ids.shape[0], ids.shape[1], attended))
        if ids.shape[0] * attended > limit:
            raise torch.OutOfMemoryError(f"(test) {ids.shape[0]} rows × {attended} tokens")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", watched)
    return calls


def test_batches_are_bounded_by_tokens_as_well_as_rows(lm, monkeypatch):
    model, tokenizer = lm
    budget, bound = 60, 6  # every single sequence fits, not every pair
    choice = [ChoiceItem(p, ("1", "46", "abcdefgh"), 0) for p in PROMPTS]
    generation = [GenerationItem(p, "never", bound) for p in PROMPTS]
    unbounded = [one_batch(model, tokenizer).evaluate("t", items) for items in (choice, generation)]
    evaluator = CausalLMEvaluator(model, tokenizer, batch_size=64, max_batch_tokens=budget)
    forwards = watch_forward(model, monkeypatch)
    results = [evaluator.evaluate("t", choice)]
    assert len(forwards) > 2 and max(rows for rows, _, _ in forwards) > 1
    assert all(rows * width <= budget for rows, width, _ in forwards)
    generations = []
    generate = model.generate

    def watched_generate(input_ids, max_new_tokens, **kwargs):
        generations.append((input_ids.shape[0], input_ids.shape[1] + max_new_tokens))
        return generate(input_ids=input_ids, max_new_tokens=max_new_tokens, **kwargs)

    monkeypatch.setattr(model, "generate", watched_generate)
    results.append(evaluator.evaluate("t", generation))
    assert len(generations) > 2 and max(rows for rows, _ in generations) > 1
    assert all(rows * width <= budget for rows, width in generations)
    for result, reference in zip(results, unbounded, strict=True):
        assert (result.correct, result.prediction) == (reference.correct, reference.prediction)
        assert result.score == pytest.approx(reference.score, rel=1e-5, abs=1e-5)


def test_a_batch_out_of_memory_is_halved_and_stays_halved(lm, monkeypatch):
    model, tokenizer = lm
    pairs = [(12, 34), (56, 78), (90, 11), (23, 45), (67, 89), (10, 32), (54, 76), (98, 21)]
    prompts = [f"{a}+{b}=" for a, b in pairs]  # all as long: batches are the same in every run
    choice = [ChoiceItem(p, (str(a + b)[-2:], "00"), 0) for p, (a, b) in zip(prompts, pairs,
                                                                            strict=True)]
    generation = [GenerationItem(p, "42", 3) for p in prompts]
    width = 1 + 6 + 2  # BOS, prompt, answer; generation attends to at most 1 + 6 + 3 tokens
    runs = [(choice, True), (generation, False)]  # False: every item is also generated
    halved = [CausalLMEvaluator(model, tokenizer, batch_size=4, confirm_by_teacher_forcing=c)
              .evaluate("t", items) for items, c in runs]
    calls = watch_forward(model, monkeypatch, limit=4 * (width + 1))  # 4 rows fit, 8 do not
    for (items, confirm), expected in zip(runs, halved, strict=True):
        calls.clear()
        assert CausalLMEvaluator(model, tokenizer, batch_size=8, confirm_by_teacher_forcing=confirm
                                 ).evaluate("t", items) == expected
        passes = 1 if items is choice else 2  # the teacher-forced pass, then generation's
        assert [rows for rows, _, _ in calls].count(8) == passes  # one failure each, no retry at 8
        assert {rows for rows, _, _ in calls} == {8, 4}


def test_a_sequence_that_does_not_fit_alone_says_what_to_change(lm, monkeypatch):
    model, tokenizer = lm
    watch_forward(model, monkeypatch, limit=2)
    items = [ChoiceItem("a long prompt", ("a", "b"), 0), ChoiceItem("x", ("a", "bc"), 1)]
    with pytest.raises(CandidateOutOfMemory, match=r"task 'oom', item 1: a single sequence of 3 "
                       r"tokens .* lower the task's max_new_tokens or shorten its items, give the "
                       r"worker more memory \(a GPU with more memory\)"):
        CausalLMEvaluator(model, tokenizer).evaluate("oom", items)


def test_empty_prompts_and_zero_budgets_are_refused(lm, monkeypatch):
    model, tokenizer = lm
    with pytest.raises(ValueError, match="max_batch_tokens must be at least 1"):
        CausalLMEvaluator(model, tokenizer, max_batch_tokens=0)
    evaluator = CausalLMEvaluator(model, tokenizer)
    monkeypatch.setattr(evaluator, "_prompt_ids", lambda prompt: [])  # a tokenizer without BOS
    with pytest.raises(FitnessError, match="item 0: the prompt encodes to no tokens"):
        evaluator.evaluate("t", [ChoiceItem("", ("a", "b"), 0)])


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
    with pytest.raises(TaskFormatError, match=r"not a .jsonl file, an lm-eval/… task nor a "
                                              r"built-in task \(zoo/…, nas/…\)"):
        load_task("nonsense.txt", builtin=BUILTIN_TASKS)
    with pytest.raises(TaskFormatError, match="unknown zoo task 'nope'"):
        load_task("zoo/nope", builtin=BUILTIN_TASKS)


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


def test_generation_stops_on_a_stop_in_the_generated_text_only():
    """A stop string that begins in the prompt must not end generation: only the completion's
    own text counts, as `_cut` reads it."""
    from fitness.causal_lm import StopsInGenerated
    from search_spaces.char_tokenizer import char_tokenizer

    tokenizer = char_tokenizer()
    prompt, width = encode("1+2=\n"), len(encode("1+2=\n"))
    done = StopsInGenerated(tokenizer, ("\n\n", "3"), width)
    rows = torch.tensor([prompt + encode("\n"), prompt + encode("3"), prompt + encode("4")])
    assert done(rows, torch.zeros(3, 1)).tolist() == [False, True, False]
