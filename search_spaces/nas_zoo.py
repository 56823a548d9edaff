"""The NAS zoo: MNIST-1D, generated from code, and its reference CNN and MLP trained as seeds.

The data comes from the `mnist1d` package's `make_dataset` (generated with the package's default
arguments and seed; its download path is never used). The reference models are trained as the
MNIST-1D paper trains them (Adam, learning rate 1e-2, batches of 100), deterministically, and cached
like the merge zoo under `<cache>/nas/<hash>/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from fitness.items import ClassificationItem, Task
from operators.cache import cache_dir
from search_spaces.mnist1d_nets import (
    REFERENCE_CNN,
    REFERENCE_MLP,
    Mnist1dNet,
    NetSpec,
    parameter_count,
)

NAS_VERSION = 1
REFERENCES = {"cnn": (REFERENCE_CNN, 0.94), "mlp": (REFERENCE_MLP, 0.68)}  # published accuracy
TRAIN_STEPS = 6000
BATCH = 100
LEARNING_RATE = 1e-2
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class NasEntry:
    spec: NetSpec
    folder: Path
    parameters: int
    accuracy: float  # on the task's test split
    published: float


@dataclass(frozen=True)
class NasZoo:
    folder: Path
    models: dict[str, NasEntry]


@cache
def mnist1d_arrays(seed: int = 42) -> dict[str, np.ndarray]:
    """MNIST-1D's train and test arrays, generated (never downloaded)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    state = np.random.get_state()
    try:
        data = make_dataset(args)  # seeds numpy's global generator; restored below
    finally:
        np.random.set_state(state)
    return {key: np.asarray(data[key]) for key in ("x", "y", "x_test", "y_test")}


def mnist1d_task() -> Task:
    """MNIST-1D's 1,000 test signals: the first 500 are the search split, the rest the test."""
    data = mnist1d_arrays()
    items = tuple(ClassificationItem(tuple(float(v) for v in x), int(y))
                  for x, y in zip(data["x_test"], data["y_test"], strict=True))
    return Task("nas/mnist1d", "classification", items[:500], items[500:],
                "MNIST-1D digit classification (10 classes, 40-sample signals)")


def _key() -> str:
    payload = {name: spec.to_dict() for name, (spec, _) in REFERENCES.items()}
    payload |= {"steps": TRAIN_STEPS, "batch": BATCH, "lr": LEARNING_RATE, "version": NAS_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def nas_folder(root: Path | None = None) -> Path:
    return (root or cache_dir() / "nas") / _key()


def is_nas_built(root: Path | None = None) -> bool:
    return (nas_folder(root) / "nas.json").is_file()


def train_net(spec: NetSpec, steps: int = TRAIN_STEPS, seed: int = 0,
              on_step: Callable[[int], None] | None = None) -> Mnist1dNet:
    """A classifier of architecture `spec`, trained on MNIST-1D's training signals."""
    data = mnist1d_arrays()
    signals = torch.tensor(data["x"], dtype=torch.float32)
    labels = torch.tensor(data["y"], dtype=torch.long)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = Mnist1dNet(spec)
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    for step in range(steps):
        batch = torch.tensor(rng.sample(range(len(labels)), BATCH))
        loss = torch.nn.functional.cross_entropy(net(signals[batch]), labels[batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None and (step + 1) % 100 == 0:
            on_step(step + 1)
    return net.eval()


def build_nas_zoo(root: Path | None = None, progress: Progress | None = None) -> NasZoo:
    """The NAS zoo, trained (under a minute on 2 cores) unless cached."""
    from fitness.classifier import ClassifierEvaluator

    folder = nas_folder(root)
    if not (folder / "nas.json").is_file():
        staging = folder.parent / f".{folder.name}.{os.getpid()}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        task = mnist1d_task()
        summary = {}
        for name, (spec, _) in REFERENCES.items():
            net = train_net(spec, on_step=lambda step, name=name: progress and progress(
                f"training MNIST-1D {name}", step, TRAIN_STEPS))
            (staging / name).mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in net.state_dict().items()},
                      staging / name / "model.safetensors")
            (staging / name / "spec.json").write_text(json.dumps(spec.to_dict()))
            result = ClassifierEvaluator(net).evaluate(task.name, task.test)
            summary[name] = {"accuracy": result.accuracy,
                             "parameters": parameter_count(net)}
        (staging / "nas.json").write_text(json.dumps(summary, indent=2))
        try:
            staging.rename(folder)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    summary = json.loads((folder / "nas.json").read_text())
    return NasZoo(folder, {name: NasEntry(spec, folder / name, summary[name]["parameters"],
                                          summary[name]["accuracy"], published)
                           for name, (spec, published) in REFERENCES.items()})
