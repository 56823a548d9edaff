"""Code-level architecture search on MNIST-1D (EvoPrompting's setting): a genome is the source of
a PyTorch module, `class Net(nn.Module)`, that maps a batch of 40-sample signals to 10 logits.

The seeds are the MNIST-1D paper's reference CNN (5,210 parameters, about 94 % on the test split)
and MLP, written as code. Children come from the heuristic code mutator
(`operators.code_edits.CodeMutator`: SEARCH/REPLACE edits of the layer list) or from an LLM, and
every candidate is trained and scored inside the sandbox (`operators.sandbox`), never in the
driver: `train_and_predict` is the sandbox harness. It trains the candidate exactly as the NAS zoo
trains its references (Adam, learning rate 1e-2, batches of 100 drawn by a seeded
`random.Random`, one thread), then predicts the task's 1,000 signals; the driver keeps the first
500 (the search split) for selection and the last 500 (the held-out test split) for the final
report only.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save, save_file

from operators.code_edits import CodeChild, CodeMutator, source_key
from operators.llm_client import Endpoint
from operators.llm_proposer import LLMCodeProposer, ReplyMemo, Scored
from search_spaces.mnist1d_nets import SIGNAL_LENGTH
from search_spaces.nas_zoo import BATCH, LEARNING_RATE, mnist1d_arrays, mnist1d_task

HARNESS = "search_spaces.mnist1d_code:train_and_predict"
DATA_FILE = "mnist1d.safetensors"
WEIGHTS_FILE = "model.safetensors"

REFERENCE_CNN = '''import torch
from torch import nn


class Net(nn.Module):
    """The MNIST-1D paper's CNN: three convolutions of 25 channels, then 10 logits."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.LazyConv1d(25, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.LazyConv1d(25, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.LazyConv1d(25, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.LazyLinear(10),
        )

    def forward(self, x):
        return self.layers(x.unsqueeze(1))
'''

REFERENCE_MLP = '''import torch
from torch import nn


class Net(nn.Module):
    """The MNIST-1D paper's MLP: two hidden layers of 100, then 10 logits."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.LazyLinear(100),
            nn.ReLU(),
            nn.LazyLinear(100),
            nn.ReLU(),
            nn.LazyLinear(10),
        )

    def forward(self, x):
        return self.layers(x.unsqueeze(1))
'''

REFERENCES = {"reference-cnn": REFERENCE_CNN, "reference-mlp": REFERENCE_MLP}


def code_recipe(source: str, change: str = "", proposal: dict | None = None) -> dict:
    """A code candidate's recipe: its source, what changed from its first parent, and who wrote
    it (the proposer, and for an LLM the prompt's hash and its replies)."""
    return ({"op": "code", "source": source} | ({"change": change} if change else {})
            | ({"proposal": proposal} if proposal else {}))


class ProposalContext(Protocol):
    """What the run tells an LLM proposer: how a parent scored, the front, recent failures."""

    def scored(self, recipe: dict) -> Scored: ...

    def front(self) -> list[Scored]: ...

    def failures(self) -> list[str]: ...


@cache
def training_data() -> bytes:
    """MNIST-1D's training signals and the task's 1,000 signals, as the file the sandbox reads."""
    data = mnist1d_arrays()
    return save({"x": torch.tensor(data["x"], dtype=torch.float32),
                 "y": torch.tensor(data["y"], dtype=torch.long),
                 "signals": torch.tensor(data["x_test"], dtype=torch.float32)})


def train_and_predict(names: dict, steps: int, seed: int, learning_rate: float = LEARNING_RATE,
                      batch: int = BATCH, save_weights: bool = False) -> dict:
    """The sandbox harness: build the candidate's `Net`, train it, predict the task's signals
    (and, for an export, save the trained weights in the sandbox's folder)."""
    torch.set_num_threads(1)
    data = load_file(DATA_FILE)
    signals, labels = data["x"], data["y"]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = names["Net"]()
    with torch.no_grad():
        net(signals[:2])  # lazy layers take their shapes
    parameters = list(net.parameters())
    if not parameters:
        raise ValueError("the network has no parameters to train")
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    net.train()
    for _ in range(steps):
        chosen = torch.tensor(rng.sample(range(len(labels)), batch))
        logits = net(signals[chosen])
        if tuple(logits.shape) != (batch, 10):
            raise ValueError(f"Net returned shape {tuple(logits.shape)} for {batch} signals; "
                             f"it must return ({batch}, 10) logits")
        loss = torch.nn.functional.cross_entropy(logits, labels[chosen])
        if not torch.isfinite(loss):
            raise ValueError("the training loss became NaN or infinite")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    net.eval()
    with torch.no_grad():
        predictions = net(data["signals"]).argmax(dim=1)
    if save_weights:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, WEIGHTS_FILE)
    return {"params": sum(p.numel() for p in parameters),
            "bytes": sum(p.numel() * p.element_size() for p in parameters),
            "nonzero": int(sum((p != 0).sum() for p in parameters)),
            "predictions": predictions.tolist()}


@dataclass
class CodeSpace:
    """The search space a code run breeds in: seeds, random starts, mutation and crossover, the
    duplicate key; what the engine asks of a space. With an `endpoint`, an LLM writes the
    children (`operators.llm_proposer`) once the run has given its context (`observe`)."""

    endpoint: Endpoint | None = None
    calibration_mutations: int = 3  # changes that make one random starting point

    def __post_init__(self) -> None:
        self.mutator = CodeMutator(SIGNAL_LENGTH)
        self.task = mnist1d_task()
        self.context: ProposalContext | None = None
        self.llm: LLMCodeProposer | None = None

    def observe(self, context: ProposalContext, memo: ReplyMemo,
                on_event: Callable[[str, str], None]) -> None:
        """The run's view for the LLM proposer, its reply memo and its event log."""
        self.context = context
        if self.endpoint is not None:
            self.llm = LLMCodeProposer(self.endpoint, self.mutator, memo, on_event)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(REFERENCES)

    def seed_recipe(self, name: str) -> dict:
        return code_recipe(REFERENCES[name])

    def calibration(self, rng: random.Random, count: int) -> list[tuple[str, dict, tuple[str, ...]]]:
        """`count` random starting points: each reference changed a few times."""
        starts = []
        for k in range(count):
            parent = rng.choice(self.sources)
            source, changes = REFERENCES[parent], []
            for _ in range(self.calibration_mutations):
                child = self.mutator.mutate(rng, source)
                source = child.source
                changes.append(child.change)
            starts.append((f"cal-{k}", code_recipe(source, "; ".join(changes)), (parent,)))
        return starts

    @staticmethod
    def key(recipe: dict) -> str:
        return source_key(recipe["source"])

    @staticmethod
    def describe(recipe: dict) -> str:
        """What a proposer reads of a member: its program."""
        return recipe["source"]

    @staticmethod
    def lineage_check(recipes: dict[str, dict]) -> None:
        """No lineage rule: any code may come from any parents."""
        return None

    def _written(self, rng: random.Random, parents: list[dict],
                 heuristic: Callable[[], CodeChild]) -> dict:
        if self.llm is None:
            child = heuristic()
            return code_recipe(child.source, child.change, {"proposer": "heuristic"})
        child, proposal = self.llm.child(rng, [self.context.scored(p) for p in parents],
                                         self.context.front(), self.context.failures())
        return code_recipe(child.source, child.change, proposal)

    def mutate(self, rng: random.Random, recipe: dict) -> dict:
        return self._written(rng, [recipe], lambda: self.mutator.mutate(rng, recipe["source"]))

    def crossover(self, rng: random.Random, first: dict, second: dict) -> dict:
        return self._written(rng, [first, second], lambda: self.mutator.crossover(
            rng, first["source"], second["source"]))

    def harness(self, steps: int, seed: int, save_weights: bool = False
                ) -> tuple[str, dict[str, Any], dict[str, bytes]]:
        """What the sandbox runs for a candidate: the harness, its arguments, its data file."""
        return (HARNESS, {"steps": steps, "seed": seed, "save_weights": save_weights},
                {DATA_FILE: training_data()})
