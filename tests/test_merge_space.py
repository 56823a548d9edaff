"""The merge-recipe search space: every operator gives a recipe that materializes."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from operators.recipes import RecipeError, materialize, sources_of
from operators.settings import count_layers
from search_spaces.merge_space import MergeSpace


@pytest.fixture(scope="module")
def world(tiny_models):
    states = {name: load_file(folder / "model.safetensors") for name, folder in tiny_models.items()}
    space = MergeSpace("base", ("add", "sort", "reverse"), layers=4)
    return space, states


def test_operators_make_materializable_recipes(world):
    space, states = world
    rng = random.Random(0)
    population = [space.random(rng) for _ in range(4)]
    for step in range(40):
        a, b = rng.sample(population, 2)
        child = [space.crossover(rng, a, b), space.mutate(rng, a),
                 space.mutate_weights(rng, a), space.edit(rng, a)][step % 4]
        state = materialize(child, states.__getitem__)
        assert 1 <= count_layers(state) <= 6  # edits may stack layers up to 1.5x
        assert all(torch.isfinite(t).all() for t in state.values())
        assert set(sources_of(child)) <= {"base", "add", "sort", "reverse"}
        population.append(child)


def test_operators_are_seeded(world):
    space, _ = world
    first = [space.random(random.Random(7)) for _ in range(3)]
    assert first == [space.random(random.Random(7)) for _ in range(3)]


def test_edits_drop_restore_and_stack_layers_within_bounds(world):
    space, _ = world
    rng = random.Random(1)
    recipe, depths = space.random(rng), set()
    for _ in range(40):
        recipe = space.edit(rng, recipe)
        plan = space.layer_plan(recipe)
        assert space.min_layers <= len(plan) <= 6 and plan == sorted(plan)
        depths.add(len(plan))
    assert min(depths) < 4 < max(depths)  # both smaller and stacked (deeper) models
    noisy = space.mutate_weights(rng, space.edit(rng, space.random(rng)))
    assert noisy["op"] == "edit" and noisy["input"]["op"] == "mutate"
    single = MergeSpace(space.base, space.experts, layers=1)  # nothing to edit: unchanged
    assert single.edit(rng, recipe["input"]) == recipe["input"]


def test_select_layers_drops_and_stacks(world):
    _, states = world
    base = states["base"]
    def select_layers(state, layers):  # an edit recipe over the state, materialized
        return materialize({"op": "edit", "layers": layers, "input": {"model": "s"}},
                           {"s": state}.__getitem__)

    stacked = select_layers(base, [0, 1, 1, 3])
    assert count_layers(stacked) == 4
    first = [n for n in base if "layers.1." in n]
    assert all(torch.equal(stacked[n], base[n]) and
               torch.equal(stacked[n.replace("layers.1.", "layers.2.")], base[n]) for n in first)
    assert all(torch.equal(stacked[n], base[n]) for n in base if "layers.3." in n)
    with pytest.raises(RecipeError, match=r"the input has layers 0\.\.3"):
        select_layers(base, [0, 4])
    with pytest.raises(RecipeError, match="list at least one"):
        select_layers(base, [])
    with pytest.raises(RecipeError, match="unknown recipe op"):
        materialize({"op": "teleport"}, states.__getitem__)


def test_layer_group_weights_and_densities_match_mergekit_gradients(world):
    from tests.mergekit_reference import mergekit_merge

    space, states = world
    recipe = space.merge_recipe("ties", {"add": [0.3, 1.1], "sort": 0.8, "reverse": [1.0, 0.2]},
                                {"add": [0.3, 0.8], "sort": 0.6, "reverse": [0.9, 0.4]}, 1.0,
                                seed=0)
    assert recipe["params"]["weight"] == [[0.3, 1.1], 0.8, [1.0, 0.2]]  # gradients over depth
    assert recipe["params"]["density"] == [[0.3, 0.8], 0.6, [0.9, 0.4]]
    ours = materialize(recipe, states.__getitem__)
    models = [states[i["model"]] for i in recipe["inputs"]]
    # the first layer sits at the gradients' start, the last at their end; TIES works per tensor,
    # so each end equals mergekit's merge with those scalar weights and densities
    for layer, weights, densities in ((0, [0.3, 0.8, 1.0], [0.3, 0.6, 0.9]),
                                      (3, [1.1, 0.8, 0.2], [0.8, 0.6, 0.4])):
        reference = mergekit_merge("ties", states["base"], models, weight=weights,
                                   density=densities, **{"lambda": 1.0})
        names = [n for n in reference if f"layers.{layer}." in n]
        assert names and all(torch.equal(ours[n], reference[n]) for n in names)


def test_genes_round_trip_through_recipes(world):
    space, _ = world
    rng = random.Random(3)
    for _ in range(20):
        recipe = space.random(rng)
        genes = space.genes(recipe)
        assert space.from_genes(genes, recipe["seed"]) == recipe
    shared = space.merge_recipe("pcb", {"add": 1.0, "sort": 0.5}, 0.3, 0.8, seed=1)
    assert shared["params"]["density"] == 0.3  # one density for all stays a scalar
    assert space.from_genes(space.genes(shared), 1) == shared


def test_prune_edits_narrow_and_restore_width_and_heads_within_bounds(world, tiny_models):
    """With every edit a prune, widths move by sixteenths of the MLP and by one head group, stay
    within 1..the sources' own, and materialize at exactly those shapes; the other operators keep
    a parent's shape wrappers (prune under edit) around their new merge."""
    import json

    from transformers import LlamaConfig

    from operators.prune import HeadShape

    space, states = world
    config = LlamaConfig(**json.loads((tiny_models["base"] / "config.json").read_text()))
    heads = HeadShape.of(config)
    pruning = MergeSpace(space.base, space.experts, layers=4, mlp_width=config.intermediate_size,
                         kv_heads=config.num_key_value_heads, prune=1.0)
    rng = random.Random(3)
    recipe, seen = pruning.random(rng), {"mlp": set(), "kv_heads": set()}
    step = config.intermediate_size // 16
    for _ in range(60):
        before = pruning.widths(recipe)
        recipe = pruning.edit(rng, recipe)
        widths = pruning.widths(recipe)
        changed = [k for k in seen if widths.get(k) != before.get(k)]
        assert len(changed) == 1 and pruning.layer_plan(recipe) == [0, 1, 2, 3]
        mlp = widths.get("mlp", config.intermediate_size)
        assert 0 < mlp <= config.intermediate_size and mlp % step == 0
        assert 1 <= widths.get("kv_heads", config.num_key_value_heads) <= 4
        for kind, value in widths.items():
            seen[kind].add(value)
    assert all(len(values) >= 3 for values in seen.values()), seen

    widths = pruning.widths(recipe)
    state = materialize(recipe, states.__getitem__, heads=heads)
    assert state["model.layers.2.mlp.gate_proj.weight"].shape[0] == widths.get(
        "mlp", config.intermediate_size)
    assert state["model.layers.2.self_attn.k_proj.weight"].shape[0] == heads.head_dim * widths.get(
        "kv_heads", config.num_key_value_heads)
    edited = space.edit(random.Random(0), recipe)  # a depth edit wraps the prune
    assert edited["op"] == "edit" and edited["input"]["op"] == "prune"
    for child in (pruning.mutate(rng, edited), pruning.mutate_weights(rng, edited),
                  pruning.crossover(rng, edited, edited)):
        assert pruning.widths(child) == widths and pruning.layer_plan(child) == \
            space.layer_plan(edited), child
        materialize(child, states.__getitem__, heads=heads)
    assert MergeSpace(space.base, space.experts, layers=4).edit(rng, recipe)["op"] == "edit"


def test_who_proposed_a_parent_is_not_copied_onto_its_children(world):
    """An LLM child's `proposal` record describes that child only: weight noise, a composing
    crossover, gene operators and edits of it carry no copy, on any node."""
    space, _ = world
    rng = random.Random(5)
    proposed = {**space.random(rng), "proposal": {"proposer": "llm", "prompt": "ab"}}
    wrapped = {"op": "edit", "layers": [0, 2, 3], "proposal": {"proposer": "llm"},
               "input": {"op": "prune", "mlp": 64, "input": proposed}}
    composing = MergeSpace(space.base, space.experts, layers=4, compose=1.0)
    for parent in (proposed, wrapped):
        for child in (space.mutate_weights(rng, parent), composing.crossover(rng, parent, parent),
                      space.mutate(rng, parent), space.edit(rng, parent)):
            assert "proposal" not in json.dumps(child), child
