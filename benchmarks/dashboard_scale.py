"""Does every dashboard page open in under a second on a 20,000-individual run? And against
optuna-dashboard on a study of as many trials (its users report the Pareto front stalling above
1,000: optuna-dashboard #506)?

The store is generated through the run store's own write API, shaped like a long zoo run: 100
generations of 200 children (reduced estimates on 80 items, one in ten promoted to 400 and one in
a hundred evaluated on the full 1,600), a 40-recipe calibration, each generation's population and
front. The peer's study holds the same 20,000 points as two-objective trials (accuracy up,
parameters down) with the same per-task values as user attributes.

Each page is timed as a browser opens it: every request the page makes, over HTTP on loopback,
first cold (a fresh server: the run is read from disk) and then best of 5 warm; and in headless
Chromium until the page says it has drawn: typed into a browser with an empty profile (its cache
cold: plotly is fetched and compiled), typed again in that profile (best of 5; the browser keeps
plotly's compiled code from the third load on), and reached by a link from the runs page (the app
moves between pages without reloading, so plotly is already there). optuna-dashboard is timed the
same way over its API (the study's detail, which carries its trials and Pareto front).

Run: ``python benchmarks/dashboard_scale.py [--individuals 20000] [--keep DIR]``
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evolve.store import RunStore  # noqa: E402
from fitness.journal import Recorded  # noqa: E402
from fitness.size import Size  # noqa: E402
from tests.dashboard_helpers import CHROMIUM_FLAGS, VIEWPORT, serving  # noqa: E402

TASKS = ["zoo/rev", "zoo/sort", "zoo/inc", "zoo/cnt"]
PER_GENERATION = 200
ITEMS = [f"{task}:{i}" for task in TASKS for i in range(400)]  # the search split: 1,600


def _objectives(rng: random.Random, stderr: float) -> dict:
    per_task = {f"accuracy/{t}": [rng.random(), stderr] for t in TASKS}
    params = float(rng.choice([178816, 342912, 507008, 671104, 835200]))
    return ({"accuracy": [sum(v[0] for v in per_task.values()) / 4, stderr / 2]} | per_task
            | {"params": [params, 0.0], "bytes": [4 * params, 0.0], "nonzero": [params, 0.0]})


def generate(folder: Path, individuals: int, seed: int = 0) -> Path:
    """A run store of `individuals` individuals (see the module docstring)."""
    rng = random.Random(seed)
    run_dir = folder / "big"
    store = RunStore(run_dir)
    config = (ROOT / "examples" / "zoo.yaml").read_text()
    (run_dir / "config.yaml").write_text(config.replace("generations: 12", "generations: "
                                                        f"{individuals // PER_GENERATION}"))
    store.set_meta("search_items", len(ITEMS))
    store.event("start")
    population: list[str] = []
    store.db.execute("PRAGMA synchronous = OFF")  # a generated store need not survive a crash
    for k in range(40):
        identifier = f"cal-{k}"
        store.add_individual(identifier, 0, {"op": "merge", "method": "ties", "seed": k}, [],
                             "calibration")
        store.add_result(Recorded(identifier, identifier, tuple(ITEMS),
                                  tuple(float(rng.random() < 0.5) for _ in ITEMS),
                                  Size(671104, 2684416, 671104), None, "calibration"))
        store.add_evaluation(identifier, 0, "full", _objectives(rng, 0.0), len(ITEMS), None)
        population.append(identifier)
    for generation in range(1, individuals // PER_GENERATION + 1):
        children = []
        for k in range(PER_GENERATION):
            identifier = f"g{generation}-{k}"
            parents = rng.sample(population, 2)
            store.add_individual(identifier, generation,
                                 {"op": "merge", "method": rng.choice(["ties", "dare_ties"]),
                                  "inputs": [{"model": p} for p in parents],
                                  "params": {"density": rng.random(), "weight": rng.random()},
                                  "seed": rng.randrange(2**31)}, parents, "crossover")
            stage, asked = "reduced", rng.sample(ITEMS, 80)
            if k % 100 == 0:
                stage, asked = "full", ITEMS
            elif k % 10 == 0:
                stage, asked = "promoted", rng.sample(ITEMS, 400)
            store.add_result(Recorded(identifier, identifier, tuple(asked),
                                      tuple(float(rng.random() < 0.5) for _ in asked),
                                      Size(671104, 2684416, 671104), None, stage))
            store.add_evaluation(identifier, generation, stage,
                                 _objectives(rng, 0.0 if stage == "full" else 0.03), len(asked),
                                 None)
            children.append(identifier)
        population = rng.sample(population + children, PER_GENERATION)
        store.add_generation(generation, population, rng.sample(population, 8), rng.random())
    store.set_meta("status", "done")
    store.close()
    return run_dir


PAGES = {  # what each page requests once loaded (the browser fetches these in order)
    "runs": ["/", "/api/runs"],
    "run": ["/runs/big", "/api/runs/big", "/api/runs/big/points?dominated=1",
            "/api/runs/big/table?page=0"],
    "individual": ["/runs/big/individuals/{last}", "/api/runs/big/individuals/{last}"],
    "compare": ["/compare?run=big", "/api/compare?run=big"],
}


def _get(url: str) -> int:
    with urllib.request.urlopen(url) as response:
        return len(response.read())


def _time_requests(base: str, paths: list[str], repeats: int) -> tuple[float, float, int]:
    """Seconds for the page's requests: the first time, and the best of `repeats` more."""
    def once() -> tuple[float, int]:
        started = time.perf_counter()
        size = sum(_get(base + path) for path in paths)
        return time.perf_counter() - started, size
    first, size = once()
    return first, min(once()[0] for _ in range(repeats)), size


@contextmanager
def browser_profile() -> Iterator:
    """Debian's chromium with a profile of its own on disk, as a user's browser has (a private
    context keeps no compiled code between loads)."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    if executable is None:
        sys.exit("Debian's chromium is not installed (scripts/ensure-browser installs it)")
    with tempfile.TemporaryDirectory(prefix="evoforge-profile-") as folder, \
            sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            folder, executable_path=executable, args=CHROMIUM_FLAGS, viewport=VIEWPORT)
        try:
            yield context
        finally:
            context.close()


def _drawn(tab) -> float:
    """Seconds from the navigation (or the followed link) until the page said it had drawn."""
    tab.wait_for_selector("body[data-ready='1']", timeout=60_000)
    return int(tab.evaluate("document.body.dataset.drawnMs")) / 1000


def _typed(context, url: str) -> float:
    tab = context.new_page()
    tab.goto(url)
    seconds = _drawn(tab)
    tab.close()
    return seconds


def _followed(context, base: str, url: str) -> float:
    """From the runs page, once it has drawn and preloaded plotly, to `url` as a link goes."""
    tab = context.new_page()
    tab.goto(base + "/")
    _drawn(tab)
    tab.wait_for_load_state("networkidle")
    tab.evaluate("url => navigate(url)", url)
    seconds = _drawn(tab)
    tab.close()
    return seconds


def ours(run_dir: Path, last: str, repeats: int) -> dict:
    results = {}
    with serving(run_dir.parent) as base:
        for page, paths in PAGES.items():
            paths = [p.format(last=last) for p in paths]
            results[page] = _time_requests(base, paths, repeats)
        for page, paths in PAGES.items():
            url = paths[0].format(last=last)
            with browser_profile() as context:
                first = _typed(context, base + url)
                returning = min(_typed(context, base + url) for _ in range(repeats))
                followed = min(_followed(context, base, url) for _ in range(repeats))
            results[page] += (first, returning, followed)
    return results


def optuna_peer(run_dir: Path, repeats: int) -> tuple[float, float, int] | None:
    """optuna-dashboard over the same points as a two-objective study (None if not installed)."""
    try:
        import optuna
        from optuna_dashboard import wsgi
    except ImportError:
        return None
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    store = RunStore.reader(run_dir)
    rows = store.db.execute("SELECT id, objectives FROM evaluations ORDER BY rowid").fetchall()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="big",
                                directions=["maximize", "minimize"])
    distributions = {"density": optuna.distributions.FloatDistribution(0, 1)}
    trials = []
    for identifier, objectives in rows:
        values = json.loads(objectives)
        trials.append(optuna.trial.create_trial(
            params={"density": random.random()}, distributions=distributions,
            values=[values["accuracy"][0], values["params"][0]],
            user_attrs={"id": identifier} | {k: v[0] for k, v in values.items()
                                              if k.startswith("accuracy/")}))
    study.add_trials(trials)

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = make_server("127.0.0.1", 0, wsgi(storage), handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        return _time_requests(base, ["/api/studies", f"/api/studies/{study._study_id}"], repeats)
    finally:
        server.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--individuals", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="generate the store here and keep it")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="evoforge-dashboard-"))
    started = time.perf_counter()
    run_dir = generate(folder, args.individuals)
    last = f"g{args.individuals // PER_GENERATION}-{PER_GENERATION - 1}"
    print(f"generated {args.individuals:,} individuals + 40 calibration recipes in "
          f"{time.perf_counter() - started:.0f} s ({(run_dir / 'run.db').stat().st_size / 2**20:.0f} "
          "MiB store)")
    results = ours(run_dir, last, args.repeats)
    print("\nseconds until each page has drawn; requests: its HTTP requests on loopback (cold: a "
          "fresh server); Chromium: the address typed into an empty profile, typed again (best of "
          f"{args.repeats}), reached by a link from the runs page (best of {args.repeats})")
    print(f"{'page':<12}{'requests cold':>14}{'warm':>8}{'Chromium first':>16}{'returning':>11}"
          f"{'by link':>9}{'bytes':>12}")
    for page, (cold, warm, size, first, returning, followed) in results.items():
        print(f"{page:<12}{cold:>14.3f}{warm:>8.3f}{first:>16.3f}{returning:>11.3f}"
              f"{followed:>9.3f}{size:>12,}")
    peer = optuna_peer(run_dir, args.repeats)
    if peer is None:
        print("\noptuna-dashboard is not installed (pip install optuna-dashboard): no peer figure")
    else:
        cold, warm, size = peer
        ours_cold, ours_warm = results["run"][0], results["run"][1]
        print(f"\noptuna-dashboard, the same {len(results) and args.individuals + 40:,} points as "
              f"a 2-objective study: its study page's requests {cold:.3f} s cold, {warm:.3f} s "
              f"warm ({size:,} bytes)")
        print(f"ratio (optuna-dashboard / evoforge, a run's or study's page): cold "
              f"{cold / ours_cold:.1f}x, warm {warm / ours_warm:.1f}x")
    if args.keep is None:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
