"""mergekit's YAML merge-config format, read into an evoforge merge plan.

Supported: ``models:`` (each with optional ``parameters``), top-level ``parameters``,
``base_model``, ``merge_method`` (mergekit's methods that evoforge has, ``passthrough``, plus ``pcb``
and evoforge's convention switches), ``dtype``, ``out_dtype``, ``tokenizer_source`` (base or a
model), and ``slices:``. Slices stack layer ranges, as mergekit 0.1.5 does: with passthrough, one
source per slice (frankenmerges, depth up-scaling); with a merge method, several sources per slice
whose ranges have one length, with the slice's own ``parameters`` and ``base_model`` if given.
Slices are checked here, before any tensor is written, because their merges run one after another
while the output is being written (see `operators.slices`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from operators import rng
from operators.engine import MergeSpec
from operators.errors import MergeParameterError
from operators.methods import Method, check_parameter_names
from operators.settings import Setting, check_setting
from operators.slices import PASSTHROUGH, LayerRange, OutputSlice, method_named
from search_spaces.models import BUILTIN_PREFIXES, resolve_model

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "fp32": torch.float32, "fp16": torch.float16,
           "bf16": torch.bfloat16}
_KNOWN_KEYS = {"models", "slices", "merge_method", "base_model", "parameters", "dtype",
               "out_dtype", "tokenizer_source", "seed", "name"}
_SLICE_KEYS = {"sources", "parameters", "base_model"}
_SOURCE_KEYS = {"model", "layer_range", "parameters"}


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
    # `slices:` configs: the output's layers, slice by slice (`spec` then holds the top level's
    # method, parameters and seed; each slice has its own spec). None for `models:` configs.
    slices: list[OutputSlice[Path]] | None = None

    def layer_plan(self) -> list[tuple[Path, int]] | None:
        """(model folder, layer index) of each output layer, the base's when a slice has one;
        None when the output keeps the layers of its config's model."""
        if self.slices is None:
            return None
        return [(piece.ranges[0].model, piece.ranges[0].start + offset)
                for piece in self.slices for offset in range(piece.length)]

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
            if "base_model" in piece:
                piece["base_model"] = local(piece["base_model"])
            for source in piece.get("sources") or []:
                source["model"] = local(source["model"])
        return config


def _dtype(value: Any, key: str) -> torch.dtype | None:
    if value is None:
        return None
    if value not in _DTYPES:
        raise MergeParameterError(f"{key}: {value!r} is not a dtype; use one of {sorted(_DTYPES)}")
    return _DTYPES[value]


def _check_keys(mapping: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(mapping) - allowed
    if unknown:
        raise MergeParameterError(f"{where}: unknown keys {sorted(unknown)}; allowed: "
                                  f"{sorted(allowed)}")


def _conditions(setting: Setting) -> list[dict[str, Any]] | None:
    """A setting's {filter, value} conditions; None for a number or a gradient."""
    if isinstance(setting, dict):
        return [setting]
    if isinstance(setting, list) and setting and all(isinstance(c, dict) for c in setting):
        return list(setting)
    return None


def _layered(high: dict[str, Setting], low: dict[str, Setting]) -> dict[str, Setting]:
    """`high`'s settings over `low`'s, as one scope. mergekit looks a parameter up in the slice,
    then at the top level, and slice conditions that match no tensor fall through to the top
    level: the slice's conditions followed by the top level's setting say the same."""
    merged = {**low, **high}
    for key in high.keys() & low.keys():
        if (first := _conditions(high[key])) is not None:
            merged[key] = first + (_conditions(low[key]) or [{"value": low[key]}])
    return merged


def _read_source(where: str, source: Any) -> tuple[LayerRange[str], dict[str, Setting]]:
    if not isinstance(source, dict) or "model" not in source:
        raise MergeParameterError(
            f"{where}: expected {{model: <path or name>, layer_range: [start, stop]}}")
    _check_keys(source, _SOURCE_KEYS, where)
    bounds = source.get("layer_range")
    if not (isinstance(bounds, list) and len(bounds) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)):
        raise MergeParameterError(
            f"{where}: layer_range must be [start, stop], two integers, got {bounds!r}")
    start, stop = bounds
    if start < 0 or stop <= start:
        raise MergeParameterError(
            f"{where}: layer_range {bounds} holds no layers; it takes layers start to stop - 1, "
            "so it needs 0 <= start < stop")
    return LayerRange(str(source["model"]), start, stop), dict(source.get("parameters") or {})


def _read_slice(index: int, piece: Any, method: Method, shared: dict[str, Setting],
                base_name: str | None, seed: int) -> OutputSlice[str]:
    where = f"slices[{index}]"
    if not isinstance(piece, dict) or not isinstance(piece.get("sources"), list) \
            or not piece["sources"]:
        raise MergeParameterError(
            f"{where}: expected {{sources: [{{model: ..., layer_range: [start, stop]}}, ...]}}")
    _check_keys(piece, _SLICE_KEYS, where)
    sources = [_read_source(f"{where}.sources[{j}]", s) for j, s in enumerate(piece["sources"])]
    names = [r.model for r, _ in sources]
    lengths = [r.stop - r.start for r, _ in sources]
    if len(set(lengths)) > 1:
        raise MergeParameterError(
            f"{where}: its sources take {lengths} layers; every source of a slice must give the "
            "same number of layers (they are merged layer by layer)")
    if len(set(names)) < len(names):
        raise MergeParameterError(
            f"{where}: a model is listed twice; as in mergekit, a slice merges each model once "
            "(stack its layers in separate slices instead)")
    if method is PASSTHROUGH and len(sources) > 1:
        raise MergeParameterError(
            f"{where}: passthrough copies the layers of one source, this slice has "
            f"{len(sources)}; give each source its own slice, or merge them with a merge method")
    base = piece.get("base_model", base_name) if method.needs_base else None
    if method.needs_base and base is None:
        raise MergeParameterError(f"{where}: merge_method {method.name} needs base_model: (at "
                                  "the top level or in the slice)")
    base_range = next((r for r, _ in sources if base is not None and r.model == str(base)), None)
    if base is not None and base_range is None:
        raise MergeParameterError(
            f"{where}: the base model {base} must be one of the slice's sources, with the "
            "layer_range to take from it (mergekit merges a slice from its own sources only)")
    inputs = [(r, params) for r, params in sources if r is not base_range]
    spec = MergeSpec(method.name, _layered(dict(piece.get("parameters") or {}), shared),
                     [params for _, params in inputs], seed=rng.stream_key(seed, where, "slice"))
    try:
        check_parameter_names(method, spec.parameters, spec.model_parameters)
        for scope in (spec.parameters, *spec.model_parameters):
            for name, setting in scope.items():
                check_setting(name, setting)
    except MergeParameterError as error:
        raise MergeParameterError(f"{where}: {error}") from None
    return OutputSlice(spec, [r for r, _ in inputs], base_range)


def _read_slices(raw: Any, method: Method, shared: dict[str, Setting], base_name: str | None,
                 seed: int) -> list[OutputSlice[str]]:
    """The slices, checked; DARE/DELLA draws of each come from its own seed, derived from `seed`
    (slice layers are numbered from 0 in each slice's merge, so a shared seed would repeat them)."""
    if not isinstance(raw, list):
        raise MergeParameterError("slices: expected a list of {sources: [...]} entries")
    slices = [_read_slice(i, piece, method, shared, base_name, seed) for i, piece in enumerate(raw)]
    first, last = len(slices[0].ranges), len(slices[-1].ranges)
    if last > first:
        raise MergeParameterError(
            f"slices: the last slice has {last} sources and the first {first}; mergekit 0.1.5 "
            f"would merge the final norm and head from only {first} of them. Give the first and "
            "the last slice the same sources")
    return slices


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
    _check_keys(raw, _KNOWN_KEYS, str(path))
    if "merge_method" not in raw:
        raise MergeParameterError(f"{path}: merge_method is required (e.g. merge_method: ties)")
    method = method_named(raw["merge_method"])
    if bool(raw.get("models")) == bool(raw.get("slices")):
        raise MergeParameterError(f"{path}: give exactly one of models: or slices:")
    here = path.parent
    base_name = str(raw["base_model"]) if method.needs_base and "base_model" in raw else None
    shared = dict(raw.get("parameters") or {})
    seed = int(raw.get("seed", 0))
    slices = None
    if raw.get("slices"):
        slices = _read_slices(raw["slices"], method, shared, base_name, seed)
        names = list(dict.fromkeys(r.model for piece in slices for r in piece.ranges
                                   if r.model != base_name))
        spec = MergeSpec(method.name, shared, seed=seed)
    else:
        entries = raw["models"]
        for entry in entries:
            if not isinstance(entry, dict) or "model" not in entry:
                raise MergeParameterError(f"{path}: every models: entry needs model: <path or name>")
        if method.needs_base and base_name is None:
            raise MergeParameterError(f"{path}: merge_method {method.name} needs base_model:")
        if method is PASSTHROUGH and len(entries) != 1:
            raise MergeParameterError(f"{path}: passthrough copies one model; list one under "
                                      "models:, or stack layer ranges with slices:")
        inputs = [e for e in entries if str(e["model"]) != base_name]
        names = [str(e["model"]) for e in inputs]
        spec = MergeSpec(method.name, shared, [dict(e.get("parameters") or {}) for e in inputs],
                         seed=seed)
    folders = {name: resolve_model(name, here)
               for name in dict.fromkeys([*names, *([base_name] if base_name else [])])}
    tokenizer = raw.get("tokenizer_source")
    if tokenizer == "union":
        raise MergeParameterError("tokenizer_source: union is not supported; use base or a model")
    tokenizer_ref = base_name if tokenizer in (None, "base") else tokenizer
    return MergePlan(
        spec=spec,
        base=folders[base_name] if base_name is not None else None,
        models=[folders[name] for name in names],
        model_names=names,
        base_name=base_name,
        dtype=_dtype(raw.get("dtype"), "dtype"),
        out_dtype=_dtype(raw.get("out_dtype"), "out_dtype"),
        tokenizer_source=resolve_model(str(tokenizer_ref or names[0]), here),
        raw=raw,
        slices=None if slices is None else [piece.map(folders.__getitem__) for piece in slices])
