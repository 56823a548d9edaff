"""Size objectives of a materialized model: what a Pareto front trades accuracy against."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


@dataclass(frozen=True)
class Size:
    params: int  # parameter count
    bytes: int  # at the export dtype (floating tensors) and as stored (the rest)
    nonzero: int  # parameters that are not exactly zero (sparse merges, pruned layers)


def measure_size(state: Mapping[str, torch.Tensor], export_dtype: str = "bfloat16") -> Size:
    """Counts every tensor of a state dict once (tied weights included once per name)."""
    if export_dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown export dtype {export_dtype!r}; use one of {list(DTYPE_BYTES)}")
    params = nbytes = nonzero = 0
    for tensor in state.values():
        params += tensor.numel()
        width = DTYPE_BYTES[export_dtype] if tensor.is_floating_point() else tensor.element_size()
        nbytes += tensor.numel() * width
        nonzero += int(torch.count_nonzero(tensor))
    return Size(params, nbytes, nonzero)


def measure_latency(run: Callable[[], object], repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of `run()` (e.g. one batch forward on the worker's device)."""
    for _ in range(warmup):
        run()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    return sorted(timings)[len(timings) // 2]
