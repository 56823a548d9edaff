"""Size objectives of a materialized model: what a Pareto front trades accuracy against."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    params: int  # parameter count (tied weights once: they are one tensor on disk)
    bytes: int  # at the run's dtype (floating tensors) and as stored (the rest)
    nonzero: int  # parameters that are not exactly zero (sparse merges, pruned layers)
