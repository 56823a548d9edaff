"""Evaluation throughput on the zoo: batched vs one item at a time, in one process.

Scores the zoo's search splits (all skills) with the base (weak: most items need generating) and
an expert (strong: most items are confirmed by one teacher-forced pass), at several batch sizes,
and prints items/s and the ratio to batch size 1 (scoring the same items one by one). Also
prints the ratio with the teacher-forced shortcut off (every item generated), so the two gains
are visible separately. Run: ``python benchmarks/eval_throughput.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from fitness.causal_lm import CausalLMEvaluator, load_causal_lm
from search_spaces.merge_zoo import build_zoo, zoo_task


def _rate(evaluator: CausalLMEvaluator, tasks, limit: int | None) -> float:
    started, count = time.perf_counter(), 0
    for task in tasks:
        items = task.search[:limit] if limit else task.search
        evaluator.evaluate(task.name, items)
        count += len(items)
    if evaluator.device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default="1,16,64,256,1024")
    parser.add_argument("--single-items", type=int, default=100,
                        help="items per task timed at batch size 1 (it is slow)")
    args = parser.parse_args()
    zoo = build_zoo()
    tasks = [zoo_task(skill, zoo.recipe) for skill in zoo.recipe.skills]
    print(f"{torch.get_num_threads()} threads, device {args.device}, "
          f"{sum(len(t.search) for t in tasks)} items over {len(tasks)} tasks")
    for label, folder in (("base", zoo.base), (f"{zoo.recipe.skills[0]} expert",
                                               zoo.experts[zoo.recipe.skills[0]])):
        model, tokenizer = load_causal_lm(folder, args.device)
        for shortcut in (True, False):
            rates = {}
            for size in (int(s) for s in args.batch_sizes.split(",")):
                limit = args.single_items if size == 1 else None
                evaluator = CausalLMEvaluator(model, tokenizer, batch_size=size,
                                              confirm_by_teacher_forcing=shortcut)
                rates[size] = _rate(evaluator, tasks, limit)
            best = max(rates, key=rates.get)
            mode = "shortcut" if shortcut else "generate all"
            print(f"{label:12s} {mode:12s} " + "  ".join(f"b{s}: {r:7.0f}/s" for s, r in
                                                         rates.items())
                  + f"  | best b{best}: {rates[best] / rates[1]:.1f}x one-by-one")


if __name__ == "__main__":
    main()
