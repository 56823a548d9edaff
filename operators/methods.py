"""The merge methods evoforge knows, as configurations of a few engines, and their parameters.

Names, defaults and parameter names follow mergekit 0.1.5 wherever mergekit has the method, so a
mergekit YAML means the same thing here; `pcb` and the convention switches are ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from operators.errors import MergeParameterError
from operators.pcb import InterBalancing
from operators.sparsify import RescaleMode, Sparsifier, TieBreak
from operators.task_arithmetic import Consensus


class Engine(StrEnum):
    TASK_VECTORS = "task_vectors"
    PCB = "pcb"
    LINEAR = "linear"
    SLERP = "slerp"


class TrimScope(StrEnum):
    TENSOR = "tensor"  # mergekit and peft: top-k inside each tensor
    MODEL = "model"  # TIES paper: one top-k over the whole flattened model


class PcbVariant(StrEnum):
    OURS = "ours"  # operators.pcb: our reading of the paper, streaming C kernels
    REFERENCE = "reference"  # operators.pcb_reference: the authors' released code


@dataclass(frozen=True)
class Param:
    """One parameter: its type, default (None: required) and admissible range."""

    kind: type | tuple[type, ...] | StrEnum
    default: Any = None
    low: float | None = None  # exclusive lower bound
    high: float | None = None  # inclusive upper bound
    help: str = ""

    def check(self, name: str, value: Any, where: str) -> Any:
        """Validate and coerce one resolved value; raise an error that says how to fix it."""
        if isinstance(self.kind, type) and issubclass(self.kind, StrEnum):
            try:
                return self.kind(value)
            except ValueError:
                allowed = ", ".join(member.value for member in self.kind)
                raise MergeParameterError(
                    f"{name}={value!r}{where}: allowed values are {allowed}") from None
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MergeParameterError(f"{name}={value!r}{where}: expected true or false")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MergeParameterError(f"{name}={value!r}{where}: expected a number")
        value = float(value)
        if not math.isfinite(value):
            raise MergeParameterError(f"{name}={value!r}{where}: must be a finite number")
        below = self.low is not None and value <= self.low
        if below or (self.high is not None and value > self.high):
            low = "-inf" if self.low is None else self.low
            high = "inf" if self.high is None else self.high
            raise MergeParameterError(
                f"{name}={value!r}{where}: must lie in ({low}, {high}]. {self.help}".rstrip())
        return value


WEIGHT = Param(float, help="Model weight (scale of its task vector or of its tensors).")
DENSITY = Param(float, 1.0, 0.0, 1.0, "density is the fraction of entries kept, in (0, 1].")
GAMMA = Param(float, 0.01, -1e-12, 1.0, "gamma is the fraction of largest entries dropped.")
EPSILON = Param(float, 0.15, -1e-12, 1.0, "epsilon is DELLA's keep-probability spread.")
LAMBDA = Param(float, 1.0, help="lambda scales the merged task vector.")


@dataclass(frozen=True)
class Method:
    name: str
    engine: Engine
    sparsifier: Sparsifier | None = None
    consensus: Consensus | None = None
    normalize: bool = False
    rescale: bool = False
    per_model: dict[str, Param] = field(default_factory=dict)
    shared: dict[str, Param] = field(default_factory=dict)
    needs_base: bool = True
    summary: str = ""
    # The method rejects NaN/Inf inputs itself (raising `NonFiniteInput`) on a pass it makes
    # anyway, so the engine skips its own check pass over the inputs.
    checks_inputs: bool = False


def _task_vector_method(name: str, sparsifier: Sparsifier | None, consensus: Consensus | None,
                        normalize: bool, rescale: bool, summary: str) -> Method:
    per_model = {"weight": WEIGHT, "density": DENSITY}
    if sparsifier is Sparsifier.MAGNITUDE_OUTLIERS:
        per_model["gamma"] = GAMMA
    if sparsifier is Sparsifier.DELLA:
        per_model["epsilon"] = EPSILON
    shared = {
        "lambda": LAMBDA,
        "normalize": Param(bool, normalize),
        "rescale": Param(bool, rescale),
        "int8_mask": Param(bool, False, help="accepted for mergekit compatibility; no effect"),
        "weight_before_election": Param(bool, True),
    }
    if sparsifier in (Sparsifier.RANDOM, Sparsifier.DELLA):
        shared["rescale_mode"] = Param(RescaleMode, RescaleMode.L1.value)
    if sparsifier in (Sparsifier.MAGNITUDE, Sparsifier.MAGNITUDE_OUTLIERS):
        shared["trim_scope"] = Param(TrimScope, TrimScope.TENSOR.value)
        shared["tie_break"] = Param(TieBreak, TieBreak.INDEX.value)
    return Method(name, Engine.TASK_VECTORS, sparsifier, consensus, normalize, rescale, per_model,
                  shared, summary=summary)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("linear", Engine.LINEAR, per_model={"weight": WEIGHT},
           shared={"normalize": Param(bool, True)}, needs_base=False,
           summary="weighted average of the models' weights"),
    Method("slerp", Engine.SLERP, shared={"t": Param(float, None, -1e-12, 1.0)},
           summary="spherical interpolation from the base (t=0) to the other model (t=1)"),
    _task_vector_method("task_arithmetic", None, None, False, False,
                        "base + lambda * sum of weighted task vectors"),
    _task_vector_method("ties", Sparsifier.MAGNITUDE, Consensus.SUM, True, False,
                        "trim to top-k magnitudes, elect signs, disjoint mean"),
    _task_vector_method("dare_ties", Sparsifier.RANDOM, Consensus.SUM, False, True,
                        "random drop + rescale, then TIES sign election"),
    _task_vector_method("dare_linear", Sparsifier.RANDOM, None, False, True,
                        "random drop + rescale, then weighted sum"),
    _task_vector_method("breadcrumbs", Sparsifier.MAGNITUDE_OUTLIERS, None, False, False,
                        "drop outliers and small magnitudes, weighted sum"),
    _task_vector_method("breadcrumbs_ties", Sparsifier.MAGNITUDE_OUTLIERS, Consensus.SUM, False,
                        False, "breadcrumbs trim, then TIES sign election"),
    _task_vector_method("della", Sparsifier.DELLA, Consensus.SUM, True, True,
                        "magnitude-ranked random drop, then TIES sign election"),
    _task_vector_method("della_linear", Sparsifier.DELLA, None, False, True,
                        "magnitude-ranked random drop, then weighted sum"),
    Method("pcb", Engine.PCB,
           per_model={"weight": Param(float, 1.0, help="coefficient of the task vector"),
                      "density": Param(float, 0.2, 0.0, 1.0, "density is PCB's kept ratio r.")},
           shared={"lambda": LAMBDA,
                   "clip": Param(float, 1e-4, -1e-12, 0.5, "clip is a quantile in [0, 0.5)."),
                   "inter": Param(InterBalancing, InterBalancing.TANH.value),
                   "variant": Param(PcbVariant, PcbVariant.OURS.value),
                   "scope": Param(TrimScope, TrimScope.TENSOR.value)},
           summary="parameter competition balancing (intra + inter task), drop, weighted mean",
           checks_inputs=True),
)}


def get_method(name: str) -> Method:
    """The method called `name`, or an error listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise MergeParameterError(f"unknown merge method {name!r}; known methods: {known}") from None


def check_parameter_names(method: Method, shared: dict[str, Any],
                          per_model: list[dict[str, Any]]) -> None:
    """Reject parameter names the method does not take (typos must not pass silently)."""
    for name in shared:
        if name not in method.shared and name not in method.per_model:
            raise MergeParameterError(
                f"method {method.name!r} has no parameter {name!r}; it takes "
                f"{sorted(method.shared) + sorted(method.per_model)}")
    for index, params in enumerate(per_model):
        for name in params:
            if name not in method.per_model:
                raise MergeParameterError(
                    f"model #{index}: method {method.name!r} has no per-model parameter "
                    f"{name!r}; per-model parameters are {sorted(method.per_model)}")
