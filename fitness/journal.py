"""The run's journal: every consumed job result recorded in order, and served again on resume.

A run's driver is deterministic given the order in which job results reach it. In generational
mode that order does not matter (each stage waits for all its jobs); in steady-state mode it does:
a child is bred from the population as it is when a worker frees up. So `JournalPool` wraps the
live pool: the fitness tells it of each result it consumes (`journal`: answers and size, or the
reason the candidate failed), and it records that in the run store, in consumption order. A
failure that stops the run is not recorded, so a resume after the fix evaluates it anew. On resume
it starts with the recorded results:

- a submitted job that the journal holds (same candidate, same items) is not run: its future is
  answered from the journal, and only when every result recorded before it has been served;
- anything else goes to the live pool, whose results are consumed once the journal is exhausted.

The driver therefore retraces the interrupted run exactly (same children, same survivors, same
decisions) and then goes on live; nothing finished is evaluated again, nothing is counted twice.
A journal that does not match what the driver asks (the code or the config changed since the run
began, so a candidate id now names another recipe, or the driver waits for results the run never
recorded in that order) stops the resume with `ResumeMismatch` instead of reusing answers that
belong to another model.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from fitness.errors import FitnessError, RecordedFailure
from fitness.pool import Answers, Job, Pool, PoolWrapper
from fitness.size import Size
from operators.recipes import recipe_key


class ResumeMismatch(FitnessError):
    """The run's journal does not match what this driver asks: it cannot be resumed as is."""


@dataclass(frozen=True)
class Recorded:
    """One consumed job result, as the run store journals it."""

    candidate: str
    recipe: str  # recipe_key of the candidate's recipe
    items: tuple[int, ...]
    values: tuple[float, ...]
    size: Size | None  # None for a failure
    error: str | None  # why the candidate failed; None for answers
    stage: str = ""  # the fitness stage that asked (`Job.stage`)

    @classmethod
    def of(cls, job: Job, answers: Answers | None, error: str | None) -> Recorded:
        if answers is None:
            return cls(job.candidate_id, recipe_key(job.recipe), job.items, (), None, error,
                       job.stage)
        return cls(job.candidate_id, recipe_key(job.recipe), answers.items, answers.values,
                   answers.size, None, job.stage)


_ADVICE = ("the code or the config changed since the run began; resume it with the evoforge "
           "version and config.yaml that started it, or start a new run")


class JournalPool(PoolWrapper):
    """`pool` behind the run's journal: `recorded` is what an earlier session of the run
    consumed (empty for a new run), `record` writes each new result (see the module docstring)."""

    def __init__(self, pool: Pool, recorded: Sequence[Recorded],
                 record: Callable[[Recorded], None]):
        super().__init__(pool)
        self.record = record
        self._journal = deque(recorded)
        self._served: set[Future] = set()  # answered from the journal, not yet journaled
        self._held: dict[int, Future] = {}  # position in the journal -> the future it answers
        self._position = 0  # of the journal's first unserved entry
        self._by_job: dict[tuple[str, tuple[int, ...]], deque[int]] = {}
        self._recipes: dict[str, str] = {}
        for position, entry in enumerate(recorded):
            self._by_job.setdefault((entry.candidate, entry.items), deque()).append(position)
            self._recipes.setdefault(entry.candidate, entry.recipe)

    def submit(self, job: Job) -> Future:
        if not job.test and job.candidate_id in self._recipes:
            if recipe_key(job.recipe) != self._recipes[job.candidate_id]:
                raise ResumeMismatch(f"candidate {job.candidate_id} has another recipe than the "
                                     f"one this run recorded under that id: {_ADVICE}")
            positions = self._by_job.get((job.candidate_id, job.items))
            if positions:
                future: Future = Future()
                self._held[positions.popleft()] = future
                return future
        return self.pool.submit(job)

    def completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        waiting = list(futures)
        while waiting and self._journal:
            future = self._held.get(self._position)
            if future is None or future not in waiting:
                entry = self._journal[0]
                raise ResumeMismatch(
                    f"the run recorded a result for {entry.candidate} next, but the driver now "
                    f"waits for other jobs: {_ADVICE}")
            self._serve(self._journal.popleft(), future)
            self._served.add(future)
            del self._held[self._position]
            self._position += 1
            waiting.remove(future)
            yield future
        if waiting:
            yield from self.pool.completed(waiting)

    @staticmethod
    def _serve(entry: Recorded, future: Future) -> None:
        if entry.error is not None:
            future.set_exception(RecordedFailure(entry.error))
        else:
            future.set_result(Answers(entry.candidate, entry.items, entry.values, entry.size))

    def journal(self, job: Job, future: Future, error: str | None) -> None:
        """The driver consumed `future` (the result of `job`); `error` is why its candidate
        failed, or None. Recorded unless it came from the journal in the first place."""
        if future in self._served:
            self._served.discard(future)
            return
        self.record(Recorded.of(job, None if error else future.result(), error))

