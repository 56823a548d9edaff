"""Training the zoo's tiny causal LMs from code: deterministic, seeded, a few hundred steps.

Each step draws a fresh batch of (prompt, answer) problems from a seeded generator, so there is no
dataset to store or download. Pre-training puts the loss on every token (a language model of the
synthetic corpus); fine-tuning puts it on the answer only, as instruction tuning does.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

from search_spaces.char_tokenizer import BOS_ID, EOS_ID, PAD_ID, encode

Problem = tuple[str, str]  # (prompt, answer)


def encode_batch(problems: list[Problem], loss_on_prompt: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids, attention mask and labels (-100 where no loss), right-padded."""
    rows = [([BOS_ID, *encode(prompt)], [*encode(answer), EOS_ID]) for prompt, answer in problems]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prompt, answer) in enumerate(rows):
        sequence = torch.tensor(prompt + answer)
        ids[row, :len(sequence)] = sequence
        mask[row, :len(sequence)] = 1
        first = 1 if loss_on_prompt else len(prompt)
        labels[row, first:len(sequence)] = sequence[first:]
    return ids, mask, labels


def train(model, draw: Callable[[random.Random], Problem], *, steps: int, batch_size: int,
          learning_rate: float, seed: int, loss_on_prompt: bool, warmup: int = 20,
          on_step: Callable[[int, float], None] | None = None) -> None:
    """AdamW with linear warm-up and cosine decay over `steps` batches drawn by `draw`."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps))))
    model.train()
    for step in range(steps):
        ids, mask, labels = encode_batch([draw(rng) for _ in range(batch_size)], loss_on_prompt)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step + 1, loss.item())
    model.eval()
