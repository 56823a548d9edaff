"""The local worker: sources mapped once, one resident model, recipes materialized into it.

What the worker holds, and how it grows (model = one model's bytes in the run's dtype):
- **sources**: every source checkpoint, memory-mapped once (safetensors; on a GPU, copied to the
  device once, in its own dtype). The pages are the operating system's and shared with any
  other process mapping the same files; nothing else copies them.
- **the resident model**: one transformers model built on the meta device (no random init)
  whose parameters are assigned the candidate's tensors, one by one, as the recipe streams them;
  a candidate of another depth gets a new module list over the same storage. On a GPU the
  parameters are in the run's dtype; on a CPU in float32 holding values rounded to the run's
  dtype (the same numbers the export holds; CPUs compute bf16 slowly): 1 model, or 2 for a
  bf16 run on a CPU.
- **sub-recipes**: materialized parents of composed recipes (children of children), kept only
  while a population member's recipe is one of them and only within the memory budget; a sub-
  recipe that does not fit is recomputed tensor by tensor instead (same bits, more time).
- **merge scratch**: per tensor, the merged tensor in float32 and its rounding to the run's
  dtype; inputs are read where they lie (bf16 and float32 sources memory-mapped, widened block by
  block inside the merge kernels), and mutation noise is drawn chunk by chunk.

So a worker needs the mapped sources + 1–2 models + the sub-recipe cache (bounded by
`memory_budget`) + the evaluator's activations (bounded by its token budget), whatever the
population size or the run's length.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from fitness.causal_lm import CausalLMEvaluator
from fitness.errors import FitnessError
from fitness.items import Task, item_pool
from fitness.results import ItemResults
from fitness.size import Size
from operators.architecture import Architecture, check_compatible, edited_config
from operators.errors import CheckpointError
from operators.prune import HeadShape
from operators.recipes import (
    Recipe,
    inner_recipes,
    layer_plan,
    pruned_widths,
    recipe_key,
    recipe_source,
)
from operators.safetensors_io import TensorSpec, tensor_bytes
from operators.sources import CheckpointSource, StateDictSource, TensorSource

GiB = 2**30


class MemoryBudgetError(FitnessError):
    """The worker's memory budget cannot hold what a candidate needs."""


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the resident model computes in: the run's dtype on a GPU; float32 on a CPU,
    where bf16/fp16 matrix products are several times slower (the values stay the run's)."""
    return dtype if device.type == "cuda" else torch.float32


def default_budget(device: torch.device) -> int:
    """Half the machine's memory on a CPU; 90 % of the GPU's on a GPU (sources count there)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.9)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


class SourceBank:
    """The run's source checkpoints, opened once. On a CPU a tensor is read from the mapped
    file when asked; on a GPU every tensor is copied to the device on first use and kept."""

    def __init__(self, folders: Mapping[str, Path], device: torch.device):
        self.device = device
        self._sources = {name: CheckpointSource(folder) for name, folder in folders.items()}
        self._on_device: dict[str, dict[str, torch.Tensor]] = {name: {} for name in folders}

    def source(self, name: str) -> TensorSource:
        if name not in self._sources:
            raise FitnessError(f"recipe names the model {name!r}, which is not one of the run's "
                               f"sources {sorted(self._sources)}")
        if self.device.type == "cpu":
            return self._sources[name]
        return _DeviceSource(self._sources[name], self._on_device[name], self.device)

    def model_bytes(self, name: str) -> int:
        source = self._sources[name]
        return sum(tensor_bytes(source.shape(n), source.dtype(n)) for n in source.names())

    def close(self) -> None:
        for source in self._sources.values():
            source.close()


class _DeviceSource:
    """A checkpoint whose tensors live on the worker's device once read."""

    def __init__(self, source: CheckpointSource, store: dict[str, torch.Tensor],
                 device: torch.device):
        self._source, self._store, self._device = source, store, device
        self.label = source.label

    def names(self) -> list[str]:
        return self._source.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._source.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._source.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._store:
            self._store[name] = self._source.get(name).to(self._device)
        return self._store[name]


class SubRecipeCache:
    """Materialized sub-recipes, bounded in bytes, least recently used out first; only the
    recipes the engine says a population member has (`retain`) may be stored."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.retained: set[str] = set()
        self._entries: OrderedDict[str, StateDictSource] = OrderedDict()
        self._sizes: dict[str, int] = {}

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())

    def get(self, key: str) -> TensorSource | None:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        return None

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.capacity

    def put(self, key: str, state: dict[str, torch.Tensor]) -> None:
        self._sizes[key] = sum(t.numel() * t.element_size() for t in state.values())
        self._entries[key] = StateDictSource(state, f"sub-recipe {key[:40]}")
        while self.nbytes > self.capacity:
            oldest = next(iter(self._entries))
            del self._entries[oldest], self._sizes[oldest]

    def retain(self, keys: set[str]) -> None:
        self.retained = keys
        for key in [k for k in self._entries if k not in keys]:
            del self._entries[key], self._sizes[key]


class ResidentModel:
    """One transformers model whose parameters are assigned each candidate's tensors.

    The module tree is built on the meta device (parameters cost nothing and are never
    initialised); buffers that are not weights (rotary frequencies) are real. A candidate's
    tensors are copied into storage reused from the previous candidate, so loading a candidate
    allocates nothing when the shapes repeat; a new depth rebuilds the module tree only.
    """

    def __init__(self, architecture: Architecture, device: torch.device, dtype: torch.dtype):
        self.architecture, self.device, self.dtype = architecture, device, dtype
        self.model = None
        self._config_key: str | None = None
        self._storage: dict[str, torch.Tensor] = {}

    def _build(self, config) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        key = config.to_json_string()
        if key == self._config_key:
            return
        self.model = None  # drop the old tree (it references the storage) before building anew
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        for module in model.modules():
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = buffer.to(self.device)
        self.model, self._config_key = model.eval(), key

    def load(self, source: TensorSource, config, dtype: torch.dtype) -> Size:
        """Materialize `source` into the model (config: the candidate's, edits applied);
        returns its size with floating tensors counted at `dtype` (the export dtype)."""
        self._build(config)
        modules = dict(self.model.named_modules())
        names = source.names()
        params = nbytes = nonzero = 0
        for name in names:
            tensor = source.get(name)
            stored = self._storage.get(name)
            want = self.dtype if tensor.is_floating_point() else tensor.dtype
            if stored is None or stored.shape != tensor.shape or stored.dtype != want:
                stored = torch.empty(tensor.shape, dtype=want, device=self.device)
                self._storage[name] = stored
            stored.copy_(tensor)
            self._assign(modules, name, stored)
            params += tensor.numel()
            nbytes += tensor_bytes(tensor.shape, dtype if tensor.is_floating_point()
                                   else tensor.dtype)
            nonzero += int(torch.count_nonzero(stored))
        wanted = set(names)
        for name in [n for n in self._storage if n not in wanted]:
            del self._storage[name]  # a shallower candidate: free the layers it does not have
        for name, target in self.architecture.tied_missing(names).items():
            owner, _, leaf = target.rpartition(".")
            tied = modules[owner]._parameters[leaf]  # the same Parameter, as transformers ties
            owner, _, leaf = name.rpartition(".")
            modules[owner]._parameters[leaf] = tied
        empty = [n for n, p in self.model.named_parameters() if p.is_meta]
        if empty:
            raise FitnessError(f"the recipe gives no tensors for {empty[:4]}; its sources lack "
                               "weights the architecture needs")
        return Size(params, nbytes, nonzero)

    @staticmethod
    def _assign(modules: dict, name: str, tensor: torch.Tensor) -> None:
        owner, _, leaf = name.rpartition(".")
        module = modules[owner]
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[leaf] = tensor


class RunSources:
    """The run's source checkpoints and what every process needs to know of them: the
    architecture, the run's dtype, the tokenizer, and how a recipe streams and is configured.

    The driver of a Ray run and `evoforge export` hold only this (no resident model, no memory
    budget: they never score a candidate); each worker builds its own on its device. Opening it
    checks that the experts fit the base (architecture, tensors, shapes, tying, vocabulary)."""

    def __init__(self, folders: Mapping[str, Path], base: str, config, tokenizer,
                 device: str = "cpu", dtype: torch.dtype | None = None):
        self.config, self.tokenizer = config, tokenizer
        self.heads = HeadShape.of(config)  # what a head prune keeps fixed (None: no heads)
        self.device = torch.device(device)
        self.architecture = Architecture.of(config)
        self.bank = SourceBank(folders, self.device)
        self.names = tuple(folders)
        self.reference = self.bank.source(base)
        try:
            check_compatible(self.reference, [self.bank.source(n) for n in folders if n != base],
                             self.architecture)
        except CheckpointError:
            self.bank.close()
            raise
        self.dtype = dtype or next(self.reference.dtype(n) for n in self.reference.names()
                                   if self.reference.dtype(n).is_floating_point)

    def model_bytes(self, dtype: torch.dtype) -> int:
        """One model of the sources' shapes with its floating tensors in `dtype`."""
        return sum(tensor_bytes(self.reference.shape(n), dtype
                                if self.reference.dtype(n).is_floating_point
                                else self.reference.dtype(n))
                   for n in self.reference.names())

    def source(self, recipe: Recipe, cached=None) -> TensorSource:
        """`recipe` as a stream of tensors in the run's dtype (`cached`: materialized sub-recipes
        by key, reused)."""
        return recipe_source(recipe, self.bank.source, dtype=self.dtype,
                             naming=self.architecture, cached=cached, device=self.device,
                             heads=self.heads)

    def candidate_config(self, recipe: Recipe):
        """The transformers config of the recipe's model: edits applied to per-layer lists, a
        pruned MLP's width, pruned heads (whose size is then written out, as configs that
        derive it from hidden_size / heads would get it wrong)."""
        plan = layer_plan(recipe, self.architecture.num_layers)
        config = self.config if plan == list(range(self.architecture.num_layers)) else \
            edited_config(self.config, plan, self.architecture)
        widths = pruned_widths(recipe)
        if widths:
            config = copy.deepcopy(config)
            if "mlp" in widths:
                config.intermediate_size = widths["mlp"]
            if "kv_heads" in widths:
                config.head_dim = self.heads.head_dim
                config.num_key_value_heads = widths["kv_heads"]
                config.num_attention_heads = widths["kv_heads"] * self.heads.group
        return config

    def export_specs(self, recipe: Recipe) -> tuple[list[TensorSpec], TensorSource]:
        """The recipe's tensor specs in the run's dtype, and the source that streams exactly the
        bits a worker scores (one tensor at a time)."""
        source = self.source(recipe)
        return [TensorSpec(n, tuple(source.shape(n)), source.dtype(n)) for n in source.names()], \
            source

    def close(self) -> None:
        self.bank.close()


class LocalWorker:
    """Materializes recipes into its resident model and answers pool items with it.

    A candidate is materialized once and kept while it is asked (its stages follow each other);
    answers, its size and its test results all come from the same resident weights.
    """

    def __init__(self, tasks: Sequence[Task], sources: RunSources,
                 memory_budget: int | None = None, batch_size: int = 256):
        self.tasks, self.sources, self.batch_size = list(tasks), sources, batch_size
        self.pool = item_pool(self.tasks)
        self.device = sources.device
        self.resident = ResidentModel(sources.architecture, self.device,
                                      compute_dtype(sources.dtype, self.device))
        resident_bytes = sources.model_bytes(self.resident.dtype)
        budget = memory_budget if memory_budget is not None else default_budget(self.device)
        if self.device.type == "cuda":
            budget -= sum(sources.bank.model_bytes(name) for name in sources.names)
        if budget < resident_bytes:
            raise MemoryBudgetError(
                f"memory_budget {budget / GiB:.2f} GiB (after the sources) is smaller than one "
                f"resident model ({resident_bytes / GiB:.2f} GiB in "
                f"{str(self.resident.dtype).removeprefix('torch.')} on {self.device}); raise "
                "memory_budget, or use a device with more memory")
        self.cache = SubRecipeCache(budget - resident_bytes)
        self._current: tuple[str, Size] | None = None
        self._evaluators: dict[str, object] = {}

    # -- materialization ---------------------------------------------------------------------

    def source(self, recipe: Recipe) -> TensorSource:
        """`recipe` as a stream of tensors in the run's dtype (cached sub-recipes reused)."""
        return self.sources.source(recipe, cached=self.cache.get)

    def _cache_parents(self, recipe: Recipe) -> None:
        for inner in inner_recipes(recipe):
            key = recipe_key(inner)
            if key not in self.cache.retained or self.cache.get(key) is not None:
                continue
            source = self.source(inner)
            names = source.names()
            if self.cache.fits(sum(tensor_bytes(source.shape(n), source.dtype(n)) for n in names)):
                self.cache.put(key, {n: source.get(n) for n in names})

    def _load(self, candidate_id: str, recipe: Recipe) -> Size:
        if self._current is None or self._current[0] != candidate_id:
            self._current = None
            self._cache_parents(recipe)
            size = self.resident.load(self.source(recipe),
                                      self.sources.candidate_config(recipe), self.sources.dtype)
            self._current = (candidate_id, size)
        return self._current[1]

    def retain(self, recipes: Sequence[Recipe]) -> None:
        """The population's recipes: the only sub-recipes worth keeping materialized."""
        self.cache.retain({recipe_key(r) for r in recipes})

    # -- evaluation --------------------------------------------------------------------------

    def _evaluate(self, task: Task, items) -> ItemResults:
        model = self.resident.model
        evaluator = self._evaluators.get(task.format)
        if evaluator is None or evaluator.model is not model:
            if task.format == "lm-eval":
                from fitness.lm_eval_tasks import LmEvalEvaluator  # optional dependency

                evaluator = LmEvalEvaluator(model, self.sources.tokenizer, self.batch_size)
            else:
                evaluator = CausalLMEvaluator(model, self.sources.tokenizer, self.batch_size)
            self._evaluators[task.format] = evaluator
        return evaluator.evaluate(task.name, items)

    def answers(self, candidate_id: str, recipe: Recipe, items: torch.Tensor) -> torch.Tensor:
        self._load(candidate_id, recipe)
        out = torch.zeros(len(items), dtype=torch.float64)
        by_task: dict[int, list[int]] = {}
        for position, index in enumerate(items.tolist()):
            by_task.setdefault(self.pool[index][0], []).append(position)
        for t, positions in by_task.items():
            task = self.tasks[t]
            chosen = [task.search[self.pool[int(items[p])][1]] for p in positions]
            out[positions] = torch.tensor(self._evaluate(task, chosen).correct,
                                          dtype=torch.float64)
        return out

    def size(self, candidate_id: str, recipe: Recipe) -> Size:
        return self._load(candidate_id, recipe)

    def test_results(self, candidate_id: str, recipe: Recipe) -> list[ItemResults]:
        """Per-item results on every task's held-out test split (for a run's final report)."""
        self._load(candidate_id, recipe)
        return [self._evaluate(task, task.test) for task in self.tasks]
