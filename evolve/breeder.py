"""Proposals worth an evaluation: genomes the driver does not hold yet, with honest lineage.

A strategy proposes children; the breeder checks each before it is scored and has the strategy
draw again (from a stream named after the child and the attempt, so a resume redraws the same)
when a proposal
- is a genome the driver already holds, by its `key` (for recipes the canonical key, where the
  seed of a merge that draws nothing random does not count; for code the program's syntax tree;
  for architectures the isomorphism class), whether scored or still being scored: its answers
  would be the same;
- fails the space's lineage check (`MergeSpace.lineage_check`: it merges an expert none of its
  parents merges; an operator must never invent one).
Each redraw is reported (`on_redraw`; a run records it in its store's events as `redrawn`). A
strategy that learns from results (optuna, CMA-ES) is told the refused proposal's known
objectives, or a failure, so that it moves on.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from evolve.strategies import Proposal, Strategy

MAX_REDRAWS = 100  # then the proposal is kept, and the report says so


class Breeder:
    def __init__(self, strategy: Strategy, key: Callable[[Any], Hashable],
                 on_redraw: Callable[[str, str], None],
                 lineage: Callable[[Proposal], str | None] | None = None):
        self.strategy, self.key, self.lineage = strategy, key, lineage
        self.on_redraw = on_redraw  # (child id, reason)
        self.keys: dict[Hashable, str] = {}  # genome key -> id of the candidate holding it

    def known(self, identifier: str, genome: Any) -> None:
        """A candidate of the driver (calibration, seed or child): its genome is taken."""
        self.keys.setdefault(self.key(genome), identifier)

    def flaw(self, proposal: Proposal) -> tuple[str, str | None] | None:
        """Why a proposal must be drawn again (and the id of the candidate it repeats), or None."""
        holder = self.keys.get(self.key(proposal.genome))
        if holder is not None:
            return f"repeats {holder}", holder
        reason = self.lineage(proposal) if self.lineage else None
        return None if reason is None else (reason, None)

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
            self.known(identifier, proposal.genome)
            checked.append(proposal)
        return checked
