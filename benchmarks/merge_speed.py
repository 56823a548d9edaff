"""Merge speed and peak memory: evoforge vs mergekit 0.1.5's in-memory API, in one process.

Merges a base plus 3 models (>= 100M parameters each, float32, Llama-shaped tensors) with each
method, checks that both give the same tensors, and prints the time ratio and the peak resident
memory each merge added above the inputs. Both are measured the same way: a warm-up merge each,
then `--repeats` rounds that run every method once per side, the best round counting.
Run: ``python benchmarks/merge_speed.py [--layers N] [--repeats 3]``.

``--dtype bfloat16`` gives both sides bf16 inputs, as real checkpoints are: evoforge merges them
the way a run materializes a recipe (the kernels read the bf16 inputs in place and compute in
float32; the result is rounded once to bf16), mergekit in bf16 as its ``dtype: bfloat16`` does.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the evoforge CLI does; helps both sides

import torch

from operators import merge
from operators.recipes import materialize

try:
    from mergekit.merge_methods.api import merge_state_dicts
except ImportError:  # pragma: no cover - mergekit is a dependency, but keep the script usable
    merge_state_dicts = None

WEIGHTS = [0.5, 0.3, 0.7]
DENSITY = 0.3


def _peak_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _peak_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def build_models(layers: int, hidden: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> tuple[dict, list[dict]]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (8000, hidden)}
    for i in range(layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"model.layers.{i}.self_attn.{name}.weight"] = (hidden, hidden)
        for name, shape in (("gate_proj", (hidden * 11 // 4, hidden)),
                            ("up_proj", (hidden * 11 // 4, hidden)),
                            ("down_proj", (hidden, hidden * 11 // 4))):
            shapes[f"model.layers.{i}.mlp.{name}.weight"] = shape
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
    base = {k: torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()}
    models = [{k: (v + torch.randn(v.shape, generator=generator) * 0.002).to(dtype)
               for k, v in base.items()} for _ in range(3)]
    return {k: v.to(dtype) for k, v in base.items()}, models


def timed(fn):
    """(result, wall time, peak RSS the run added above what was resident before, in GiB)."""
    gc.collect()
    before = _rss_gib()
    _peak_reset()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, seconds, _peak_gib() - before


def run_evoforge(method: str, base: dict, models: list[dict], params: dict) -> dict:
    if base["model.embed_tokens.weight"].dtype == torch.bfloat16:
        return _run_recipe(method, base, models, params)
    if method == "linear":  # linear has no base: the base joins the inputs with weight 1
        return merge("linear", None, [base, *models], weight=[1.0, *params["weight"]])
    return merge(method, base, models, **params)


def _run_recipe(method: str, base: dict, models: list[dict], params: dict) -> dict:
    """The merge as a run's worker materializes it: float32 arithmetic, rounded once to bf16."""
    states = {"base": base} | {f"m{i}": m for i, m in enumerate(models)}
    inputs = [{"model": f"m{i}"} for i in range(len(models))]
    recipe = {"op": "merge", "method": method, "base": {"model": "base"}, "inputs": inputs,
              "params": params}
    if method == "linear":
        recipe = {"op": "merge", "method": "linear", "inputs": [{"model": "base"}, *inputs],
                  "params": {"weight": [1.0, *params["weight"]]}}
    return materialize(recipe, states.__getitem__, dtype=torch.bfloat16)


def run_mergekit(method: str, base: dict, models: list[dict], params: dict) -> dict:
    inputs = {"base": base} | {f"m{i}": m for i, m in enumerate(models)}
    per_model = {k: ({f"m{i}": x for i, x in enumerate(v)} if isinstance(v, list) else v)
                 for k, v in params.items()}
    if method == "linear":
        per_model["weight"]["base"] = 1.0
        return merge_state_dicts(inputs, method, parameters=per_model)
    return merge_state_dicts(inputs, method, parameters=per_model, base="base")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds (each method once per round and side); the best time "
                             "counts, for both")
    parser.add_argument("--skip-mergekit", action="store_true",
                        help="time evoforge only (mergekit's TIES sorts every tensor: slow)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    base, models = build_models(args.layers, args.hidden, dtype=getattr(torch, args.dtype))
    n_params = sum(v.numel() for v in base.values())
    print(f"inputs: base + {len(models)} models x {n_params / 1e6:.1f}M parameters ({args.dtype}), "
          f"{torch.get_num_threads()} threads; best of {args.repeats} rounds after a warm-up, "
          "both sides")
    cases = {
        "linear": {"weight": WEIGHTS},
        "task_arithmetic": {"weight": WEIGHTS},
        "ties": {"weight": WEIGHTS, "density": DENSITY},
        "dare_ties": {"weight": WEIGHTS, "density": DENSITY},
        "pcb": {"density": DENSITY},
    }
    peer = merge_state_dicts is not None and not args.skip_mergekit
    # Warm-up: the first large allocations of a process pay page faults that later ones reuse.
    run_evoforge("linear", base, models, cases["linear"])
    if peer:
        run_mergekit("linear", base, models, cases["linear"])
    # Each round times every method once per side, so a slow spell of the machine (a noisy
    # neighbour on a shared VM) lands on all methods and both sides alike; best round counts.
    ours_time, ours_peak, their_time, their_peak = {}, {}, {}, {}
    for _ in range(args.repeats):
        for method, params in cases.items():
            out, seconds, peak = timed(lambda m=method, p=params: run_evoforge(m, base, models, p))
            del out  # freed before the next run measures what is resident
            ours_time[method] = min(seconds, ours_time.get(method, float("inf")))
            ours_peak.setdefault(method, peak)
            if peer and method != "pcb":
                out, seconds, peak = timed(lambda m=method, p=params: run_mergekit(
                    m, base, models, p))
                del out
                their_time[method] = min(seconds, their_time.get(method, float("inf")))
                their_peak.setdefault(method, peak)
    header = f"{'method':16} {'evoforge s':>10} {'mergekit s':>10} {'speedup':>8} " \
             f"{'vs linear':>9} {'peak GiB ours/mk':>17}  same result"
    print(header)
    for method, params in cases.items():
        out = run_evoforge(method, base, models, params)
        t_ours, m_ours = ours_time[method], ours_peak[method]
        t_mk = m_mk = None
        same = "n/a (mergekit has no pcb)" if method == "pcb" else "not compared (--skip-mergekit)"
        if peer and method != "pcb":
            ref = run_mergekit(method, base, models, params)
            t_mk, m_mk = their_time[method], their_peak[method]
            if method == "dare_ties":
                same = "masks differ by design (seeded per tensor); equal given masks: tests"
            elif args.dtype == "bfloat16":
                within = sum(int(((out[k].float() - ref[k].float()).abs()
                                  <= ref[k].float().pow(2).mean().sqrt() / 32).sum()) for k in out)
                same = (f"{within / n_params:.1%} of entries within 2^-5 of the tensor's RMS "
                        "(mergekit rounds every step to bf16; we round once)")
            else:
                differing = sum(int((out[k] != ref[k]).sum()) for k in out)
                same = "bit-identical" if differing == 0 else (
                    f"{differing} of {n_params} entries differ (magnitudes tied at the trim "
                    "threshold: mergekit keeps its argsort's choice, we the first by index)")
            del ref
        del out
        speedup = f"{t_mk / t_ours:7.1f}x" if t_mk else "      -"
        vs_linear = f"{t_ours / ours_time['linear']:8.2f}x"
        mk_s = f"{t_mk:10.2f}" if t_mk else f"{'-':>10}"
        mk_m = f"{m_mk:.2f}" if m_mk is not None else "-"
        print(f"{method:16} {t_ours:10.2f} {mk_s} {speedup:>8} {vs_linear:>9} "
              f"{m_ours:8.2f}/{mk_m:<8}  {same}")


if __name__ == "__main__":
    main()
