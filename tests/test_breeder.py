"""What the breeder guarantees, over 200 children bred on the zoo's merge space: no recipe twice,
no expert a parent did not have, and every redraw recorded with its reason."""

from __future__ import annotations

import random

import numpy as np
import pytest

from evolve.breeder import Breeder
from evolve.selection import survivors
from evolve.strategies import GeneticStrategy, MergeGeneStrategy, Proposal
from operators.recipes import canonical_key, sources_of
from search_spaces.merge_space import MergeSpace, default_merge_recipes

EXPERTS = ("zoo/rev", "zoo/sort", "zoo/inc", "zoo/cnt")
SPACE = MergeSpace("zoo/base", EXPERTS, layers=4)


def _experts(recipe) -> set[str]:
    return {name for name in sources_of(recipe) if name != SPACE.base}


def _breed(strategy_of, children: int, population: int = 16):
    """A run's breeding without its evaluations: calibration recipes as the engine makes them,
    then generations whose objective rows are seeded random numbers."""
    recipes, rows, redraws = {}, {}, []
    strategy = strategy_of(recipes)
    breeder = Breeder(strategy, canonical_key, lambda child, why: redraws.append(why),
                      SPACE.lineage_check(recipes))
    rng, scores = random.Random(0), random.Random(1)
    calibration = {f"seed-{e}": {"model": e} for e in (SPACE.base, *EXPERTS)}
    calibration |= {f"default-{r['method']}": r for r in default_merge_recipes(SPACE.base,
                                                                              EXPERTS)}
    calibration |= {f"cal-{k}": SPACE.random(rng) for k in range(12)}
    for identifier, recipe in calibration.items():
        recipes[identifier] = recipe
        breeder.known(identifier, recipe)
        rows[identifier] = np.array([-scores.random(), scores.random()])
    pool = list(calibration)
    alive = [pool[i] for i in survivors(np.array([rows[i] for i in pool]), population)]
    bred, generation = [], 0
    while len(bred) < children:
        generation += 1
        ids = [f"g{generation}-{k}" for k in range(min(population, children - len(bred)))]
        proposals = breeder.propose(f"gen/{generation}", ids, alive,
                                    np.array([rows[i] for i in alive]), lambda _: None)
        for identifier, proposal in zip(ids, proposals, strict=True):
            recipes[identifier] = proposal.genome
            rows[identifier] = np.array([-scores.random(), scores.random()])
            bred.append((identifier, proposal))
        strategy.tell(proposals, [rows[i] for i in ids])
        pool = alive + ids
        alive = [pool[i] for i in survivors(np.array([rows[i] for i in pool]), population)]
    return recipes, bred, redraws, calibration


@pytest.mark.parametrize("kind", ["ga", "tpe"])
def test_two_hundred_children_are_new_and_merge_only_their_parents_experts(kind):
    def strategy_of(recipes):
        if kind == "ga":
            return GeneticStrategy(SPACE, recipes, {"crossover": 0.6, "edit": 0.15,
                                                    "weight-noise": 0.1}, seed=0)
        return MergeGeneStrategy("tpe", SPACE, objectives=2, budget=200, seed=0)

    recipes, bred, redraws, calibration = _breed(strategy_of, 200)
    assert len(bred) == 200
    keys = [canonical_key(r) for r in calibration.values()]
    for identifier, proposal in bred:
        key = canonical_key(proposal.genome)
        assert key not in keys, f"{identifier} repeats an earlier recipe"
        keys.append(key)
        allowed = set().union(*(_experts(recipes[p]) if p in recipes else {p}
                                for p in proposal.parents))
        assert _experts(proposal.genome) <= allowed, (identifier, proposal.parents)
    # the operators themselves never invent an expert: only repeats are ever redrawn
    assert all(why.startswith("repeats ") for why in redraws)
    if kind == "ga":  # a GA over 200 children meets its own copies (a parent's seeds…)
        assert redraws


def test_a_merge_left_with_no_expert_is_the_base_itself():
    assert SPACE.merge_recipe("ties", {"zoo/rev": 0.0}, 0.5, 1.0, seed=3) == {"model": "zoo/base"}
    mutated = [SPACE.mutate(random.Random(k), {"model": "zoo/base"}) for k in range(20)]
    assert all(_experts(m) == set() for m in mutated)  # no expert brought in from nowhere


def test_seeds_of_deterministic_merges_do_not_make_a_new_recipe():
    ties = SPACE.merge_recipe("ties", {"zoo/rev": 1.0, "zoo/sort": 0.5}, 0.5, 1.0, seed=1)
    dare = SPACE.merge_recipe("dare_ties", {"zoo/rev": 1.0, "zoo/sort": 0.5}, 0.5, 1.0, seed=1)
    assert canonical_key(ties) == canonical_key(ties | {"seed": 2})
    assert canonical_key(dare) != canonical_key(dare | {"seed": 2})  # DARE draws with its seed
    noisy = SPACE.mutate_weights(random.Random(0), ties)
    assert canonical_key(noisy) != canonical_key(noisy | {"seed": noisy["seed"] + 1})


def test_a_child_merging_an_expert_no_parent_merges_is_refused():
    recipes = {"a": SPACE.merge_recipe("ties", {"zoo/rev": 1.0, "zoo/sort": 0.5}, 0.5, 1.0,
                                       seed=1)}
    check = SPACE.lineage_check(recipes)
    child = SPACE.merge_recipe("ties", {"zoo/rev": 1.0, "zoo/cnt": 0.5}, 0.5, 1.0, seed=1)
    assert check(Proposal(child, ("a",), "mutation")) == \
        "merges zoo/cnt, which none of its parents merges"
    assert check(Proposal(child, ("a", "zoo/cnt"), "mutation")) is None  # a source as parent
