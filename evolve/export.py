"""Write a merge as a Hugging Face checkpoint folder that `transformers` and mergekit both read.

The folder holds safetensors shards (streamed tensor by tensor), config.json, the tokenizer files
of the tokenizer source, `mergekit_config.yml` (so mergekit can reproduce the merge) and a model
card README with the front matter the Hub expects.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

import torch
import yaml

from evolve.merge_config import MergePlan
from operators.architecture import per_layer_keys
from operators.errors import CheckpointError
from operators.safetensors_io import DEFAULT_SHARD_BYTES, TensorSpec, write_checkpoint
from operators.slices import MergePart, plan_slices
from operators.sources import CheckpointSource

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")


@contextmanager
def staged_output(out: Path, force: bool = False) -> Iterator[Path]:
    """A folder to write an output into, renamed to `out` once complete: an interrupted or failed
    export leaves `out` as it was. A non-empty `out` is refused unless `force`, and then replaced
    only when the new output is complete."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise CheckpointError(f"{out} is not empty: nothing was written. Choose another --out "
                              "folder, or pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as error:
        raise CheckpointError(f"cannot write beside {out}: {error.strerror}. Choose another "
                              "--out folder or free disk space.") from None
    try:
        yield staging
        if out.exists():
            replaced = staging.with_name(staging.name + ".replaced")
            os.replace(out, replaced)
            os.replace(staging, out)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{folder} has no config.json: not a Hugging Face model folder")
    return json.loads(config_path.read_text())


def _restack(config: dict, layers: list[tuple[Path, int]]) -> None:
    """Give `config` the depth of a model whose layers are `layers` (folder, index), in order.

    Lists with one entry per layer (`layer_types` of Gemma2/3 and Qwen2 configs) follow the
    layers, each entry taken from the config of the model the layer comes from. mergekit 0.1.5
    sets only the depth, a config that transformers 5 refuses to save once `layer_types` no longer
    matches it. Token-id lists and `architectures` are not per layer, whatever their length.
    """
    depth = config.get("num_hidden_layers")
    if not isinstance(depth, int):
        raise CheckpointError("config.json has no num_hidden_layers, so the depth of the stacked "
                              "model cannot be written; stack models whose config has it")
    per_layer = per_layer_keys(config, depth)
    donors = {folder: _read_config(folder) for folder in dict.fromkeys(f for f, _ in layers)}
    for key in per_layer:
        entries = []
        for folder, index in layers:
            values = donors[folder].get(key)
            if not isinstance(values, list) or index >= len(values):
                raise CheckpointError(
                    f"{folder}/config.json gives no {key} for layer {index}, which the output's "
                    f"config lists per layer; stack models of one architecture")
            entries.append(values[index])
        config[key] = entries
    config["num_hidden_layers"] = len(layers)


def _output_config(plan: MergePlan, dtype: torch.dtype | None) -> dict:
    """config.json of the merge: the base's (else the first model's), with the output's dtype and,
    for stacked layers, its depth."""
    config = _read_config(plan.base or plan.models[0])
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    layers = plan.layer_plan()
    if layers is not None:
        _restack(config, layers)
    return config


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
    """Merge `plan` from its checkpoints straight into a Hugging Face folder at `out_dir` (a fresh
    folder: the CLI gives it a `staged_output`).

    `on_tensor(done, total)` is called after each merged tensor (for progress bars).
    """
    out_dtype = plan.out_dtype or plan.dtype
    config = _output_config(plan, out_dtype)  # before the tensors: its errors leave no half output
    opened: dict[Path, CheckpointSource] = {}

    def source(folder: Path) -> CheckpointSource:
        if folder not in opened:
            opened[folder] = CheckpointSource(folder)
        return opened[folder]

    def spec_of(part: MergePart, name: str) -> TensorSpec:
        dtype = part.reference.dtype(name)
        if out_dtype is not None and dtype.is_floating_point:
            dtype = out_dtype
        return TensorSpec(part.output_name(name), part.reference.shape(name), dtype)

    def tensors():
        merged = chain.from_iterable(part.tensors(device, plan.dtype) for part in parts)
        for done, (name, tensor) in enumerate(merged, start=1):
            if on_tensor is not None:
                on_tensor(done, len(specs))
            yield name, tensor

    try:
        if plan.slices is None:
            parts = [MergePart(plan.spec, None if plan.base is None else source(plan.base),
                               [source(folder) for folder in plan.models])]
        else:
            parts = plan_slices([piece.map(source) for piece in plan.slices])
        specs = [spec_of(part, name) for part in parts for name in part.reference.names()]
        write_checkpoint(out_dir, specs, tensors(), max_shard_bytes)
    except OSError as error:
        raise CheckpointError(f"writing {out_dir} failed: {error.strerror or error}. Free disk "
                              "space or choose another --out folder; the inputs are untouched.") \
            from None
    finally:
        for opened_source in opened.values():
            opened_source.close()
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if plan.tokenizer_source is not None:
        for file in TOKENIZER_FILES:
            if (plan.tokenizer_source / file).exists():
                shutil.copy2(plan.tokenizer_source / file, out_dir / file)
    (out_dir / "mergekit_config.yml").write_text(
        yaml.safe_dump(plan.mergekit_config(), sort_keys=False))
    (out_dir / "README.md").write_text(_model_card(plan))
    return out_dir
