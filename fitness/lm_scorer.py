"""The local worker: materializes recipes and answers pool items with a causal LM.

One model object per depth is reused (recipes that drop layers are smaller); a candidate's
weights are materialized once and kept while it is being asked (its stages follow each other), and
materialized sub-recipes are cached, so a generation costs about one merge per candidate.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch

from fitness.causal_lm import CausalLMEvaluator
from fitness.items import Task
from fitness.results import ItemResults
from fitness.size import Size, measure_latency, measure_size
from operators.settings import count_layers
from search_spaces.recipes import StateCache, materialize


class LocalLMScorer:
    def __init__(self, tasks: Sequence[Task], load_source: Callable[[str], Mapping],
                 config, tokenizer, batch_size: int = 256, export_dtype: str = "bfloat16",
                 device: str = "cpu"):
        self.tasks = list(tasks)
        self.pool = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task.search))]
        self.load_source = load_source
        self.config, self.tokenizer, self.batch_size = config, tokenizer, batch_size
        self.device = device
        self.export_dtype = export_dtype
        self.cache = StateCache()
        self._evaluators: dict[int, CausalLMEvaluator] = {}
        self._current: tuple[str, dict[str, torch.Tensor]] | None = None
        self.evaluator = self._evaluator(config.num_hidden_layers)

    def _evaluator(self, layers: int) -> CausalLMEvaluator:
        if layers not in self._evaluators:
            from transformers import AutoModelForCausalLM

            config = copy.deepcopy(self.config)
            config.num_hidden_layers = layers
            model = AutoModelForCausalLM.from_config(config).to(self.device).eval()
            self._evaluators[layers] = CausalLMEvaluator(model, self.tokenizer, self.batch_size)
        return self._evaluators[layers]

    @property
    def task_of(self) -> torch.Tensor:
        return torch.tensor([t for t, _ in self.pool])

    def _state(self, candidate_id: str, recipe: dict) -> dict[str, torch.Tensor]:
        if self._current is None or self._current[0] != candidate_id:
            state = materialize(recipe, self.load_source, self.cache)
            self.evaluator = self._evaluator(count_layers(state))
            self.evaluator.model.load_state_dict(state)
            self._current = (candidate_id, state)
        return self._current[1]

    def answers(self, candidate_id: str, recipe: dict, items: torch.Tensor) -> torch.Tensor:
        self._state(candidate_id, recipe)
        out = torch.zeros(len(items), dtype=torch.float64)
        by_task: dict[int, list[int]] = {}
        for position, index in enumerate(items.tolist()):
            by_task.setdefault(self.pool[index][0], []).append(position)
        for t, positions in by_task.items():
            task = self.tasks[t]
            chosen = [task.search[self.pool[int(items[p])][1]] for p in positions]
            correct = self.evaluator.evaluate(task.name, chosen).correct
            out[positions] = torch.tensor(correct, dtype=torch.float64)
        return out

    def size(self, candidate_id: str, recipe: dict) -> Size:
        return measure_size(self._state(candidate_id, recipe), self.export_dtype)

    def test_results(self, candidate_id: str, recipe: dict) -> list[ItemResults]:
        """Per-item results on every task's held-out test split (for a run's final report)."""
        self._state(candidate_id, recipe)
        return [self.evaluator.evaluate(task.name, task.test) for task in self.tasks]

    def latency(self, candidate_id: str, recipe: dict, batch: int = 32) -> float:
        """Median seconds of one forward pass over `batch` search prompts, on this worker."""
        self._state(candidate_id, recipe)
        prompts = [item.prompt for task in self.tasks for item in task.search[:batch]][:batch]
        tokenizer = self.evaluator.tokenizer
        inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(self.evaluator.device)
        with torch.inference_mode():
            return measure_latency(lambda: self.evaluator.model(**inputs))
