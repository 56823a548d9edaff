"""Calling mergekit 0.1.5's in-memory API with evoforge-style arguments (test helper)."""

from __future__ import annotations

from mergekit.merge_methods.api import merge_state_dicts


def mergekit_merge(method: str, base: dict | None, models: list[dict], **params) -> dict:
    inputs = {f"m{i}": m for i, m in enumerate(models)}
    mk_params = {k: ({f"m{i}": x for i, x in enumerate(v)} if isinstance(v, list) else v)
                 for k, v in params.items()}
    if base is None:
        return merge_state_dicts(inputs, method, parameters=mk_params)
    return merge_state_dicts({"base": base} | inputs, method, parameters=mk_params, base="base")
