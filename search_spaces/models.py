"""Resolving model references: built-in names (``tiny/base``) or local Hugging Face folders.

Nothing is downloaded: a reference that is neither a built-in name nor an existing folder is an
error that says so.
"""

from __future__ import annotations

from pathlib import Path

from operators.cache import cache_dir
from operators.errors import CheckpointError

BUILTIN_PREFIXES = ("tiny/", "zoo/")


def resolve_model(reference: str, relative_to: Path | None = None) -> Path:
    """The local folder of a model reference; builds built-in models on first use."""
    if "+" in reference:
        raise CheckpointError(
            f"model {reference!r}: LoRA references (model+adapter) are not supported; merge the "
            "adapter into its model first (peft's merge_and_unload) and give that folder")
    if reference.startswith("tiny/"):
        from search_spaces.tiny_llama import DEFAULT_EXPERTS, build_family

        name = reference.removeprefix("tiny/")
        if name not in ("base", *DEFAULT_EXPERTS):
            raise CheckpointError(f"unknown built-in model {reference!r}; built-in tiny models: "
                                  f"{['tiny/' + n for n in ('base', *DEFAULT_EXPERTS)]}")
        return build_family(cache_dir() / "tiny")[name]
    if reference.startswith("zoo/"):
        from search_spaces.merge_zoo import build_zoo

        zoo = build_zoo()
        name = reference.removeprefix("zoo/")
        if name not in zoo.models:
            raise CheckpointError(f"unknown zoo model {reference!r}; the zoo's models: "
                                  f"{['zoo/' + n for n in zoo.models]}")
        return zoo.models[name]
    candidates = [Path(reference).expanduser()]
    if relative_to is not None and not Path(reference).is_absolute():
        candidates.append(relative_to / reference)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise CheckpointError(
        f"model {reference!r} not found (looked in {[str(c) for c in candidates]}). evoforge "
        "never downloads weights: give a local Hugging Face model folder or a built-in name "
        f"({', '.join(p + '...' for p in BUILTIN_PREFIXES)})")
