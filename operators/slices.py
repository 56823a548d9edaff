"""Models stacked from layer ranges of other models (mergekit's ``slices:``), merged as a stream.

A `LayerPlanSource` is a TensorSource whose layer k is some layer of some other source, renamed to
index k: a layer range, a frankenmerge or a depth up-scaled model, as the merge engine sees it,
without a tensor being copied. `plan_slices` turns output slices into `MergePart`s, one
`iter_merge` (or one passthrough copy) each, with mergekit 0.1.5's semantics:

- the tensors before the layers (embeddings) are merged from the first slice's sources and those
  after them (final norm, head) from the last slice's, at gradient position t = 0 and with that
  slice's parameters;
- each slice is one merge: inside a slice of n layers, layer i sits at t = i / (n - 1) (t = 1 when
  n = 1), whatever its index in the sources or in the output;
- output layers are numbered consecutively, slice after slice.

Which tensors are layers, and which layer, is a `split(name) -> (prefix, index, suffix) | None`
function (default: `operators.settings.split_layer_name`), so an architecture-aware one can replace
the name pattern; which non-layer tensors come before the layers is a predicate (default: the
embeddings, by name), where mergekit reads its architecture tables.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from operators.engine import MergeSpec, iter_merge
from operators.errors import MergeInputError, MergeParameterError
from operators.methods import Engine, Method, Param, get_method
from operators.settings import TensorSite, count_layers, resolve_first, split_layer_name
from operators.sources import TensorSource

Split = Callable[[str], tuple[str, int, str] | None]
M = TypeVar("M")
N = TypeVar("N")

# A component that names an embedding: embed_tokens, embed_in, embeddings, wte, wpe (not embed_out,
# GPT-NeoX's head).
_EMBEDDING = re.compile(r"(?:^|\.)(?:embed(?!_out)\w*|\w*embeddings\w*|wte|wpe)(?:\.|$)")

# Not among operators.methods: there is nothing to merge, `MergePart` copies (the engine is unused).
PASSTHROUGH = Method(
    "passthrough", Engine.LINEAR, needs_base=False,
    per_model={"scale": Param(float, help="scale multiplies the copied tensors.")},
    summary="copies the tensors of its one source (layer stacking), optionally scaled")


def is_embedding(name: str) -> bool:
    """Whether a tensor outside the layer stack comes before it (an embedding or its norm)."""
    return _EMBEDDING.search(name) is not None


def method_named(name: str) -> Method:
    """A merge method by name: evoforge's, or passthrough, which only layer stacking needs."""
    return PASSTHROUGH if name == PASSTHROUGH.name else get_method(name)


def _layer_tensors(source: TensorSource, split: Split) -> dict[int, list[tuple[str, str, str]]]:
    """(prefix, suffix, name) of each layer tensor of `source`, by layer index."""
    layers: dict[int, list[tuple[str, str, str]]] = defaultdict(list)
    for name in source.names():
        parts = split(name)
        if parts is not None:
            layers[parts[1]].append((parts[0], parts[2], name))
    return layers


class LayerPlanSource:
    """A TensorSource whose layer k is layer `layers[k][1]` of `layers[k][0]`, renamed to index k,
    plus the non-layer tensors of `outside` that `keep` accepts.

    `get` loads the original tensor, so a stacked model streams like any checkpoint.
    """

    def __init__(self, layers: Sequence[tuple[TensorSource, int]],
                 outside: TensorSource | None = None, *, keep: Callable[[str], bool] | None = None,
                 split: Split = split_layer_name, label: str | None = None):
        self._origin: dict[str, tuple[TensorSource, str]] = {}
        if outside is not None:
            for name in outside.names():
                if split(name) is None and (keep is None or keep(name)):
                    self._origin[name] = (outside, name)
        found: dict[int, dict[int, list[tuple[str, str, str]]]] = {}
        for position, (source, index) in enumerate(layers):
            if id(source) not in found:
                found[id(source)] = _layer_tensors(source, split)
            tensors = found[id(source)]
            if index not in tensors:
                have = f"its layers are 0-{max(tensors)}" if tensors else "it has no layers"
                raise MergeInputError(f"{source.label} has no layer {index}; {have}")
            for prefix, suffix, name in tensors[index]:
                self._origin[f"{prefix}{position}{suffix}"] = (source, name)
        sources = dict.fromkeys(s.label for s, _ in layers)
        if outside is not None:
            sources.setdefault(outside.label)
        self.label = label or " + ".join(sources)

    def names(self) -> list[str]:
        return list(self._origin)

    def shape(self, name: str) -> tuple[int, ...]:
        source, original = self._origin[name]
        return source.shape(original)

    def dtype(self, name: str) -> torch.dtype:
        source, original = self._origin[name]
        return source.dtype(original)

    def get(self, name: str) -> torch.Tensor:
        source, original = self._origin[name]
        return source.get(original)

    def origin(self, name: str) -> tuple[TensorSource, str]:
        """The source and the name under which it holds the tensor presented as `name`."""
        return self._origin[name]


@dataclass(frozen=True)
class LayerRange(Generic[M]):
    """Layers start..stop-1 of `model` (mergekit's ``layer_range: [start, stop]``)."""

    model: M
    start: int
    stop: int


@dataclass
class OutputSlice(Generic[M]):
    """One output slice: layer ranges of one length, merged by `spec` (`base` is the base model's
    range when the method takes one). `M` is what names a model: a folder, or an open source."""

    spec: MergeSpec
    models: list[LayerRange[M]]
    base: LayerRange[M] | None = None

    @property
    def ranges(self) -> list[LayerRange[M]]:
        """Every range, the base's first: the order of the merge's inputs."""
        return ([self.base] if self.base is not None else []) + self.models

    @property
    def length(self) -> int:
        return self.models[0].stop - self.models[0].start

    def map(self, convert: Callable[[M], N]) -> OutputSlice[N]:
        """The same slice with every model converted (e.g. a folder opened as a source)."""
        def moved(piece: LayerRange[M]) -> LayerRange[N]:
            return LayerRange(convert(piece.model), piece.start, piece.stop)

        return OutputSlice(self.spec, [moved(piece) for piece in self.models],
                           None if self.base is None else moved(self.base))


@dataclass
class MergePart:
    """One merge over sources that hold the same tensors, written with its layer k as output layer
    `offset + k`: an `iter_merge`, or a copy of the one source when the method is passthrough."""

    spec: MergeSpec
    base: TensorSource | None
    models: list[TensorSource]
    offset: int = 0
    split: Split = field(default=split_layer_name, repr=False)

    @property
    def reference(self) -> TensorSource:
        """The source whose tensor names, order, shapes and dtypes the part's output has."""
        return self.base if self.base is not None else self.models[0]

    def output_name(self, name: str) -> str:
        parts = self.split(name) if self.offset else None
        return name if parts is None else f"{parts[0]}{parts[1] + self.offset}{parts[2]}"

    def tensors(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """(output name, tensor) for every tensor of the part, one at a time."""
        if self.spec.method == PASSTHROUGH.name:
            merged = _passthrough(self.spec, self.models[0], dtype)
        else:
            merged = iter_merge(self.spec, self.base, self.models, device=device, dtype=dtype)
        for name, tensor in merged:
            yield self.output_name(name), tensor


def _passthrough(spec: MergeSpec, source: TensorSource, dtype: torch.dtype | None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """The source's tensors, floating ones cast to `dtype` and times `scale` where it is set
    (mergekit multiplies only then: an unset scale copies the bits)."""
    names = source.names()
    num_layers = count_layers(names)
    own = spec.model_parameters[0] if spec.model_parameters else {}
    for name in names:
        tensor = source.get(name)
        if tensor.is_floating_point():
            if dtype is not None:
                tensor = tensor.to(dtype)
            scale = resolve_first([own, spec.parameters], "scale", TensorSite.of(name, num_layers))
            if scale is not None:
                tensor = tensor * PASSTHROUGH.per_model["scale"].check(
                    "scale", scale, f" (tensor {name!r})")
        yield name, tensor


def _filters(setting: Any) -> Iterator[str]:
    """The filter strings of a setting's {filter, value} conditions, nested ones included."""
    for condition in setting if isinstance(setting, list) else [setting]:
        if isinstance(condition, Mapping):
            if condition.get("filter") not in (None, "*"):
                yield str(condition["filter"])
            yield from _filters(condition["value"])


def _check_filters(part: MergePart, sources: Sequence[LayerPlanSource]) -> None:
    """Refuse filters that tell layers apart by their index: mergekit matches a filter against
    the sources' and the output's tensor names, the merge engine against the slice's own
    numbering, so such a filter would select other tensors here than in mergekit."""
    scopes = [part.spec.parameters, *part.spec.model_parameters]
    filters = {text for scope in scopes for setting in scope.values() for text in _filters(setting)}
    for source in sources if filters else ():
        for name in source.names():
            seen = (name, source.origin(name)[1], part.output_name(name))
            for text in filters:
                if len({text in each for each in seen}) > 1:
                    raise MergeParameterError(
                        f"filter {text!r} depends on the layer index (tensor {seen[1]!r} of "
                        f"{source.label}, written as {seen[2]!r}); inside slices evoforge "
                        "renumbers layers, so filter by module name (self_attn, mlp, ...) instead")


def plan_slices(slices: Sequence[OutputSlice[TensorSource]], *, split: Split = split_layer_name,
                before_layers: Callable[[str], bool] = is_embedding) -> list[MergePart]:
    """The merges that build the stacked model, in output order: the tensors before the layers,
    each slice's layers, the tensors after them. Expects validated slices (ranges of one length,
    the base among the ranges when the method takes one, as `evolve.merge_config` checks)."""

    def part(piece: OutputSlice[TensorSource], sources: list[LayerPlanSource],
             offset: int) -> MergePart:
        base, models = (sources[0], sources[1:]) if piece.base is not None else (None, sources)
        return MergePart(piece.spec, base, list(models), offset, split)

    def outside(piece: OutputSlice[TensorSource], keep: Callable[[str], bool]) -> MergePart:
        return part(piece, [LayerPlanSource([], r.model, keep=keep, split=split)
                            for r in piece.ranges], 0)

    def layers(index: int, piece: LayerRange[TensorSource]) -> LayerPlanSource:
        try:
            return LayerPlanSource([(piece.model, i) for i in range(piece.start, piece.stop)],
                                   split=split, label=f"{piece.model.label} layers "
                                                      f"[{piece.start}, {piece.stop})")
        except MergeInputError as error:
            raise MergeInputError(f"slices[{index}]: layer_range [{piece.start}, {piece.stop}] "
                                  f"is out of range: {error}") from None

    parts = [outside(slices[0], before_layers)]
    offset = 0
    for index, piece in enumerate(slices):
        sources = [layers(index, r) for r in piece.ranges]
        parts.append(part(piece, sources, offset))
        _check_filters(parts[-1], sources)
        offset += piece.length
    parts.append(outside(slices[-1], lambda name: not before_layers(name)))
    return parts
