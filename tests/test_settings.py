"""Layer-depth gradients and filters resolve exactly as mergekit resolves them."""

from __future__ import annotations

import pytest
from mergekit.config import evaluate_setting

from operators.settings import TensorSite, count_layers, resolve

SETTINGS = [0.5, [0.1, 0.9], [0.0, 0.3, 1.0, 0.2],
            [{"filter": "self_attn", "value": [0.2, 0.8]}, {"value": 0.4}],
            [{"filter": "mlp", "value": 0.7}]]
NAMES = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
         "model.layers.3.mlp.up_proj.weight", "model.layers.7.self_attn.o_proj.weight",
         "lm_head.weight"]


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_resolution_matches_mergekit(setting, name):
    site = TensorSite.of(name, 8)
    from mergekit.config import ConditionalParameter

    theirs_setting = ([ConditionalParameter(**c) for c in setting]
                      if isinstance(setting, list) and isinstance(setting[0], dict) else setting)
    expected = evaluate_setting(name, theirs_setting, site.t, validate=float)
    assert resolve(setting, name, site.t) == expected


def test_layer_count_from_names():
    assert count_layers(NAMES) == 8
    assert TensorSite.of("model.layers.7.mlp.x", 8).t == 1.0
    assert TensorSite.of("model.norm.weight", 8).t == 0.0
