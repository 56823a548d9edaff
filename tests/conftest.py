"""Shared fixtures: random Llama-shaped state dicts and the tiny built-in Llama family."""

from __future__ import annotations

import pytest
import torch

SHAPES = {
    "model.embed_tokens.weight": (40, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.mlp.up_proj.weight": (32, 16),
    "model.layers.1.self_attn.q_proj.weight": (16, 16),
    "model.layers.1.mlp.up_proj.weight": (32, 16),
    "model.layers.2.mlp.up_proj.weight": (32, 16),
    "model.norm.weight": (16,),
}


def make_family(n_models: int, seed: int = 0, scale: float = 0.1,
                dtype: torch.dtype = torch.float32) -> tuple[dict, list[dict]]:
    generator = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=generator) for k, s in SHAPES.items()}
    models = [{k: v + scale * torch.randn(v.shape, generator=generator) for k, v in base.items()}
              for _ in range(n_models)]
    return ({k: v.to(dtype) for k, v in base.items()},
            [{k: v.to(dtype) for k, v in m.items()} for m in models])


@pytest.fixture
def family():
    return make_family(3)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from search_spaces.tiny_llama import build_family

    return build_family(tmp_path_factory.mktemp("tiny"))
