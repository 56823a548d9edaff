"""`evoforge fitness check [CONFIG]`: the reduced evaluation's cost and accuracy, measured on a run's
models and tasks (the built-in zoo by default)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from evolve.zoo_cli import _progress_bar, stage_reporter

fitness_app = typer.Typer(no_args_is_help=True, help="Reduced (IRT) fitness evaluation.")
console = Console(stderr=True)
TARGETS = {"cost_ratio": 20.0, "mae": 3.0, "rank": 0.9, "coverage": 0.9}


@fitness_app.command("check")
def check(
    config: Path | None = typer.Argument(None, help="a run config: its sources, tasks and merge "
                                         "methods (default: the built-in zoo)"),
    calibration: int = typer.Option(100, help="calibration candidates evaluated fully"),
    held_out: int = typer.Option(60, help="separate held-out candidates evaluated fully"),
    sizes: str = typer.Option("10,20,50,100", help="items per task of the reduced sets"),
    selections: str = typer.Option("random,stratified,anchor,informative"),
    dims: int = typer.Option(0, help="IRT dimensions (0: one per task)"),
    seed: int = typer.Option(0),
) -> None:
    """Fit IRT on calibration candidates, then score every estimator on held-out candidates."""
    from evolve.config import ConfigError, RunConfig, load_config
    from evolve.engine import prepare
    from evolve.fitness_check import (
        ZOO_CONFIG,
        evaluate_fully,
        populations,
        reduced_evaluation_table,
        sources_fingerprint,
    )
    from evolve.run_cli import _build_zoo_if_needed, _fail

    started = time.perf_counter()
    try:
        run_config = RunConfig.model_validate(ZOO_CONFIG) if config is None else \
            load_config(config, {"workers": 1, "backend": "local"})
    except ConfigError as error:
        _fail(error)
    base_dir = None if config is None else config.parent
    _build_zoo_if_needed(run_config)
    setup = prepare(run_config, base_dir)
    calibration_recipes, held_out_recipes = populations(setup.space, calibration, held_out, seed)
    fingerprint = sources_fingerprint(run_config, base_dir)
    with _progress_bar() as progress:
        report = stage_reporter(progress)
        calibration_set = evaluate_fully(calibration_recipes, setup, fingerprint, report,
                                         "calibration")
        held_out_set = evaluate_fully(held_out_recipes, setup, fingerprint, report, "held-out")
    setup.pool.close()
    dims = dims or len(setup.task_names)
    rows = reduced_evaluation_table(calibration_set, held_out_set, dims,
                                    [int(s) for s in sizes.split(",")], selections.split(","),
                                    seed)
    table = Table(title=f"reduced evaluation on {len(held_out_recipes)} held-out candidates "
                        f"({calibration} calibration, {dims}-D IRT); targets: cost >= 20x, "
                        "MAE <= 3, rank >= 0.9, coverage >= 90%")
    for column in ("selection", "items/task", "estimator", "cost ratio", "MAE (pts)",
                   "P95 (pts)", "coverage", "Spearman", "Kendall", "meets"):
        table.add_column(column, justify="left" if column in ("selection", "estimator") else
                         "right")
    for row in rows:
        meets = (row.cost_ratio >= TARGETS["cost_ratio"] and row.mae <= TARGETS["mae"]
                 and row.spearman >= TARGETS["rank"] and row.coverage >= TARGETS["coverage"])
        table.add_row(row.selection, str(row.per_task), row.estimator, f"{row.cost_ratio:.0f}x",
                      f"{row.mae:.2f}", f"{row.p95:.2f}", f"{row.coverage:.0%}",
                      f"{row.spearman:.3f}", f"{row.kendall:.3f}", "yes" if meets else "")
    Console(width=max(Console().width, 150)).print(table)
    console.print(f"fitness check took {time.perf_counter() - started:.0f} s (answers already "
                  "cached are not evaluated again)")
