"""MLP-width pruning on the eight real architectures (random weights from their transformers
configs): the pruned model loads in `transformers` at its new width, loses exactly the computed
parameters, and, where the pruned neurons could not write (zero `down_proj` columns), computes
exactly what the unpruned model computes."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from operators.prune import PruneError, kept_neurons, prune_mlp, removed_parameters
from search_spaces.families import FAMILIES

KEEP = 96  # of 128


def _model(family: str):
    torch.manual_seed(0)
    config = FAMILIES[family](hidden=64, layers=2, vocab=128)
    return config, AutoModelForCausalLM.from_config(config).eval()


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruned_model_loads_counts_and_computes_the_same(family, tmp_path):
    config, model = _model(family)
    width = config.intermediate_size
    generator = torch.Generator().manual_seed(1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    silenced = {}
    for name in state:  # neurons that cannot write: zero columns of down_proj
        if name.endswith("mlp.down_proj.weight"):
            columns = torch.randperm(width, generator=generator)[:width - KEEP]
            state[name][:, columns] = 0
            silenced[name] = set(columns.tolist())
    model.load_state_dict(state)
    pruned_state = prune_mlp(state, width, KEEP)
    for name, columns in silenced.items():  # exactly the silent neurons went
        assert pruned_state[name].shape[1] == KEEP
        kept = kept_neurons(torch.tensor([0.0 if j in columns else 1.0 for j in range(width)]),
                            KEEP)
        assert not set(kept.tolist()) & columns

    pruned_config = copy.deepcopy(config)
    pruned_config.intermediate_size = KEEP
    pruned = AutoModelForCausalLM.from_config(pruned_config).eval()
    pruned.load_state_dict(pruned_state, strict=True)
    bias = bool(getattr(config, "mlp_bias", False))
    assert _count(model) - _count(pruned) == removed_parameters(
        config.hidden_size, config.num_hidden_layers, width, KEEP, bias)

    tokens = torch.randint(0, 128, (2, 16), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens).logits, model(tokens).logits, rtol=1e-5,
                                   atol=1e-5)
    pruned.save_pretrained(tmp_path)  # and back, as an exported checkpoint is loaded
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.intermediate_size == KEEP and _count(again) == _count(pruned)


def test_the_least_important_neurons_go_first():
    config, model = _model("llama")
    state = model.state_dict()
    down = "model.layers.0.mlp.down_proj.weight"
    state[down][:, 5] *= 1e-3  # neuron 5 barely writes
    pruned = prune_mlp(state, config.intermediate_size, config.intermediate_size - 1)
    kept_columns = pruned[down]
    assert torch.equal(kept_columns[:, :5], state[down][:, :5])
    assert torch.equal(kept_columns[:, 5:], state[down][:, 6:])


def test_a_width_out_of_range_or_a_model_without_gated_mlp_is_refused():
    config, model = _model("llama")
    with pytest.raises(PruneError, match="keeps between 1 and 128"):
        prune_mlp(model.state_dict(), config.intermediate_size, 0)
    with pytest.raises(PruneError, match="no gated MLP"):
        prune_mlp({"model.embed_tokens.weight": torch.zeros(4, 4)}, 128, 64)
