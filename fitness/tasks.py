"""Task references: built-in names (`zoo/rev`, `nas/mnist1d`) or JSONL files."""

from __future__ import annotations

from pathlib import Path

from fitness.errors import TaskFormatError
from fitness.items import Task
from fitness.jsonl_tasks import load_jsonl_task


def load_task(reference: str, relative_to: Path | None = None) -> Task:
    """The task a run config or CLI names."""
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

