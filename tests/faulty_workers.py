"""Fault injection for the Ray backend: a real worker that misbehaves for named candidates.

Imported inside Ray actors (the spec is pickled by reference to this module), so it lives in an
importable module of the tests package rather than in a test file.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from fitness.worker_spec import WorkerSpec


class _Faulty:
    """A worker that sleeps for `slow` candidates and kills its own process for `fatal` ones;
    everything else is the real worker's."""

    def __init__(self, worker, slow: dict[str, float], fatal: frozenset[str]):
        self.worker, self.slow, self.fatal = worker, slow, fatal

    def answers(self, candidate_id, recipe, items):
        if candidate_id in self.fatal:
            os._exit(1)  # like an OOM kill: no exception, the process is gone
        time.sleep(self.slow.get(candidate_id, 0.0))
        return self.worker.answers(candidate_id, recipe, items)

    def __getattr__(self, name):
        return getattr(self.worker, name)


@dataclass(frozen=True)
class FaultySpec(WorkerSpec):
    slow: tuple[tuple[str, float], ...] = ()
    fatal: tuple[str, ...] = ()

    def build(self, device=None, tasks=None):
        return _Faulty(super().build(device, tasks), dict(self.slow), frozenset(self.fatal))
