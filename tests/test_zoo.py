"""The built-in zoo: real checkpoints, deterministic builds, tasks with disjoint splits."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import operators
from search_spaces.merge_zoo import ZooRecipe, build_zoo, zoo_task
from tests.mergekit_reference import mergekit_merge

MINI = ZooRecipe(hidden=32, layers=2, heads=2, intermediate=64, pretrain_steps=12,
                 finetune_steps=6, batch_size=16, items_per_split=60)


@pytest.fixture(scope="module")
def mini_zoo(tmp_path_factory):
    return build_zoo(MINI, tmp_path_factory.mktemp("zoo"))


def _state(folder):
    return load_file(folder / "model.safetensors")


def test_rebuild_from_the_same_seed_gives_identical_tensors(mini_zoo, tmp_path):
    again = build_zoo(MINI, tmp_path)
    assert again.folder != mini_zoo.folder
    for name, folder in mini_zoo.models.items():
        first, second = _state(folder), _state(again.models[name])
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), name
    other_seed = build_zoo(ZooRecipe(**{**MINI.__dict__, "seed": 1}), tmp_path)
    assert not torch.equal(_state(other_seed.base)["lm_head.weight"],
                           _state(mini_zoo.base)["lm_head.weight"])


def test_transformers_loads_every_zoo_checkpoint(mini_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for folder in mini_zoo.models.values():
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        inputs = tokenizer("rev:abc=", return_tensors="pt")
        assert inputs["input_ids"][0, 0] == tokenizer.bos_token_id
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape[1] > inputs["input_ids"].shape[1]


def test_mergekit_and_evoforge_merge_the_zoo_alike(mini_zoo):
    base = _state(mini_zoo.base)
    experts = [_state(folder) for folder in mini_zoo.experts.values()]
    params = {"weight": [1.0] * len(experts), "density": 0.5}
    ours = operators.merge("ties", base, experts, **params)
    reference = mergekit_merge("ties", base, experts, **params)
    assert all(torch.equal(ours[name], reference[name]) for name in reference)


def test_zoo_tasks_have_distinct_disjoint_seeded_splits():
    task = zoo_task("rev", MINI)
    prompts = [item.prompt for item in task.search + task.test]
    assert len(task.search) == len(task.test) == MINI.items_per_split
    assert len(set(prompts)) == len(prompts)
    assert zoo_task("rev", MINI) == task
    assert all(item.answer == item.prompt[4:-1][::-1] for item in task.test)
    with pytest.raises(ValueError, match="unknown zoo task"):
        zoo_task("juggle", MINI)


def test_interrupted_build_leaves_no_zoo_behind(tmp_path, monkeypatch):
    import search_spaces.merge_zoo as merge_zoo

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_zoo, "_save", explode)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(MINI, tmp_path)
    assert not merge_zoo.is_built(MINI, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_default_zoo_landscape_keeps_its_promises():
    from evolve.zoo_landscape import check_landscape, compute_landscape

    landscape = compute_landscape(build_zoo())
    assert check_landscape(landscape) == []
