"""Errors raised while loading tasks and models or evaluating items.

Each names the file and line, the model folder, or the task and item index it is about, and says
what to do, so that a run never dies half-way through an evaluation without saying where.
"""


class FitnessError(ValueError):
    """Something in a task, an item or a model cannot be evaluated."""


class TaskFormatError(FitnessError):
    """A task file or item is malformed (bad JSON, missing fields, unknown format)."""


class ModelLoadError(FitnessError):
    """A model folder is missing or is not what the evaluator needs (e.g. not a causal LM)."""


class ItemTooLongError(FitnessError):
    """An item does not fit in the model's context window."""


class CandidateOutOfMemory(FitnessError):
    """A model cannot score an item even one sequence at a time: the item's tokens, the model and
    whatever else its device holds exceed that device's memory. Smaller batches cannot help, so the
    evaluator stops and says what to shrink instead of halving forever."""


class CandidateTimeout(FitnessError):
    """A candidate's job ran past the run's `candidate_timeout`; its worker was restarted."""


class WorkerDied(FitnessError):
    """Every worker that ran a candidate's job died (killed, out of host memory, preempted)."""


class RecordedFailure(FitnessError):
    """A candidate failure an earlier session of this run recorded (its text is the original
    reason), served again when the run is resumed instead of evaluating the candidate anew."""


class CandidateCodeError(FitnessError):
    """A generated candidate's code was rejected by the sandbox's check, or failed, was blocked or
    ran out of its limits in the sandbox; the message is what the proposer is told."""
