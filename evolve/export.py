"""Write a merge as a Hugging Face checkpoint folder that `transformers` and mergekit both read.

The folder holds safetensors shards (streamed tensor by tensor), config.json, the tokenizer files
of the tokenizer source, `mergekit_config.yml` (so mergekit can reproduce the merge) and a model
card README with the front matter the Hub expects.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from evolve.merge_config import MergePlan
from operators.engine import iter_merge
from operators.errors import CheckpointError
from operators.safetensors_io import DEFAULT_SHARD_BYTES, TensorSpec, write_checkpoint
from operators.sources import CheckpointSource

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")


def _ensure_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".evoforge-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise CheckpointError(f"cannot write to {out_dir}: {error.strerror}. Choose another "
                              "--out folder or free disk space.") from None


def _copy_config(source: Path, out_dir: Path, dtype: torch.dtype | None) -> None:
    config_path = source / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{source} has no config.json: not a Hugging Face model folder")
    config = json.loads(config_path.read_text())
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _model_card(plan: MergePlan) -> str:
    front = {"base_model": [plan.base_name] if plan.base_name else plan.model_names,
             "tags": ["merge", "evoforge", "mergekit", plan.spec.method],
             "library_name": "transformers"}
    models = "\n".join(f"- {name}" for name in plan.model_names)
    config = yaml.safe_dump(plan.mergekit_config(), sort_keys=False).rstrip()
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# Merged model\n\n"
            f"Made with [evoforge](https://pypi.org/project/evoforge/) using the "
            f"**{plan.spec.method}** merge method"
            + (f" with `{plan.base_name}` as the base" if plan.base_name else "")
            + f".\n\n## Models merged\n\n{models}\n\n## Configuration\n\nThis merge is "
            f"reproducible with `evoforge merge mergekit_config.yml --out DIR`"
            + ("" if plan.spec.method == "pcb" else " or with `mergekit-yaml`")
            + f":\n\n```yaml\n{config}\n```\n")


def export_merge(plan: MergePlan, out_dir: Path, device: str = "cpu",
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 on_tensor: Callable[[int, int], None] | None = None) -> Path:
    """Merge `plan` from its checkpoints straight into a Hugging Face folder at `out_dir`.

    `on_tensor(done, total)` is called after each merged tensor (for progress bars).
    """
    _ensure_writable(out_dir)
    base = CheckpointSource(plan.base) if plan.base is not None else None
    models = [CheckpointSource(path) for path in plan.models]
    reference = base or models[0]
    out_dtype = plan.out_dtype or plan.dtype

    def spec_of(name: str) -> TensorSpec:
        dtype = reference.dtype(name)
        if out_dtype is not None and dtype.is_floating_point:
            dtype = out_dtype
        return TensorSpec(name, reference.shape(name), dtype)

    def tensors():
        merged = iter_merge(plan.spec, base, models, device=device, dtype=plan.dtype)
        for done, (name, tensor) in enumerate(merged, start=1):
            if on_tensor is not None:
                on_tensor(done, len(specs))
            yield name, tensor

    try:
        specs = [spec_of(name) for name in reference.names()]
        write_checkpoint(out_dir, specs, tensors(), max_shard_bytes)
    except OSError as error:
        raise CheckpointError(f"writing {out_dir} failed: {error.strerror or error}. Free disk "
                              "space or choose another --out folder; the inputs are untouched.") \
            from None
    finally:
        for source in [s for s in (base, *models) if s is not None]:
            source.close()
    _copy_config(plan.base or plan.models[0], out_dir, out_dtype)
    if plan.tokenizer_source is not None:
        for file in TOKENIZER_FILES:
            if (plan.tokenizer_source / file).exists():
                shutil.copy2(plan.tokenizer_source / file, out_dir / file)
    (out_dir / "mergekit_config.yml").write_text(
        yaml.safe_dump(plan.mergekit_config(), sort_keys=False))
    (out_dir / "README.md").write_text(_model_card(plan))
    return out_dir
