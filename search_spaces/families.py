"""Tiny checkpoints of the real architectures users merge: Llama, Qwen, Mistral, Gemma, Phi.

Users bring 1B–8B bf16 fine-tunes of one base, saved by transformers as sharded safetensors, often
with tied embeddings. The merge code has to cope with what those folders really contain, and each
family differs in ways that break naive code: a tied `lm_head` that is absent on disk (Llama-3.2,
Qwen2.5, Qwen3, Gemma), qkv biases (Qwen2), q/k norms (Qwen3, Gemma3), Gemma's four norms per layer
stored as offsets from 1, alternating sliding and global attention (Gemma2, Gemma3), fused
`qkv_proj`/`gate_up_proj` (Phi3), and a config vocabulary padded past the tokenizer's (Qwen). This
module builds that world in miniature: each family from its own transformers config, with random
weights, written exactly the way transformers writes the real ones (bf16, sharded with an index,
tied tensors left out), plus the character-level tokenizer so `AutoTokenizer` loads every folder.

The experts are the base plus seeded low-rank and sparse changes of a few percent of each tensor's
RMS: stand-ins for fine-tunes, so merges and fitness differ between experts. Everything is
deterministic: the same arguments give the same bytes (on the same torch and transformers).

The sizes are keyword arguments, so the same builder makes the ~0.5B-parameter Llama of the memory
benchmark: `build_family("llama", root, **LLAMA_05B)`. From the shell:
`python -m search_spaces.families qwen3 /tmp/families` prints the folders it built.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from search_spaces.char_tokenizer import BOS_ID, CHARSET, EOS_ID, PAD_ID, VOCAB_SIZE, save_char_tokenizer

if TYPE_CHECKING:
    from transformers import PretrainedConfig

FAMILIES_VERSION = 1  # bump when the build code changes what it produces
CONTEXT = 128
SLIDING_WINDOW = 32  # shorter than CONTEXT, so sliding layers really differ from global ones
EXPERT_SCALE = 0.03  # an expert's change, as a fraction of each tensor's RMS
BASE_VECTOR_NOISE = 0.05  # spread given to the base's norms and biases (transformers inits constants)
DELTA_RANK = 2
DELTA_DENSITY = 0.05
RECIPE_FILE = "family.json"

# The memory benchmark's model: the shape of the small real Llamas (a 32k vocabulary, 24 layers,
# grouped-query attention), about 0.51B parameters, 1 GB in bf16, shards of 200 MB.
LLAMA_05B: dict[str, int] = {"hidden": 1024, "layers": 24, "vocab": 32000, "intermediate": 5120,
                             "shard_bytes": 200_000_000}


def _shape(hidden: int, layers: int, vocab: int | None, intermediate: int | None) -> dict:
    """The config fields every family shares; heads grow with the width as in the real models.

    Grouped-query attention everywhere (the real checkpoints of all eight families use it), so
    key/value projections are narrower than the query's, as merges meet them.
    """
    heads = max(4, hidden // 64)
    return {"vocab_size": vocab or VOCAB_SIZE, "hidden_size": hidden,
            "intermediate_size": intermediate or 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": max(2, heads // 4),
            "max_position_embeddings": CONTEXT, "pad_token_id": PAD_ID, "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID}


def _head_dim(shape: dict) -> int:
    return shape["hidden_size"] // shape["num_attention_heads"]


def _padded_vocab(vocab: int | None) -> int:
    """Qwen's configs round the vocabulary up past the tokenizer's (151936 for 151665 tokens)."""
    return vocab or -(-VOCAB_SIZE // 64) * 64


def _alternating(layers: int) -> list[str]:
    return ["sliding_attention" if index % 2 == 0 else "full_attention" for index in range(layers)]


def llama(hidden: int = 64, layers: int = 4, vocab: int | None = None,
          intermediate: int | None = None) -> PretrainedConfig:
    """Llama 3 8B-style: untied output head."""
    from transformers import LlamaConfig

    shape = _shape(hidden, layers, vocab, intermediate)
    return LlamaConfig(**shape, head_dim=_head_dim(shape), tie_word_embeddings=False)


def llama_tied(hidden: int = 64, layers: int = 4, vocab: int | None = None,
               intermediate: int | None = None) -> PretrainedConfig:
    """Llama-3.2-1B-style: the output head is the embedding matrix, so no lm_head on disk."""
    from transformers import LlamaConfig

    shape = _shape(hidden, layers, vocab, intermediate)
    return LlamaConfig(**shape, head_dim=_head_dim(shape), tie_word_embeddings=True)


def qwen2(hidden: int = 64, layers: int = 4, vocab: int | None = None,
          intermediate: int | None = None) -> PretrainedConfig:
    """Qwen2.5-0.5B-style: tied, biases on q/k/v, a padded vocabulary."""
    from transformers import Qwen2Config

    shape = _shape(hidden, layers, _padded_vocab(vocab), intermediate)
    return Qwen2Config(**shape, tie_word_embeddings=True, use_sliding_window=False)


def qwen3(hidden: int = 64, layers: int = 4, vocab: int | None = None,
          intermediate: int | None = None) -> PretrainedConfig:
    """Qwen3-0.6B-style: tied, RMS norms on queries and keys, a padded vocabulary."""
    from transformers import Qwen3Config

    shape = _shape(hidden, layers, _padded_vocab(vocab), intermediate)
    return Qwen3Config(**shape, head_dim=_head_dim(shape), tie_word_embeddings=True,
                       use_sliding_window=False)


def mistral(hidden: int = 64, layers: int = 4, vocab: int | None = None,
            intermediate: int | None = None) -> PretrainedConfig:
    """Mistral-7B-v0.1-style: untied, sliding-window attention in every layer."""
    from transformers import MistralConfig

    shape = _shape(hidden, layers, vocab, intermediate)
    return MistralConfig(**shape, head_dim=_head_dim(shape), tie_word_embeddings=False,
                         sliding_window=SLIDING_WINDOW)


def gemma2(hidden: int = 64, layers: int = 4, vocab: int | None = None,
           intermediate: int | None = None) -> PretrainedConfig:
    """Gemma-2-2B-style: tied, sliding and global layers alternating, soft-capped logits,
    pre/post norms around both attention and MLP."""
    from transformers import Gemma2Config

    shape = _shape(hidden, layers, vocab, intermediate)
    head_dim = _head_dim(shape)
    return Gemma2Config(**shape, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                        tie_word_embeddings=True, sliding_window=SLIDING_WINDOW,
                        layer_types=_alternating(layers), final_logit_softcapping=30.0,
                        attn_logit_softcapping=50.0)


def gemma3(hidden: int = 64, layers: int = 4, vocab: int | None = None,
           intermediate: int | None = None) -> PretrainedConfig:
    """Gemma-3-1B-style (text only, Gemma3ForCausalLM): tied, q/k norms, Gemma2's four norms,
    sliding and full attention layers (every second one full, so a 4-layer model has both)."""
    from transformers import Gemma3TextConfig

    shape = _shape(hidden, layers, vocab, intermediate)
    head_dim = _head_dim(shape)
    return Gemma3TextConfig(**shape, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                            tie_word_embeddings=True, sliding_window=SLIDING_WINDOW,
                            layer_types=_alternating(layers))


def phi3(hidden: int = 64, layers: int = 4, vocab: int | None = None,
         intermediate: int | None = None) -> PretrainedConfig:
    """Phi-3/Phi-4-mini-style: untied, q/k/v fused in `qkv_proj`, gate and up in `gate_up_proj`."""
    from transformers import Phi3Config

    shape = _shape(hidden, layers, vocab, intermediate)
    return Phi3Config(**shape, tie_word_embeddings=False, original_max_position_embeddings=CONTEXT)


FAMILIES: dict[str, Callable[..., PretrainedConfig]] = {
    "llama": llama, "llama-tied": llama_tied, "qwen2": qwen2, "qwen3": qwen3, "mistral": mistral,
    "gemma2": gemma2, "gemma3": gemma3, "phi3": phi3,
}


def expert_names(experts: int) -> list[str]:
    return [f"expert{index}" for index in range(1, experts + 1)]


def build_family(family: str, root: Path, experts: int = 3, seed: int = 0,
                 dtype: torch.dtype = torch.bfloat16, layers: int = 4, shard_bytes: int | None = None,
                 *, hidden: int = 64, vocab: int | None = None,
                 intermediate: int | None = None) -> dict[str, Path]:
    """Build (or reuse) base + experts of `family` under `root`; returns {"base"/"expertN": folder}.

    The folder is `root/<family>-<hash of everything that determines the bytes>`, written to a
    staging folder and renamed into place, so an interrupted build never leaves half a family.
    `shard_bytes` is save_pretrained's max_shard_size; None splits each model into three or more
    shards, so every family exercises the sharded-checkpoint paths. Peak memory is two copies of
    the model (the one being written and the base the experts derive from) plus float32 scratch
    the size of its largest tensor: 2.8 GB resident for the 1 GB `LLAMA_05B`.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    config = FAMILIES[family](hidden=hidden, layers=layers, vocab=vocab, intermediate=intermediate)
    recipe = {"family": family, "config": json.loads(config.to_json_string()), "experts": experts,
              "seed": seed, "dtype": str(dtype), "shard_bytes": shard_bytes, "charset": CHARSET,
              "torch": torch.__version__, "version": FAMILIES_VERSION}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    folder = root / f"{family}-{key}"
    paths = {name: folder / name for name in ("base", *expert_names(experts))}
    if (folder / RECIPE_FILE).is_file():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{folder.name}.{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_family(config, staging, experts, seed, dtype, shard_bytes)
        (staging / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True))
        with contextlib.suppress(OSError):  # another process finished the same build first
            staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def _write_family(config: PretrainedConfig, staging: Path, experts: int, seed: int,
                  dtype: torch.dtype, shard_bytes: int | None) -> None:
    """Save the base, then each expert by rewriting the same model's parameters in place.

    `named_parameters` lists a tied output head once, under the embedding's name, so a change to
    the embedding is a change to the head and the tie survives into the saved folder.
    """
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):  # transformers initialises from the global generator
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    parameters = dict(model.named_parameters())
    total = sum(tensor.numel() * tensor.element_size() for tensor in parameters.values())
    max_shard = shard_bytes or max(1, total // 3)
    with torch.no_grad():
        noise = torch.Generator().manual_seed(seed * 1000)
        for tensor in parameters.values():
            if tensor.dim() == 1:  # norms and biases start as constants; real ones are spread out
                tensor.add_(BASE_VECTOR_NOISE * torch.randn(tensor.shape, generator=noise))
        base = {name: tensor.detach().clone() for name, tensor in parameters.items()}
        scales = {name: EXPERT_SCALE * _rms(tensor) for name, tensor in base.items()}
        for index, name in enumerate(("base", *expert_names(experts))):
            if index:
                generator = torch.Generator().manual_seed(seed * 1000 + index)
                for parameter_name, tensor in parameters.items():
                    change = _direction(tensor.shape, generator).mul_(scales[parameter_name])
                    tensor.copy_(change.add_(base[parameter_name]))
            model.save_pretrained(staging / name, max_shard_size=max_shard)
            save_char_tokenizer(staging / name)


def _rms(tensor: torch.Tensor) -> float:
    """In float64, so the scale does not depend on how a thread count splits the sum."""
    return tensor.double().pow(2).mean().sqrt().item()


def _direction(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """A seeded float32 change of RMS about 1: low-rank plus sparse for matrices (the structure
    fine-tuning deltas have, which TIES/DARE-style merges rely on), dense noise for vectors.

    Both parts of a matrix's change come from small draws (the low-rank factors, the scattered
    entries) whose norms give the parts' RMS without a pass over the full tensor, and outer
    products instead of a matmul keep the bytes independent of the BLAS: an expert costs a few
    passes over each weight and float32 scratch the size of one tensor.
    """
    if len(shape) == 1:
        change = torch.randn(shape, generator=generator)
        return change.div_(_rms(change))
    rows, cols = shape
    left = torch.randn(DELTA_RANK, rows, generator=generator)
    right = torch.randn(DELTA_RANK, cols, generator=generator)
    count = max(1, round(DELTA_DENSITY * rows * cols))
    where = torch.randint(rows * cols, (count,), generator=generator)
    values = torch.randn(count, generator=generator)
    # |sum_k l_k r_k^T|_F^2 = sum over k, j of (l_k . l_j)(r_k . r_j); each part gets RMS 1/sqrt(2)
    gram = _gram(left) * _gram(right)
    half = math.sqrt(rows * cols / 2)
    left *= half / gram.sum().sqrt().item()
    values *= half / values.double().norm().item()
    change = torch.outer(left[0], right[0])
    for rank in range(1, DELTA_RANK):
        change += torch.outer(left[rank], right[rank])
    change.view(-1).index_add_(0, where, values)
    return change


def _gram(vectors: torch.Tensor) -> torch.Tensor:
    """Dot products of the rows, in float64 by broadcasting: a tiny BLAS call costs more here."""
    rows = vectors.double()
    return (rows[:, None, :] * rows[None, :, :]).sum(-1)


def main(argv: list[str] | None = None) -> None:
    """`python -m search_spaces.families FAMILY OUT_DIR`: build a family and print its folders;
    OUT_DIR/FAMILY links to the build, so configs can name OUT_DIR/FAMILY/base and
    OUT_DIR/FAMILY/expert1… (examples/hf-checkpoints.yaml does)."""
    parser = argparse.ArgumentParser(prog="python -m search_spaces.families",
                                     description=main.__doc__)
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=("tiny", "0.5b"), default="tiny",
                        help="0.5b: the memory benchmark's ~0.5B-parameter shape (1 GB per model)")
    args = parser.parse_args(argv)
    size = LLAMA_05B if args.size == "0.5b" else {}
    paths = build_family(args.family, args.out_dir, experts=args.experts, seed=args.seed, **size)
    link = args.out_dir / args.family
    if link.is_symlink():
        link.unlink()
    link.symlink_to(paths["base"].parent.name)
    for name, path in paths.items():
        print(f"{name}\t{path}")


if __name__ == "__main__":
    main()
