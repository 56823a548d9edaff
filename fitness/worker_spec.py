"""How to build a worker, as plain data: what the driver sends to each Ray actor.

A worker's weights never travel: every process that evaluates builds its own worker from this
spec (paths of the checkpoints, task references, dtype, budget), mapping the sources itself onto
its own device. The spec pickles in a few hundred bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fitness.items import Task
from fitness.tasks import Builtin, load_task
from fitness.worker import LocalWorker, RunSources


@dataclass(frozen=True)
class WorkerSpec:
    folders: tuple[tuple[str, str], ...]  # (source name, checkpoint folder), base included
    base: str
    tasks: tuple[str, ...]  # task references, as the run config names them
    task_root: str | None = None  # where relative task paths are looked up
    lm_eval_paths: tuple[str, ...] = ()
    lm_eval_metric: str | None = None
    device: str = "cpu"
    dtype: str | None = None  # "bfloat16", ...; None: the sources'
    memory_budget: int | None = None
    builtin_tasks: Builtin = ()  # (prefix, loader) of built-in task names
    batch_size: int = 256  # items per evaluation batch (bounded by a token budget too)

    def load_tasks(self) -> list[Task]:
        root = Path(self.task_root) if self.task_root else None
        return [load_task(t, root, self.lm_eval_paths, self.lm_eval_metric, self.builtin_tasks)
                for t in self.tasks]

    def sources(self, device: str | None = None) -> RunSources:
        """The run's sources on `device` (default: the spec's): what the driver and export need."""
        from transformers import AutoConfig, AutoTokenizer

        folders = {name: Path(folder) for name, folder in self.folders}
        model_config = AutoConfig.from_pretrained(folders[self.base], local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folders[self.base], local_files_only=True)
        return RunSources(folders, self.base, model_config, tokenizer, device or self.device,
                          getattr(torch, self.dtype) if self.dtype else None)

    def build(self, device: str | None = None, tasks: list[Task] | None = None) -> LocalWorker:
        """A worker on `device` (default: the spec's); `tasks` if already loaded."""
        return LocalWorker(tasks if tasks is not None else self.load_tasks(),
                           self.sources(device), memory_budget=self.memory_budget,
                           batch_size=self.batch_size)
