"""`evoforge eval`: score one model folder on tasks, per item, from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def eval_command(
    model: str = typer.Argument(..., help="model folder (Hugging Face causal LM) or zoo/<name>"),
    task: list[str] = typer.Option(..., "--task", "-t", help="zoo/<skill> or a .jsonl file; "
                                   "repeat for several"),
    split: str = typer.Option("search", help="search or test"),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N (bf16 on GPUs)"),
    batch_size: int = typer.Option(256, help="sequences per forward pass"),
    out: Path | None = typer.Option(None, help="write per-item results here (JSONL)"),
) -> None:
    """Evaluate MODEL on each task's split and print accuracies; --out keeps every item."""
    from fitness.causal_lm import CausalLMEvaluator
    from fitness.errors import FitnessError
    from fitness.tasks import load_task
    from operators.errors import MergeError
    from search_spaces.builtin_tasks import BUILTIN_TASKS
    from search_spaces.models import resolve_model

    try:
        folder = resolve_model(model)
        tasks = [load_task(reference, builtin=BUILTIN_TASKS) for reference in task]
        evaluator = CausalLMEvaluator.from_folder(folder, device=device, batch_size=batch_size)
        results = [evaluator.evaluate(t.name, t.split(split)) for t in tasks]
    except (FitnessError, MergeError, ValueError) as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(code=2) from None
    table = Table(title=f"{model} on the {split} split")
    for column in ("task", "items", "accuracy (%)"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for result in results:
        table.add_row(result.task, str(len(result)), f"{result.accuracy * 100:.1f}")
    Console().print(table)
    if out is not None:
        with out.open("w") as sink:
            for result in results:
                for index in range(len(result)):
                    sink.write(json.dumps({"task": result.task, "item": index,
                                           "correct": result.correct[index],
                                           "score": result.score[index],
                                           "prediction": result.prediction[index]}) + "\n")
        console.print(f"per-item results -> {out}")
