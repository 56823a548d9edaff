"""The fused C kernels give the eager torch path's bits exactly (and build where a compiler is)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from operators import merge, native, pcb
from operators.chunks import Workspace
from operators.engine import MergeSpec, iter_merge
from operators.sources import StateDictSource
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
@pytest.mark.parametrize("n_models", [6, 8])
def test_pcb_sums_task_vectors_in_the_kernels_order(n_models, monkeypatch):
    """Σₖτₖ is added left to right on both paths: a pairwise torch.sum once changed the last bit
    of some entries with six or more models."""
    base, models = make_family(n_models, seed=1 if n_models == 6 else 0)
    fused = merge("pcb", base, models, density=0.3)
    monkeypatch.setattr(native, "library", lambda: None)
    eager = merge("pcb", base, models, density=0.3)
    for name in fused:
        assert torch.equal(fused[name], eager[name]), name


def _merged_in_float32(method: str, base: dict, models: list[dict], **params) -> dict:
    """A merge in float32 (mergekit's `dtype: float32`), as recipes run it."""
    spec = MergeSpec.from_kwargs(method, len(models), seed=4, **params)
    return dict(iter_merge(spec, StateDictSource(base, "base"),
                           [StateDictSource(m, f"model #{i}") for i, m in enumerate(models)],
                           dtype=torch.float32))


@needs_kernels
@pytest.mark.parametrize(("method", "params"), CASES, ids=[m for m, _ in CASES])
def test_bf16_inputs_are_read_in_place_with_float32_copies_bits(method, params, monkeypatch):
    """A float32 merge of bfloat16 checkpoints reads them as they are (the kernels widen them
    block by block, and the eager path chunk by chunk) and gives the bits of the same merge over
    float32 copies of the inputs, by the eager path."""
    base, models = make_family(3, seed=8, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(3)  # and one tensor past FUSED_SELECT_MIN entries,
    large = torch.randn(512, 512, generator=generator)  # with bf16 deltas of 1% (many ties)
    base["model.layers.0.mlp.down_proj.weight"] = large.bfloat16()
    for model in models:
        model["model.layers.0.mlp.down_proj.weight"] = (
            large + 0.01 * torch.randn(large.shape, generator=generator)).bfloat16()
    read_in_place = _merged_in_float32(method, base, models, **params)
    monkeypatch.setattr(native, "library", lambda: None)
    eager_in_place = _merged_in_float32(method, base, models, **params)
    widened = merge(method, {k: v.float() for k, v in base.items()},
                    [{k: v.float() for k, v in m.items()} for m in models], seed=4, **params)
    for name in widened:
        assert read_in_place[name].dtype == torch.float32, name
        assert torch.equal(read_in_place[name], widened[name]), name
        assert torch.equal(eager_in_place[name], widened[name]), name


@needs_kernels
def test_the_kernels_read_bf16_and_return_float32():
    base, models = _large_family("ties")
    narrow_base, narrow = base.bfloat16(), [m.bfloat16() for m in models]
    assert native.readable(narrow_base, *narrow)
    assert not native.readable(narrow_base, models[0])  # one format per call
    assert not native.readable(base.half())
    ranks = [0, 150_000, 300_006]
    wide_base, wide = narrow_base.float(), [m.float() for m in narrow]
    assert native.magnitude_thresholds(narrow_base, narrow, ranks) == \
        native.magnitude_thresholds(wide_base, wide, ranks)
    assert native.select_ranks(narrow[0], narrow_base, ranks[:2]) == \
        native.select_ranks(wide[0], wide_base, ranks[:2])
    assert native.magnitude_extremes(narrow_base, narrow, 31, 7) == \
        native.magnitude_extremes(wide_base, wide, 31, 7)
    assert native.dare_l1_sums(narrow[1], narrow_base, 5, 0.3) == \
        native.dare_l1_sums(wide[1], wide_base, 5, 0.3)


@needs_kernels
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_draws_made_on_the_fly_equal_where_torch_applies_them(method, monkeypatch):
    """The kernels store no DARE mask: the L1 sums and the merge draw the keeps on the fly. A
    `Keep` holding such a draw gives the same tensor when the torch path applies it (as for
    more models than the kernels take)."""
    base, models = make_family(3, seed=8)
    params = {"weight": [0.5, 0.3, 0.7], "density": [0.3, 0.6, 0.9]}
    fused = merge(method, base, models, seed=4, **params)
    monkeypatch.setattr(native, "MAX_MODELS", 0)
    applied_by_torch = merge(method, base, models, seed=4, **params)
    for name in fused:
        assert torch.equal(fused[name], applied_by_torch[name]), name


@needs_kernels
@pytest.mark.parametrize("n", [100_003, 1001])  # radix passes; a quickselect for small tensors
def test_native_selection_matches_sort(n):
    values = torch.randn(n).mul(8).round()  # with long runs of equal values
    ranks = [0, 17, n // 2, n - 1]
    assert native.select_ranks(values, None, ranks) == [values.sort().values[r].item()
                                                        for r in ranks]
    other = torch.randn(n)
    magnitudes = (values - other).abs().sort().values
    assert native.select_ranks(values, other, ranks) == [magnitudes[r].item() for r in ranks]


def _large_family(values: str = "normal") -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(11)
    base = torch.randn(300_007, generator=generator)
    models = [base + 0.1 * torch.randn(base.shape, generator=generator) for _ in range(3)]
    if values == "ties":  # long runs of equal magnitudes and scores
        models = [base + (m - base).mul(20).round().div(20) for m in models]
    if values == "tiers":  # task vectors of 1e-3, 0.1 and 3 by thirds: each form of PCB's tanh
        scale = torch.tensor([0.01, 1.0, 30.0]).repeat_interleave(100_003)[:base.numel()]
        models = [base + (m - base) * scale for m in models]
    return base, models


@needs_kernels
@pytest.mark.parametrize(("values", "params"), [
    ("normal", {"density": 0.3, "weight": [0.5, 1.0, 0.8]}),
    ("normal", {"density": [0.05, 0.5, 1.0], "clip": 0.0, "lambda": 1.1}),
    ("normal", {"density": 0.2, "clip": 0.4}),  # clip ranks too far in for heaps: stored path
    ("ties", {"density": 0.3}),
    ("tiers", {"density": 0.3, "clip": 0.0}),
])
def test_fused_pcb_passes_equal_the_eager_path_on_large_tensors(values, params, monkeypatch):
    base, models = _large_family(values)
    ran = []
    fused_merge = pcb._fused_tanh_merge
    monkeypatch.setattr(pcb, "_fused_tanh_merge",
                        lambda *args: ran.append(fused_merge(*args)) or ran[-1])
    fused = merge("pcb", {"w": base}, [{"w": m} for m in models], **params)["w"]
    assert (ran[0] is None) == (params.get("clip") == 0.4)
    monkeypatch.setattr(native, "library", lambda: None)
    eager = merge("pcb", {"w": base}, [{"w": m} for m in models], **params)["w"]
    assert torch.equal(fused, eager)


class _CountingLibrary:
    """The kernels, counting calls of the radix fallback."""

    def __init__(self, lib):
        self.lib, self.radix_calls = lib, 0

    def __getattr__(self, name):
        self.radix_calls += name == "scores_radix_select"
        return getattr(self.lib, name)


@needs_kernels
@pytest.mark.parametrize("values", ["normal", "ties"])
def test_a_missed_bracket_falls_back_to_radix_passes_storing_nothing(values, monkeypatch):
    """Ties can put a run of equal scores across a sample bracket's end (a 0.5B bf16 embedding
    did); the selection then takes two radix passes: the same exact values, no scores stored."""
    base, models = _large_family(values)
    expected = merge("pcb", {"w": base}, [{"w": m} for m in models], density=0.3)["w"]
    counting = _CountingLibrary(native.library())
    monkeypatch.setattr(native, "library", lambda: counting)
    monkeypatch.setattr(native, "bracket_ranks", lambda *args: (0, 0))  # the sample's minimum
    ranks = [200_000, 5, 300_006]
    found = native.magnitude_thresholds(base, models, ranks)
    assert counting.radix_calls == 1
    assert found == [(m - base).abs().sort().values[r].item()
                     for m, r in zip(models, ranks, strict=True)]
    workspace = Workspace()
    assert torch.equal(pcb.pcb_merge(base, models, densities=[0.3] * 3, weights=[1.0] * 3,
                                     ws=workspace), expected)
    assert counting.radix_calls == 2 and not workspace._buffers  # nothing tensor-sized


@needs_kernels
@pytest.mark.parametrize("values", ["normal", "ties", "tiers"])
def test_magnitude_extremes_match_sort(values):
    base, models = _large_family(values)
    for count_low, count_high in ((1, 1), (31, 7), (300, 300)):
        found = native.magnitude_extremes(base, models, count_low, count_high)
        for (low, high), model in zip(found, models, strict=True):
            ordered = (model - base).abs().sort().values
            assert (low, high) == (ordered[count_low - 1].item(), ordered[-count_high].item())


@needs_kernels
@pytest.mark.parametrize("values", ["normal", "ties"])
def test_magnitude_thresholds_match_sort(values):
    base, models = _large_family(values)
    ranks = [0, 150_000, 300_006]
    found = native.magnitude_thresholds(base, models, ranks)
    for value, model, rank in zip(found, models, ranks, strict=True):
        assert value == (model - base).abs().sort().values[rank].item()


@needs_kernels
@pytest.mark.parametrize("miss", [False, True])
def test_large_ties_merges_equal_the_eager_path(miss, monkeypatch):
    """All models' trim thresholds in one pass (or, when a bracket misses, two radix passes)."""
    base, models = _large_family("ties")
    params = {"weight": [0.5, 0.3, 0.7], "density": [0.3, 1.0, 0.05]}
    if miss:
        monkeypatch.setattr(native, "bracket_ranks", lambda *args: (0, 0))
    fused = merge("ties", {"w": base}, [{"w": m} for m in models], **params)["w"]
    monkeypatch.setattr(native, "library", lambda: None)
    assert torch.equal(fused, merge("ties", {"w": base}, [{"w": m} for m in models],
                                    **params)["w"])
