"""The local worker's resident model and sub-recipe cache, on a tied bf16 sharded family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from fitness.items import ChoiceItem, Task
from fitness.worker import LocalWorker, MemoryBudgetError, RunSources
from operators.recipes import materialize
from search_spaces.families import build_family

TASK = Task("t", "choice", tuple(ChoiceItem(f"w{i}:", ("ab", "ba"), i % 2) for i in range(6)),
            (ChoiceItem("w9:", ("ab", "ba"), 0),))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    built = build_family("llama-tied", tmp_path_factory.mktemp("tied"), experts=2)
    return dict(built)


def _worker(family, budget=None) -> LocalWorker:
    config = AutoConfig.from_pretrained(family["base"])
    sources = RunSources(family, "base", config, AutoTokenizer.from_pretrained(family["base"]))
    return LocalWorker([TASK], sources, memory_budget=budget)


def _merge(method: str, inputs: list[dict]) -> dict:
    return {"op": "merge", "method": method, "base": {"model": "base"}, "inputs": inputs,
            "params": {"weight": 0.7, "density": 0.5}}


PARENT = _merge("ties", [{"model": "expert1"}, {"model": "expert2"}])
CHILD = _merge("task_arithmetic", [PARENT, {"model": "expert1"}])


def test_a_tied_bf16_model_is_resident_in_float32_with_its_head_tied(family):
    worker = _worker(family)
    assert worker.sources.dtype == torch.bfloat16 and worker.resident.dtype == torch.float32
    worker.answers("p", PARENT, torch.tensor([0, 1]))
    model = worker.resident.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    state = materialize(PARENT, lambda name: _load(family[name]), dtype=torch.bfloat16)
    for name, tensor in state.items():  # float32 holding exactly the bf16 values
        assert torch.equal(model.state_dict()[name], tensor.float()), name


def _exported(worker, recipe) -> dict[str, torch.Tensor]:
    specs, source = worker.sources.export_specs(recipe)
    return {spec.name: source.get(spec.name) for spec in specs}


def _load(folder):
    from operators.sources import CheckpointSource

    source = CheckpointSource(folder)
    return {name: source.get(name) for name in source.names()}


def test_candidates_of_one_shape_reuse_the_resident_storage(family):
    worker = _worker(family)
    worker.answers("a", PARENT, torch.tensor([0]))
    pointers = {n: p.data_ptr() for n, p in worker.resident.model.named_parameters()}
    worker.answers("b", _merge("ties", [{"model": "expert2"}, {"model": "expert1"}]),
                   torch.tensor([0]))
    assert {n: p.data_ptr() for n, p in worker.resident.model.named_parameters()} == pointers


def test_sub_recipes_are_cached_only_when_retained_and_give_the_same_bits(family):
    worker = _worker(family)
    worker.answers("c", CHILD, torch.tensor([0]))
    assert worker.cache.nbytes == 0  # nobody said the parent is in the population
    uncached = _exported(worker, CHILD)
    worker.retain([PARENT])
    worker.answers("c2", CHILD, torch.tensor([0]))
    assert worker.cache.nbytes > 0
    cached = _exported(worker, CHILD)
    assert all(torch.equal(uncached[n], cached[n]) for n in uncached)
    worker.retain([CHILD])  # the parent left the population: its weights are dropped
    assert worker.cache.nbytes == 0


def test_a_budget_of_one_resident_model_caches_nothing_and_a_smaller_one_is_refused(family):
    config = AutoConfig.from_pretrained(family["base"])
    resident = sum(p.numel() for p in _meta_model(config).parameters()) * 4
    worker = _worker(family, budget=resident)
    worker.retain([PARENT])
    worker.answers("c", CHILD, torch.tensor([0]))
    assert worker.cache.nbytes == 0
    with pytest.raises(MemoryBudgetError, match="smaller than one resident model"):
        _worker(family, budget=resident - 1)


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
