"""Errors raised by the merge operators.

Every error says what is wrong (which tensor, which parameter, which file) and what to do about it,
because a merge that fails after twenty minutes with a bare shape error wastes a user's afternoon.
"""


class MergeError(ValueError):
    """A merge cannot be computed from the given inputs or parameters."""


class MergeInputError(MergeError):
    """The input models disagree (keys, shapes, dtypes) or hold invalid values (NaN/Inf)."""


class MergeParameterError(MergeError):
    """A merge method or one of its parameters is unknown or out of range."""


class CheckpointError(MergeError):
    """A checkpoint on disk is missing or unreadable."""


class NonFiniteInput(MergeInputError):
    """An input of the tensor being merged holds NaN/Inf, found by a method that checks its own
    inputs on its first pass (`Method.checks_inputs`); the engine then names the input."""
