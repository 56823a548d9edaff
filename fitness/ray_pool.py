"""The Ray backend: one actor per GPU (or CPU actors), all busy at once, faults contained.

Each actor builds its own worker from a `WorkerSpec` (it maps the sources onto its device once and
keeps one resident model); only jobs (recipe + item ids) go to it and only answers and sizes come
back. The driver keeps every actor busy: `submit` queues a job, `completed` hands it to the next
idle actor (preferring the one whose resident model already holds the candidate) and yields
results in the order they finish, in the driver's thread, so the driver is the only writer of the
run store.

Faults:
- an actor that dies (OOM-killed, preempted, `ray.kill`) is replaced, and its job goes back to
  the queue, up to `retries` more times; a candidate that kills that many workers fails with
  `WorkerDied` (the run goes on). A result is consumed once: a retried job that had finished
  on the dead actor was never received, so nothing is counted twice;
- a job over `timeout` seconds has its actor killed and replaced, and the candidate fails with
  `CandidateTimeout`;
- an exception inside a job reaches the caller as itself, the worker's traceback in a note:
  candidate errors mark the candidate failed, anything else stops the run with the traceback.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import ray
import torch

from fitness.errors import CandidateTimeout, FitnessError, WorkerDied
from fitness.pool import Job, run_job
from fitness.worker_spec import WorkerSpec

_POLL_SECONDS = 1.0  # how often a wait wakes up to check the jobs' time budgets
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its remote tracebacks


class _WorkerActor:
    """The process behind one Ray actor: a local worker on the actor's device."""

    def __init__(self, spec: WorkerSpec, threads: int):
        torch.set_num_threads(max(1, threads))
        device = spec.device if spec.device.startswith("cuda") and ray.get_gpu_ids() else "cpu"
        self.worker = spec.build(device)

    def visible_devices(self) -> str | None:
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    def pid(self) -> int:
        return os.getpid()

    def retain(self, recipes: list[dict]) -> None:
        self.worker.retain(recipes)

    def run(self, job: Job):
        return run_job(self.worker, job)


def _cause(error: Exception) -> str:
    """The worker's own error line out of Ray's report of an actor that died starting (its last
    line, 'fitness.worker.MemoryBudgetError: ...')."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _check_resources(workers: int, gpus: float, cpus: float) -> None:
    """Refuse a pool the cluster cannot hold: its actors would wait for resources forever."""
    have = ray.cluster_resources()
    for kind, each in (("GPU", gpus), ("CPU", cpus)):
        if workers * each > have.get(kind, 0):
            raise FitnessError(
                f"workers: {workers} x {each:g} {kind}s each needs {workers * each:g} {kind}s, "
                f"but the Ray cluster has {have.get(kind, 0):g}; lower `workers`, "
                f"`ray.{kind.lower()}s_per_worker`, or join a larger cluster (--ray-address)")


@dataclass
class _Running:
    future: Future
    job: Job
    worker: int
    started: float
    attempts: int


class RayPool:
    """`workers` actors of `gpus_per_worker` GPUs (0: CPU actors) and `cpus_per_worker` CPUs."""

    def __init__(self, spec: WorkerSpec, workers: int, *, gpus_per_worker: float = 0,
                 cpus_per_worker: float = 1, address: str | None = None,
                 timeout: float | None = None, retries: int = 2,
                 on_event: Callable[[str, str], None] | None = None):
        started = time.perf_counter()
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, logging_level="warning",
                     configure_logging=False)
        self.spec, self.workers, self.timeout, self.retries = spec, workers, timeout, retries
        self.on_event = on_event or (lambda kind, detail: None)
        self._options = {"num_gpus": gpus_per_worker, "num_cpus": cpus_per_worker,
                         "max_restarts": 0, "max_task_retries": 0}
        self._threads = max(1, int(cpus_per_worker))
        _check_resources(workers, gpus_per_worker, cpus_per_worker)
        self._actors = [self._start() for _ in range(workers)]
        try:
            ray.get([actor.pid.remote() for actor in self._actors])  # built (or the error, now)
        except ray.exceptions.RayActorError as error:
            self.close()
            raise FitnessError(f"a Ray worker could not start: {_cause(error)}") from None
        self.startup_seconds = time.perf_counter() - started
        self._queue: deque[tuple[Future, Job, int]] = deque()
        self._running: dict[ray.ObjectRef, _Running] = {}
        self._starting: dict[ray.ObjectRef, int] = {}  # replacement actors still building
        self._busy: list[str | None] = [None] * workers
        self._busy_seconds = [0.0] * workers
        self._last: dict[str, int] = {}  # candidate -> the actor that last materialized it
        self._retained: list[dict] = []

    def _start(self):
        return ray.remote(_WorkerActor).options(**self._options).remote(self.spec, self._threads)

    # -- the interface ------------------------------------------------------------------------

    def submit(self, job: Job) -> Future:
        future: Future = Future()
        self._queue.append((future, job, 0))
        return future

    def completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        waiting = list(futures)
        while waiting:
            done = [f for f in waiting if f.done()]
            for future in done:
                waiting.remove(future)
                yield future
            if not waiting:
                return
            self._dispatch()
            if not self._running and not self._starting:
                raise RuntimeError("waiting for results of jobs that were never submitted")
            ready, _ = ray.wait([*self._running, *self._starting], num_returns=1,
                                timeout=_POLL_SECONDS)
            for ref in ready:
                if ref in self._starting:
                    self._started(ref)
                else:
                    self._finish(ref)
            self._expire()

    def retain(self, recipes: Sequence[dict]) -> None:
        """Sent without waiting: an actor runs its calls in the order they were sent, so its next
        job sees the new population, and a busy actor does not hold the driver up (steady-state
        mode retains after every child). An actor that died meanwhile fails its next job."""
        self._retained = list(recipes)
        for actor in self._actors:
            actor.retain.remote(self._retained)

    def activity(self) -> list[str | None]:
        """The candidate each actor is busy with (None: idle)."""
        return list(self._busy)

    def busy_seconds(self) -> list[float]:
        """Seconds each actor has spent on jobs (dispatch to result, as the driver sees it)."""
        return list(self._busy_seconds)

    def visible_devices(self) -> list[str | None]:
        return ray.get([actor.visible_devices.remote() for actor in self._actors])

    def pids(self) -> list[int]:
        return ray.get([actor.pid.remote() for actor in self._actors])

    def close(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []

    # -- scheduling ---------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while self._queue and None in self._busy:
            future, job, attempts = self._queue.popleft()
            if future.done():
                continue
            idle = [i for i, busy in enumerate(self._busy) if busy is None]
            last = self._last.get(job.candidate_id)
            index = last if last in idle else idle[0]
            ref = self._actors[index].run.remote(job)
            self._running[ref] = _Running(future, job, index, time.perf_counter(), attempts)
            self._busy[index] = job.candidate_id
            self._last[job.candidate_id] = index

    def _finish(self, ref: ray.ObjectRef) -> None:
        run = self._running.pop(ref)
        self._busy[run.worker] = None
        self._busy_seconds[run.worker] += time.perf_counter() - run.started
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as error:
            self._replace(run.worker, f"worker {run.worker} died running {run.job.candidate_id}")
            if run.attempts < self.retries:
                self.on_event("retry", f"{run.job.candidate_id}: attempt {run.attempts + 2}")
                self._queue.appendleft((run.future, run.job, run.attempts + 1))
            else:
                run.future.set_exception(WorkerDied(
                    f"candidate {run.job.candidate_id}: its worker died {run.attempts + 1} times "
                    f"({type(error).__name__}); it is likely too large for a worker's memory"))
            return
        except ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, Exception):  # the worker's own exception, with its traceback
                cause.add_note(f"raised in Ray worker {run.worker}: "
                               + _ANSI.sub("", str(error)))
            run.future.set_exception(cause if isinstance(cause, Exception) else error)
            return
        run.future.set_result(result)

    def _expire(self) -> None:
        if self.timeout is None:
            return
        now = time.perf_counter()
        for ref, run in list(self._running.items()):
            if now - run.started <= self.timeout:
                continue
            del self._running[ref]
            self._busy[run.worker] = None
            self._busy_seconds[run.worker] += now - run.started
            self._replace(run.worker, f"{run.job.candidate_id} ran past {self.timeout:g} s")
            run.future.set_exception(CandidateTimeout(
                f"candidate {run.job.candidate_id}: not finished after {self.timeout:g} s "
                "(candidate_timeout); its worker was restarted"))

    def _replace(self, index: int, why: str) -> None:
        """A new actor in place of actor `index`; it takes jobs once its worker is built (so
        the build does not count against a job's time budget)."""
        ray.kill(self._actors[index])
        self._actors[index] = self._start()
        self._last = {c: w for c, w in self._last.items() if w != index}
        if self._retained:
            self._actors[index].retain.remote(self._retained)
        self._starting[self._actors[index].pid.remote()] = index
        self._busy[index] = "(starting)"
        self.on_event("worker-restarted", why)

    def _started(self, ref: ray.ObjectRef) -> None:
        index = self._starting.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayError as error:
            raise FitnessError(f"a replacement for Ray worker {index} failed to start: "
                               f"{_cause(error)}") from None
        self._busy[index] = None
