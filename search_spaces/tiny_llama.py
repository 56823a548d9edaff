"""A family of tiny Llama checkpoints built from code, for the merge demo and the tests.

Real Hugging Face checkpoints (safetensors, config.json, a character-level tokenizer that
`AutoTokenizer` loads), small enough to merge in milliseconds. The "experts" are the base plus
seeded low-rank and sparse weight changes: stand-ins for fine-tunes with the statistics merges care
about (correlated, sparse-ish task vectors). The trained zoo with real skills replaces them as the
default run's models; these stay as the fixture for fast merge tests.

Everything is deterministic: the same seed gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from search_spaces.char_tokenizer import CHARSET, VOCAB_SIZE, save_char_tokenizer

DEFAULT_EXPERTS = ("add", "sort", "reverse")


def llama_config(hidden: int = 64, layers: int = 4, heads: int = 4, vocab: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab or VOCAB_SIZE, hidden_size=hidden,
        intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _perturb(state: dict[str, torch.Tensor], seed: int, scale: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        if tensor.dim() == 2:
            rank = 2
            left = torch.randn(tensor.shape[0], rank, generator=generator)
            right = torch.randn(rank, tensor.shape[1], generator=generator)
            sparse = torch.randn(tensor.shape, generator=generator) * (
                torch.rand(tensor.shape, generator=generator) < 0.1)
            delta = (left @ right) / rank + sparse
        else:
            delta = torch.randn(tensor.shape, generator=generator)
        out[name] = tensor + scale * tensor.abs().mean() * delta
    return out


def build_family(root: Path, experts: tuple[str, ...] = DEFAULT_EXPERTS, seed: int = 0,
                 hidden: int = 64, layers: int = 4) -> dict[str, Path]:
    """Build (or reuse) base + experts under `root`; returns {name: folder}."""
    from transformers import LlamaForCausalLM

    recipe = json.dumps({"experts": experts, "seed": seed, "hidden": hidden, "layers": layers,
                         "charset": CHARSET, "version": 2})
    folder = root / hashlib.sha256(recipe.encode()).hexdigest()[:12]
    paths = {name: folder / name for name in ("base", *experts)}
    if all((path / "model.safetensors").exists() for path in paths.values()):
        return paths
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(hidden, layers))
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for index, (name, path) in enumerate(paths.items()):
        state = base_state if name == "base" else _perturb(base_state, seed * 1000 + index, 0.5)
        model.load_state_dict(state)
        model.save_pretrained(path)
        save_char_tokenizer(path)
    return paths
