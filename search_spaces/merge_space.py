"""The merge-recipe search space: what a candidate is, and how operators make new ones.

A candidate is a recipe (see `recipes.py`) whose core is a merge of the experts onto the base, or a
source model itself (an expert is the merge base + 1·τ of that expert). The genes of that merge
are the method, per expert a weight and a density for each layer group (`groups` anchors spread
over depth, as mergekit gradients; weights all 0 leave the expert out) and λ: the genome of
mergekit-evolve and of Sakana's parameter-space merging, plus PCB and the method choice.
Around the core, a recipe may carry weight noise (`mutate`), a structured prune (`prune`: every
layer's MLP width or key/value head groups cut to its most important ones) and a layer plan
(`edit`: mergekit passthrough slices, layers left out or stacked twice), outermost in that order:
the shape wrappers, which are how the size objective varies.

Operators, all seeded by the `random.Random` they are given, never invent an expert: a child
merges only experts its parents merge (a merge left with no expert is the base itself):
- `crossover(a, b)`: with probability `compose` a merge of the two parents' recipes (a child of
  children: the recipe tree is the lineage); otherwise uniform crossover of their genes (each
  expert's weight and density from one parent; at least one expert of theirs is kept);
- `mutate(a)`: Gaussian noise on weights, density and λ, sometimes a new method;
- `mutate_weights(a)`: seeded weight noise on the materialized model (σ relative to the task
  vector, a gene rate);
- `edit(a)`: the heuristic architecture proposer. With probability `prune` (where the model has
  a gated MLP or attention heads to cut) it narrows or widens the MLP by a sixteenth of the
  sources' width or two, or removes or restores a key/value head group; the units cut are the
  least important by weight magnitude (`operators.prune`). Otherwise it drops a decoder layer
  (the one nearest the middle, where layers are most redundant), restores a dropped one, or
  stacks a middle layer twice (depth up-scaling, as SOLAR's); between `min_layers` and 1.5× the
  sources' depth.
"""

from __future__ import annotations

import bisect
import copy
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from operators.llm_client import Endpoint
from operators.llm_edits import DecoderShape, LLMEditProposer
from operators.llm_proposer import ReplyMemo
from operators.prune import PRUNE_FIELDS
from operators.recipes import Recipe, canonical_key, sources_of

# The default merges, with the parameters their papers and mergekit's examples use. DARE-TIES gets
# lambda 0.5 like task arithmetic: its rescaled task vectors sum to the same scale.
DEFAULT_MERGES: dict[str, tuple[str, dict]] = {
    "task_arithmetic": ("task_arithmetic", {"weight": 1.0, "lambda": 0.5}),
    "ties": ("ties", {"weight": 1.0, "density": 0.2}),
    "dare_ties": ("dare_ties", {"weight": 1.0, "density": 0.5, "lambda": 0.5}),
    "pcb": ("pcb", {"weight": 1.0, "density": 0.2}),
}

METHODS = ("task_arithmetic", "ties", "dare_ties", "pcb")
SPARSE = ("ties", "dare_ties", "pcb")
MIN_DENSITY = 0.05
WRAPPERS = ("mutate", "prune", "edit")  # around the core, innermost first
MLP_STEPS = 16  # an MLP prune moves in sixteenths of the sources' width


def default_merge_recipes(base: str, experts: list[str] | tuple[str, ...]) -> list[dict]:
    """The default merges as recipes (see `operators.recipes`), in DEFAULT_MERGES order."""
    return [{"op": "merge", "method": method, "seed": 0, "base": {"model": base},
             "inputs": [{"model": e} for e in experts], "params": params}
            for method, params in DEFAULT_MERGES.values()]


@dataclass
class MergeSpace:
    base: str
    experts: tuple[str, ...]
    layers: int
    methods: tuple[str, ...] = METHODS
    compose: float = 0.2
    min_layers: int = 1
    groups: int = 2  # weight anchors per expert, spread over layer depth (mergekit gradients)
    mlp_width: int | None = None  # the sources' MLP width, where it can be pruned
    kv_heads: int | None = None  # the sources' key/value heads, where they can be pruned
    prune: float = 0.0  # share of edits that prune width or heads instead of changing depth
    group: int = 1  # query heads per key/value head (what the LLM is told a head group holds)
    endpoint: Endpoint | None = None  # an LLM proposes the edits (the heuristic: fallback)
    llm: LLMEditProposer | None = field(default=None, init=False, repr=False, compare=False)
    context: Any = field(default=None, init=False, repr=False, compare=False)

    # -- what a run asks of its space --------------------------------------------------------

    @property
    def sources(self) -> tuple[str, ...]:
        """The source models, each of which enters a run as its seed candidate."""
        return (self.base, *self.experts)

    @staticmethod
    def seed_recipe(name: str) -> Recipe:
        return {"model": name}

    def calibration(self, rng: random.Random, count: int) -> list[tuple[str, Recipe,
                                                                        tuple[str, ...]]]:
        """The default merges, then `count` random recipes: (id, recipe, parent sources)."""
        return ([(f"default-{r['method']}", r, self.experts)
                 for r in default_merge_recipes(self.base, self.experts)]
                + [(f"cal-{k}", self.random(rng), self.experts) for k in range(count)])

    key = staticmethod(canonical_key)  # a recipe's identity, for the breeder's duplicate check

    def observe(self, context, memo: ReplyMemo, on_event: Callable[[str, str], None]) -> None:
        """The run's view (parents' scores, the front, failures) for the LLM edit proposer."""
        self.context = context
        if self.endpoint is not None:
            self.llm = LLMEditProposer(self.endpoint, memo, on_event)

    @property
    def shape(self) -> DecoderShape:
        return DecoderShape(self.layers, self.min_layers, self.mlp_width, self.kv_heads,
                            self.group)

    def architecture(self, recipe: Recipe) -> dict:
        """A recipe's decoder architecture, as the LLM edit proposer reads and writes it."""
        widths = self.widths(recipe)
        return {"layers": self.layer_plan(recipe)} | {
            cut: widths.get(cut, self._full(cut)) for cut in self.shape.fields() if cut != "layers"}

    def describe(self, recipe: Recipe) -> str:
        """What a proposer reads of a member: its architecture (the merge genes it does not
        edit)."""
        return json.dumps(self.architecture(recipe))

    def lineage_check(self, recipes: dict[str, Recipe]):
        """The breeder's lineage rule: a proposal merges no expert that none of its parents (a
        candidate id, or a source model's name) merges."""
        def experts(recipe: Recipe) -> set[str]:
            return {name for name in sources_of(recipe) if name != self.base}

        def check(proposal) -> str | None:
            allowed: set[str] = set()
            for parent in proposal.parents:
                allowed |= experts(recipes[parent]) if parent in recipes \
                    else {parent} - {self.base}
            invented = sorted(experts(proposal.genome) - allowed)
            return f"merges {', '.join(invented)}, which none of its parents merges" \
                if invented else None
        return check

    # -- genes <-> recipes -------------------------------------------------------------------

    def anchors(self, value: float | list[float] | tuple[float, ...]) -> tuple[float, ...]:
        """A per-expert setting (weight or density) as `groups` anchors over depth; a number
        is the same everywhere."""
        if isinstance(value, list | tuple):
            values = tuple(float(v) for v in value)
            return values if len(values) == self.groups else (values[0],) * self.groups
        return (float(value),) * self.groups

    def merge_recipe(self, method: str, weights: dict[str, Any],
                     densities: dict[str, Any] | float, lam: float, seed: int) -> Recipe:
        """A flat merge; `weights` and `densities` map experts to a number or group anchors
        (a single number for `densities` is every expert's). Experts of weight 0 are left out;
        with none left the merge is the base itself, which is what it returns then."""
        anchors = {e: self.anchors(w) for e, w in weights.items()}
        chosen = [e for e in self.experts if max(anchors.get(e, (0.0,))) > 0]
        if not chosen:
            return {"model": self.base}
        if not isinstance(densities, dict):
            densities = dict.fromkeys(chosen, densities)

        def setting(values: tuple[float, ...], low: float, high: float) -> float | list[float]:
            rounded = [round(min(max(v, low), high), 4) for v in values]
            return rounded[0] if len(set(rounded)) == 1 else rounded
        params: dict[str, Any] = {
            "weight": [setting(anchors[e], 0.0, float("inf")) for e in chosen],
            "lambda": round(lam, 4)}
        if method in SPARSE:
            per_expert = [setting(self.anchors(densities.get(e, 0.5)), MIN_DENSITY, 1.0)
                          for e in chosen]
            same = all(d == per_expert[0] for d in per_expert)
            params["density"] = per_expert[0] if same and not isinstance(
                per_expert[0], list) else per_expert
        return {"op": "merge", "method": method, "seed": seed, "base": {"model": self.base},
                "inputs": [{"model": e} for e in chosen], "params": params}

    @staticmethod
    def core(recipe: Recipe) -> Recipe:
        """The innermost flat merge of the experts (through mutate/prune/edit wrappers)."""
        while recipe.get("op") in WRAPPERS:
            recipe = recipe["input"]
        return recipe

    def genes(self, recipe: Recipe) -> dict[str, Any] | None:
        """The merge genes of a flat recipe, or None for a composed one.

        A source model is a point of the space too: an expert is base + 1·τ (task arithmetic
        with its weight 1, λ 1), the base is the empty merge. So crossing an expert with a merge
        explores the weights around that expert, not copies of it.
        """
        core = self.core(recipe)
        if "model" in core:
            chosen = [core["model"]] if core["model"] in self.experts else []
            return {"method": "task_arithmetic", "seed": 0,
                    "weights": {e: self.anchors(1.0) for e in chosen},
                    "densities": {e: self.anchors(1.0) for e in chosen}, "lambda": 1.0}
        if core.get("op") != "merge" or any("model" not in i for i in core["inputs"]):
            return None
        params, names = core["params"], [i["model"] for i in core["inputs"]]

        def per_expert(key: str, default: float) -> dict[str, tuple[float, ...]]:
            value = params.get(key, default)  # a list is one setting per input (the API's rule)
            values = value if isinstance(value, list) else [value] * len(names)
            return {n: self.anchors(v) for n, v in zip(names, values, strict=True)}
        return {"method": core["method"], "seed": core.get("seed", 0),
                "weights": per_expert("weight", 1.0), "densities": per_expert("density", 0.5),
                "lambda": float(params.get("lambda", 1.0))}

    def layer_plan(self, recipe: Recipe) -> list[int]:
        """The decoder layers of `recipe`, as indices into its core's (all, if unedited)."""
        return list(recipe["layers"]) if recipe.get("op") == "edit" else list(range(self.layers))

    def widths(self, recipe: Recipe) -> dict[str, int]:
        """The units each layer keeps (`mlp`, `kv_heads`) where `recipe` prunes them."""
        pruned = recipe["input"] if recipe.get("op") == "edit" else recipe
        return {kind: pruned[kind] for kind in PRUNE_FIELDS if kind in pruned} \
            if pruned.get("op") == "prune" else {}

    def _rewrap(self, template: Recipe, core: Recipe) -> Recipe:
        """`core` wrapped in the same wrappers as `template` (edits outermost)."""
        if template.get("op") in WRAPPERS:  # (who proposed the template is not the child's)
            wrapper = {k: v for k, v in template.items() if k != "proposal"}
            return {**wrapper, "input": self._rewrap(template["input"], core)}
        return core

    # -- operators ------------------------------------------------------------------------

    def from_genes(self, genes: dict[str, Any], seed: int) -> Recipe:
        """A flat merge from a gene dict (as `genes()` returns, or a continuous strategy asks)."""
        densities = genes.get("densities", genes.get("density", 0.5))
        return self.merge_recipe(genes["method"], genes["weights"], densities, genes["lambda"],
                                 seed)

    def _around(self, rng: random.Random, low: float, high: float,
                spread: float) -> list[float]:
        """Group anchors: a level drawn in [low, high], each anchor jittered by ±spread."""
        level = rng.uniform(low, high)
        return [level + rng.uniform(-spread, spread) for _ in range(self.groups)]

    def random(self, rng: random.Random) -> Recipe:
        chosen = rng.sample(self.experts, rng.randint(2, len(self.experts)))
        weights = {e: self._around(rng, 0.2, 1.2, 0.3) for e in chosen}
        densities = {e: self._around(rng, 0.2, 0.9, 0.15) for e in chosen}
        return self.merge_recipe(rng.choice(self.methods), weights, densities,
                                 rng.uniform(0.3, 1.0), rng.randrange(2**31))

    def crossover(self, rng: random.Random, a: Recipe, b: Recipe) -> Recipe:
        genes_a, genes_b = self.genes(a), self.genes(b)
        same_shape = self.layer_plan(a) == self.layer_plan(b) and self.widths(a) == self.widths(b)
        if same_shape and (genes_a is None or genes_b is None or rng.random() < self.compose):
            share = rng.uniform(0.3, 0.7)
            composed = {"op": "merge", "method": "linear", "seed": rng.randrange(2**31),
                        "inputs": [self._unshaped(a), self._unshaped(b)],
                        "params": {"weight": [round(share, 4), round(1 - share, 4)]}}
            return self._shaped(composed, self.layer_plan(a), self.widths(a))
        if genes_a is None or genes_b is None:
            return self.mutate(rng, a if genes_a is not None else b)
        if not genes_a["weights"] and not genes_b["weights"]:  # two bases: nothing to mix
            return self.mutate(rng, a)
        pick = [genes_a, genes_b]
        donors = {e: rng.choice(pick) for e in self.experts}  # per expert: weight and density
        theirs = [e for e in self.experts if e in genes_a["weights"] or e in genes_b["weights"]]
        if not any(e in donors[e]["weights"] for e in theirs):  # neither donor brought one
            kept = rng.choice(theirs)
            donors[kept] = genes_a if kept in genes_a["weights"] else genes_b
        weights = {e: donor["weights"].get(e, 0.0) for e, donor in donors.items()}
        densities = {e: donor["densities"].get(e, 0.5) for e, donor in donors.items()}
        child = self.merge_recipe(rng.choice(pick)["method"], weights, densities,
                                  rng.choice(pick)["lambda"], rng.randrange(2**31))
        return self._rewrap(rng.choice([a, b]), child)

    def mutate(self, rng: random.Random, recipe: Recipe, scale: float = 0.15) -> Recipe:
        genes = self.genes(recipe)
        if genes is None:
            return self.mutate_weights(rng, recipe)
        weights, densities = {}, {}
        for expert in genes["weights"]:  # perturb each anchor; an expert may drop out at 0
            weights[expert] = [max(0.0, w + rng.gauss(0, scale))
                               for w in genes["weights"][expert]]
            densities[expert] = [d + rng.gauss(0, scale) for d in genes["densities"][expert]]
        method = rng.choice(self.methods) if rng.random() < 0.1 else genes["method"]
        child = self.merge_recipe(method, weights, densities,
                                  max(0.05, genes["lambda"] + rng.gauss(0, scale)),
                                  rng.randrange(2**31))
        return self._rewrap(recipe, child)

    def mutate_weights(self, rng: random.Random, recipe: Recipe) -> Recipe:
        noisy = {"op": "mutate", "seed": rng.randrange(2**31),
                 "sigma": round(rng.uniform(0.02, 0.1), 4),
                 "rate": round(rng.uniform(0.05, 0.3), 4),
                 "base": {"model": self.base}, "input": copy.deepcopy(self._unshaped(recipe))}
        return self._shaped(noisy, self.layer_plan(recipe), self.widths(recipe))

    @staticmethod
    def _unshaped(recipe: Recipe) -> Recipe:
        """`recipe` without its shape wrappers (edit, then prune), and without the record of who
        proposed it: that belongs to the recipe, not to the children built from its inside."""
        for op in ("edit", "prune"):
            if recipe.get("op") == op:
                recipe = recipe["input"]
        return {key: value for key, value in recipe.items() if key != "proposal"}

    def _shaped(self, recipe: Recipe, layers: list[int], widths: dict[str, int]) -> Recipe:
        """`recipe` pruned to `widths` and edited to `layers`; a wrapper that would change
        nothing (the sources' own widths, all layers in order) is left out."""
        sources = {"mlp": self.mlp_width, "kv_heads": self.kv_heads}
        kept = {kind: widths[kind] for kind in PRUNE_FIELDS
                if kind in widths and widths[kind] != sources[kind]}
        if kept:
            recipe = {"op": "prune", **kept, "input": recipe}
        if layers != list(range(self.layers)):
            recipe = {"op": "edit", "layers": layers, "input": recipe}
        return recipe

    def _full(self, cut: str) -> int | None:
        """A cut's units per layer in the sources (None: this model cannot be cut so)."""
        return self.mlp_width if cut == "mlp" else self.kv_heads

    def _step(self, cut: str) -> int:
        """The units one prune move takes or gives back."""
        return max(1, self.mlp_width // MLP_STEPS) if cut == "mlp" else 1

    def _prune_moves(self, widths: dict[str, int]) -> dict[tuple[str, int], float]:
        """The prune moves open from `widths`: (cut, direction) -> weight."""
        moves = {}
        for cut in PRUNE_FIELDS:
            if full := self._full(cut):
                if widths.get(cut, full) > self._step(cut):
                    moves[(cut, -1)] = 0.35
                if widths.get(cut, full) < full:
                    moves[(cut, +1)] = 0.15
        return moves

    def edit(self, rng: random.Random, recipe: Recipe) -> Recipe:
        """An architecture edit: the LLM's where one is configured (its `proposal` recorded on
        the child), the heuristic's otherwise or where the LLM's could not be used."""
        if self.llm is None:
            return self._heuristic_edit(rng, recipe)
        architecture, proposal = self.llm.child(
            rng, self.context.scored(recipe), self.context.front(), self.context.failures(),
            self.shape)
        if architecture is None:
            child = self._heuristic_edit(rng, recipe)
        else:
            child = self._shaped(self._unshaped(recipe), architecture["layers"],
                                 {cut: architecture[cut] for cut in PRUNE_FIELDS
                                  if cut in architecture})
        return {**child, "proposal": proposal}

    def _heuristic_edit(self, rng: random.Random, recipe: Recipe) -> Recipe:
        layers, widths = self.layer_plan(recipe), self.widths(recipe)
        moves = self._prune_moves(widths)
        if self.prune and moves and rng.random() < self.prune:
            cut, direction = rng.choices(list(moves), weights=list(moves.values()))[0]
            full, step = self._full(cut), self._step(cut)
            steps = rng.choice((1, 2)) if cut == "mlp" else 1
            kept = min(full, max(step, widths.get(cut, full) + direction * steps * step))
            return self._shaped(self._unshaped(recipe), layers, {**widths, cut: kept})
        return self._depth_edit(rng, recipe, layers, widths)

    def _depth_edit(self, rng: random.Random, recipe: Recipe, layers: list[int],
                    widths: dict[str, int]) -> Recipe:
        inner = self._unshaped(recipe)
        missing = [i for i in range(self.layers) if i not in layers]
        moves = {"drop": 0.6 if len(layers) > self.min_layers else 0.0,
                 "restore": 0.25 if missing else 0.0,
                 "stack": 0.15 if len(layers) < self.layers * 3 // 2 else 0.0}
        if not any(moves.values()):  # a one-layer model: nothing to drop, restore or stack
            return recipe
        move = rng.choices(list(moves), weights=list(moves.values()))[0]
        middle = (self.layers - 1) / 2
        central = min(range(len(layers)), key=lambda p: (abs(layers[p] - middle), rng.random()))
        if move == "drop":
            layers.pop(central)
        elif move == "restore":
            bisect.insort(layers, rng.choice(missing))
        else:
            layers.insert(central + 1, layers[central])
        return self._shaped(inner, layers, widths)
