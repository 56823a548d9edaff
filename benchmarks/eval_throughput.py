"""Evaluation throughput: evoforge's evaluator against lm-eval-harness, same model, same items.

The zoo's search items (every skill: greedy generation, exact match) are written as an lm-eval
task (a local JSONL file and its YAML: `generate_until`, stop at a newline, at most as many new
tokens as the longest item allows, whitespace stripped before exact match, as evoforge's
generation items do). Then, in one process, on the same model object:
- evoforge's `CausalLMEvaluator` (batched, left-padded, logits only where scored, and the
  teacher-forced shortcut: an item whose answer greedy decoding would produce is confirmed by one
  forward pass instead of generated);
- lm-eval-harness 0.4's own pipeline (`simple_evaluate` with its HFLM on the same model), which
  generates every item.
Both after a warm-up, best of `--repeats`; prints items/s, the ratio, and that the two agree on
every item's correctness. Run with the base (weak: most items generated) and an expert (strong:
most confirmed).

    python benchmarks/eval_throughput.py [--device cuda] [--batch-size 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fitness.causal_lm import CausalLMEvaluator, load_causal_lm
from search_spaces.merge_zoo import build_zoo, zoo_task

TASK_YAML = """task: zoo_search
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: question
doc_to_target: answer
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: {tokens}
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def _write_task(folder: Path, items) -> Path:
    data = folder / "zoo_search.jsonl"
    data.write_text("".join(json.dumps({"question": item.prompt, "answer": item.answer}) + "\n"
                            for item in items))
    tokens = max(item.max_new_tokens for item in items)
    (folder / "zoo_search.yaml").write_text(TASK_YAML.format(data=data, tokens=tokens))
    return folder


def _best(fn, repeats: int):
    result = fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return result, best


def _lm_eval(model, tokenizer, folder: Path, batch_size: int) -> list[float]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=["zoo_search"], log_samples=True,
                              task_manager=TaskManager(include_path=str(folder),
                                                       include_defaults=False),
                              verbosity="ERROR")
    samples = sorted(results["samples"]["zoo_search"], key=lambda s: s["doc_id"])
    return [float(s["exact_match"]) for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    zoo = build_zoo()
    items = [item for skill in zoo.recipe.skills for item in zoo_task(skill, zoo.recipe).search]
    folder = _write_task(Path(tempfile.mkdtemp(prefix="eval-throughput-")), items)
    print(f"{len(items)} zoo search items (generation, exact match), batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, device {args.device}; best of {args.repeats} "
          "after a warm-up")
    skill = zoo.recipe.skills[-1]
    for label, path in (("base", zoo.base), (f"{skill} expert", zoo.experts[skill])):
        model, tokenizer = load_causal_lm(path, args.device)
        evaluator = CausalLMEvaluator(model, tokenizer, batch_size=args.batch_size)
        ours, ours_time = _best(lambda e=evaluator: e.evaluate("zoo_search", items).correct,
                                args.repeats)
        theirs, their_time = _best(lambda m=model, t=tokenizer: _lm_eval(m, t, folder,
                                                                        args.batch_size),
                                   args.repeats)
        agree = sum(float(a) == b for a, b in zip(ours, theirs, strict=True))
        print(f"{label:12s} evoforge {len(items) / ours_time:7.0f} items/s, lm-eval "
              f"{len(items) / their_time:7.0f} items/s: {their_time / ours_time:.1f}x; accuracy "
              f"{sum(ours) / len(items):.3f} vs {sum(theirs) / len(items):.3f}, "
              f"{agree}/{len(items)} items agree")


if __name__ == "__main__":
    main()
