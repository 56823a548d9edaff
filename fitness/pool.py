"""Workers behind one interface: jobs go out as recipes and item ids, answers and sizes come back.

`submit(job) -> Future`, then `completed(futures)` yields them as they finish, in the caller's
thread: the driver commits each answer batch to the run store before it waits for the next. The
local backend runs one job at a time, in submission order, inside `completed` (so a crash loses
at most the job it was running); the Ray backend (`fitness.ray_pool`) runs them on all actors at
once. Either way a job's result is the same bits: a recipe materializes identically everywhere.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch

from fitness.results import ItemResults
from fitness.size import Size


@dataclass(frozen=True)
class Job:
    """One candidate's work: answers to pool items (and its size), or its test-split results."""

    candidate_id: str
    recipe: dict
    items: tuple[int, ...] = ()
    test: bool = False
    stage: str = ""  # what the items are asked for (calibration, reduced, …): the run's cost


@dataclass(frozen=True)
class Answers:
    candidate_id: str
    items: tuple[int, ...]
    values: tuple[float, ...]  # 0/1 per item
    size: Size


def run_job(worker, job: Job) -> Answers | list[ItemResults]:
    """What every backend executes for a job, on its own worker."""
    if job.test:
        return worker.test_results(job.candidate_id, job.recipe)
    values = worker.answers(job.candidate_id, job.recipe, torch.tensor(job.items, dtype=torch.long))
    return Answers(job.candidate_id, job.items, tuple(values.tolist()),
                   worker.size(job.candidate_id, job.recipe))


class Pool(Protocol):
    workers: int

    def submit(self, job: Job) -> Future: ...

    def completed(self, futures: Iterable[Future]) -> Iterator[Future]: ...

    def retain(self, recipes: Sequence[dict]) -> None: ...

    def activity(self) -> list[str | None]: ...

    def busy_seconds(self) -> list[float]: ...

    def close(self) -> None: ...


class LocalPool:
    """The in-process backend: one worker, its jobs run when their results are consumed."""

    workers = 1

    def __init__(self, worker):
        self.worker = worker
        self._pending: dict[Future, Job] = {}
        self._running: str | None = None
        self._busy = 0.0

    def submit(self, job: Job) -> Future:
        future: Future = Future()
        self._pending[future] = job
        return future

    def _run(self, future: Future) -> None:
        job = self._pending.pop(future)
        self._running, started = job.candidate_id, time.perf_counter()
        try:
            future.set_result(run_job(self.worker, job))
        except Exception as error:  # re-raised by future.result(), in the consumer
            future.set_exception(error)
        finally:
            self._running = None
            self._busy += time.perf_counter() - started

    def completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        for future in list(futures):
            if future in self._pending:
                self._run(future)
            yield future

    def retain(self, recipes: Sequence[dict]) -> None:
        self.worker.retain(recipes)

    def activity(self) -> list[str | None]:
        """The candidate each worker is busy with (None: idle)."""
        return [self._running]

    def busy_seconds(self) -> list[float]:
        """Seconds each worker has spent on jobs."""
        return [self._busy]

    def close(self) -> None:
        self._pending.clear()


class PoolWrapper:
    """A pool in front of another (journal, timing): what a subclass does not override goes
    straight to `pool`."""

    def __init__(self, pool: Pool):
        self.pool, self.workers = pool, pool.workers

    def submit(self, job: Job) -> Future:
        return self.pool.submit(job)

    def completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        return self.pool.completed(futures)

    def retain(self, recipes: Sequence[dict]) -> None:
        self.pool.retain(recipes)

    def activity(self) -> list[str | None]:
        return self.pool.activity()

    def busy_seconds(self) -> list[float]:
        return self.pool.busy_seconds()

    def close(self) -> None:
        self.pool.close()
