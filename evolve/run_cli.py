"""`evoforge run | resume | status | front | runs | export`: the evolution on the command line.

Exit codes: 0 done; 1 an unexpected error (a bug: its traceback is printed, the run is marked
failed and `evoforge resume` continues it); 2 an error in the input (config, sources, tasks, run
directory), said in one message; 130 interrupted (Ctrl-C). `front` exits 1 when the run has no
finished generation yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from evolve.zoo_cli import _progress_bar, stage_reporter

console = Console(stderr=True)
RUNS = Path("runs")


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(code=2)


def _run_dir(run: str) -> Path:
    for candidate in (Path(run), RUNS / run):
        if (candidate / "run.db").is_file():
            return candidate
    raise typer.BadParameter(f"no run at {run!r} (a run directory or an id under {RUNS}/)")


def _execute(run_dir: Path) -> None:
    from evolve.config import ConfigError, load_config
    from evolve.engine import Evolution, prepare
    from evolve.run_report import cost_line, summary
    from evolve.store import RunStore, StoreError
    from fitness.errors import FitnessError
    from operators.errors import MergeError

    try:
        store = RunStore(run_dir)
        changes = store.begin(environment(), _file_hash(run_dir / "config.yaml"))
    except StoreError as error:  # (a run another driver holds is not ours to mark failed)
        _fail(error)
    if changes:
        console.print("resuming after changes: " + "; ".join(changes))
    setup = None
    try:
        config = load_config(run_dir / "config.yaml", saved_run=True)
        _build_zoo_if_needed(config)
        store.set_meta("driver", {"pid": os.getpid(), "host": socket.gethostname()})
        setup = prepare(config, run_dir, on_event=store.event)
        startup = getattr(setup.pool, "startup_seconds", None)
        if startup is not None:
            console.print(f"Ray: {setup.pool.workers} workers started in {startup:.1f} s (before "
                          "the run's clock starts)")
        with _progress_bar() as progress:
            evolution = Evolution(config, setup, store, stage_reporter(progress),
                                  _worker_reporter(progress))
            evolution.run()
    except KeyboardInterrupt:
        _stopped(store, "interrupted", "stopped by Ctrl-C")
        console.print(f"stopped; every finished evaluation is saved. Continue with "
                      f"`evoforge resume {run_dir}`")
        raise typer.Exit(code=130) from None
    except (ConfigError, StoreError, FitnessError, MergeError) as error:
        _stopped(store, "failed", f"{type(error).__name__}: {error}")
        _fail(error)
    except Exception as error:  # a bug: marked, then its traceback
        _stopped(store, "failed", f"{type(error).__name__}: {error}")
        console.print(f"the run stopped on an unexpected error (below); every finished "
                      f"evaluation is saved, and `evoforge resume {run_dir}` continues it")
        raise
    finally:
        _close(setup)
        store.close()  # releases the driver lock
    timings = evolution.timings
    work = "merging + evaluating" if config.search_space == "merge" else \
        "training + evaluating in the sandbox"
    console.print(f"run finished in {timings.wall:.0f}s: worker ({work}) "
                  f"{timings.worker:.0f}s, IRT statistics {timings.fitness - timings.worker:.0f}s,"
                  f" engine {timings.engine:.1f}s ({timings.engine / timings.wall:.1%} of the run)")
    console.print(cost_line(summary(run_dir)))
    _print_front(run_dir)


def _worker_reporter(progress):
    """A line that shows how many workers are busy and with which candidates."""
    bar = None

    def report(activity: list[str | None]) -> None:
        nonlocal bar
        busy = [f"{w}:{c}" for w, c in enumerate(activity) if c is not None]
        text = "workers  " + (" ".join(busy) if busy else "idle")
        if bar is None:
            bar = progress.add_task(text, total=len(activity))
        progress.update(bar, description=text, completed=len(busy), total=len(activity))
    return report


def environment() -> dict[str, str]:
    """The versions that can change what a run computes: Python, evoforge and its key
    dependencies (recorded in the run store; a resume says which changed)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("evoforge", "torch", "transformers", "safetensors", "mergekit", "ray",
                    "optuna", "pymoo", "nevergrad", "lm_eval"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    return found


def _file_hash(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return "unreadable"


def _stopped(store, status: str, reason: str) -> None:
    """Mark the run as stopped with its reason (best effort: the store may be what failed)."""
    if store is None:
        return
    from evolve.store import StoreError

    try:
        store.set_meta("status", status)
        store.set_meta("error", reason)
        store.event(status, reason)
    except StoreError:
        pass


def _close(setup) -> None:
    if setup is not None:
        setup.pool.close()


def _build_zoo_if_needed(config) -> None:
    """Build the zoo with progress bars first, rather than silently inside model resolution."""
    from evolve.zoo_cli import build_with_progress
    from search_spaces.merge_zoo import is_built

    if config.sources is None:  # a code search: nothing to build
        return
    names = [config.sources.base, *config.sources.experts, *config.tasks]
    if any(str(name).startswith("zoo/") for name in names) and not is_built():
        console.print("building the built-in zoo first (once, about 2 minutes on 2 cores)")
        build_with_progress("merge")


def run(
    config: Path = typer.Argument(..., help="run config (YAML); see examples/zoo.yaml"),
    run_dir: Path | None = typer.Option(None, help="where the run is stored (default "
                                        "runs/<config>-<time>)"),
    generations: int | None = typer.Option(None, help="override the config's generations"),
    seed: int | None = typer.Option(None, help="override the config's seed"),
    workers: int | None = typer.Option(None, help="evaluation workers (more than one: Ray)"),
    backend: str | None = typer.Option(None, help="local or ray (default: ray for more than "
                                       "one worker)"),
    ray_address: str | None = typer.Option(None, help="join this Ray cluster ('auto', "
                                           "'ray://host:10001') instead of starting one"),
    mode: str | None = typer.Option(None, help="generational or steady-state (a child bred as "
                                    "soon as a worker frees up)"),
) -> None:
    """Start an evolution run and print its Pareto front."""
    import yaml

    from evolve.config import ConfigError, load_config

    try:
        validated = load_config(config, {"generations": generations, "seed": seed,
                                         "workers": workers, "backend": backend, "mode": mode},
                                {"address": ray_address})
    except ConfigError as error:
        _fail(error)
    run_dir = run_dir or RUNS / f"{config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (run_dir / "run.db").exists():
        _fail(FileExistsError(f"{run_dir} already holds a run; `evoforge resume {run_dir}` "
                              "continues it, or choose another --run-dir"))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        data = _as_saved(validated, config.parent)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    except OSError as error:
        _fail(OSError(f"cannot write the run directory {run_dir}: {error.strerror}; choose a "
                      "writable --run-dir with free space"))
    console.print(f"run directory: {run_dir}")
    _execute(run_dir)


def _as_saved(config, folder: Path) -> dict:
    """The run's config.yaml: every setting spelled out (defaults too, so a later evoforge with
    other defaults resumes the same run), local paths made absolute, and only the keys the run's
    search space reads."""
    if config.search_space != "merge":
        data = config.model_dump(exclude={"sources", "dtype", "memory_budget", "lm_eval", "ray",
                                          "candidate_timeout"})
        data["operators"] = {"crossover": data["operators"]["crossover"]}
    else:
        data = config.model_dump(exclude={"code"})
        data["sources"] = {k: _absolute(v, folder) for k, v in data["sources"].items()}
        data["lm_eval"]["include_path"] = [_absolute(p, folder)
                                           for p in data["lm_eval"]["include_path"]]
    data.pop("generations" if data["evaluations"] is not None else "evaluations")
    data["tasks"] = [_absolute(t, folder) for t in data["tasks"]]
    return data


def _absolute(value, relative_to: Path):
    """Local paths in a config are relative to the config file; built-in names stay as they are."""
    if isinstance(value, list):
        return [_absolute(v, relative_to) for v in value]
    if value.startswith(("zoo/", "tiny/", "nas/", "lm-eval/")):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (relative_to / path).resolve())


def resume(run: str = typer.Argument(..., help="run directory or run id")) -> None:
    """Continue a stopped or killed run; finished evaluations are reused, not redone."""
    _execute(_run_dir(run))


def _json(data) -> None:
    from evolve.run_report import SCHEMA

    print(json.dumps(data | {"schema": SCHEMA}, indent=2))


def status(run: str = typer.Argument(..., help="run directory or run id"),
           as_json: bool = typer.Option(False, "--json", help="print JSON (schema: README)")
           ) -> None:
    """Progress of a run: generations, evaluations, hypervolume."""
    from evolve.run_report import cost_line, summary

    data = summary(_run_dir(run))
    if as_json:
        _json(data)
        return
    out = Console()
    done, planned = data["generations"]["done"], data["generations"]["planned"]
    out.print(f"{data['path']}: {data['state']}, generation {done}/{planned}, "
              f"{data['individuals']} individuals, {data['results']} results")
    for entry in data["hypervolume"]:
        out.print(f"  generation {entry['generation']:3d}: front of {entry['front']}, "
                  f"hypervolume {entry['hypervolume']:.4f}")
    if data["final"] is not None:
        out.print(f"  final (fully evaluated): front of {len(data['final']['front'])}, "
                  f"hypervolume {data['final']['hypervolume']:.4f}")
    out.print(cost_line(data))


def front(run: str = typer.Argument(..., help="run directory or run id"),
          as_json: bool = typer.Option(False, "--json", help="print JSON (schema: README)")
          ) -> None:
    """The run's Pareto front: scores ± stderr, size, lineage."""
    _print_front(_run_dir(run), as_json)


def _print_front(run_dir: Path, as_json: bool = False) -> None:
    from evolve.run_report import front as front_report
    from evolve.run_report import run_state
    from evolve.store import RunStore

    data = front_report(run_dir)
    if data is None:
        console.print(f"no generation of {run_dir.name} has finished yet "
                      f"({run_state(RunStore.reader(run_dir))})")
        raise typer.Exit(code=1)
    if as_json:
        _json(data)
        return
    title = ("final front, fully evaluated" if data["final"] else
             f"front after generation {data['generation']} of {data['planned']}, "
             f"{data['state']}")
    table = Table(title=f"Pareto front of {run_dir.name} ({title})")
    for column in ("individual", "search acc. (%)", "test acc. (%)", "params", "operator",
                   "lineage"):
        table.add_column(column)
    for member in data["members"]:
        objectives, test = member["objectives"], member["test"] or {}
        accuracy, stderr = objectives.get("accuracy", (float("nan"), 0.0))
        table.add_row(
            member["id"], f"{accuracy * 100:.1f} ± {stderr * 100:.1f}",
            f"{test['accuracy'][0] * 100:.1f} ± {test['accuracy'][1] * 100:.1f}" if test else "–",
            f"{objectives.get('params', (0, 0))[0]:,.0f}", member["operator"] or "",
            " + ".join(member["parents"]) or "–")
    Console().print(table)


def runs(as_json: bool = typer.Option(False, "--json", help="print JSON (schema: README)")
         ) -> None:
    """List the runs under runs/."""
    from evolve.run_report import summary

    found = [summary(folder.parent) for folder in sorted(RUNS.glob("*/run.db"))]
    if as_json:
        _json({"runs": found})
        return
    table = Table(title="runs")
    for column in ("run", "status", "generations", "individuals"):
        table.add_column(column)
    for data in found:
        table.add_row(data["run"], data["state"],
                      f"{data['generations']['done']}/{data['generations']['planned']}",
                      str(data["individuals"]))
    Console().print(table)


def export(
    run: str = typer.Argument(..., help="run directory or run id"),
    individual: str = typer.Argument(..., help="individual id (see `evoforge front`)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    max_shard_gb: float = typer.Option(5.0, help="largest safetensors shard, in GiB (a larger "
                                       "model is split, with model.safetensors.index.json)"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out folder"),
) -> None:
    """Write an individual as a Hugging Face checkpoint with its recipe and model card."""
    from evolve.code_export import export_code_individual
    from evolve.config import load_config
    from evolve.engine import worker_spec
    from evolve.export import staged_output
    from evolve.recipe_export import export_individual
    from evolve.store import RunStore
    from fitness.errors import FitnessError
    from operators.errors import MergeError

    run_dir = _run_dir(run)
    store = RunStore.reader(run_dir)
    record = store.individual(individual)
    if record is None:
        _fail(KeyError(f"no individual {individual!r} in {run_dir}; `evoforge front "
                       f"{run}` lists the front's ids"))
    config = load_config(run_dir / "config.yaml", saved_run=True)
    objectives = (store.evaluation(individual) or {}).get("objectives", {})
    try:
        if config.search_space != "merge":
            answers = [r for r in store.results() if r.candidate == individual and r.error is None]
            with staged_output(out, force) as staging:
                export_code_individual(record, config, staging, answers,
                                       store.report(individual), objectives)
        else:
            sources = worker_spec(config, run_dir).sources()
            with staged_output(out, force) as staging:
                export_individual(record, sources, config, staging, store.report(individual),
                                  objectives, max_shard_bytes=int(max_shard_gb * 2**30))
    except (MergeError, FitnessError) as error:
        _fail(error)
    console.print(f"exported {individual} -> {out}")
