"""Merge parameters that vary by layer depth and by tensor name: the merge genome.

A *setting* uses mergekit's YAML shapes, so every evoforge recipe reads like a mergekit config:

- a scalar, e.g. ``0.5``: the same value for every tensor;
- a gradient, e.g. ``[0.2, 0.8]`` or ``[0, 0.5, 1]``: anchors spread evenly over layer depth and
  linearly interpolated; a tensor of layer ``i`` out of ``L`` sits at ``t = i / (L - 1)`` and
  tensors outside the layer stack (embeddings, final norm, head) at ``t = 0``, as in mergekit;
- a list of conditions, e.g. ``[{filter: self_attn, value: 0.3}, {value: 0.7}]``: the first
  condition whose filter is a substring of the tensor name (or that has no filter, or ``*``)
  gives the value, itself a scalar or a gradient.

Settings are plain JSON/YAML values, so a recipe that holds them serializes as it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from operators.errors import MergeParameterError

Scalar = bool | int | float | str
Setting = Any  # Scalar | list[Scalar] | list[dict] | dict; validated by `check_setting`

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block)\.(\d+)\.")


def split_layer_name(tensor_name: str) -> tuple[str, int, str] | None:
    """(prefix, block index, suffix) of a tensor inside the layer stack, or None for
    embeddings, norms, heads: what a layer edit renumbers."""
    match = _LAYER_INDEX.search(tensor_name)
    if match is None:
        return None
    return tensor_name[:match.start(1)], int(match.group(1)), tensor_name[match.end(1):]


def layer_index(tensor_name: str) -> int | None:
    """The transformer-block index a tensor belongs to, or None for embeddings, norms, heads."""
    parts = split_layer_name(tensor_name)
    return parts[1] if parts else None


def count_layers(tensor_names: Iterable[str]) -> int:
    """Number of blocks in a model, read off its tensor names (max index + 1)."""
    indices = [index for name in tensor_names if (index := layer_index(name)) is not None]
    return max(indices) + 1 if indices else 0


def depth(tensor_name: str, num_layers: int) -> float:
    """Relative depth t in [0, 1] used to interpolate gradients (mergekit's convention)."""
    index = layer_index(tensor_name)
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def _is_scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float | str)


def check_setting(name: str, setting: Setting) -> None:
    """Raise a MergeParameterError if `setting` is not one of the three accepted shapes."""
    if _is_scalar(setting):
        return
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, Sequence) and setting:
        if all(_is_scalar(item) for item in setting):
            return
        if all(isinstance(item, Mapping) for item in setting):
            for condition in setting:
                unknown = set(condition) - {"filter", "value"}
                if unknown or "value" not in condition:
                    raise MergeParameterError(
                        f"parameter {name!r}: a condition must be {{filter: <substring>, "
                        f"value: <number or list>}}, got {dict(condition)!r}"
                    )
                check_setting(name, condition["value"])
            return
    raise MergeParameterError(
        f"parameter {name!r}: expected a number, a list of numbers (a gradient over layer depth) "
        f"or a list of {{filter, value}} conditions, got {setting!r}"
    )


def resolve(setting: Setting, tensor_name: str, t: float) -> Scalar | None:
    """The value of `setting` for one tensor at depth `t`; None if no condition matches."""
    if _is_scalar(setting):
        return setting
    if isinstance(setting, Mapping):
        setting = [setting]
    if all(_is_scalar(item) for item in setting):
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        low = int(scaled)
        high = min(len(setting) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * setting[low] + frac * setting[high]
    for condition in setting:
        pattern = condition.get("filter")
        if pattern is None or pattern == "*" or pattern in tensor_name:
            return resolve(condition["value"], tensor_name, t)
    return None


@dataclass(frozen=True)
class TensorSite:
    """Where a tensor sits in its model: what settings are resolved against."""

    name: str
    t: float

    @classmethod
    def of(cls, name: str, num_layers: int) -> TensorSite:
        return cls(name, depth(name, num_layers))


def resolve_first(scopes: Sequence[Mapping[str, Setting] | None], key: str, site: TensorSite) -> Any:
    """Resolve `key` from the first scope (highest precedence first) that yields a value."""
    for scope in scopes:
        if scope and key in scope:
            value = resolve(scope[key], site.name, site.t)
            if value is not None:
                return value
    return None
