"""Does a code search find networks that beat the MNIST-1D paper's reference CNN on both held-out
test accuracy and parameter count?

For each finished run of `examples/mnist1d.yaml` given (one per seed), the reference CNN is
trained again exactly as that run trained its seed (same steps, same seed, in the sandbox) and
scored on the held-out split, which the run's search never saw; the run's final front members are
listed with their held-out reports, and those smaller and more accurate than the reference are
counted. The reference is not on every front, so its held-out score is not in every store.

Run: ``python benchmarks/mnist1d_code_search.py runs/mnist1d-seed0 runs/mnist1d-seed1 ...``
(after ``evoforge run examples/mnist1d.yaml --seed K --run-dir runs/mnist1d-seedK``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evolve.config import load_config
from evolve.store import RunStore
from operators.sandbox import Limits, run_untrusted
from search_spaces.mnist1d_code import REFERENCE_CNN, CodeSpace


def reference_test_accuracy(space: CodeSpace, steps: int, seed: int) -> tuple[float, int]:
    harness, arguments, files = space.harness(steps, seed)
    result = run_untrusted(REFERENCE_CNN, harness, arguments, Limits(cpu_seconds=1200,
                                                                     wall_seconds=2400), files)
    if not result.ok:
        raise SystemExit(f"the reference CNN did not train: {result.kind}: {result.error}")
    predictions = result.value["predictions"][len(space.task.search):]
    correct = sum(p == item.label for p, item in zip(predictions, space.task.test, strict=True))
    return correct / len(space.task.test), result.value["params"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    space = CodeSpace()
    beaten = 0
    for run_dir in args.runs:
        config = load_config(run_dir / "config.yaml")
        store = RunStore.reader(run_dir)
        reference, params = reference_test_accuracy(space, config.code.steps, config.seed)
        final = store.generations()[-1]
        wall = (store.meta("timings") or {}).get("wall", float("nan"))
        print(f"\n{run_dir.name} (seed {config.seed}, {len(store.generations()) - 1} generations, "
              f"{wall / 60:.0f} min): reference CNN {100 * reference:.1f} % held-out, "
              f"{params:,} parameters")
        print(f"{'member':<10}{'params':>9}{'held-out':>10}  beats the reference on both")
        wins = []
        for member in final["front"]:
            objectives = store.evaluation(member)["objectives"]
            test = store.report(member)["accuracy"]
            size = int(objectives["params"][0])
            wins.append(size < params and test[0] > reference)
            print(f"{member:<10}{size:>9,}{100 * test[0]:>7.1f} ± {100 * test[1]:.1f}  "
                  f"{'yes' if wins[-1] else ''}")
        beaten += any(wins)
    print(f"\nruns with a front member smaller and more accurate (held-out) than the reference "
          f"CNN: {beaten} of {len(args.runs)}")


if __name__ == "__main__":
    main()
