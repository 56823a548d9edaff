"""Task references: lm-eval-harness tasks (`lm-eval/<task>`, from the user's task YAMLs), JSONL
files, or built-in names (`zoo/rev`, `nas/mnist1d`) from the table the caller passes
(`search_spaces.builtin_tasks`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from fitness.errors import TaskFormatError
from fitness.items import Task
from fitness.jsonl_tasks import load_jsonl_task

Builtin = Sequence[tuple[str, Callable[[str], Task]]]  # (prefix, loader of the name after it)


def load_task(reference: str, relative_to: Path | None = None,
              lm_eval_paths: Sequence[str | Path] = (), lm_eval_metric: str | None = None,
              builtin: Builtin = ()) -> Task:
    """The task a run config or CLI names; `lm-eval/<name>` is looked up in `lm_eval_paths`
    (folders of lm-eval task YAMLs, relative to `relative_to`), offline; a name with a prefix of
    `builtin` by its loader."""
    if reference.startswith("lm-eval/"):
        from fitness.lm_eval_tasks import load_lm_eval_task  # optional dependency: evoforge[lm-eval]

        folder = relative_to or Path.cwd()
        paths = [Path(p) if Path(p).is_absolute() else folder / p for p in lm_eval_paths]
        if not paths:
            raise TaskFormatError(f"task {reference!r}: an lm-eval task needs the folder of its "
                                  "YAML: set lm_eval.include_path in the run config")
        task = load_lm_eval_task(reference.removeprefix("lm-eval/"), paths, lm_eval_metric)
        return dataclasses.replace(task, name=reference)
    for prefix, loader in builtin:
        if reference.startswith(prefix):
            return loader(reference.removeprefix(prefix))
    path = Path(reference).expanduser()
    if relative_to is not None and not path.is_absolute() and not path.exists():
        path = relative_to / path
    if path.suffix != ".jsonl":
        known = ", ".join(f"{prefix}…" for prefix, _ in builtin)
        raise TaskFormatError(f"task {reference!r}: not a .jsonl file, an lm-eval/… task"
                              + (f" nor a built-in task ({known})" if known else ""))
    return load_jsonl_task(path)

