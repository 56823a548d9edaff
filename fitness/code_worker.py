"""The worker of a code search: it scores a candidate whose recipe is source code by training and
running it in the sandbox (`operators.sandbox`), never in this process.

One sandboxed run trains the candidate and predicts every signal of the task (search and test
splits), so `answers`, `size` and `test_results` for one recipe cost one training: the run's
result is kept while the recipe is in the population (`retain`) or among the last few scored. A
candidate whose code is rejected, fails, is blocked or runs out of its limits raises
`CandidateCodeError` with the sandbox's report (the run records it as that child's failure, and
a proposer is told); the sandbox itself failing to start is a `FitnessError` that stops the run.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from fitness.errors import CandidateCodeError, FitnessError
from fitness.items import Task
from fitness.results import ItemResults
from fitness.size import Size
from operators.recipes import recipe_key
from operators.sandbox import Limits, SandboxResult, run_untrusted

RECENT = 16  # sandbox results kept besides the population's


class CodeWorker:
    """Scores code recipes on one classification task (see the module docstring). `harness`,
    `arguments` and `files` are what the sandbox runs for every candidate (the search space's)."""

    def __init__(self, task: Task, harness: str, arguments: dict, files: dict[str, bytes],
                 limits: Limits):
        self.tasks = [task]
        self.harness, self.arguments, self.files, self.limits = harness, arguments, files, limits
        self._results: OrderedDict[str, dict] = OrderedDict()
        self._retained: set[str] = set()

    def _run(self, candidate_id: str, recipe: dict) -> dict:
        key = recipe_key(recipe)
        if key in self._results:
            self._results.move_to_end(key)
            return self._results[key]
        source = recipe.get("source")
        if recipe.get("op") != "code" or not isinstance(source, str):
            raise FitnessError(f"{candidate_id}: a code search scores recipes "
                               "{'op': 'code', 'source': ...}; got " + repr(recipe)[:200])
        result = run_untrusted(source, self.harness, self.arguments, self.limits, self.files)
        value = self._checked(candidate_id, result)
        self._results[key] = value
        for old in [k for k in self._results if k not in self._retained][:-RECENT]:
            del self._results[old]
        return value

    def _checked(self, candidate_id: str, result: SandboxResult) -> dict:
        if result.kind == "crashed" and "operators.sandbox_child" in result.output:
            raise FitnessError(f"the sandbox could not start for {candidate_id}: {result.error}")
        if not result.ok:
            raise CandidateCodeError(f"{result.kind}: {result.error}")
        task = self.tasks[0]
        predictions = result.value.get("predictions")
        if not isinstance(predictions, list) or \
                len(predictions) != len(task.search) + len(task.test):
            raise FitnessError(f"{candidate_id}: the harness {self.harness} returned "
                               f"{type(predictions).__name__} predictions, not one per signal of "
                               f"{task.name} ({len(task.search) + len(task.test)})")
        return result.value

    def _correct(self, value: dict, items: Sequence, offset: int) -> list[bool]:
        predictions = value["predictions"]
        return [predictions[offset + i] == item.label for i, item in enumerate(items)]

    def answers(self, candidate_id: str, recipe: dict, items: torch.Tensor) -> torch.Tensor:
        correct = self._correct(self._run(candidate_id, recipe), self.tasks[0].search, 0)
        return torch.tensor([float(correct[i]) for i in items.tolist()], dtype=torch.float64)

    def size(self, candidate_id: str, recipe: dict) -> Size:
        value = self._run(candidate_id, recipe)
        return Size(value["params"], value["bytes"], value["nonzero"])

    def test_results(self, candidate_id: str, recipe: dict) -> list[ItemResults]:
        task = self.tasks[0]
        value = self._run(candidate_id, recipe)
        correct = self._correct(value, task.test, len(task.search))
        predictions = value["predictions"][len(task.search):]
        return [ItemResults(task.name, tuple(correct), tuple(float(c) for c in correct),
                            tuple(str(p) for p in predictions))]

    def retain(self, recipes: Sequence[dict]) -> None:
        self._retained = {recipe_key(r) for r in recipes}
