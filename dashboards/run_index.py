"""One run store held in memory for the dashboard, read incrementally while the run goes on.

A page must open in well under a second on a store of 20,000 individuals, so nothing is scanned
per request: on each request `refresh()` asks SQLite whether anything was committed since
(`PRAGMA data_version`, a counter read without touching a table) and, if so, reads only the rows
added since the last look. The driver writes with INSERT OR REPLACE; a replaced row gets the
largest rowid (or the one it had, when it held the largest), so reading `rowid >= last seen`
finds every new and changed row. Fronts are computed here, for any two objectives, by one sort
(O(n log n)), and tables are sorted here and sent a page at a time.

Memory: one small dict per individual (its recipe stays in SQLite until a page asks for it) and one
rowid list per candidate for its answers; about 1 kB per individual, 20 MB for 20,000.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

from evolve.run_report import cost, plan, run_state
from evolve.store import RunStore


@dataclass
class Individual:
    id: str
    generation: int
    parents: list[str]
    operator: str
    objectives: dict[str, list[float]] = field(default_factory=dict)
    stage: str | None = None
    items: int = 0
    error: str | None = None
    test: dict[str, list[float]] | None = None


def pareto_front(points: list[tuple[float, float]], directions: tuple[str, str]) -> list[int]:
    """Indices of the points no other point dominates under the two directions ('max'/'min'):
    one sort by the first objective, then a sweep keeping each point that improves the best
    second objective seen so far. Equal points are all kept (neither dominates the other)."""
    signs = [1.0 if d == "min" else -1.0 for d in directions]
    keyed = sorted(range(len(points)),
                   key=lambda i: (signs[0] * points[i][0], signs[1] * points[i][1]))
    front, best, last = [], math.inf, None
    for i in keyed:
        x, y = signs[0] * points[i][0], signs[1] * points[i][1]
        if y < best or (x, y) == last:
            front.append(i)
            best, last = y, (x, y)
    return front


class RunIndex:
    """The dashboard's view of one run (see the module docstring). Thread-safe: the web server
    answers requests from a thread pool."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.store = RunStore.reader(run_dir)
        self.plan = plan(run_dir)
        self.individuals: dict[str, Individual] = {}
        self.children: dict[str, list[str]] = {}
        self.answer_rows: dict[str, list[int]] = {}
        self.generations: dict[int, dict] = {}
        self.version = -1
        self._seen = {"individuals": 0, "evaluations": 0, "reports": 0, "generations": 0,
                      "answers": 0}
        self._lock = threading.Lock()
        self._cache: dict = {}

    def has(self, identifier: str) -> bool:
        """Whether the run bred `identifier`, asked of SQLite (no need to load the run)."""
        if identifier in self.individuals:
            return True
        with self._lock:
            return self.store.db.execute("SELECT 1 FROM individuals WHERE id = ?",
                                         (identifier,)).fetchone() is not None

    def refresh(self) -> None:
        with self._lock:
            version = self.store.db.execute("PRAGMA data_version").fetchone()[0]
            if version == self.version:
                return
            self.version = version
            self._cache.clear()
            self._read_individuals()
            self._read_evaluations()
            self._read_reports()
            self._read_generations()
            self._read_answer_rows()

    def _new_rows(self, table: str, columns: str):
        rows = self.store.db.execute(f"SELECT rowid, {columns} FROM {table} WHERE rowid >= ? "
                                     "ORDER BY rowid", (self._seen[table],)).fetchall()
        if rows:
            self._seen[table] = rows[-1][0]
        return rows

    def _read_individuals(self) -> None:
        for _, identifier, generation, parents, operator in self._new_rows(
                "individuals", "id, generation, parents, operator"):
            parents = json.loads(parents)
            known = self.individuals.get(identifier)
            if known is None:
                self.individuals[identifier] = Individual(identifier, generation, parents, operator)
                for parent in parents:
                    self.children.setdefault(parent, []).append(identifier)
            else:
                known.generation, known.operator = generation, operator

    def _read_evaluations(self) -> None:
        for _, identifier, stage, objectives, items, error in self._new_rows(
                "evaluations", "id, stage, objectives, items, error"):
            individual = self.individuals.get(identifier)
            if individual is not None:
                individual.stage, individual.items, individual.error = stage, items, error
                individual.objectives = json.loads(objectives)

    def _read_reports(self) -> None:
        for _, identifier, objectives in self._new_rows("reports", "id, objectives"):
            individual = self.individuals.get(identifier)
            if individual is not None:
                individual.test = json.loads(objectives)

    def _read_generations(self) -> None:
        for _, generation, population, front, hypervolume, at in self._new_rows(
                "generations", "generation, population, front, hypervolume, at"):
            self.generations[generation] = {"generation": generation,
                                            "population": json.loads(population),
                                            "front": json.loads(front),
                                            "hypervolume": hypervolume, "at": at}

    def _read_answer_rows(self) -> None:
        for rowid, candidate in self._new_rows("answers", "candidate"):
            rows = self.answer_rows.setdefault(candidate, [])
            if not rows or rows[-1] != rowid:
                rows.append(rowid)

    # -- what the pages show ------------------------------------------------------------------

    def cached(self, key, compute):
        """`compute()` once per store version (the cache is emptied when the run writes)."""
        with self._lock:
            if key not in self._cache:
                self._cache[key] = compute()
            return self._cache[key]

    def state(self) -> str:
        with self._lock:
            return run_state(self.store)

    def cost(self) -> dict:
        return self.cached("cost", lambda: cost(self.store))

    def meta(self, key: str, default=None):
        with self._lock:
            return self.store.meta(key, default)

    def times(self) -> tuple[float | None, float | None]:
        """When the run started, and when it last wrote (its last answer or generation)."""
        with self._lock:
            started, answered, generated = self.store.db.execute(
                "SELECT (SELECT MIN(at) FROM events), (SELECT at FROM answers ORDER BY rowid "
                "DESC LIMIT 1), (SELECT MAX(at) FROM generations)").fetchone()
        return started, max((t for t in (answered, generated) if t is not None), default=started)

    def recipe(self, identifier: str) -> dict | None:
        with self._lock:
            individual = self.store.individual(identifier)
        return None if individual is None else individual["recipe"]

    def answers(self, identifier: str) -> dict[str, float]:
        """Every item the candidate answered in the run (item -> score), from its journal rows."""
        rows = self.answer_rows.get(identifier, [])
        scores: dict[str, float] = {}
        with self._lock:
            for start in range(0, len(rows), 500):
                chunk = rows[start:start + 500]
                for items, values in self.store.db.execute(
                        "SELECT items, answers FROM answers WHERE rowid IN "
                        f"({','.join('?' * len(chunk))}) AND error IS NULL ORDER BY rowid", chunk):
                    scores.update(zip(json.loads(items), json.loads(values), strict=True))
        return scores

    def objective_names(self) -> list[str]:
        """Objectives the store holds values for: the run's own first, then per-task scores and
        the other size measures."""
        def compute():
            names = dict.fromkeys(self.plan["objectives"])
            for individual in self.individuals.values():
                names.update(dict.fromkeys(individual.objectives))
            return list(names)
        return self.cached("names", compute)

    def scored(self, generation: int | None = None) -> list[Individual]:
        """Individuals with objectives, born by `generation` (all when None), in birth order."""
        return [i for i in self.individuals.values() if i.objectives and not i.error
                and (generation is None or i.generation <= generation)]

    def front(self, generation: int | None, x: str, y: str) -> tuple[list[Individual], set[str]]:
        """The scored individuals born by `generation` (all when None) and the ids of the front
        in (x, y) of that generation's population (what the run kept; the last one when None),
        each objective in its direction (the run's config; 'max' for per-task scores). For the
        run's own objectives this is the run's front, with the latest estimates."""
        def compute():
            scored = [i for i in self.scored(generation) if x in i.objectives and y in i.objectives]
            kept = self.generations.get(max(self.generations) if generation is None
                                        else generation)
            population = set(kept["population"]) if kept else {i.id for i in scored}
            members = [i for i in scored if i.id in population]
            points = [(i.objectives[x][0], i.objectives[y][0]) for i in members]
            indices = pareto_front(points, (self.direction(x), self.direction(y)))
            return scored, {members[k].id for k in indices}
        return self.cached(("front", generation, x, y), compute)

    def direction(self, objective: str) -> str:
        if objective in self.plan["objectives"]:
            return self.plan["objectives"][objective]
        return "min" if objective in ("params", "bytes", "nonzero") else "max"
