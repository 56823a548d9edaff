"""Candidates per hour and worker busy share: local against Ray, generational against steady-state.

Runs the same small evolution (the default zoo run, shortened) four times through `evoforge run`,
each in a fresh process: on the local backend (one worker, all cores) and on Ray with `--workers N`
CPU actors (one core each), each in generational and in steady-state mode. Prints, per arm:
candidates evaluated per hour of the run's clock (calibration included), children per hour over
the breeding phase (from the last calibration result to the last child's), the workers' busy share
(seconds on jobs / (workers x wall)) and Ray's start-up time (outside the run's clock, so printed
apart); then the ratios Ray / local per mode and steady-state / generational per backend.

    python benchmarks/worker_throughput.py [--workers 2] [--generations 2] [--population 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _run(config: Path, run_dir: Path, extra: list[str], env: dict) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from evolve.cli import app; app()", "run",
                           str(config), "--run-dir", str(run_dir), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"evoforge run {' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    db = sqlite3.connect(run_dir / "run.db")
    timings = json.loads(db.execute("SELECT value FROM meta WHERE key = 'timings'").fetchone()[0])
    candidates = db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
    children = db.execute("SELECT COUNT(*) FROM individuals WHERE generation > 0").fetchone()[0]
    calibrated = db.execute("SELECT MAX(at) FROM answers WHERE candidate NOT LIKE 'g%'"
                            ).fetchone()[0]
    bred = db.execute("SELECT MAX(at) FROM answers WHERE candidate LIKE 'g%'").fetchone()[0]
    startup = next((float(line.split(" started in ")[1].split(" s")[0])
                    for line in done.stderr.splitlines() if " workers started in " in line), 0.0)
    workers = max(1, len(timings["busy"]))
    return {"candidates": candidates, "wall": timings["wall"], "startup": startup,
            "per_hour": candidates / timings["wall"] * 3600,
            "children_per_hour": children / (bred - calibrated) * 3600,
            "busy": sum(timings["busy"]) / (workers * timings["wall"]),
            "process": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--population", type=int, default=8)
    args = parser.parse_args()

    config = yaml.safe_load((ROOT / "examples" / "zoo.yaml").read_text())
    config |= {"generations": args.generations, "population": args.population}
    config["fitness"] |= {"calibration": 24, "max_full_per_generation": 1}  # 4 tasks: >= 32 in all
    work = Path(tempfile.mkdtemp(prefix="worker-throughput-"))
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    cores = os.cpu_count() or 1
    print(f"zoo run: population {args.population}, {args.generations} generations, "
          f"calibration 24; {cores} cores", flush=True)
    arms = {}
    for mode in ("generational", "steady-state"):
        arms["local", mode] = _run(path, work / f"local-{mode}", ["--backend", "local",
                                                                  "--mode", mode],
                                   dict(os.environ, OMP_NUM_THREADS=str(cores)))
        arms["ray", mode] = _run(path, work / f"ray-{mode}", ["--workers", str(args.workers),
                                                              "--mode", mode],
                                 dict(os.environ, OMP_NUM_THREADS="1"))
    for (backend, mode), result in arms.items():
        label = "local, 1 worker" if backend == "local" else f"ray, {args.workers} CPU actors"
        print(f"{label:20s} {mode:13s} {result['candidates']} candidates in "
              f"{result['wall']:.0f} s: {result['per_hour']:.0f}/hour, children "
              f"{result['children_per_hour']:.0f}/hour, workers busy {result['busy']:.0%}"
              + (f" (Ray start-up {result['startup']:.1f} s, not in the run's clock)"
                 if result["startup"] else ""), flush=True)
    for mode in ("generational", "steady-state"):
        ray, local = arms["ray", mode], arms["local", mode]
        print(f"ray / local, {mode}: {ray['per_hour'] / local['per_hour']:.2f}x candidates/hour,"
              f" {ray['children_per_hour'] / local['children_per_hour']:.2f}x children/hour, "
              f"busy share {ray['busy'] / local['busy']:.2f}x")
    for backend in ("local", "ray"):
        steady, generational = arms[backend, "steady-state"], arms[backend, "generational"]
        print(f"steady-state / generational, {backend}: "
              f"{steady['per_hour'] / generational['per_hour']:.2f}x candidates/hour, "
              f"{steady['children_per_hour'] / generational['children_per_hour']:.2f}x "
              f"children/hour, busy share {steady['busy'] / generational['busy']:.2f}x")


if __name__ == "__main__":
    main()
