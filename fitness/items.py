"""Items and tasks: what a model is scored on.

A task is a named list of items with a *search* split (seen during evolution) and a held-out
*test* split (seen only by a run's final report). Three item formats cover the zoo and most
benchmarks:

- `GenerationItem`: greedy decoding from a prompt, correct when the completion equals the answer
  exactly (after stripping surrounding whitespace), with a bound on new tokens;
- `ChoiceItem`: multiple choice, the choice whose continuation has the highest log-likelihood
  given the prompt is the model's answer;
- `ClassificationItem`: an input vector and a label, for classifiers such as the NAS zoo's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FORMATS = ("generation", "choice", "classification")
Split = Literal["search", "test"]


@dataclass(frozen=True)
class GenerationItem:
    prompt: str
    answer: str
    max_new_tokens: int = 16


@dataclass(frozen=True)
class ChoiceItem:
    prompt: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class ClassificationItem:
    features: tuple[float, ...]
    label: int


Item = GenerationItem | ChoiceItem | ClassificationItem


@dataclass(frozen=True)
class Task:
    """A named task: its format and its two splits of items (all of one format)."""

    name: str
    format: str
    search: tuple[Item, ...]
    test: tuple[Item, ...]
    description: str = ""
    metadata: dict = field(default_factory=dict, compare=False)

    def split(self, which: Split) -> tuple[Item, ...]:
        if which not in ("search", "test"):
            raise ValueError(f"task {self.name!r}: unknown split {which!r}; use 'search' or 'test'")
        return self.search if which == "search" else self.test
