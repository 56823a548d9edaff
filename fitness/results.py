"""Per-item results: what an evaluator returns, and what every aggregate derives from.

The IRT fitting and the reduced-set estimators need each item's outcome, so evaluators never
return only an accuracy. `score` is a continuous signal of the same outcome: the log-likelihood of
the reference answer (generation), of the chosen-correct option (choice), or of the true label
(classification).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ItemResults:
    task: str
    correct: tuple[bool, ...]
    score: tuple[float, ...]
    prediction: tuple[str, ...]

    def __post_init__(self) -> None:
        if not len(self.correct) == len(self.score) == len(self.prediction):
            raise ValueError("ItemResults: correct, score and prediction differ in length")

    def __len__(self) -> int:
        return len(self.correct)

    @property
    def accuracy(self) -> float:
        """Fraction correct (nan for no items)."""
        return sum(self.correct) / len(self.correct) if self.correct else math.nan
