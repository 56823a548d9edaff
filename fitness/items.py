"""Items and tasks: what a model is scored on.

A task is a named list of items with a *search* split (seen during evolution) and a held-out
*test* split (seen only by a run's final report). Three item formats cover the zoo and most
benchmarks:

- `GenerationItem`: greedy decoding from a prompt, correct when the completion equals the answer
  exactly (after stripping surrounding whitespace), with a bound on new tokens;
- `ChoiceItem`: multiple choice, the choice whose continuation has the highest log-likelihood
  given the prompt is the model's answer;
- `ClassificationItem`: an input vector and a label, for classifiers such as the NAS zoo's.

`LmEvalItem` is a document of an lm-eval-harness task, which lm-eval itself prompts and scores
(fitness/lm_eval_tasks.py); its tasks have the format "lm-eval".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# The formats of task files (fitness/jsonl_tasks.py); tasks of LmEvalItems have the format "lm-eval".
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


@dataclass(frozen=True)
class LmEvalItem:
    """One document of an lm-eval task: its position in its lm-eval split and a hash of its content.

    Results are joined back onto items by `doc_key`, never by position alone, so a mislabelled
    sample cannot credit the wrong item. `source` is the loaded lm-eval split the document is in
    (an `LmEvalSplit`), what the evaluator runs; it takes no part in comparisons and hashing.
    """

    doc_index: int
    doc_key: str
    source: Any = field(default=None, compare=False, repr=False)


Item = GenerationItem | ChoiceItem | ClassificationItem | LmEvalItem


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


def item_pool(tasks: list[Task]) -> list[tuple[int, int]]:
    """The run's pool of search items, (task index, item index) task after task: a position in
    it is the item id that jobs carry and answers are stored under."""
    return [(t, i) for t, task in enumerate(tasks) for i in range(len(task.search))]
