"""The LLM proposer of a code search: an OpenAI-compatible model writes a child program from its
parents' code and scores (EvoPrompting, OPRO), with one repair round and a logged fallback.

The prompt holds each parent's source with its accuracy ± stderr and parameter count, the run's
current front, the errors of recent failed children (so the model learns what broke), and a
target slightly better than the best parent: more accurate by a point at no more parameters than
the smallest parent. The reply is SEARCH/REPLACE blocks against the first parent's source or,
for a larger change, the whole new file in one ```python block (the full-rewrite fallback).

A reply is used only if it parses, applies, passes the sandbox's source check and is a new
program. Otherwise the model is told exactly why, once (the repair round); a second unusable
reply, or an endpoint that fails or times out, falls back to the heuristic mutator and the
reason is reported. Replies are memoized by the prompt's hash in the run store, so a resumed run
gets the same children without asking again. What a child's recipe records: which proposer made
it, the prompt's hash, the replies and whether one was repaired or fell back (never the key).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from operators.code_edits import (
    CodeChild,
    CodeMutator,
    EditError,
    apply_edits,
    parse_edits,
    source_key,
)
from operators.llm_client import Endpoint, LLMError, chat
from operators.sandbox import SandboxViolation, check_source

CODE_BLOCK = re.compile(r"```(?:python|py)?\n(.*?)```", re.DOTALL)
REPLY_KEPT = 8000  # characters of a reply kept in the recipe
UNUSABLE = (ValueError, EditError, SandboxViolation)  # a reply that cannot be used, and why
T = TypeVar("T")

SYSTEM = """You design PyTorch networks for MNIST-1D: 40-sample signals, 10 classes.
A program defines `class Net(nn.Module)`; `Net()(x)` takes a float tensor of shape (batch, 40)
and returns logits of shape (batch, 10). It may import only torch, torch.nn,
torch.nn.functional and math, and may not use names or attributes that start with an
underscore (other than __init__), eval/exec/open/getattr, or file, network or process access.
Lazy layers (nn.LazyConv1d, nn.LazyLinear) infer their input sizes.
Each program is trained for a fixed number of Adam steps and scored on held-out signals for
accuracy (higher is better) and parameter count (lower is better).

Reply with one or more edits of the FIRST parent's source, each exactly:
<<<<<<< SEARCH
(lines copied exactly from the first parent)
=======
(the new lines)
>>>>>>> REPLACE
or, for a larger change, the whole new program in one ```python block. Nothing else is read."""


class ReplyMemo(Protocol):
    """Replies by prompt hash: a resumed run is answered as the interrupted one was."""

    def reply(self, prompt: str) -> str | None: ...

    def add_reply(self, prompt: str, reply: str) -> None: ...


@dataclass(frozen=True)
class Scored:
    """A member of the run as a proposer reads it (a program's source, or a decoder's
    architecture as JSON) and how it scored (objectives as [value, stderr])."""
    id: str
    source: str
    objectives: dict


def score_text(scored: Scored) -> str:
    """How a member scored, as the prompt says it."""
    accuracy = scored.objectives.get("accuracy")
    params = scored.objectives.get("params")
    parts = []
    if accuracy:
        parts.append(f"accuracy {100 * accuracy[0]:.1f} ± {100 * accuracy[1]:.1f} %")
    if params:
        parts.append(f"{int(params[0]):,} parameters")
    return ", ".join(parts) or "not scored"


def prompt_messages(parents: Sequence[Scored], front: Sequence[Scored],
                    failures: Sequence[str]) -> list[dict]:
    """The chat messages for one child (see the module docstring)."""
    lines = []
    for number, parent in enumerate(parents, start=1):
        lines += [f"Parent {number} ({parent.id}): {score_text(parent)}", "```python",
                  parent.source.rstrip(), "```", ""]
    lines += run_context(front, failures, score_text)
    lines.append(f"{target_text(parents)} Write one child program.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def run_context(front: Sequence[Scored], failures: Sequence[str],
                describe: Callable[[Scored], str]) -> list[str]:
    """The prompt's lines on the run: its front (each member as `describe` says it) and its
    recent failures with their reasons."""
    lines = []
    if front:
        lines.append("The current Pareto front (accuracy against parameters):")
        lines += [f"- {member.id}: {describe(member)}" for member in front]
        lines.append("")
    if failures:
        lines.append("Recent children that failed, and why:")
        lines += [f"- {failure}" for failure in failures]
        lines.append("")
    return lines


def target_text(parents: Sequence[Scored]) -> str:
    """The target, slightly better than the best parent (EvoPrompting, OPRO): a point more
    accurate at no more parameters than the smallest parent."""
    best = max((p.objectives.get("accuracy", [0, 0])[0] for p in parents), default=0.0)
    smallest = min((p.objectives.get("params", [0, 0])[0] for p in parents), default=0)
    return (f"Target: accuracy above {100 * min(best + 0.01, 1.0):.1f} % with at most "
            f"{int(smallest):,} parameters.")


def prompt_hash(messages: list[dict], endpoint: Endpoint, draw: int) -> str:
    """The memo's key: the model, the messages and the child's own sampling seed (`draw`, from
    the child's random stream: two children of one prompt are two samples, and a resumed run
    draws the same seed again)."""
    return hashlib.sha256(json.dumps([endpoint.model, messages, draw], sort_keys=True).encode()
                          ).hexdigest()


def read_reply(reply: str, parents: Sequence[Scored]) -> tuple[str, str]:
    """The child's source and the edit it came by ('' for a full rewrite), or `ValueError`
    saying why the reply cannot be used."""
    if parse_edits(reply):
        source, edit = apply_edits(parents[0].source, reply), reply
    else:
        blocks = [b for b in CODE_BLOCK.findall(reply) if "class Net" in b]
        if not blocks:
            raise ValueError("the reply has no SEARCH/REPLACE block and no ```python block that "
                             "defines class Net")
        source, edit = blocks[-1], ""
    check_source(source)
    if any(source_key(source) == source_key(p.source) for p in parents):
        raise ValueError("the child is the same program as a parent; change something")
    return source, edit


class LLMProposer:
    """What every LLM proposer shares: replies memoized by prompt hash, one repair round with
    the reason the first reply could not be used, and a logged fallback."""

    def __init__(self, endpoint: Endpoint, memo: ReplyMemo, on_event: Callable[[str, str], None]):
        self.endpoint, self.memo, self.on_event = endpoint, memo, on_event

    def _ask(self, messages: list[dict], draw: int) -> str:
        """The reply to `messages`: the run store's, or the endpoint's (then stored)."""
        key = prompt_hash(messages, self.endpoint, draw)
        reply = self.memo.reply(key)
        if reply is None:
            reply = chat(self.endpoint, messages, seed=draw)
            self.memo.add_reply(key, reply)
        return reply

    def usable(self, messages: list[dict], draw: int, read: Callable[[str], T],
               replies: list[str]) -> tuple[T, bool]:
        """What `read` makes of the reply, and whether the repair round gave it; raises why
        neither reply could be used (`read` raises ValueError and its kin for an unusable one)."""
        reply = self._ask(messages, draw)
        replies.append(reply[:REPLY_KEPT])
        try:
            return read(reply), False
        except UNUSABLE as error:
            messages = [
                *messages, {"role": "assistant", "content": reply},
                {"role": "user", "content": f"That reply could not be used: {error}. Reply "
                 "again, following the format exactly."}]
        reply = self._ask(messages, draw)
        replies.append(reply[:REPLY_KEPT])
        return read(reply), True

    def fallback(self, error: Exception, prompt: str, replies: list[str]) -> dict:
        """Report why the LLM's child was not used; the proposal record of the fallback child."""
        reason = f"{type(error).__name__}: {error}"
        self.on_event("llm-fallback", reason)
        return {"proposer": "heuristic", "fallback_from": "llm", "reason": reason,
                "prompt": prompt, "replies": replies}


class LLMCodeProposer(LLMProposer):
    """Children from an OpenAI-compatible endpoint (see the module docstring)."""

    def __init__(self, endpoint: Endpoint, fallback: CodeMutator, memo: ReplyMemo,
                 on_event: Callable[[str, str], None]):
        super().__init__(endpoint, memo, on_event)
        self.mutator = fallback

    def child(self, rng: random.Random, parents: Sequence[Scored], front: Sequence[Scored],
              failures: Sequence[str]) -> tuple[CodeChild, dict]:
        """A child of `parents`, and how it came to be (the recipe's `proposal`)."""
        messages, draw = prompt_messages(parents, front, failures), rng.randrange(2**31)
        prompt, replies = prompt_hash(messages, self.endpoint, draw), []
        try:
            (source, edit), repaired = self.usable(
                messages, draw, lambda reply: read_reply(reply, parents), replies)
        except (*UNUSABLE, LLMError) as error:
            proposal = self.fallback(error, prompt, replies)
            child = self.mutator.crossover(rng, parents[0].source, parents[1].source) \
                if len(parents) > 1 else self.mutator.mutate(rng, parents[0].source)
            return child, proposal
        how = ("an edit" if edit else "a full rewrite") + (", repaired" if repaired else "")
        return (CodeChild(source, edit, f"written by the LLM ({how})"),
                {"proposer": "llm", "prompt": prompt, "replies": replies, "repaired": repaired})
