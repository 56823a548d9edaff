"""Property tests of the merge engine, the randomness and the order statistics."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from operators import merge, mutate, rng
from operators.quantiles import kth_smallest_sampled, kth_smallest_streaming
from tests.conftest import make_family

FAST = settings(max_examples=25, deadline=None)


@FAST
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=300),
       st.data())
def test_kth_smallest_matches_sort(values, data):
    tensor = torch.tensor(values, dtype=torch.float32)
    rank = data.draw(st.integers(0, len(values) - 1))
    assert kth_smallest_streaming(lambda: (tensor,), rank) == tensor.sort().values[rank].item()


@FAST
@given(st.integers(-(2**31), 2**31 - 1), st.integers(0, 5000), st.integers(1, 3000))
def test_random_streams_are_chunk_independent(key, start, count):
    whole = rng.random_bits(key, 0, start + count)
    assert torch.equal(whole[start:], rng.random_bits(key, start, count))


def test_uniforms_look_uniform():
    u = rng.uniform(rng.stream_key(0, "w", "t"), 0, 200_000)
    assert u.min().item() >= 0 and u.max().item() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    histogram = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (histogram - 0.1).abs().max().item() < 0.005
    z = rng.normal(rng.stream_key(0, "w", "n"), 0, 200_000)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01


@FAST
@given(st.integers(0, 10_000), st.floats(0.1, 2.0))
def test_dare_at_density_one_is_task_arithmetic(seed, weight):
    base, models = make_family(2, seed=seed % 7)
    for dare, plain in (("dare_linear", "task_arithmetic"), ("dare_ties", "ties")):
        a = merge(dare, base, models, seed=seed, weight=weight, density=1.0)
        b = merge(plain, base, models, weight=weight, density=1.0, normalize=False)
        assert all(torch.equal(a[k], b[k]) for k in a), dare


def test_dare_masks_keep_the_right_fraction():
    big_base = {"w": torch.zeros(100_000)}
    big = {"w": torch.randn(100_000)}
    for density in (0.1, 0.5, 0.9):
        out = merge("dare_linear", big_base, [big], weight=1.0, density=density, rescale=False)
        kept = (out["w"] != 0).float().mean().item()
        # binomial standard deviation sqrt(p(1-p)/n) <= 0.0016; allow 5 sigma
        assert abs(kept - density) < 0.008, density


def test_mean_of_many_dare_draws_is_the_task_vector():
    base = {"w": torch.zeros(2000)}
    model = {"w": torch.linspace(-1, 1, 2000)}
    draws = torch.stack([merge("dare_linear", base, [model], seed=s, weight=1.0, density=0.3,
                               rescale_mode="inverse_p")["w"] for s in range(400)])
    # each entry: mean of 400 draws of (x/0.3 w.p. 0.3, else 0): sd = |x| sqrt(0.7/0.3/400)
    error = (draws.mean(0) - model["w"]).abs()
    assert (error <= 5 * model["w"].abs() * (0.7 / 0.3 / 400) ** 0.5 + 1e-6).all()


@FAST
@given(st.integers(0, 1000), st.integers(2, 4))
def test_ties_at_density_one_with_agreeing_signs_is_the_disjoint_mean(seed, n):
    generator = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(64, generator=generator)}
    magnitudes = torch.rand(n, 64, generator=generator) + 0.01
    sign = torch.where(torch.rand(64, generator=generator) < 0.5, -1.0, 1.0)
    models = [{"w": base["w"] + sign * magnitudes[i]} for i in range(n)]
    out = merge("ties", base, models, weight=1.0, density=1.0)
    expected = base["w"] + torch.stack([m["w"] - base["w"] for m in models]).mean(0)
    torch.testing.assert_close(out["w"], expected, rtol=1e-6, atol=1e-6)


@FAST
@given(st.integers(0, 1000), st.integers(1, 4), st.sampled_from([0.0, 1e-3]),
       st.sampled_from(["tanh", "softmax"]), st.sampled_from([0.1, 0.5, 1.0]))
def test_pcb_of_identical_task_vectors_returns_that_vector(seed, n, clip, inter, density):
    generator = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(40, 30, generator=generator)}
    tau = torch.randn(40, 30, generator=generator) * 0.01
    models = [{"w": base["w"] + tau} for _ in range(n)]
    out = merge("pcb", base, models, density=density, clip=clip, inter=inter)
    magnitudes = tau.abs().reshape(-1).sort().values
    if clip:
        low = magnitudes[int(tau.numel() * clip)]
        high = magnitudes[int(tau.numel() * (1 - clip)) - 1]
        tau = tau.sign() * tau.abs().clamp(low, high)
    merged = out["w"] - base["w"]
    kept = merged != 0
    # Every surviving entry is the (clipped) task vector; at density 1 every entry survives.
    torch.testing.assert_close(merged[kept], tau[kept], rtol=1e-5, atol=1e-6)
    assert kept.float().mean().item() >= min(1.0, density) - 0.02


def _merge_digest(method: str, seed: int) -> str:
    base, models = make_family(3, seed=1)
    out = merge(method, base, models, seed=seed, weight=[0.5, 0.3, 0.7], density=0.5)
    digest = hashlib.sha256()
    for name in sorted(out):
        digest.update(out[name].numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("method", ["dare_ties", "della", "ties", "pcb"])
def test_a_merge_is_identical_across_processes(method):
    code = (f"from tests.test_properties import _merge_digest; "
            f"print(_merge_digest({method!r}, 42))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert other == _merge_digest(method, 42)
    if method in ("dare_ties", "della"):
        assert _merge_digest(method, 43) != other


def test_mutation_is_reproducible_and_sparse():
    base, models = make_family(1, seed=4)
    a = mutate(models[0], seed=7, sigma=0.1, rate=0.05, base=base)
    b = mutate(models[0], seed=7, sigma=0.1, rate=0.05, base=base)
    c = mutate(models[0], seed=8, sigma=0.1, rate=0.05, base=base)
    name = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[name], c[name])
    changed = (a[name] != models[0][name]).float().mean().item()
    assert 0.01 < changed < 0.12
    assert all(torch.equal(x, y) for x, y in zip(mutate(base, seed=1, sigma=0.1, rate=0).values(),
                                                 base.values(), strict=True))


def test_mutation_drawn_chunk_by_chunk_is_the_whole_tensor_formula():
    """A tensor of several chunks is mutated as the module docstring's formula says, computed
    here over the whole tensor at once: noise N(0, 1) * sigma * RMS(task vector) where the gene
    draw is below the rate."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(3, 233_337, generator=generator)
    model = (base + 0.01 * torch.randn(base.shape, generator=generator)).bfloat16()
    out = mutate({"w": model}, seed=3, sigma=0.1, rate=0.3, base={"w": base})["w"]
    n = base.numel()
    scale = float((model.float() - base).double().pow(2).mean().sqrt())
    genes = rng.uniform(rng.stream_key(3, "w", "mutate:gene"), 0, n) < 0.3
    noise = rng.normal(rng.stream_key(3, "w", "mutate:noise"), 0, n) * genes * (0.1 * scale)
    expected = (model.float().reshape(-1) + noise).bfloat16().reshape(base.shape)
    assert out.dtype == torch.bfloat16
    assert (out != expected).float().mean() < 1e-6  # a float64 sum order may move one rounding


def test_model_scope_trim_keeps_the_global_top_k():
    base, models = make_family(1, seed=6)
    density = 0.3
    out = merge("ties", base, models, weight=1.0, density=density, trim_scope="model")
    total = sum(v.numel() for v in base.values())
    kept = sum(int((out[k] != base[k]).sum()) for k in base)
    assert kept == max(1, int(density * total))
    # The kept entries are the globally largest |delta|: the smallest kept beats the largest dropped.
    deltas = {k: (models[0][k] - base[k]).abs() for k in base}
    kept_min = min(deltas[k][out[k] != base[k]].min().item() for k in base if (out[k] != base[k]).any())
    dropped_max = max(deltas[k][out[k] == base[k]].max().item() for k in base
                      if (out[k] == base[k]).any())
    assert kept_min >= dropped_max
    single_base, single = {"w": base["model.embed_tokens.weight"]}, [
        {"w": models[0]["model.embed_tokens.weight"]}]
    a = merge("ties", single_base, single, weight=1.0, density=density, trim_scope="model")
    b = merge("ties", single_base, single, weight=1.0, density=density)
    assert torch.equal(a["w"], b["w"])


def test_weights_after_election_follow_the_ties_paper():
    base = {"w": torch.zeros(3)}
    models = [{"w": torch.tensor([1.0, -1.0, 2.0])}, {"w": torch.tensor([-3.0, 2.0, 1.0])}]
    # Unweighted votes: [-2, 1, 3] elect [-, +, +]; weighted by [3, 1]: [0, -1, 7] elect [+, -, +].
    paper = merge("ties", base, models, weight=[3.0, 1.0], density=1.0,
                  weight_before_election=False)["w"]
    torch.testing.assert_close(paper, torch.tensor([-3.0, 2.0, 7.0 / 4.0]))
    mergekit_order = merge("ties", base, models, weight=[3.0, 1.0], density=1.0)["w"]
    torch.testing.assert_close(mergekit_order, torch.tensor([1.0, -1.0, 7.0 / 4.0]))


@FAST
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=2, max_size=400),
       st.data(), st.booleans())
def test_sampled_selection_is_exact_even_with_a_misleading_sample(values, data, misleading):
    tensor = torch.tensor(values, dtype=torch.float32)
    ranks = data.draw(st.lists(st.integers(0, len(values) - 1), min_size=1, max_size=3))
    # A misleading sample brackets the wrong values and forces the radix fallback.
    sample = torch.full((64,), 7.5e2) if misleading else tensor[::3]
    chunks = lambda: tensor.split(37)  # noqa: E731
    expected = [tensor.sort().values[r].item() for r in ranks]
    assert kth_smallest_sampled(chunks, ranks, len(values), sample) == expected
    magnitudes = tensor.abs()
    expected = [magnitudes.sort().values[r].item() for r in ranks]
    assert kth_smallest_sampled(lambda: magnitudes.split(37), ranks, len(values),
                                magnitudes[::5], nonnegative=True) == expected
