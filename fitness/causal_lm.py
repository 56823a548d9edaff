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

Memory. A batch holds at most `batch_size` sequences (sorted by length) and at most
`max_batch_tokens` padded tokens, rows × width (a generation batch counts its width as prompt width
plus max_new_tokens, what its KV cache grows to), so activations and the KV cache are
O(rows × width × hidden), bounded by the token budget whatever the batch size or item lengths (eager
attention adds rows × heads × width² scores). The teacher-forced pass asks the model only for the
logits at the positions that predict a continuation token or greedy's next one (`logits_to_keep`):
rows × kept positions × vocab in the model's dtype, where the kept positions span the batch's
continuations (about the answer length, since rows of similar lengths sit together; never more than
the width). Log-probabilities are computed in float32 `score_chunk_rows` positions at a time, so the
scores cost O(score_chunk_rows × vocab) float32, independent of batch × length × vocab (a float32
log-softmax over all of batch × length × vocab is tens of GB at a 128k vocabulary).

Equality with a float32 log-softmax over the full logits: given the same logits, the chunked
scores are the same bits (the softmax is per position, and a chunk's rows are computed as they are
in the full tensor), and argmax is unchanged. The kept logits themselves come out of an lm_head
product over fewer rows, which a BLAS may round differently in the last bit (MKL tiles rows by 4:
seen up to 1e-7 on logits of order 1), just as the batch a sequence lands in (its padded width)
always could. So log-likelihoods agree with the full computation to float32 rounding (1e-6
relative), and greedy checks and next tokens agree unless two logits tie within that rounding.

A batch that runs out of device memory is halved and retried, and the halved row cap stays for the
rest of that pass; a single sequence that does not fit raises `CandidateOutOfMemory`, which says
what to shrink.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.utils import logging

from fitness.errors import CandidateOutOfMemory, FitnessError, ItemTooLongError, ModelLoadError
from fitness.items import ChoiceItem, GenerationItem
from fitness.results import ItemResults

DEFAULT_STOPS = ("\n",)
DEFAULT_MAX_BATCH_TOKENS = 16384
DEFAULT_SCORE_CHUNK_ROWS = 128  # 128 × a 128k vocabulary: 64 MB per float32 copy
# any device's out-of-memory error from torch 2.5 on; before it, the same class under torch.cuda
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on GPUs (what the weights are trained and served in), float32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_causal_lm(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a local Hugging Face folder, in eval mode on `device`."""
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


class StopsInGenerated(StoppingCriteria):
    """A row is done once its generated text holds a stop string, so a batch stops when every
    row has (instead of running to the longest bound). `stop_strings` of `generate` would also
    match a stop that begins in the prompt, and cut a completion the full one would not be.
    A row found done stays done and is not decoded again."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_width: int):
        super().__init__()
        self.tokenizer, self.stops, self.width = tokenizer, stops, prompt_width
        self.done: list[bool] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if not self.done:
            self.done = [False] * len(input_ids)
        open_rows = [row for row, done in enumerate(self.done) if not done]
        texts = self.tokenizer.batch_decode(input_ids[open_rows, self.width:],
                                            skip_special_tokens=True)
        for row, text in zip(open_rows, texts, strict=True):
            self.done[row] = any(stop in text for stop in self.stops)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


class CausalLMEvaluator:
    """Scores items with a causal LM in batches of at most `batch_size` sequences and
    `max_batch_tokens` padded tokens (see the module docstring for what memory that bounds)."""

    def __init__(self, model, tokenizer, batch_size: int = 64, stops: Sequence[str] = DEFAULT_STOPS,
                 confirm_by_teacher_forcing: bool = True,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 score_chunk_rows: int = DEFAULT_SCORE_CHUNK_ROWS):
        for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens),
                            ("score_chunk_rows", score_chunk_rows)):
            if value < 1:
                raise ValueError(f"CausalLMEvaluator: {name} must be at least 1, not {value}")
        self.model = model
        self.confirm_by_teacher_forcing = confirm_by_teacher_forcing
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.score_chunk_rows = score_chunk_rows
        self.stops = tuple(stops)
        self.device = next(model.parameters()).device
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id or 0)

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "cpu", batch_size: int = 64,
                    dtype: torch.dtype | None = None,
                    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> CausalLMEvaluator:
        model, tokenizer = load_causal_lm(folder, device, dtype)
        return cls(model, tokenizer, batch_size, max_batch_tokens=max_batch_tokens)

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

    def _check_item(self, task: str, index: int, prompt: list[int], length: int) -> None:
        """Refuses items the model cannot score: an empty prompt leaves nothing to predict the
        first answer token from (a tokenizer that adds no BOS), a long one overflows the context."""
        if not prompt:
            raise FitnessError(f"task {task!r}, item {index}: the prompt encodes to no tokens, so "
                               "nothing predicts the answer's first token; give a non-empty prompt")
        if self.context is not None and length > self.context:
            raise ItemTooLongError(
                f"task {task!r}, item {index}: needs {length} tokens but the model's context "
                f"holds {self.context}; shorten the item or lower its max_new_tokens")

    # -- the two primitives ---------------------------------------------------------------------

    @torch.inference_mode()
    def _continuations(self, task: str, rows: list[tuple[list[int], list[int]]],
                       items: list[int]) -> list[_Continuation]:
        """Teacher-forced log-likelihoods of (prompt ids, continuation ids) rows; row r belongs to
        item `items[r]` of `task` (named if it does not fit in memory)."""
        out: list[_Continuation | None] = [None] * len(rows)
        lengths = [len(prompt) + len(continuation) for prompt, continuation in rows]

        def score(batch: list[int]) -> None:
            ids, mask = self._padded([rows[i][0] + rows[i][1] for i in batch], left=False)
            # the positions whose logits predict each continuation token, then greedy's next one
            spans = [range(len(rows[i][0]) - 1, lengths[i]) for i in batch]
            kept = sorted(set().union(*spans))
            column = {position: k for k, position in enumerate(kept)}
            logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=torch.tensor(
                kept, device=self.device)).logits
            targets = torch.tensor([t for i in batch for t in (*rows[i][1], 0)])  # 0: no target
            logprobs, greedy = self._score(
                logits, [row for row, span in enumerate(spans) for _ in span],
                [column[position] for span in spans for position in span], targets)
            offset = 0
            for i in batch:
                end = offset + len(rows[i][1])
                out[i] = _Continuation(float(logprobs[offset:end].sum()),
                                       bool((greedy[offset:end] == targets[offset:end]).all()),
                                       int(greedy[end]))
                offset = end + 1

        self._in_batches(task, sorted(range(len(rows)), key=lengths.__getitem__),
                         [(length, 0) for length in lengths], items, score)
        return out  # type: ignore[return-value]

    def _score(self, logits: torch.Tensor, rows: list[int], columns: list[int],
               targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 log-probability of `targets[n]` and the argmax at `logits[rows[n], columns[n]]`
        for each n, on the CPU. `score_chunk_rows` positions at a time, so that float32 copies of
        the logits never exceed that many rows of the vocabulary."""
        rows_at, columns_at = torch.tensor(rows, device=self.device), torch.tensor(
            columns, device=self.device)
        targets_at = targets.to(self.device)
        logprobs, greedy = [], []
        for start in range(0, len(rows), self.score_chunk_rows):
            part = slice(start, start + self.score_chunk_rows)
            chunk = logits[rows_at[part], columns_at[part]].float()
            greedy.append(chunk.argmax(dim=-1))
            logprobs.append(chunk.log_softmax(dim=-1).gather(-1, targets_at[part, None])[:, 0])
        return torch.cat(logprobs).cpu(), torch.cat(greedy).cpu()

    @torch.inference_mode()
    def _generate(self, task: str, prompts: list[list[int]], bounds: list[int],
                  items: list[int]) -> list[str]:
        """Greedy completions, each cut at EOS, its bound, or a stop string, and stripped; prompt
        r belongs to item `items[r]` of `task` (named if it does not fit in memory)."""
        texts = [""] * len(prompts)
        eos = self.tokenizer.eos_token_id

        def generate(batch: list[int]) -> None:
            ids, mask = self._padded([prompts[i] for i in batch], left=True)
            stop = StoppingCriteriaList([StopsInGenerated(self.tokenizer, self.stops,
                                                          ids.shape[1])])
            generated = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max(bounds[i] for i in batch),
                do_sample=False, pad_token_id=self.pad_id, eos_token_id=eos,
                stopping_criteria=stop)[:, ids.shape[1]:].cpu().tolist()
            for row, i in enumerate(batch):
                tokens = generated[row][:bounds[i]]
                if eos is not None and eos in tokens:
                    tokens = tokens[:tokens.index(eos)]
                texts[i] = self._cut(self.tokenizer.decode(tokens, skip_special_tokens=True))

        self._in_batches(task, sorted(range(len(prompts)), key=lambda i: (bounds[i], len(prompts[i]))),
                         list(zip(map(len, prompts), bounds, strict=True)), items, generate)
        return texts

    # -- batching -------------------------------------------------------------------------------

    def _padded(self, sequences: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask) of `sequences` padded to the longest, on the model's device: on the
        right for teacher forcing (positions stay 0, 1, ...), on the left for generation (every
        row's next token comes at the same column)."""
        width = max(map(len, sequences))
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            columns = slice(width - len(sequence), width) if left else slice(0, len(sequence))
            ids[row, columns] = torch.tensor(sequence, dtype=torch.long)
            mask[row, columns] = 1
        return ids.to(self.device), mask.to(self.device)

    def _in_batches(self, task: str, order: list[int], sizes: list[tuple[int, int]],
                    items: list[int], run: Callable[[list[int]], None]) -> None:
        """Calls `run` on consecutive batches of `order`, where sequence i pads to `sizes[i][0]`
        tokens and then grows by `sizes[i][1]` (new tokens). A batch that runs out of memory is
        halved and retried, and later batches keep the halved row cap: retrying the size that just
        failed would likely fail again and cost a failed forward pass each time."""
        cap, start = self.batch_size, 0
        while start < len(order):
            batch = self._next_batch(order[start:start + cap], sizes)
            try:
                run(batch)
            except _OUT_OF_MEMORY:
                if len(batch) == 1:
                    raise CandidateOutOfMemory(
                        f"task {task!r}, item {items[batch[0]]}: a single sequence of "
                        f"{sum(sizes[batch[0]])} tokens (prompt, then answer or new tokens) runs out of "
                        f"memory on {self.device}; lower the task's max_new_tokens or shorten its "
                        "items, give the worker more memory (a GPU with more memory), or give the "
                        "caches on that device a smaller memory budget") from None
            else:
                start += len(batch)
                continue
            # outside the except block, so the failed batch's tensors (which its traceback kept
            # alive) are released before the cache is
            cap = len(batch) // 2
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _next_batch(self, candidates: list[int], sizes: list[tuple[int, int]]) -> list[int]:
        """The longest prefix of `candidates` whose rows × padded width stays within the token
        budget; at least one sequence, however long (a sequence cannot be split)."""
        batch: list[int] = []
        pad = grow = 0
        for i in candidates:
            pad, grow = max(pad, sizes[i][0]), max(grow, sizes[i][1])
            if batch and (len(batch) + 1) * (pad + grow) > self.max_batch_tokens:
                break
            batch.append(i)
        return batch

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
            self._check_item(task, index, prompt, len(prompt) + item.max_new_tokens)
        references = self._continuations(task, list(zip(prompts, answers, strict=True)),
                                         list(range(len(items))))
        confirmed = [self.confirm_by_teacher_forcing and ref.greedy_follows and (
            len(answer) == item.max_new_tokens or self._stops_after(ref.next_token))
                     for ref, answer, item in zip(references, answers, items, strict=True)]
        pending = [i for i, ok in enumerate(confirmed) if not ok]
        predictions = [item.answer.strip() for item in items]
        for i, text in zip(pending, self._generate(task, [prompts[i] for i in pending],
                                                   [items[i].max_new_tokens for i in pending],
                                                   pending), strict=True):
            predictions[i] = text
        correct = tuple(prediction == item.answer.strip()
                        for prediction, item in zip(predictions, items, strict=True))
        return ItemResults(task, correct, tuple(ref.loglik for ref in references),
                           tuple(predictions))

    def _multiple_choice(self, task: str, items: Sequence[ChoiceItem]) -> ItemResults:
        rows, owners = [], []
        for index, item in enumerate(items):
            prompt = self._prompt_ids(item.prompt)
            for choice in item.choices:
                continuation = self._continuation_ids(choice)
                self._check_item(task, index, prompt, len(prompt) + len(continuation))
                rows.append((prompt, continuation))
                owners.append(index)
        logliks = [c.loglik for c in self._continuations(task, rows, owners)]
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
