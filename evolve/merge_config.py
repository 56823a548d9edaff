"""mergekit's YAML merge-config format, read into an evoforge merge plan.

Supported: ``models:`` (each with optional ``parameters``), top-level ``parameters``,
``base_model``, ``merge_method`` (mergekit's methods that evoforge has, plus ``pcb`` and evoforge's
convention switches), ``dtype``, ``out_dtype``, ``tokenizer_source`` (base or a model), and
``slices:`` when every slice takes the same full layer range from each source (the usual SLERP
config). Layer stacking with different ranges (passthrough) is refused with a clear message.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from operators.engine import MergeSpec
from operators.errors import MergeParameterError
from operators.methods import get_method
from search_spaces.models import BUILTIN_PREFIXES, resolve_model

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "fp32": torch.float32, "fp16": torch.float16,
           "bf16": torch.bfloat16}
_KNOWN_KEYS = {"models", "slices", "merge_method", "base_model", "parameters", "dtype",
               "out_dtype", "tokenizer_source", "seed", "name"}


@dataclass
class MergePlan:
    spec: MergeSpec
    base: Path | None
    models: list[Path]
    model_names: list[str]
    base_name: str | None
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    tokenizer_source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def mergekit_config(self) -> dict[str, Any]:
        """The config as mergekit can run it: built-in names replaced by their local folders."""
        folders = dict(zip(self.model_names, map(str, self.models), strict=True))
        if self.base_name is not None and self.base is not None:
            folders[self.base_name] = str(self.base)

        def local(reference: Any) -> Any:
            name = str(reference)
            return folders.get(name, reference) if name.startswith(BUILTIN_PREFIXES) else reference

        config = copy.deepcopy(self.raw)
        config.pop("seed", None)  # evoforge-only key
        for key in ("base_model", "tokenizer_source"):
            if key in config:
                config[key] = local(config[key])
        for entry in config.get("models") or []:
            entry["model"] = local(entry["model"])
        for piece in config.get("slices") or []:
            for source in piece.get("sources") or []:
                source["model"] = local(source["model"])
        return config


def _dtype(value: Any, key: str) -> torch.dtype | None:
    if value is None:
        return None
    if value not in _DTYPES:
        raise MergeParameterError(f"{key}: {value!r} is not a dtype; use one of {sorted(_DTYPES)}")
    return _DTYPES[value]


def _entries_from_slices(slices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if len(slices) != 1:
        raise MergeParameterError(
            "slices: evoforge merges one slice spanning all layers; layer stacking (several slices "
            "or passthrough) is not supported by `evoforge merge` yet")
    sources = slices[0].get("sources") or []
    ranges = {tuple(source.get("layer_range", ())) for source in sources}
    if len(ranges) != 1:
        raise MergeParameterError(
            f"slices: all sources must take the same layer_range, got {sorted(ranges)}")
    return [{"model": s["model"], "parameters": s.get("parameters") or {}} for s in sources]


def load_merge_config(path: Path) -> MergePlan:
    """Read and validate a mergekit-style YAML file; model references are resolved to folders."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MergeParameterError(f"merge config {path} does not exist") from None
    except yaml.YAMLError as error:
        raise MergeParameterError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise MergeParameterError(f"{path}: expected a mapping with merge_method and models")
    unknown = set(raw) - _KNOWN_KEYS
    if unknown:
        raise MergeParameterError(f"{path}: unknown keys {sorted(unknown)}; allowed: "
                                  f"{sorted(_KNOWN_KEYS)}")
    if "merge_method" not in raw:
        raise MergeParameterError(f"{path}: merge_method is required (e.g. merge_method: ties)")
    method = get_method(raw["merge_method"])
    if bool(raw.get("models")) == bool(raw.get("slices")):
        raise MergeParameterError(f"{path}: give exactly one of models: or slices:")
    entries = raw.get("models") or _entries_from_slices(raw["slices"])
    for entry in entries:
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeParameterError(f"{path}: every models: entry needs model: <path or name>")
    here = path.parent
    base_name = raw.get("base_model")
    if method.needs_base and base_name is None:
        raise MergeParameterError(f"{path}: merge_method {method.name} needs base_model:")
    if not method.needs_base:
        base_name = None
    inputs = [e for e in entries if str(e["model"]) != str(base_name)]
    spec = MergeSpec(
        method=method.name, parameters=dict(raw.get("parameters") or {}),
        model_parameters=[dict(e.get("parameters") or {}) for e in inputs],
        seed=int(raw.get("seed", 0)))
    tokenizer = raw.get("tokenizer_source")
    if tokenizer == "union":
        raise MergeParameterError("tokenizer_source: union is not supported; use base or a model")
    tokenizer_ref = base_name if tokenizer in (None, "base") else tokenizer
    return MergePlan(
        spec=spec,
        base=resolve_model(str(base_name), here) if base_name is not None else None,
        models=[resolve_model(str(e["model"]), here) for e in inputs],
        model_names=[str(e["model"]) for e in inputs],
        base_name=str(base_name) if base_name is not None else None,
        dtype=_dtype(raw.get("dtype"), "dtype"),
        out_dtype=_dtype(raw.get("out_dtype"), "out_dtype"),
        tokenizer_source=resolve_model(str(tokenizer_ref or inputs[0]["model"]), here),
        raw=raw)
