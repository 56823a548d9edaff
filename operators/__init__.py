"""Merge and mutation operators: pure functions on tensors, state dicts and checkpoints.

The one entry point for merging is `merge` (in-memory) / `iter_merge` (streaming from sources).
"""

from operators.engine import MergeSpec, iter_merge, merge
from operators.errors import CheckpointError, MergeError, MergeInputError, MergeParameterError
from operators.methods import METHODS
from operators.mutation import mutate

__all__ = ["METHODS", "CheckpointError", "MergeError", "MergeInputError", "MergeParameterError",
           "MergeSpec", "iter_merge", "merge", "mutate"]
