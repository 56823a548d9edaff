"""One entry point for every merge: resolve parameters per tensor, stream tensors, dispatch.

`merge(method, base, models, **params)` merges in-memory state dicts; `iter_merge(spec, ...)`
streams (name, tensor) pairs from any sources (checkpoints on disk included) so callers can write
each merged tensor out before the next one is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from operators import pcb_reference, rng
from operators.chunks import Workspace, flat
from operators.errors import MergeInputError, MergeParameterError, NonFiniteInput
from operators.finite import nonfinite_count, require_finite
from operators.interpolation import linear, slerp
from operators.methods import (
    Engine,
    Method,
    PcbVariant,
    TrimScope,
    check_parameter_names,
    get_method,
)
from operators.pcb import pcb_merge
from operators.quantiles import kth_smallest_streaming
from operators.settings import Setting, TensorSite, check_setting, count_layers, resolve_first
from operators.sources import StateDictSource, TensorSource
from operators.sparsify import (
    Keep,
    Sparsifier,
    TieBreak,
    count_magnitudes,
    kept_count,
    outlier_keep,
    sparsify,
    top_keeps,
)
from operators.task_arithmetic import Aggregation, merge_task_vectors
from operators.ties import TieWindow


@dataclass
class MergeSpec:
    """A serializable merge: method, parameters (shared and per model) and the random seed.

    `parameters` holds shared parameters and defaults for per-model ones (mergekit's top-level
    `parameters:`); `model_parameters[i]` holds model i's own settings, which take precedence.
    """

    method: str
    parameters: dict[str, Setting] = field(default_factory=dict)
    model_parameters: list[dict[str, Setting]] = field(default_factory=list)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "parameters": self.parameters,
                "model_parameters": self.model_parameters, "seed": self.seed}

    @classmethod
    def from_kwargs(cls, method: str, n_models: int, seed: int = 0, **params: Any) -> MergeSpec:
        """Python-API form: a list/tuple value gives one setting per model, anything else is shared."""
        info = get_method(method)
        shared: dict[str, Setting] = {}
        per_model: list[dict[str, Setting]] = [{} for _ in range(n_models)]
        for name, value in params.items():
            if name in info.per_model and isinstance(value, list | tuple):
                if len(value) != n_models:
                    raise MergeParameterError(
                        f"{name} has {len(value)} values for {n_models} models: give one per "
                        "model (in the order of `models`) or a single value for all")
                for entry, setting in zip(per_model, value, strict=True):
                    entry[name] = setting
            else:
                shared[name] = value
        return cls(method, shared, per_model, seed)


def _validate(spec: MergeSpec, method: Method, n_models: int, has_base: bool) -> None:
    if spec.model_parameters and len(spec.model_parameters) != n_models:
        raise MergeParameterError(
            f"{len(spec.model_parameters)} model parameter sets for {n_models} models")
    check_parameter_names(method, spec.parameters, spec.model_parameters)
    for name, setting in spec.parameters.items():
        check_setting(name, setting)
    for params in spec.model_parameters:
        for name, setting in params.items():
            check_setting(name, setting)
    if method.needs_base and not has_base:
        raise MergeInputError(f"method {method.name!r} needs a base model (base_model:)")
    if not method.needs_base and has_base:
        raise MergeInputError(
            f"method {method.name!r} takes no base model: list every input under models")
    if n_models == 0 and method.engine is not Engine.TASK_VECTORS:
        raise MergeInputError(f"method {method.name!r} needs at least one model to merge")
    if method.engine is Engine.SLERP and n_models != 1:
        raise MergeInputError(f"slerp interpolates the base and exactly one other model, got "
                              f"{n_models} other models")


def _check_sources(sources: Sequence[TensorSource]) -> list[str]:
    """Names to merge, after checking every input has the same tensors with the same shapes."""
    reference = sources[0]
    names = reference.names()
    wanted = set(names)
    for source in sources[1:]:
        have = set(source.names())
        if have != wanted:
            missing, extra = sorted(wanted - have)[:5], sorted(have - wanted)[:5]
            raise MergeInputError(
                f"{source.label} and {reference.label} have different tensors (missing in "
                f"{source.label}: {missing}; only in {source.label}: {extra}). Merge only models "
                "fine-tuned from the same base architecture.")
        for name in names:
            if source.shape(name) != reference.shape(name):
                raise MergeInputError(
                    f"tensor {name!r}: shape {list(source.shape(name))} in {source.label} but "
                    f"{list(reference.shape(name))} in {reference.label}. The models differ in "
                    "architecture or vocabulary size; resize embeddings or pick compatible models.")
    return names


def _check_finite(tensor: torch.Tensor, name: str, label: str) -> None:
    """Reject NaN/Inf weights, naming the tensor and the input that holds them."""
    bad = nonfinite_count(tensor)
    if bad:
        raise MergeInputError(
            f"tensor {name!r} of {label} holds {bad} NaN/Inf values: the checkpoint is corrupt or "
            "diverged; re-export it or drop this model from the merge")


class _Resolver:
    """Resolves and validates every parameter of the method for one tensor."""

    def __init__(self, spec: MergeSpec, method: Method, n_models: int):
        self.spec, self.method, self.n_models = spec, method, n_models

    def shared(self, site: TensorSite) -> dict[str, Any]:
        values = {}
        for name, param in self.method.shared.items():
            value = resolve_first([self.spec.parameters], name, site)
            values[name] = self._checked(name, param, value, site, None)
        return values

    def per_model(self, site: TensorSite) -> list[dict[str, Any]]:
        result = []
        for index in range(self.n_models):
            own = self.spec.model_parameters[index] if self.spec.model_parameters else {}
            values = {}
            for name, param in self.method.per_model.items():
                value = resolve_first([own, self.spec.parameters], name, site)
                values[name] = self._checked(name, param, value, site, index)
            result.append(values)
        return result

    def _checked(self, name: str, param: Any, value: Any, site: TensorSite, index: int | None):
        where = f" (tensor {site.name!r}" + (f", model #{index})" if index is not None else ")")
        if value is None:
            if param.default is None:
                raise MergeParameterError(
                    f"method {self.method.name!r} needs parameter {name!r}{where}: set it in "
                    "parameters (for all models) or in each model's parameters")
            value = param.default
        return param.check(name, value, where)


@dataclass(frozen=True)
class _ModelTies:
    """The tie window of a whole-model trim's edge: positions [skip, skip + take) among the
    model's entries equal to the edge, tensor after tensor; per tensor, how many it holds and how
    many come before it."""

    skip: int
    take: int
    equal: dict[str, int]
    before: dict[str, int]

    def local(self, name: str) -> tuple[int, int] | None:
        """This tensor's part of the window, or None when it keeps all its ties."""
        equal, before = self.equal[name], self.before[name]
        skip = min(max(self.skip - before, 0), equal)
        end = min(max(self.skip + self.take - before, 0), equal)
        return None if (skip, end) == (0, equal) else (skip, end - skip)


@dataclass(frozen=True)
class _ModelTrim:
    """A whole-model trim of one model: its magnitude band and the windows of its edges."""

    band: tuple[float, float]
    low: _ModelTies | None
    high: _ModelTies | None

    def keep(self, name: str, model: torch.Tensor, base: torch.Tensor, ws: Workspace) -> Keep:
        windows = []
        for edge, value in ((self.low, self.band[0]), (self.high, self.band[1])):
            local = edge.local(name) if edge is not None else None
            if local is None:
                windows.append(None)
                continue
            count = count_magnitudes([flat(model)], flat(base), [value], ws)[0]
            windows.append(TieWindow(local[0], local[1], count.prefix))
        return Keep(band=self.band, windows=(windows[0], windows[1]))


def _model_ties(first: int, count: int, descending: bool, value: float, floating: list[str],
                model: TensorSource, base: TensorSource, total: int, ws: Workspace
                ) -> _ModelTies | None:
    """The whole model's window over the entries equal to `value`, which a trim keeping ranks
    [first, first + count) cuts (None: it keeps them all)."""
    equal, before, below, seen = {}, {}, 0, 0
    for name in floating:
        counted = count_magnitudes([flat(model.get(name))], flat(base.get(name)), [value], ws)[0]
        equal[name], before[name] = counted.equal, seen
        seen += counted.equal
        below += counted.below
    start = total - below - seen if descending else below
    skip = min(max(first - start, 0), seen)
    end = min(max(first + count - start, 0), seen)
    return None if (skip, end) == (0, seen) else _ModelTies(skip, end - skip, equal, before)


def _model_scope_bounds(method: Method, resolver: _Resolver, base: TensorSource,
                        models: Sequence[TensorSource], names: list[str], num_layers: int,
                        ws: Workspace) -> list[_ModelTrim | None]:
    """Per-model trims for the TIES paper's whole-model trim (None: keep all): one band over the
    flattened model, ties at its edges taken in the model's order (tensor after tensor, then
    flat index), so exactly the requested count survives."""
    floating = [n for n in names if base.dtype(n).is_floating_point]
    total = sum(int(torch.Size(base.shape(n)).numel()) for n in floating)
    per_tensor = [resolver.per_model(TensorSite.of(n, num_layers)) for n in floating]
    bounds: list[_ModelTrim | None] = []
    for index, model in enumerate(models):
        settings = {params[index]["density"] for params in per_tensor}
        if len(settings) != 1:
            raise MergeParameterError(
                f"trim_scope: model needs one density per model (model #{index} has "
                f"{sorted(settings)} across tensors); use trim_scope: tensor for layer-wise density")
        density = settings.pop()
        if density >= 1:
            bounds.append(None)
            continue

        def magnitudes(model=model):
            return ((model.get(n).float() - base.get(n).float()).abs() for n in floating)

        if method.sparsifier is Sparsifier.MAGNITUDE:
            k = kept_count(total, density)
            low = kth_smallest_streaming(magnitudes, total - k, True)
            bounds.append(_ModelTrim((low, math.inf), _model_ties(
                0, k, True, low, floating, model, base, total, ws), None))
            continue
        keep = int(density * total)
        bottom = max(0, total - keep - int(per_tensor[0][index]["gamma"] * total))
        low = kth_smallest_streaming(magnitudes, bottom, True)
        high = kth_smallest_streaming(magnitudes, bottom + keep - 1, True)
        bounds.append(_ModelTrim(
            (low, high), _model_ties(bottom, keep, False, low, floating, model, base, total, ws),
            None if high == low else _model_ties(bottom, keep, False, high, floating, model,
                                                 base, total, ws)))
    return bounds


def _merge_tensor(method: Method, site: TensorSite, base: torch.Tensor | None,
                  models: list[torch.Tensor], shared: dict[str, Any],
                  per_model: list[dict[str, Any]], seed: int,
                  bounds: list[_ModelTrim | None] | None, ws: Workspace,
                  out_dtype: torch.dtype | None,
                  pcb_scope: pcb_reference.Constants | None = None) -> torch.Tensor:
    if method.engine is Engine.LINEAR:
        return linear(models, [p["weight"] for p in per_model], shared["normalize"], out_dtype)
    if method.engine is Engine.SLERP:
        return slerp(shared["t"], base, models[0], out_dtype=out_dtype)
    if method.engine is Engine.PCB and shared["variant"] is PcbVariant.REFERENCE:
        densities, weights = [p["density"] for p in per_model], [p["weight"] for p in per_model]
        if pcb_scope is None:
            return pcb_reference.pcb_reference_merge(base, models, densities=densities,
                                                     weights=weights, lam=shared["lambda"],
                                                     clip=shared["clip"], out_dtype=out_dtype)
        require_finite(base, *models)
        return pcb_reference.merge_with(base, models, pcb_scope, weights, shared["lambda"],
                                        out_dtype)
    if method.engine is Engine.PCB:
        return pcb_merge(base, models, densities=[p["density"] for p in per_model],
                         weights=[p["weight"] for p in per_model], lam=shared["lambda"],
                         clip=shared["clip"], inter=shared["inter"], ws=ws, out_dtype=out_dtype)
    known = None
    if bounds is None and method.sparsifier is Sparsifier.MAGNITUDE:
        known = top_keeps(models, base, [p["density"] for p in per_model], ws)
    keeps = []
    for index, (model, params) in enumerate(zip(models, per_model, strict=True)):
        if bounds is not None:
            trim = bounds[index]
            keeps.append(Keep() if trim is None else trim.keep(site.name, model, base, ws))
            continue
        if method.sparsifier is None:
            keeps.append(Keep())
            continue
        if method.sparsifier is Sparsifier.DELLA:
            _check_della(params, site, index)
        keeps.append(sparsify(
            model, base, method.sparsifier, density=params["density"],
            gamma=params.get("gamma", 0.0), epsilon=params.get("epsilon", 0.0),
            rescale=shared["rescale"], rescale_mode=shared.get("rescale_mode", "l1"),
            key=rng.stream_key(seed, site.name, f"trim:{index}"), ws=ws, slot=f"keep{index}",
            known=None if known is None else known[index],
            tie_break=shared.get("tie_break", TieBreak.INDEX)))
    how = Aggregation(method.consensus, shared["normalize"], shared["lambda"],
                      shared["weight_before_election"])
    return merge_task_vectors(base, models, keeps, [p["weight"] for p in per_model], how, ws,
                              out_dtype)


def _check_della(params: dict[str, Any], site: TensorSite, index: int) -> None:
    density, epsilon = params["density"], params["epsilon"]
    if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise MergeParameterError(
            f"della (tensor {site.name!r}, model #{index}): density ± epsilon must stay inside "
            f"(0, 1), got density={density}, epsilon={epsilon}")


# Narrow dtypes whose values float32 holds exactly and that every merge engine reads chunk by chunk
# into float32 work buffers: a merge "in float32" reads them as they are (memory-mapped, in
# place) and writes float32 results, with the same bits as after a float32 copy of each input.
_WIDENED_IN_PLACE = (torch.bfloat16, torch.float16)


def _load(source: TensorSource, name: str, device: torch.device | str,
          dtype: torch.dtype | None) -> torch.Tensor:
    tensor = source.get(name)
    if dtype is None or not tensor.is_floating_point() or (
            dtype == torch.float32 and tensor.dtype in _WIDENED_IN_PLACE):
        return tensor.to(device)
    return tensor.to(device=device, dtype=dtype)


class MergeStream:
    """A merge, prepared: its output names, and each output tensor computed on demand.

    Checking the inputs, resolving parameters and (for the TIES paper's whole-model trim) the
    global thresholds happen once here; `tensor(name)` then merges one tensor. A recipe nested in
    another asks for its tensors one by one, so nothing model-sized is ever held.
    `dtype` is the dtype floating inputs are merged in (mergekit's ``dtype:``), and the results':
    wider inputs are cast to it first; otherwise inputs and results keep the inputs' dtype.
    """

    def __init__(self, spec: MergeSpec, base: TensorSource | None, models: Sequence[TensorSource],
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        self.method = get_method(spec.method)
        _validate(spec, self.method, len(models), base is not None)
        self.spec, self.base, self.device, self.dtype = spec, base, device, dtype
        self.sources = ([base] if base is not None else []) + list(models)
        self.names = _check_sources(self.sources)
        self.num_layers = count_layers(self.names)
        self.resolver = _Resolver(spec, self.method, len(models))
        self.bounds = None
        self.pcb_scope = None
        self.workspace = Workspace(device)
        if self.method.engine is Engine.PCB:
            self.pcb_scope = self._pcb_model_scope()
        if self.method.shared.get("trim_scope") is not None:
            first = TensorSite(self.names[0] if self.names else "", 0.0)
            shared = self.resolver.shared(first)
            if shared["trim_scope"] is TrimScope.MODEL:
                if shared["tie_break"] is TieBreak.MERGEKIT:
                    raise MergeParameterError(
                        "tie_break: mergekit reproduces mergekit's per-tensor trim; mergekit has "
                        "no trim_scope: model. Use tie_break: index with trim_scope: model")
                self.bounds = _model_scope_bounds(self.method, self.resolver, base, models,
                                                  self.names, self.num_layers, self.workspace)

    def _pcb_model_scope(self) -> pcb_reference.Constants | None:
        """`scope: model` (released PCB code): the whole model's per-task constants, found by
        streaming over the floating tensors; None for `scope: tensor`."""
        shared = self.resolver.shared(TensorSite(self.names[0] if self.names else "", 0.0))
        if shared["scope"] is TrimScope.TENSOR:
            return None
        if shared["variant"] is not PcbVariant.REFERENCE:
            raise MergeParameterError(
                "pcb scope: model is the released code's whole-model balancing; it needs "
                "variant: reference (our variant balances tensor by tensor)")
        floating = [n for n in self.names if self.base.dtype(n).is_floating_point]
        per_tensor = [self.resolver.per_model(TensorSite.of(n, self.num_layers))
                      for n in floating]
        densities = []
        for index in range(len(self.sources) - 1):
            settings = {params[index]["density"] for params in per_tensor}
            if len(settings) != 1:
                raise MergeParameterError(
                    f"pcb scope: model needs one density per model (model #{index} has "
                    f"{sorted(settings)} across tensors); use scope: tensor for layer-wise density")
            densities.append(settings.pop())

        def pairs():
            for name in floating:
                base, *models = [_load(s, name, self.device, self.dtype) for s in self.sources]
                yield base, models
        total = sum(int(torch.Size(self.base.shape(n)).numel()) for n in floating)
        return pcb_reference.constants(pairs, total, densities, shared["clip"])

    def tensor(self, name: str) -> torch.Tensor:
        tensors = [_load(source, name, self.device, self.dtype) for source in self.sources]
        if not self.method.checks_inputs:
            for tensor, source in zip(tensors, self.sources, strict=True):
                _check_finite(tensor, name, source.label)
        if not tensors[0].is_floating_point():
            if any(not torch.equal(tensors[0], t) for t in tensors[1:]):
                raise MergeInputError(
                    f"non-float tensor {name!r} differs between inputs; it cannot be averaged. "
                    "Merge models that share it (e.g. position ids) or drop it from the inputs.")
            return tensors[0]
        site = TensorSite.of(name, self.num_layers)
        has_base = self.base is not None
        base_tensor = tensors[0] if has_base else None
        model_tensors = tensors[1:] if has_base else tensors
        try:
            return _merge_tensor(self.method, site, base_tensor, model_tensors,
                                 self.resolver.shared(site), self.resolver.per_model(site),
                                 self.spec.seed, self.bounds, self.workspace, self.dtype,
                                 self.pcb_scope)
        except NonFiniteInput:
            for tensor, source in zip(tensors, self.sources, strict=True):
                _check_finite(tensor, name, source.label)
            raise MergeInputError(
                f"tensor {name!r}: a model minus the base overflows float32 (beyond 3.4e38); the "
                "weights are corrupt or not from the same base model") from None


    def cuts_ties(self, name: str) -> bool:
        """Does a magnitude trim of this tensor cut through magnitudes tied at its boundary? There
        the index order kept here and mergekit's argsort may keep different tied entries."""
        trims = (Sparsifier.MAGNITUDE, Sparsifier.MAGNITUDE_OUTLIERS)
        if self.method.sparsifier not in trims or self.bounds is not None \
                or self.base is None or not self.base.dtype(name).is_floating_point:
            return False
        base, *models = [_load(s, name, self.device, self.dtype) for s in self.sources]
        per_model = self.resolver.per_model(TensorSite.of(name, self.num_layers))
        densities = [p["density"] for p in per_model]
        if self.method.sparsifier is Sparsifier.MAGNITUDE:
            keeps = top_keeps(models, base, densities, self.workspace)
        else:
            keeps = [outlier_keep(flat(m), flat(base), p["density"], p["gamma"], self.workspace)
                     for m, p in zip(models, per_model, strict=True) if p["density"] < 1]
        return any(keep.windows != (None, None) for keep in keeps)


def iter_merge(spec: MergeSpec, base: TensorSource | None, models: Sequence[TensorSource],
               device: torch.device | str = "cpu", dtype: torch.dtype | None = None
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor) for every tensor, streaming one tensor at a time."""
    stream = MergeStream(spec, base, models, device, dtype)
    for name in stream.names:
        yield name, stream.tensor(name)


def merge(method: str, base: Mapping[str, torch.Tensor] | None,
          models: Sequence[Mapping[str, torch.Tensor]], *, seed: int = 0,
          **params: Any) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts: ``merge("ties", base, [a, b], weight=[0.7, 0.3], density=0.4)``.

    Per-model parameters take a list (one setting per model) or one setting for all; a setting is
    a number, a gradient over layer depth ``[0.2, 0.8]`` or filter conditions (see
    `operators.settings`). `seed` drives every random choice (DARE, DELLA), per tensor.
    """
    spec = MergeSpec.from_kwargs(method, len(models), seed=seed, **params)
    base_source = StateDictSource(base, "base") if base is not None else None
    sources = [StateDictSource(m, f"model #{i}") for i, m in enumerate(models)]
    return dict(iter_merge(spec, base_source, sources))
