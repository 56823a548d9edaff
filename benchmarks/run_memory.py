"""Peak memory of `evoforge run` on a real-sized model, against the bound and the code before.

Builds (once, cached under --root) a base and 4 experts of a ≈0.5B-parameter Llama-architecture
model from its config (bf16, sharded safetensors), runs `evoforge run` for 2 generations on the
CPU, and prints the run's peak RSS in units of one model's bytes, next to the bound
"mapped sources once + 3 models + 1 GiB". The peer is the same run with the code of another
revision (default: the last commit before resident models, which cloned every source into RAM),
run from a git worktree in the same way; it may be stopped at --before-timeout seconds, and its
figure is then the peak reached so far (a lower bound, said so).

    python benchmarks/run_memory.py [--root DIR] [--before REV] [--before-timeout 1200]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from search_spaces.families import LLAMA_05B, build_family  # noqa: E402

BEFORE = "45508a3"  # main before this work: sources cloned into RAM, 32 cached models
GiB = 2**30


def _task(folder: Path) -> Path:
    rng = random.Random(0)
    lines = [{"prompt": f"w{rng.randint(0, 99)}:", "choices": ["ab", "ba"],
              "answer": rng.randint(0, 1), "split": "search" if i < 20 else "test"}
             for i in range(30)]
    path = folder / "pick.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return path


def _config(folders: dict[str, Path], task: Path, budget: int | None) -> dict:
    config = {"sources": {"base": str(folders["base"]),
                          "experts": [str(folders[n]) for n in folders if n != "base"]},
              "tasks": [str(task)], "population": 4, "generations": 2, "seed": 0,
              "fitness": {"calibration": 10, "items_per_task": 5, "promote_items_per_task": 10,
                          "max_full_per_generation": 1, "dims": 1}}
    if budget is None:  # the code before: it had no budget, and another name for the dtype
        config["export_dtype"] = "bfloat16"
    else:
        config["memory_budget"] = budget
    return config


def _model_bytes(folder: Path) -> int:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return int(index["metadata"]["total_size"])


def _peak_rss(command: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int, float, bool]:
    """(peak RSS in bytes, seconds, finished) of a child process, from wait4's rusage."""
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
    finished = True
    deadline = started + timeout
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            os.killpg(child.pid, signal.SIGKILL)
            _, status, usage = os.wait4(child.pid, 0)
            finished = False
            break
        time.sleep(0.5)
    if finished and os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{child.stderr.read().decode()[-3000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - started, finished


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "evoforge-0.5b")
    parser.add_argument("--before", default=BEFORE, help="git revision of the peer")
    parser.add_argument("--before-timeout", type=float, default=1200.0)
    parser.add_argument("--skip-before", action="store_true")
    parser.add_argument("--budget-models", type=float, default=3.0,
                        help="the worker's memory_budget in models (resident model + cache)")
    args = parser.parse_args()

    print("building base + 4 experts (≈0.5B parameters each, bf16, sharded) ...", flush=True)
    folders = build_family("llama", args.root / "models", experts=4, **LLAMA_05B)
    model = _model_bytes(folders["base"])
    work = Path(tempfile.mkdtemp(prefix="run-memory-"))
    task = _task(work)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    python = sys.executable

    def run(label: str, code: Path, budget: int | None, timeout: float
            ) -> tuple[int, float, bool]:
        folder = work / label
        folder.mkdir()
        (folder / "run.yaml").write_text(yaml.safe_dump(_config(folders, task, budget)))
        command = [python, "-c", "from evolve.cli import app; app()", "run", "run.yaml",
                   "--run-dir", str(folder / "run")]
        return _peak_rss(command, folder, dict(env, PYTHONPATH=str(code)), timeout)

    budget = int(args.budget_models * model)
    peak, seconds, _ = run("now", ROOT, budget, float("inf"))
    bound = 5 * model + 3 * model + GiB
    print(f"one model: {model / GiB:.2f} GiB (bf16); sources: 5 models, memory-mapped; "
          f"memory_budget: {args.budget_models:g} models (resident model in float32 on the CPU: 2)")
    print(f"evoforge now:    peak RSS {peak / GiB:.2f} GiB = {peak / model:.2f} models "
          f"({seconds:.0f} s)")
    print(f"bound:           {bound / GiB:.2f} GiB = {bound / model:.2f} models "
          f"(mapped sources 5 + 3 models + 1 GiB): {'within' if peak <= bound else 'OVER'}")
    if args.skip_before:
        return
    tree = work / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree),
                    args.before], check=True, capture_output=True)
    try:
        old, old_seconds, finished = run("then", tree, None, args.before_timeout)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       check=False, capture_output=True)
    note = "" if finished else f", stopped after {old_seconds:.0f} s: at least this much"
    print(f"code at {args.before}: peak RSS {old / GiB:.2f} GiB = {old / model:.2f} models "
          f"({old_seconds:.0f} s{note})")
    print(f"ratio (before / now): {old / peak:.2f}x")


if __name__ == "__main__":
    main()
