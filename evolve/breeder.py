"""Proposals worth an evaluation: new recipes whose experts come from their parents.

A strategy proposes children; the breeder checks each before it is scored and has the strategy
draw again (from a stream named after the child and the attempt, so a resume redraws the same)
when a proposal
- is a recipe the run already holds, by canonical key (the seed of a merge that draws nothing
  random does not count), whether scored or still being scored: its answers would be the same;
- merges an expert none of its parents merges (an operator must never invent one).
Each redraw is recorded in the run store's events with its reason (`redrawn`). A strategy that
learns from results (optuna, CMA-ES) is told the refused proposal's known objectives, or a
failure, so that it moves on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from evolve.strategies import Proposal, RecipeStrategy
from operators.recipes import Recipe, canonical_key, sources_of

MAX_REDRAWS = 100  # then the proposal is kept, and the event says so


class Breeder:
    def __init__(self, strategy: RecipeStrategy, base: str, recipes: Mapping[str, Recipe],
                 on_redraw: Callable[[str, str], None]):
        self.strategy, self.base, self.recipes = strategy, base, recipes
        self.on_redraw = on_redraw  # (child id, reason)
        self.keys: dict[str, str] = {}  # canonical key -> id of the candidate holding it

    def known(self, identifier: str, recipe: Recipe) -> None:
        """A candidate of the run (calibration or child): its recipe is taken."""
        self.keys.setdefault(canonical_key(recipe), identifier)

    def _experts(self, recipe: Recipe) -> set[str]:
        return {name for name in sources_of(recipe) if name != self.base}

    def flaw(self, proposal: Proposal) -> tuple[str, str | None] | None:
        """Why a proposal must be drawn again (and the id of the candidate it repeats), or None."""
        holder = self.keys.get(canonical_key(proposal.recipe))
        if holder is not None:
            return f"the same recipe as {holder}", holder
        allowed: set[str] = set()
        for parent in proposal.parents:  # a candidate id, or a source model's name
            allowed |= self._experts(self.recipes[parent]) if parent in self.recipes \
                else {parent} - {self.base}
        invented = sorted(self._experts(proposal.recipe) - allowed)
        if invented:
            return f"merges {', '.join(invented)}, which none of its parents merges", None
        return None

    def propose(self, stream: str, ids: Sequence[str], population: list[str],
                matrix: np.ndarray, row_of: Callable[[str], np.ndarray | None]
                ) -> list[Proposal]:
        """One checked proposal per id in `ids` (`row_of`: a known candidate's objective row)."""
        proposals = self.strategy.ask(stream, len(ids), population, matrix)
        checked = []
        for identifier, proposal in zip(ids, proposals, strict=True):
            for attempt in range(MAX_REDRAWS + 1):
                flaw = self.flaw(proposal)
                if flaw is None:
                    break
                reason, holder = flaw
                if attempt == MAX_REDRAWS:
                    self.on_redraw(identifier, f"kept after {MAX_REDRAWS} redraws: {reason}")
                    break
                self.on_redraw(identifier, reason)
                self.strategy.tell([proposal], [row_of(holder) if holder else None])
                proposal = self.strategy.ask(f"{stream}/{identifier}/redraw/{attempt}", 1,
                                             population, matrix)[0]
            self.known(identifier, proposal.recipe)
            checked.append(proposal)
        return checked
