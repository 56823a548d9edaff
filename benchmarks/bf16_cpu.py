"""bf16 checkpoints on a CPU cost nothing extra: merges and scoring against float32, and the peers.

Merges: base + 3 models (Llama-shaped, from merge_speed.py), each method merged from float32
inputs and from the same weights in bf16 the way a run materializes a recipe (the kernels read the
bf16 inputs in place, compute in float32 and round once), best of N after a warm-up. Peer: mergekit
0.1.5 merging the bf16 inputs in bf16 (its `dtype: bfloat16`), same warm-up, best of N.

Scoring: a bf16 checkpoint family (Llama, from `search_spaces.families`) scored by a run's worker
(the resident model computes in float32 over the bf16 values on a CPU, `fitness.worker`) against
the same weights saved in float32, on the same items. Peer: the checkpoint as transformers runs it
(`dtype=torch.bfloat16`, bf16 compute). Prints seconds and the ratios; the targets are bf16 /
float32 <= 1.2 for merges and ~1 for scoring.

    python benchmarks/bf16_cpu.py [--layers 8] [--hidden 1024] [--repeats 3] [--items 40]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.merge_speed import WEIGHTS, build_models, run_evoforge, run_mergekit  # noqa: E402

CASES = {"linear": {"weight": WEIGHTS}, "task_arithmetic": {"weight": WEIGHTS},
         "ties": {"weight": WEIGHTS, "density": 0.3},
         "dare_ties": {"weight": WEIGHTS, "density": 0.3}, "pcb": {"density": 0.3}}


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def merges(layers: int, hidden: int, repeats: int) -> None:
    wide = build_models(layers, hidden, dtype=torch.float32)
    narrow = ({k: v.to(torch.bfloat16) for k, v in wide[0].items()},
              [{k: v.to(torch.bfloat16) for k, v in m.items()} for m in wide[1]])
    params = sum(v.numel() for v in wide[0].values())
    print(f"merges: base + 3 x {params / 1e6:.0f}M parameters, {torch.get_num_threads()} threads,"
          f" best of {repeats} after a warm-up")
    print(f"{'method':16} {'float32 s':>9} {'bf16 s':>8} {'bf16/fp32':>9} {'mergekit bf16 s':>15}"
          f" {'mergekit/ours':>13}")
    for method, case in CASES.items():
        fp32 = _best(lambda m=method, c=case: run_evoforge(m, *wide, c), repeats)
        bf16 = _best(lambda m=method, c=case: run_evoforge(m, *narrow, c), repeats)
        peer = "-" if method == "pcb" else _best(
            lambda m=method, c=case: run_mergekit(m, *narrow, c), repeats)
        ratio = "-" if peer == "-" else f"{peer / bf16:12.1f}x"
        shown = peer if peer == "-" else f"{peer:15.2f}"
        print(f"{method:16} {fp32:9.2f} {bf16:8.2f} {bf16 / fp32:8.2f}x {shown:>15} {ratio:>13}")


def _task(folder: Path, items: int) -> Path:
    rng = random.Random(0)
    lines = [{"prompt": f"w{rng.randint(0, 99)}:", "choices": ["ab", "ba"],
              "answer": rng.randint(0, 1), "split": "search" if i < items else "test"}
             for i in range(items + 4)]
    path = folder / "pick.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return path


def scoring(hidden: int, layers: int, items: int, repeats: int) -> None:
    from transformers import AutoModelForCausalLM

    from fitness.causal_lm import CausalLMEvaluator, load_causal_lm
    from fitness.jsonl_tasks import load_jsonl_task
    from fitness.worker_spec import WorkerSpec
    from search_spaces.families import build_family

    work = Path(tempfile.mkdtemp(prefix="bf16-cpu-"))
    family = build_family("llama", work / "bf16", experts=1, hidden=hidden, layers=layers,
                          intermediate=hidden * 4, vocab=32000)
    wide = work / "float32"
    model = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float32)
    model.save_pretrained(wide)
    load_causal_lm(family["base"])[1].save_pretrained(wide)
    task = _task(work, items)
    ids = torch.arange(items)
    seconds = {}
    for label, folder in (("bf16 sources", family["base"]), ("float32 sources", wide)):
        worker = WorkerSpec(((str(folder), str(folder)),), str(folder), (str(task),)).build()
        seconds[label] = _best(lambda w=worker: w.answers("resident", {
            "model": w.sources.names[0]}, ids), repeats)
    peer, tokenizer = load_causal_lm(family["base"])
    peer = peer.to(torch.bfloat16)
    evaluator = CausalLMEvaluator(peer, tokenizer)
    chosen = list(load_jsonl_task(task).search)
    seconds["transformers, bf16 compute"] = _best(lambda: evaluator.evaluate("t", chosen), repeats)
    params = sum(p.numel() for p in model.parameters())
    print(f"scoring: {items} items, Llama {params / 1e6:.0f}M parameters, "
          f"{torch.get_num_threads()} threads, best of {repeats} after a warm-up")
    for label, value in seconds.items():
        print(f"  {label:28s} {value:7.2f} s")
    base = seconds["float32 sources"]
    print(f"ratio bf16 sources / float32 sources: {seconds['bf16 sources'] / base:.2f}x; "
          f"transformers bf16 compute / ours: "
          f"{seconds['transformers, bf16 compute'] / seconds['bf16 sources']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--items", type=int, default=40)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    merges(args.layers, args.hidden, args.repeats)
    scoring(args.hidden, args.layers, args.items, args.repeats)


if __name__ == "__main__":
    main()
