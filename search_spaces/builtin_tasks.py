"""The built-in tasks a run config can name, by prefix: `zoo/<skill>` and `nas/mnist1d`.

`fitness.tasks.load_task` knows JSONL files and lm-eval-harness tasks itself; built-in names are
looked up in the table the composition root gives it (and gives every worker spec), so the
fitness layer never imports the search spaces that define these tasks. The loaders are
module-level functions, so a spec that carries the table pickles to Ray actors by reference.
"""

from __future__ import annotations

from fitness.errors import TaskFormatError
from fitness.items import Task
from search_spaces.merge_zoo import zoo_task
from search_spaces.nas_zoo import mnist1d_task


def _zoo(name: str) -> Task:
    try:
        return zoo_task(name)
    except ValueError as error:
        raise TaskFormatError(str(error)) from None


def _nas(name: str) -> Task:
    if name != "mnist1d":
        raise TaskFormatError(f"unknown NAS task nas/{name}; the NAS zoo's task: nas/mnist1d")
    return mnist1d_task()


BUILTIN_TASKS = (("zoo/", _zoo), ("nas/", _nas))
