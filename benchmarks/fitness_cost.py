"""What the whole run's fitness costs, against evaluating every candidate fully.

Three arms per seed, each a real `evoforge run` of a config (default: `examples/zoo.yaml`):

- **full**: the same GA with every candidate evaluated on the whole search split
  (`fitness.full_evaluation`), as many candidates as the reduced run;
- **reduced**: the config as it is (IRT-reduced fitness: calibration, reduced and promotion sets,
  full evaluations, the final front re-scored);
- **full, same items**: the full-evaluation GA given only the reduced run's item budget: as many
  candidates as that budget evaluates fully (the seeds and default merges first).

Each arm prints its items asked on the search split (calibration included; the held-out test
reports of the final front are the same kind of cost in every arm and are not counted), its wall
time, the best held-out test accuracy on its final front, and the held-out hypervolume of that
front (test accuracy up, parameters over the base's down, reference (0, 1.05)), as mean ± standard
deviation over the seeds. The target: the reduced run asks at least 10x fewer items than the full
one, its front is as good within the seeds' spread, and better than the full run on its budget.

Run: ``python benchmarks/fitness_cost.py [--seeds 3] [--config examples/zoo.yaml]
[--results fitness-cost.json]`` (finished runs are kept in the results file and not run again).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from evolve.config import DEFAULT_MERGES
from evolve.run_report import front, summary
from evolve.selection import hypervolume
from evolve.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("full", "reduced", "full, same items")


def run(config: dict, folder: Path) -> dict:
    """One `evoforge run` of `config` in a fresh run folder; its cost and held-out front."""
    path = folder / "config.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    run_dir = folder / "run"
    subprocess.run([sys.executable, "-m", "evolve.cli", "run", str(path), "--run-dir",
                    str(run_dir)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    status, final = summary(run_dir), front(run_dir)
    store = RunStore(run_dir)
    base_params = store.evaluation(f"seed-{config['sources']['base'].split('/')[-1]}"
                                   )["objectives"]["params"][0]
    points = np.array([[-m["test"]["accuracy"][0], m["objectives"]["params"][0] / base_params]
                       for m in final["members"]])
    return {"items": sum(n for stage, n in status["items_asked"].items() if stage != "test"),
            "by_stage": status["items_asked"], "items_if_full": status["items_if_full"],
            "candidates": status["individuals"], "wall": store.meta("timings")["wall"],
            "best_test": float(-points[:, 0].min()),
            "hypervolume": hypervolume(points, np.array([0.0, 1.05]))}


def arm_config(base: dict, arm: str, seed: int, reduced: dict | None) -> dict:
    config = json.loads(json.dumps(base)) | {"seed": seed}
    if arm == "reduced":
        return config
    fitness = config.setdefault("fitness", {})
    config["fitness"] = {"full_evaluation": True, "calibration": fitness.get("calibration", 40)}
    if arm == "full, same items":  # as many full evaluations as the reduced run's items buy
        search_items = reduced["items_if_full"] // reduced["candidates"]
        fixed = 1 + len(config["sources"]["experts"]) + len(DEFAULT_MERGES)
        affordable = reduced["items"] // search_items
        calibration = min(config["fitness"]["calibration"], max(affordable - fixed, 0) // 2)
        config["fitness"]["calibration"] = calibration
        config.pop("generations", None)
        config["evaluations"] = max(affordable - fixed - calibration, 1)
    return config


def spread(values: list[float], digits: int = 1, scale: float = 1.0) -> str:
    mean = statistics.fmean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "zoo.yaml")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--results", type=Path, default=None,
                        help="JSON file of finished runs (kept, and skipped next time)")
    args = parser.parse_args()
    base = yaml.safe_load(args.config.read_text())
    known = json.loads(args.results.read_text()) if args.results and args.results.exists() \
        else {}
    with tempfile.TemporaryDirectory(prefix="fitness-cost-") as scratch:
        for seed in range(args.seeds):
            for arm in ("reduced", "full", "full, same items"):
                key = f"{args.config.name}/{arm}/{seed}"
                if key not in known:
                    config = arm_config(base, arm, seed, known.get(
                        f"{args.config.name}/reduced/{seed}"))
                    known[key] = run(config, Path(scratch) / f"{arm}-{seed}".replace(", ", "-"))
                    if args.results:
                        args.results.write_text(json.dumps(known, indent=1))
                result = known[key]
                print(f"seed {seed} {arm:17s} {result['items']:>9,} items "
                      f"({result['candidates']} candidates) {result['wall']:6.0f} s  best test "
                      f"{result['best_test']:.1%}  hypervolume {result['hypervolume']:.4f}  "
                      f"{result['by_stage']}", flush=True)
    rows = {arm: [known[f"{args.config.name}/{arm}/{s}"] for s in range(args.seeds)]
            for arm in ARMS}
    full_items = statistics.fmean(r["items"] for r in rows["full"])
    print(f"\n{args.config.name}, {args.seeds} seeds (mean ± sd):")
    print(f"{'arm':18s}{'items asked':>14s}{'vs full':>9s}{'wall (s)':>14s}"
          f"{'best test (%)':>16s}{'hypervolume':>20s}")
    for arm, results in rows.items():
        items = statistics.fmean(r["items"] for r in results)
        print(f"{arm:18s}{items:>14,.0f}{full_items / items:>8.1f}x"
              f"{spread([r['wall'] for r in results], 0):>14s}"
              f"{spread([r['best_test'] for r in results], 1, 100):>16s}"
              f"{spread([r['hypervolume'] for r in results], 4):>20s}")


if __name__ == "__main__":
    main()
