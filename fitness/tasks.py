"""Task references: built-in names (`zoo/rev`, `nas/mnist1d`), lm-eval-harness tasks
(`lm-eval/<task>`, from the user's task YAMLs) or JSONL files."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from fitness.errors import TaskFormatError
from fitness.items import Task
from fitness.jsonl_tasks import load_jsonl_task


def load_task(reference: str, relative_to: Path | None = None,
              lm_eval_paths: Sequence[str | Path] = (), lm_eval_metric: str | None = None) -> Task:
    """The task a run config or CLI names; `lm-eval/<name>` is looked up in `lm_eval_paths`
    (folders of lm-eval task YAMLs, relative to `relative_to`), offline."""
    if reference.startswith("lm-eval/"):
        from fitness.lm_eval_tasks import load_lm_eval_task  # optional dependency: evoforge[lm-eval]

        folder = relative_to or Path.cwd()
        paths = [Path(p) if Path(p).is_absolute() else folder / p for p in lm_eval_paths]
        if not paths:
            raise TaskFormatError(f"task {reference!r}: an lm-eval task needs the folder of its "
                                  "YAML: set lm_eval.include_path in the run config")
        task = load_lm_eval_task(reference.removeprefix("lm-eval/"), paths, lm_eval_metric)
        return dataclasses.replace(task, name=reference)
    if reference.startswith("zoo/"):
        from search_spaces.merge_zoo import zoo_task

        try:
            return zoo_task(reference.removeprefix("zoo/"))
        except ValueError as error:
            raise TaskFormatError(str(error)) from None
    if reference == "nas/mnist1d":
        from search_spaces.nas_zoo import mnist1d_task

        return mnist1d_task()
    path = Path(reference).expanduser()
    if relative_to is not None and not path.is_absolute() and not path.exists():
        path = relative_to / path
    if path.suffix != ".jsonl":
        raise TaskFormatError(f"task {reference!r}: not a built-in task (zoo/<skill>, "
                              "nas/mnist1d) nor a .jsonl file")
    return load_jsonl_task(path)

