"""Streaming safetensors writer: write each tensor as soon as it is merged.

`safetensors.save_file` needs every tensor in memory at once. Since the merge engine knows every
output name, shape and dtype before merging (they are the inputs'), we write the header first and
then append tensor bytes one by one, so writing a 70B merge holds one tensor at a time. Outputs
are split into shards of at most `max_shard_bytes` with a `model.safetensors.index.json`, the
layout `transformers` and mergekit expect.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from operators.errors import CheckpointError

DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
          torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
          torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
DEFAULT_SHARD_BYTES = 5 * 2**30


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a tensor of `shape` and `dtype`, from metadata alone."""
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.shape, self.dtype)


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors, in order, into shards no larger than `max_shard_bytes` (one tensor min)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        entries[spec.name] = {"dtype": DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # 8-byte alignment of the data section


def write_checkpoint(out_dir: Path, specs: Sequence[TensorSpec],
                     tensors: Iterable[tuple[str, torch.Tensor]],
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write `tensors` (yielded in `specs` order) as safetensors shards; returns the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(specs, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    stream = iter(tensors)
    weight_map = {}
    for file_name, shard in zip(names, shards, strict=True):
        with open(out_dir / file_name, "wb") as handle:
            header = _header(shard, {"format": "pt"})
            handle.write(struct.pack("<Q", len(header)))
            handle.write(header)
            for spec in shard:
                name, tensor = next(stream)
                if name != spec.name or tuple(tensor.shape) != spec.shape:
                    raise CheckpointError(f"writer expected {spec.name} {spec.shape}, got {name} "
                                          f"{tuple(tensor.shape)}")
                data = tensor.detach().to("cpu", spec.dtype).contiguous().reshape(-1)
                handle.write(data.view(torch.uint8).numpy().tobytes())
                weight_map[spec.name] = file_name
    if len(shards) > 1:
        total = sum(spec.nbytes for spec in specs)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [out_dir / name for name in names]
