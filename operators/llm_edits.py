"""The LLM proposer of decoder architecture edits: an OpenAI-compatible model reads a parent's
architecture and scores, the run's front and recent failures, and replies with the child's
architecture as JSON, validated against the schema below before anything is built.

An architecture is what the shape wrappers of a merge recipe can express (`operators.recipes`):

    {"layers": [0, 1, 1, 3], "mlp": 96, "kv_heads": 2}

`layers` lists, in order, the source decoder layer behind each output layer (leaving one out
drops it, repeating one stacks it; at least `min_layers`, at most 1.5× the sources' depth);
`mlp` is the MLP neurons every layer keeps, `kv_heads` its key/value head groups (each with its
query heads), between 1 and the sources' own. A key left out keeps the parent's value; a key for a
cut this model does not allow, an unknown key, a value out of range or the parent's own
architecture is refused with the reason, which the repair round tells the model; a second
unusable reply, or an endpoint that fails, falls back to the heuristic edit and is reported.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from operators.llm_client import LLMError
from operators.llm_proposer import (
    UNUSABLE,
    LLMProposer,
    Scored,
    prompt_hash,
    run_context,
    score_text,
    target_text,
)

JSON_BLOCK = re.compile(r"```(?:json)?\s*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class DecoderShape:
    """The sources' shape and the bounds an architecture must keep."""

    layers: int
    min_layers: int
    mlp_width: int | None  # None: the MLP cannot be pruned
    kv_heads: int | None  # None: the heads cannot be pruned
    group: int  # query heads per key/value head

    @property
    def max_layers(self) -> int:
        return max(self.layers, self.layers * 3 // 2)

    def fields(self) -> tuple[str, ...]:
        """The architecture's keys: a cut the model allows and that has something to remove."""
        return ("layers",) + ("mlp",) * ((self.mlp_width or 0) > 1) \
            + ("kv_heads",) * ((self.kv_heads or 0) > 1)


def system_prompt(shape: DecoderShape) -> str:
    lines = [
        "You design smaller or better decoder-only transformers by editing the architecture of "
        "a model merged from fine-tunes of one base model.",
        f"The base has {shape.layers} decoder layers (numbered 0 to {shape.layers - 1}).",
        "An architecture is one JSON object:",
        f'- "layers": the source layer behind each output layer, in order; leave a layer out to '
        f"drop it, repeat one to stack it ({shape.min_layers} to {shape.max_layers} entries).",
    ]
    if "mlp" in shape.fields():
        lines.append(f'- "mlp": MLP neurons every layer keeps, 1 to {shape.mlp_width} (the least '
                     "important go first, by weight magnitude).")
    if "kv_heads" in shape.fields():
        lines.append(f'- "kv_heads": key/value head groups every layer keeps, 1 to '
                     f"{shape.kv_heads}; each group has {shape.group} query heads.")
    lines += ["Models are scored on accuracy (higher is better) and parameter count (lower is "
              "better).",
              "Reply with the child's architecture as one JSON object and nothing else."]
    return "\n".join(lines)


def edit_messages(parent: Scored, front: Sequence[Scored], failures: Sequence[str],
                  shape: DecoderShape) -> list[dict]:
    """The chat messages for one child of `parent`."""
    lines = [f"Parent ({parent.id}): {score_text(parent)}", f"architecture: {parent.source}", ""]
    lines += run_context(front, failures,
                         lambda member: f"{score_text(member)}; architecture: {member.source}")
    lines.append(f"{target_text([parent])} Write the child's architecture.")
    return [{"role": "system", "content": system_prompt(shape)},
            {"role": "user", "content": "\n".join(lines)}]


def _json_object(reply: str) -> dict:
    """The reply's JSON object: a fenced block, or the first object in the text."""
    blocks = JSON_BLOCK.findall(reply)
    text = blocks[-1] if blocks else reply
    start = text.find("{")
    if start < 0:
        raise ValueError("the reply holds no JSON object")
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as error:
        raise ValueError(f"the reply's JSON does not parse: {error}") from None
    if not isinstance(value, dict):
        raise ValueError("the reply's JSON is not an object")
    return value


def _count(value, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f'"{name}" must be an integer from {low} to {high}, got {value!r}')
    return value


def read_architecture(reply: str, parent: dict, shape: DecoderShape) -> dict:
    """The child's architecture (every field of `shape.fields()`), or `ValueError` saying why the
    reply cannot be used."""
    found = _json_object(reply)
    unknown = sorted(set(found) - set(shape.fields()))
    if unknown:
        raise ValueError(f"unknown or unavailable keys {unknown}; this model's architecture has "
                         f"{list(shape.fields())}")
    child = {**parent, **found}
    layers = child["layers"]
    if not isinstance(layers, list) or not shape.min_layers <= len(layers) <= shape.max_layers:
        raise ValueError(f'"layers" must be a list of {shape.min_layers} to {shape.max_layers} '
                         f"layer numbers, got {layers!r}")
    for layer in layers:
        _count(layer, "layers", 0, shape.layers - 1)
    if "mlp" in shape.fields():
        _count(child["mlp"], "mlp", 1, shape.mlp_width)
    if "kv_heads" in shape.fields():
        _count(child["kv_heads"], "kv_heads", 1, shape.kv_heads)
    if child == parent:
        raise ValueError("that is the parent's own architecture; change something")
    return child


class LLMEditProposer(LLMProposer):
    """Decoder architectures from an OpenAI-compatible endpoint (see the module docstring)."""

    def child(self, rng: random.Random, parent: Scored, front: Sequence[Scored],
              failures: Sequence[str], shape: DecoderShape) -> tuple[dict | None, dict]:
        """The child's architecture (None: fall back to the heuristic edit), and the proposal
        record the child's recipe keeps."""
        messages, draw = edit_messages(parent, front, failures, shape), rng.randrange(2**31)
        prompt, replies = prompt_hash(messages, self.endpoint, draw), []
        try:
            architecture, repaired = self.usable(
                messages, draw, lambda reply: read_architecture(
                    reply, json.loads(parent.source), shape), replies)
        except (*UNUSABLE, LLMError) as error:
            return None, self.fallback(error, prompt, replies)
        return architecture, {"proposer": "llm", "prompt": prompt, "replies": replies,
                              "repaired": repaired}
