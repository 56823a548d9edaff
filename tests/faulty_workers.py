"""Fault injection for the Ray backend: a real worker that misbehaves for named candidates.

Imported inside Ray actors (the spec is pickled by reference to this module), so it lives in an
importable module of the tests package rather than in a test file.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from fitness.errors import CandidateOutOfMemory
from fitness.worker_spec import WorkerSpec


class _Faulty:
    """A worker that sleeps for `slow` candidates, kills its own process for `fatal` ones, runs
    out of memory at batch 1 for `raising` ones and has a bug (KeyError) for `buggy` ones;
    everything else is the real worker's."""

    def __init__(self, worker, slow: dict[str, float], fatal: frozenset[str],
                 raising: frozenset[str], buggy: frozenset[str]):
        self.worker, self.slow, self.fatal = worker, slow, fatal
        self.raising, self.buggy = raising, buggy

    def answers(self, candidate_id, recipe, items):
        if candidate_id in self.fatal:
            os._exit(1)  # like an OOM kill: no exception, the process is gone
        if candidate_id in self.raising:
            raise CandidateOutOfMemory(f"{candidate_id}: out of memory at batch 1 (injected)")
        if candidate_id in self.buggy:
            raise KeyError(f"{candidate_id}: a bug (injected)")
        time.sleep(self.slow.get(candidate_id, 0.0))
        return self.worker.answers(candidate_id, recipe, items)

    def __getattr__(self, name):
        return getattr(self.worker, name)


@dataclass(frozen=True)
class FaultySpec(WorkerSpec):
    slow: tuple[tuple[str, float], ...] = ()
    fatal: tuple[str, ...] = ()
    raising: tuple[str, ...] = ()
    buggy: tuple[str, ...] = ()

    def build(self, device=None, tasks=None):
        return _Faulty(super().build(device, tasks), dict(self.slow), frozenset(self.fatal),
                       frozenset(self.raising), frozenset(self.buggy))


@dataclass(frozen=True)
class FaultyRunSpec(FaultySpec):
    """What `evoforge run` builds in the fault test: first-generation children that hang, kill
    their workers and run out of memory."""

    slow: tuple[tuple[str, float], ...] = (("g1-1", 600.0),)
    fatal: tuple[str, ...] = ("g1-2",)
    raising: tuple[str, ...] = ("g1-3",)
