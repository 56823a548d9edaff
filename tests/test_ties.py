"""The tie rule of trims by rank: exactly the requested count, ties in flat index order.

Task vectors of bf16 checkpoints take few distinct values. Here they take six (±1, ±2, ±3 units of
2**-7 on a base in [0.5, 0.9), where those sums are exact in bf16), so most entries tie with the
trim's boundary. The kept sets are checked against an independent rule: `torch.sort(...,
stable=True)` of |delta| in the direction mergekit sorts (descending for TIES and PCB, ascending
for breadcrumbs), cut at mergekit's counts."""

from __future__ import annotations

import subprocess

import pytest
import torch
import yaml
from typer.testing import CliRunner

from evolve.cli import app
from operators import merge, native
from operators.sparsify import della_probabilities
from tests.test_cli_merge import _load_all, _mergekit_yaml

SHAPES = {"model.layers.0.mlp.up_proj.weight": (512, 512),  # large: the fused selection paths
          "model.layers.0.self_attn.q_proj.weight": (64, 48), "model.norm.weight": (300,)}


def _tied_family(seed: int = 0) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(seed)
    base, expert = {}, {}
    for name, shape in SHAPES.items():
        b = 0.5 + 0.4 * torch.rand(shape, generator=generator)  # sums stay below 1
        units = torch.randint(1, 4, shape, generator=generator) * (
            torch.randint(0, 2, shape, generator=generator) * 2 - 1)
        base[name] = b.to(torch.bfloat16)
        expert[name] = (base[name].float() + units * 2**-7).to(torch.bfloat16)
        assert torch.equal(expert[name].float() - base[name].float(), units * 2**-7)
    return base, expert


def _continuous_family(seed: int = 1) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=generator) for n, s in SHAPES.items()}
    return base, {n: b + 0.01 * torch.randn(b.shape, generator=generator)
                  for n, b in base.items()}


def _reference(delta: torch.Tensor, method: str, density: float, gamma: float) -> torch.Tensor:
    """The kept entries by a stable sort: a flat 0/1 mask."""
    magnitude, n = delta.abs().reshape(-1), delta.numel()
    kept = torch.zeros(n, dtype=torch.bool)
    if method == "breadcrumbs":
        keep = int(density * n)
        bottom = max(0, n - keep - int(gamma * n))
        kept[torch.sort(magnitude, stable=True).indices[bottom:bottom + keep]] = True
    else:
        kept[torch.sort(magnitude, descending=True, stable=True).indices[
            :max(1, int(density * n))]] = True
    return kept


CASES = [("ties", {"density": 0.5}), ("ties", {"density": 0.13}),
         ("breadcrumbs", {"density": 0.4, "gamma": 0.1}),
         ("breadcrumbs", {"density": 0.3, "gamma": 0.0}),
         ("pcb", {"density": 0.5, "clip": 0.0}), ("pcb", {"density": 0.2, "clip": 0.0})]


@pytest.mark.parametrize("path", ["kernels", "torch"])
@pytest.mark.parametrize("family", [_tied_family, _continuous_family], ids=["bf16-ties", "float32"])
@pytest.mark.parametrize(("method", "params"), CASES, ids=[f"{m}-{p['density']}" for m, p in CASES])
def test_a_trim_keeps_exactly_its_count_ties_in_index_order(method, params, family, path,
                                                            monkeypatch):
    if path == "torch":
        monkeypatch.setattr(native, "library", lambda: None)
    elif native.library() is None:
        pytest.skip("no C compiler: the torch path is the only path")
    base, expert = family()
    merged = merge(method, base, [expert], weight=[1.0], **params)
    for name in SHAPES:
        delta = expert[name].float() - base[name].float()
        kept = _reference(delta, method, params["density"], params.get("gamma", 0.0))
        if family is _tied_family:  # the boundary is tied: a threshold rule would keep more
            boundary = delta.abs().reshape(-1)[kept].min()
            assert int((delta.abs() == boundary).sum()) > int(kept.sum()) - int(
                (delta.abs() > boundary).sum()) or method == "breadcrumbs"
        # one expert at weight 1: a kept entry becomes the expert's value (exact in bf16 here;
        # within rounding in float32), a dropped one stays the base's
        changed = (merged[name].float() != base[name].float()).reshape(-1)
        assert torch.equal(changed, kept & (delta.reshape(-1) != 0)), name


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_the_whole_model_trim_keeps_exactly_its_count_in_the_models_order(method):
    base, expert = _tied_family(seed=2)
    params = {"density": 0.35} | ({"gamma": 0.05} if method == "breadcrumbs" else {})
    merged = merge(method, base, [expert], weight=[1.0], trim_scope="model", **params)
    delta = torch.cat([(expert[n].float() - base[n].float()).reshape(-1) for n in SHAPES])
    kept = _reference(delta, method, params["density"], params.get("gamma", 0.0))
    changed = torch.cat([(merged[n].float() != base[n].float()).reshape(-1) for n in SHAPES])
    assert torch.equal(changed, kept)  # no zero deltas here: kept is changed


def test_della_ranks_equal_magnitudes_by_index():
    delta = torch.tensor([[0.5, -0.5, 0.1, 0.5, -0.1, 0.2]])
    probabilities = della_probabilities(delta, density=0.5, epsilon=0.2)[0]
    order = torch.sort(delta.abs()[0], stable=True).indices
    assert torch.equal(torch.sort(probabilities, stable=True).indices, order)
    assert len(set(probabilities.tolist())) == 6  # every entry its own rank


TIES_YAML = """
merge_method: ties
base_model: {base}
models:
  - {{model: {expert1}, parameters: {{weight: 0.7, density: 0.5}}}}
  - {{model: {expert2}, parameters: {{weight: 0.5, density: [0.3, 0.8]}}}}
parameters: {{normalize: true, lambda: 1.1}}
dtype: float32
out_dtype: bfloat16
"""


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    from search_spaces.families import build_family

    return build_family("llama", tmp_path_factory.mktemp("bf16"), experts=2)


def test_evoforge_merge_equals_mergekit_yaml_on_bf16_ties(bf16_family, tmp_path):
    """Real bf16 task vectors (many ties at the trim threshold): with `tie_break: mergekit`,
    evoforge merge gives mergekit-yaml's bits; by default it keeps exactly the requested count
    (index order), and differs from mergekit only at tied entries."""
    text = TIES_YAML.format(**{k: str(v) for k, v in bf16_family.items()})
    config = yaml.safe_load(text)
    theirs = tmp_path / "theirs"
    (tmp_path / "mergekit.yml").write_text(text)
    subprocess.run([_mergekit_yaml(), str(tmp_path / "mergekit.yml"), str(theirs)], check=True,
                   capture_output=True)
    reference = _load_all(theirs)
    for tie_break in ("mergekit", "index"):
        config["parameters"]["tie_break"] = tie_break
        (tmp_path / f"{tie_break}.yml").write_text(yaml.safe_dump(config))
        result = CliRunner().invoke(app, ["merge", str(tmp_path / f"{tie_break}.yml"), "--out",
                                          str(tmp_path / tie_break)])
        assert result.exit_code == 0, result.output
        ours = _load_all(tmp_path / tie_break)
        differing = sum(int((ours[n] != reference[n]).sum()) for n in reference)
        if tie_break == "mergekit":
            assert differing == 0
        else:  # ties do straddle the thresholds of these checkpoints
            assert differing > 0


def test_an_export_says_which_tensors_mergekit_cannot_reproduce(bf16_family, tmp_path):
    """A run's TIES child on bf16 checkpoints: mergekit-yaml on the exported mergekit_config.yml
    gives every tensor bit for bit except those cut among tied magnitudes, which the model card
    counts (and there are some here)."""
    from types import SimpleNamespace

    from evolve.recipe_export import export_individual
    from fitness.worker_spec import WorkerSpec
    from operators.recipes import tensors_cut_at_ties

    base, one, two = (str(bf16_family[k]) for k in ("base", "expert1", "expert2"))
    sources = WorkerSpec(tuple((p, p) for p in (base, one, two)), base, ()).sources()
    recipe = {"op": "merge", "method": "ties", "seed": 0, "base": {"model": base},
              "inputs": [{"model": one}, {"model": two}],
              "params": {"weight": [0.7, 0.5], "density": [0.5, 0.3], "lambda": 1.0}}
    cut = tensors_cut_at_ties(recipe, sources.bank.source)
    assert cut
    record = {"id": "g1-0", "recipe": recipe, "generation": 1, "operator": "crossover",
              "parents": []}
    run = SimpleNamespace(sources=SimpleNamespace(base=base, experts=[one, two]))
    export_individual(record, sources, run, tmp_path / "ours", None, {})
    assert f"except in {len(cut)} tensors" in (tmp_path / "ours" / "README.md").read_text()
    subprocess.run([_mergekit_yaml(), str(tmp_path / "ours" / "mergekit_config.yml"),
                    str(tmp_path / "theirs")], check=True, capture_output=True)
    ours, reference = _load_all(tmp_path / "ours"), _load_all(tmp_path / "theirs")
    assert all(torch.equal(ours[name], reference[name]) for name in reference if name not in cut)
    assert any(not torch.equal(ours[name], reference[name]) for name in cut)
