"""Evaluating any causal LM that `transformers` loads: exact-match generation and multiple choice.

Two batched primitives do all the work:

- a teacher-forced pass over prompt + continuation gives each continuation's log-likelihood, and
  says whether greedy decoding would follow it token for token (every argmax equals the next
  continuation token) and then stop;
- greedy generation, batched with left padding, for the items whose reference path the first pass
  did not confirm.

An exact-match item is correct when the greedy completion, cut at EOS or a stop string and
stripped, equals the answer. If greedy decoding provably reproduces the reference (first pass),
the item is correct without generating; otherwise it is generated, because another tokenization
or surrounding whitespace may still give the same string. The result is exactly what generating
every item would give, for far fewer decoding steps when the model is good.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fitness.errors import FitnessError, ItemTooLongError, ModelLoadError
from fitness.items import ChoiceItem, GenerationItem
from fitness.results import ItemResults

DEFAULT_STOPS = ("\n",)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on GPUs (what the weights are trained and served in), float32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_causal_lm(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a local Hugging Face folder, in eval mode on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: no config.json; give a local Hugging Face model folder "
                             "(evoforge never downloads models)")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=dtype or default_dtype(device))
    except ValueError as error:
        raise ModelLoadError(
            f"{folder}: a {type(config).__name__} ({config.model_type!r}) is not a causal "
            f"language model that transformers can load with AutoModelForCausalLM ({error}). "
            "Give a decoder-only LM checkpoint.") from None
    except OSError as error:
        raise ModelLoadError(f"{folder}: cannot read the weights ({error})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{folder}: no usable tokenizer files ({error}); copy the "
                             "tokenizer of the model's base into the folder") from None
    return model.to(device).eval(), tokenizer


@dataclass(frozen=True)
class _Continuation:
    loglik: float
    greedy_follows: bool  # greedy decoding from the prompt reproduces the continuation
    next_token: int  # greedy's choice right after the continuation


class CausalLMEvaluator:
    """Scores items with a causal LM in batches of `batch_size` sequences."""

    def __init__(self, model, tokenizer, batch_size: int = 64, stops: Sequence[str] = DEFAULT_STOPS,
                 confirm_by_teacher_forcing: bool = True):
        self.model = model
        self.confirm_by_teacher_forcing = confirm_by_teacher_forcing
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stops = tuple(stops)
        self.device = next(model.parameters()).device
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id or 0)

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "cpu", batch_size: int = 64,
                    dtype: torch.dtype | None = None) -> CausalLMEvaluator:
        model, tokenizer = load_causal_lm(folder, device, dtype)
        return cls(model, tokenizer, batch_size)

    def evaluate(self, task: str, items: Sequence[GenerationItem | ChoiceItem]) -> ItemResults:
        """Per-item results of `items` (all of one format) under the task name `task`."""
        if not items:
            return ItemResults(task, (), (), ())
        kinds = {type(item) for item in items}
        if kinds == {GenerationItem}:
            return self._exact_match(task, items)
        if kinds == {ChoiceItem}:
            return self._multiple_choice(task, items)
        raise FitnessError(f"task {task!r}: a causal LM evaluates generation and choice items, "
                           f"not {sorted(k.__name__ for k in kinds)} (one format per task)")

    # -- encoding -----------------------------------------------------------------------------

    def _prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def _continuation_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _check_length(self, task: str, index: int, length: int) -> None:
        if self.context is not None and length > self.context:
            raise ItemTooLongError(
                f"task {task!r}, item {index}: needs {length} tokens but the model's context "
                f"holds {self.context}; shorten the item or lower its max_new_tokens")

    # -- the two primitives ---------------------------------------------------------------------

    @torch.inference_mode()
    def _continuations(self, rows: list[tuple[list[int], list[int]]]) -> list[_Continuation]:
        """Teacher-forced log-likelihoods of (prompt ids, continuation ids) rows."""
        out: list[_Continuation | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = max(len(rows[i][0]) + len(rows[i][1]) for i in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                sequence = rows[i][0] + rows[i][1]
                ids[row, :len(sequence)] = torch.tensor(sequence)
                mask[row, :len(sequence)] = 1
            logits = self.model(input_ids=ids.to(self.device),
                                attention_mask=mask.to(self.device)).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            greedy = logits.argmax(dim=-1).cpu()
            for row, i in enumerate(batch):
                prompt, continuation = rows[i]
                positions = torch.arange(len(prompt) - 1, len(prompt) + len(continuation) - 1)
                targets = torch.tensor(continuation, dtype=torch.long)
                loglik = logprobs[row, positions.to(self.device), targets.to(self.device)].sum()
                out[i] = _Continuation(float(loglik), bool((greedy[row, positions] == targets).all()),
                                       int(greedy[row, len(prompt) + len(continuation) - 1]))
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]], bounds: list[int]) -> list[str]:
        """Greedy completions, each cut at EOS, its bound, or a stop string, and stripped."""
        texts = [""] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: (bounds[i], len(prompts[i])))
        eos = self.tokenizer.eos_token_id
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            generated = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=max(bounds[i] for i in batch), do_sample=False,
                pad_token_id=self.pad_id, eos_token_id=eos)[:, width:].cpu().tolist()
            for row, i in enumerate(batch):
                tokens = generated[row][:bounds[i]]
                if eos is not None and eos in tokens:
                    tokens = tokens[:tokens.index(eos)]
                texts[i] = self._cut(self.tokenizer.decode(tokens, skip_special_tokens=True))
        return texts

    def _cut(self, text: str) -> str:
        for stop in self.stops:
            if stop in text:
                text = text[:text.index(stop)]
        return text.strip()

    def _stops_after(self, token: int) -> bool:
        if token == self.tokenizer.eos_token_id:
            return True
        text = self.tokenizer.decode([token])
        return any(text.startswith(stop) for stop in self.stops)

    # -- formats ----------------------------------------------------------------------------

    def _exact_match(self, task: str, items: Sequence[GenerationItem]) -> ItemResults:
        prompts = [self._prompt_ids(item.prompt) for item in items]
        answers = [self._continuation_ids(item.answer) for item in items]
        for index, (item, prompt, answer) in enumerate(zip(items, prompts, answers, strict=True)):
            if not answer or len(answer) > item.max_new_tokens:
                raise FitnessError(f"task {task!r}, item {index}: the answer takes {len(answer)} "
                                   f"tokens but max_new_tokens is {item.max_new_tokens}")
            self._check_length(task, index, len(prompt) + item.max_new_tokens)
        references = self._continuations(list(zip(prompts, answers, strict=True)))
        confirmed = [self.confirm_by_teacher_forcing and ref.greedy_follows and (
            len(answer) == item.max_new_tokens or self._stops_after(ref.next_token))
                     for ref, answer, item in zip(references, answers, items, strict=True)]
        pending = [i for i, ok in enumerate(confirmed) if not ok]
        predictions = [item.answer.strip() for item in items]
        for i, text in zip(pending, self._generate([prompts[i] for i in pending],
                                                   [items[i].max_new_tokens for i in pending]),
                           strict=True):
            predictions[i] = text
        correct = tuple(prediction == item.answer.strip()
                        for prediction, item in zip(predictions, items, strict=True))
        return ItemResults(task, correct, tuple(ref.loglik for ref in references),
                           tuple(predictions))

    def _multiple_choice(self, task: str, items: Sequence[ChoiceItem]) -> ItemResults:
        rows = []
        for index, item in enumerate(items):
            prompt = self._prompt_ids(item.prompt)
            for choice in item.choices:
                continuation = self._continuation_ids(choice)
                self._check_length(task, index, len(prompt) + len(continuation))
                rows.append((prompt, continuation))
        logliks = [c.loglik for c in self._continuations(rows)]
        correct, scores, predictions = [], [], []
        cursor = 0
        for item in items:
            own = logliks[cursor:cursor + len(item.choices)]
            cursor += len(item.choices)
            choice = max(range(len(own)), key=own.__getitem__)
            correct.append(choice == item.answer)
            scores.append(own[item.answer])
            predictions.append(item.choices[choice])
        return ItemResults(task, tuple(correct), tuple(scores), tuple(predictions))
