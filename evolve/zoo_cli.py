"""`evoforge zoo build | show`: the built-in zoo on the command line."""

from __future__ import annotations

import time

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

zoo_app = typer.Typer(no_args_is_help=True, help="The built-in zoo: build it, show its landscape.")
console = Console(stderr=True)


def _progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console)


def stage_reporter(progress: Progress):
    """A (stage, done, total) callback that shows one bar per stage on `progress`."""
    bars: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = progress.add_task(stage, total=total)
        progress.update(bars[stage], completed=done, total=total)
    return report


def build_with_progress(which: str = "merge"):
    """Build (or reuse) a zoo, showing one progress bar per stage; returns it."""
    from search_spaces.merge_zoo import build_zoo
    from search_spaces.nas_zoo import build_nas_zoo

    with _progress_bar() as progress:
        report = stage_reporter(progress)
        return build_zoo(progress=report) if which == "merge" else build_nas_zoo(progress=report)


@zoo_app.command("build")
def build() -> None:
    """Build the merge zoo (tiny Llama base + skill experts) and the MNIST-1D NAS zoo."""
    from evolve.zoo_landscape import compute_landscape

    started = time.perf_counter()
    zoo = build_with_progress("merge")
    with _progress_bar() as progress:
        bar = progress.add_task("scoring the landscape")
        compute_landscape(zoo, progress=lambda _s, done, total: progress.update(
            bar, completed=done, total=total))
    build_with_progress("nas")
    console.print(f"zoo ready in {time.perf_counter() - started:.0f}s under {zoo.folder.parent}; "
                  "`evoforge zoo show` prints its landscape")


@zoo_app.command("show")
def show() -> None:
    """Print the merge zoo's landscape table and the NAS zoo's reference models."""
    from evolve.zoo_landscape import check_landscape, compute_landscape
    from search_spaces.merge_zoo import build_zoo, is_built
    from search_spaces.nas_zoo import build_nas_zoo, is_nas_built

    if not is_built() or not is_nas_built():
        console.print("the zoo is not built yet: building it now (`evoforge zoo build`)")
    zoo = build_with_progress("merge") if not is_built() else build_zoo()
    landscape = compute_landscape(zoo)
    out = Console()
    out.print(landscape_table(landscape))
    problems = check_landscape(landscape)
    out.print("landscape checks: " + ("all met" if not problems else "; ".join(problems)))
    nas = build_with_progress("nas") if not is_nas_built() else build_nas_zoo()
    out.print(nas_table(nas))


def landscape_table(landscape) -> Table:
    table = Table(title=f"merge zoo: test-split accuracy (%), {landscape.items_per_task} items "
                        "per skill")
    table.add_column("model")
    table.add_column("kind")
    for skill in landscape.skills:
        table.add_column(skill, justify="right")
    table.add_column("average", justify="right", style="bold")
    for model, row in landscape.rows.items():
        table.add_row(model, landscape.kinds[model], *(f"{row[s] * 100:.1f}" for s in
                                                       landscape.skills),
                      f"{landscape.average(model) * 100:.1f}")
    return table


def nas_table(nas) -> Table:
    table = Table(title="NAS zoo: MNIST-1D reference models (test accuracy)")
    for column in ("model", "parameters", "accuracy (%)", "published (%)"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, entry in nas.models.items():
        table.add_row(name, f"{entry.parameters:,}", f"{entry.accuracy * 100:.1f}",
                      f"{entry.published * 100:.0f}")
    return table
