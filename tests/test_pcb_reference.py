"""PCB `variant: reference` against an independent re-implementation of the authors' released
`PCB_merge` (duguodong7/pcb-merging): sort-based clamps and min-max normalizations over a
models × entries matrix, written the way that code is, per tensor and on the flattened model."""

from __future__ import annotations

import pytest
import torch

from operators import merge
from operators.engine import MergeSpec, iter_merge
from operators.errors import MergeParameterError
from operators.sources import StateDictSource
from tests.conftest import make_family


def _clamp_rows(x: torch.Tensor, min_ratio: float, max_ratio: float) -> torch.Tensor:
    d = x.size(1)
    ordered, _ = torch.sort(x, dim=1)
    low = ordered[:, int(d * min_ratio)].unsqueeze(1)
    high = ordered[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
    return torch.clamp(x, low, high)


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    low, high = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    return (x - low) / (high - low)


def released_pcb(checks: torch.Tensor, ratio: float, clip: float) -> torch.Tensor:
    """The released code's merged task vector of a (models × entries) matrix."""
    n = checks.shape[0]
    magnitude = _clamp_rows(checks.abs(), clip, clip)
    clipped = torch.sign(checks) * magnitude
    intra = torch.exp(n * _normalize_rows(magnitude) ** 2)
    inter = torch.tanh(checks * checks.sum(dim=0))
    scale = _normalize_rows(_clamp_rows(intra * inter, 1 - ratio, 0))
    return (clipped * scale).sum(dim=0) / torch.clamp(scale.sum(dim=0), min=1e-12)


def _ours(base: dict, models: list[dict], **params) -> dict:
    """A float32 merge (mergekit's `dtype: float32`) of possibly bf16 inputs."""
    spec = MergeSpec.from_kwargs("pcb", len(models), variant="reference", **params)
    return dict(iter_merge(spec, StateDictSource(base, "base"),
                           [StateDictSource(m, f"model #{i}") for i, m in enumerate(models)],
                           dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["continuous", "bf16"])
@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_reference_variant_is_the_released_code(dtype, scope):
    base, models = make_family(3, seed=5, scale=0.02, dtype=dtype)
    ratio, clip, lam = 0.2, 0.01, 1.1
    ours = _ours(base, models, density=ratio, clip=clip, scope=scope, **{"lambda": lam})
    names = list(base)
    flat = {name: torch.stack([m[name].float().reshape(-1) - base[name].float().reshape(-1)
                               for m in models]) for name in names}
    if scope == "model":  # the released code's way: one matrix of the whole flattened model
        merged = released_pcb(torch.cat([flat[n] for n in names], dim=1), ratio, clip)
        pieces = merged.split([flat[n].shape[1] for n in names])
        expected = dict(zip(names, pieces, strict=True))
    else:
        expected = {n: released_pcb(flat[n], ratio, clip) for n in names}
    if dtype is torch.bfloat16:  # quantized deltas: many entries tie at the drop threshold
        scores = flat[names[2]]
        assert len(scores.unique()) < scores.numel() / 2
    for name in names:
        want = base[name].float().reshape(-1) + lam * expected[name]
        assert torch.allclose(ours[name].reshape(-1), want, rtol=0, atol=1e-6), name
    # the scopes differ: the whole model's thresholds are not each tensor's
    other = _ours(base, models, density=ratio, clip=clip,
                  scope="tensor" if scope == "model" else "model", **{"lambda": lam})
    assert any(not torch.equal(ours[n], other[n]) for n in names)


def test_reference_variant_differs_from_ours_and_model_scope_needs_it():
    base, models = make_family(3, seed=5, scale=0.02)
    ours = merge("pcb", base, models, density=0.2)
    reference = merge("pcb", base, models, density=0.2, variant="reference")
    assert any(not torch.equal(ours[n], reference[n]) for n in base)
    with pytest.raises(MergeParameterError, match="variant: reference"):
        merge("pcb", base, models, scope="model")


def test_an_untouched_tensor_keeps_the_base_instead_of_nan():
    base, models = make_family(2, seed=1)
    for model in models:
        model["model.norm.weight"] = base["model.norm.weight"].clone()
    merged = merge("pcb", base, models, density=0.2, variant="reference")
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])
