"""The fused C kernels give the eager torch path's bits exactly (and build where a compiler is)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from operators import merge, native
from tests.conftest import make_family

CASES = [
    ("task_arithmetic", {"weight": [0.5, 0.3, 0.7], "lambda": 0.9}),
    ("ties", {"weight": [0.5, 0.3, 0.7], "density": [0.3, 0.5, 0.8]}),
    ("ties", {"weight": [1.0, -0.5, 0.7], "density": 0.4, "weight_before_election": False}),
    ("dare_ties", {"weight": [0.5, 0.3, 0.7], "density": 0.3}),
    ("dare_linear", {"weight": 0.5, "density": 0.6, "rescale_mode": "inverse_p"}),
    ("breadcrumbs_ties", {"weight": [0.5, 0.3, 0.7], "density": 0.5, "gamma": 0.05}),
    ("della", {"weight": [0.5, 0.3, 0.7], "density": 0.5, "epsilon": 0.1}),
    ("pcb", {"weight": [0.5, 1.0, 0.8], "density": 0.3}),
    ("pcb", {"density": 1.0, "clip": 0.0}),
]

needs_kernels = pytest.mark.skipif(native.library() is None,
                                   reason="no C compiler: the eager path is the only path")


def test_kernels_build_where_a_compiler_exists():
    if os.environ.get("EVOFORGE_NATIVE", "1") != "0" and (shutil.which("cc") or shutil.which("gcc")):
        assert native.library() is not None


@needs_kernels
@pytest.mark.parametrize(("method", "params"), CASES, ids=[m for m, _ in CASES])
def test_fused_kernels_equal_the_eager_path(method, params, monkeypatch):
    base, models = make_family(3, seed=8)
    fused = merge(method, base, models, seed=4, **params)
    monkeypatch.setattr(native, "library", lambda: None)
    eager = merge(method, base, models, seed=4, **params)
    for name in fused:
        assert torch.equal(fused[name], eager[name]), name


@needs_kernels
def test_native_selection_matches_sort():
    values = torch.randn(100_003)
    ranks = [0, 17, 50_000, 100_002]
    assert native.select_ranks(values, None, ranks) == [values.sort().values[r].item()
                                                        for r in ranks]
    other = torch.randn(100_003)
    magnitudes = (values - other).abs().sort().values
    assert native.select_ranks(values, other, ranks) == [magnitudes[r].item() for r in ranks]
