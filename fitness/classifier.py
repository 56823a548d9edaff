"""Evaluating a classifier (a torch module from features to logits) on classification items."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fitness.errors import FitnessError
from fitness.items import ClassificationItem
from fitness.results import ItemResults


class ClassifierEvaluator:
    """Correct = argmax of the logits is the label; score = log-probability of the label."""

    def __init__(self, model: torch.nn.Module, batch_size: int = 1024):
        self.model = model
        self.batch_size = batch_size
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def evaluate(self, task: str, items: Sequence[ClassificationItem]) -> ItemResults:
        if any(not isinstance(item, ClassificationItem) for item in items):
            raise FitnessError(f"task {task!r}: a classifier evaluates classification items only")
        correct: list[bool] = []
        scores: list[float] = []
        predictions: list[str] = []
        for start in range(0, len(items), self.batch_size):
            batch = items[start:start + self.batch_size]
            features = torch.tensor([item.features for item in batch], dtype=torch.float32)
            labels = torch.tensor([item.label for item in batch])
            logprobs = torch.log_softmax(self.model(features.to(self.device)).float(), -1).cpu()
            if logprobs.shape[-1] <= int(labels.max()):
                raise FitnessError(f"task {task!r}: the model has {logprobs.shape[-1]} outputs "
                                   f"but an item's label is {int(labels.max())}")
            chosen = logprobs.argmax(-1)
            correct += (chosen == labels).tolist()
            scores += logprobs.gather(1, labels[:, None]).squeeze(1).tolist()
            predictions += [str(int(c)) for c in chosen]
        return ItemResults(task, tuple(correct), tuple(scores), tuple(predictions))
