"""Where merge inputs come from: in-memory state dicts or Hugging Face checkpoints on disk.

A source answers metadata questions (names, shapes, dtypes) without loading weights, and loads one
tensor at a time, so a merge of checkpoints streams tensor by tensor: peak memory stays near one
tensor per input, whatever the model size. Safetensors files are memory-mapped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from operators.errors import CheckpointError
from operators.safetensors_io import DTYPE_CODES

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class TensorSource(Protocol):
    label: str

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> torch.Tensor: ...


class StateDictSource:
    """A source over an in-memory mapping of names to tensors."""

    def __init__(self, state: Mapping[str, torch.Tensor], label: str):
        self._state = state
        self.label = label

    def names(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._state[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]


class CheckpointSource:
    """A source over a Hugging Face model folder (safetensors, one file or sharded)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.label = str(folder)
        self._files = self._tensor_files()
        self._stack = ExitStack()
        self._handles = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for file in sorted(set(self._files.values())):
            handle = self._stack.enter_context(safe_open(str(self.folder / file), "pt"))
            self._handles[file] = handle
        for name, file in self._files.items():
            sliced = self._handles[file].get_slice(name)
            self._meta[name] = (tuple(sliced.get_shape()), _DTYPES[sliced.get_dtype()])

    def _tensor_files(self) -> dict[str, str]:
        if not self.folder.is_dir():
            raise CheckpointError(
                f"checkpoint folder {self.folder} does not exist: give the path of a Hugging Face "
                "model folder (with config.json and *.safetensors) or a built-in model name")
        index = self.folder / _INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as error:
                raise CheckpointError(f"{index} is not a valid safetensors index: {error}") from None
            missing = sorted({f for f in weight_map.values() if not (self.folder / f).exists()})
            if missing:
                raise CheckpointError(f"{index} lists shard files that are missing: {missing}")
            return dict(weight_map)
        single = self.folder / _SINGLE
        if single.exists():
            with safe_open(str(single), "pt") as handle:
                return {name: _SINGLE for name in handle.keys()}  # noqa: SIM118
        if any(self.folder.glob("*.bin")) or any(self.folder.glob("*.pt")):
            raise CheckpointError(
                f"{self.folder} holds PyTorch pickle weights only; evoforge reads safetensors. "
                "Convert with: AutoModelForCausalLM.from_pretrained(path).save_pretrained(path)")
        raise CheckpointError(f"{self.folder} has no {_SINGLE} or {_INDEX}: not a model folder")

    def names(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._files[name]].get_tensor(name)

    def close(self) -> None:
        self._stack.close()
