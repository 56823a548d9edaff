"""Bad input gets an error that names the tensor or parameter and says what to do."""

from __future__ import annotations

import pytest
import torch

from evolve.merge_config import load_merge_config
from operators import CheckpointError, MergeInputError, MergeParameterError, merge, mutate
from operators.sources import CheckpointSource


def test_mismatched_shapes_name_the_tensor(family):
    base, models = family
    models[1]["model.layers.0.mlp.up_proj.weight"] = torch.zeros(31, 16)
    with pytest.raises(MergeInputError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*shape"):
        merge("ties", base, models, weight=1.0, density=0.5)


def test_missing_keys_are_listed(family):
    base, models = family
    del models[2]["model.norm.weight"]
    with pytest.raises(MergeInputError, match=r"missing in model #2: \['model\.norm\.weight'\]"):
        merge("task_arithmetic", base, models, weight=1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_weights_name_the_tensor_and_model(family, bad):
    base, models = family
    models[1]["model.layers.1.self_attn.q_proj.weight"][3, 4] = bad
    with pytest.raises(MergeInputError, match=r"q_proj\.weight.*model #1.*1 NaN/Inf"):
        merge("ties", base, models, weight=1.0, density=0.5)


@pytest.mark.parametrize("numel", [4096, 1 << 18])  # the stored path and the fused kernels
@pytest.mark.parametrize("where", ["base", "model #2"])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_pcb_checks_its_own_inputs_and_names_them(numel, where, bad):
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(numel, generator=generator)}
    models = [{"w": base["w"] + 0.01 * torch.randn(numel, generator=generator)} for _ in range(3)]
    (base if where == "base" else models[2])["w"][numel // 3] = bad
    with pytest.raises(MergeInputError, match=rf"'w' of {where}.*1 NaN/Inf"):
        merge("pcb", base, models, density=0.3)


def test_pcb_names_a_task_vector_that_overflows():
    base = {"w": torch.zeros(1 << 18)}
    models = [{"w": torch.zeros(1 << 18)} for _ in range(2)]
    base["w"][7], models[0]["w"][7] = -3e38, 3e38
    with pytest.raises(MergeInputError, match=r"'w'.*overflows float32"):
        merge("pcb", base, models, density=0.3)


def test_unknown_method_lists_the_known_ones(family):
    base, models = family
    with pytest.raises(MergeParameterError, match=r"unknown merge method 'tie'.*ties"):
        merge("tie", base, models, weight=1.0)


def test_unknown_parameter_is_rejected(family):
    base, models = family
    with pytest.raises(MergeParameterError, match=r"no parameter 'densty'"):
        merge("ties", base, models, weight=1.0, densty=0.5)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_unit_interval(family, density):
    base, models = family
    with pytest.raises(MergeParameterError, match=r"density=.*model #0.*\(0\.0, 1\.0\]"):
        merge("ties", base, models, weight=1.0, density=density)


def test_density_from_a_gradient_is_checked_per_tensor(family):
    base, models = family
    with pytest.raises(MergeParameterError, match=r"density=1\.2.*model\.layers\.2"):
        merge("ties", base, models, weight=1.0, density=[[0.5, 1.2]] * 3)


def test_missing_required_weight(family):
    base, models = family
    with pytest.raises(MergeParameterError, match=r"needs parameter 'weight'"):
        merge("task_arithmetic", base, models)


def test_della_epsilon_out_of_range(family):
    base, models = family
    with pytest.raises(MergeParameterError, match=r"density ± epsilon"):
        merge("della", base, models, weight=1.0, density=0.9, epsilon=0.2)


def test_wrong_number_of_per_model_values(family):
    base, models = family
    with pytest.raises(MergeParameterError, match=r"2 values for 3 models"):
        merge("ties", base, models, weight=[0.5, 0.5], density=0.5)


def test_malformed_setting(family):
    base, models = family
    with pytest.raises(MergeParameterError, match=r"filter"):
        merge("ties", base, models, weight=[{"filtre": "mlp", "value": 1}] * 3, density=0.5)


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist"):
        CheckpointSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        CheckpointSource(tmp_path / "empty")


def test_config_with_unknown_model_says_nothing_is_downloaded(tmp_path):
    config = tmp_path / "merge.yml"
    config.write_text("merge_method: ties\nbase_model: org/not-here\nmodels:\n"
                      "  - model: org/also-not-here\n")
    with pytest.raises(CheckpointError, match=r"never downloads"):
        load_merge_config(config)


def test_config_with_unknown_key(tmp_path):
    config = tmp_path / "merge.yml"
    config.write_text("merge_method: ties\nbase: x\nmodels: [{model: y}]\n")
    with pytest.raises(MergeParameterError, match=r"unknown keys \['base'\]"):
        load_merge_config(config)


def test_mutation_rate_out_of_range(family):
    base, _ = family
    with pytest.raises(MergeParameterError, match=r"rate"):
        mutate(base, seed=0, sigma=0.1, rate=1.5)
