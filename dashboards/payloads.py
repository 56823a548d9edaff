"""What each dashboard page shows, as plain JSON-able data computed from a `RunIndex`.

Every number here is read from the store (never recomputed from weights): the search estimate is
the run's own, with its stderr; the held-out score is the run's test report. Tables are sorted and
paged here so that a page of a 20,000-individual run carries 50 rows, not 20,000.
"""

from __future__ import annotations

import math
import shlex

from dashboards.run_index import Individual, RunIndex

PAGE_SIZE = 50
ANCESTRY_DEPTH = 4  # generations of ancestors drawn on an individual's page


def _value(objectives: dict | None, name: str) -> list[float] | None:
    return None if not objectives or name not in objectives else objectives[name]


def _best_test(index: RunIndex) -> dict | None:
    """The best held-out score among the individuals the run reported on its test split."""
    metric = next(iter(index.plan["objectives"]))
    tested = [i for i in index.individuals.values() if _value(i.test, metric)]
    if not tested:
        return None
    best = max(tested, key=lambda i: i.test[metric][0])
    return {"id": best.id, "objective": metric, "value": best.test[metric]}


def _planned_generations(index: RunIndex) -> list[dict]:
    return [g for n, g in sorted(index.generations.items()) if n <= index.plan["planned"]]


def runs_payload(indices: dict[str, RunIndex]) -> list[dict]:
    rows = []
    for name, index in indices.items():
        index.refresh()
        generations = _planned_generations(index)
        started, updated = index.times()
        rows.append({
            "run": name, "state": index.state(), "strategy": index.plan["strategy"],
            "generations": {"done": len(generations), "planned": index.plan["planned"]},
            "individuals": len(index.individuals),
            "hypervolume": generations[-1]["hypervolume"] if generations else None,
            "best_test": _best_test(index),
            "started": started, "updated": updated,
        })
    return sorted(rows, key=lambda r: -(r["updated"] or 0))


def run_payload(index: RunIndex) -> dict:
    index.refresh()
    generations = sorted(index.generations.values(), key=lambda g: g["generation"])
    last = generations[-1] if generations else None
    metric = next(iter(index.plan["objectives"]))
    front = [index.individuals[i] for i in (last["front"] if last else [])
             if i in index.individuals]
    operators: dict[str, int] = {}
    for member in front:
        operators[member.operator] = operators.get(member.operator, 0) + 1
    return {
        "run": index.run_dir.name, "state": index.state(), "plan": index.plan,
        "version": index.version, "individuals": len(index.individuals),
        "objectives": index.objective_names(),
        "directions": {name: index.direction(name) for name in index.objective_names()},
        "generations": [{"generation": g["generation"], "hypervolume": g["hypervolume"],
                         "front": len(g["front"]), "population": len(g["population"]),
                         "at": g["at"], "final": g["generation"] > index.plan["planned"]}
                        for g in generations],
        "front_operators": operators,
        "search_vs_test": [{"id": i.id, "stage": i.stage, "search": _value(i.objectives, metric),
                            "test": _value(i.test, metric)}
                           for i in index.individuals.values() if _value(i.test, metric)],
        "metric": metric,
        "cost": index.cost(),
    }


def points_payload(index: RunIndex, generation: int | None, x: str, y: str,
                   dominated: bool) -> dict:
    """The front in (x, y) among individuals born by `generation`, and (if asked) the dominated
    points, as columns (ids, values, stderrs) for the plot."""
    index.refresh()
    scored, front_ids = index.front(generation, x, y)
    def columns(members: list[Individual]) -> dict:
        return {"ids": [m.id for m in members],
                "x": [m.objectives[x][0] for m in members],
                "x_err": [m.objectives[x][1] for m in members],
                "y": [m.objectives[y][0] for m in members],
                "y_err": [m.objectives[y][1] for m in members],
                "operator": [m.operator for m in members]}
    front = sorted((m for m in scored if m.id in front_ids), key=lambda m: m.objectives[x][0])
    others = [m for m in scored if m.id not in front_ids]
    return {"generation": generation, "x": x, "y": y,
            "directions": [index.direction(x), index.direction(y)],
            "front": columns(front), "dominated_count": len(others),
            "dominated": columns(others) if dominated else None}


SORTABLE = ("id", "generation", "operator", "stage")


def table_payload(index: RunIndex, page: int, sort: str, descending: bool,
                  front_only: bool) -> dict:
    """One page of the individuals, sorted by a column or an objective, server-side."""
    index.refresh()
    objectives = list(index.plan["objectives"])
    def compute():
        members = list(index.individuals.values())
        if front_only:
            last = max(index.generations) if index.generations else None
            keep = set(index.generations[last]["front"]) if last is not None else set()
            members = [m for m in members if m.id in keep]
        def key(m: Individual):
            if sort in SORTABLE:
                value = getattr(m, sort)
                return (value is None, value if value is not None else 0)
            value = _value(m.objectives, sort)
            return (value is None, value[0] if value else 0.0)
        members.sort(key=key, reverse=descending)
        if descending:  # missing values last either way
            members.sort(key=lambda m: key(m)[0])
        return members
    members = index.cached(("table", sort, descending, front_only), compute)
    pages = max(1, math.ceil(len(members) / PAGE_SIZE))
    page = min(max(page, 0), pages - 1)
    rows = [{"id": m.id, "generation": m.generation, "operator": m.operator, "stage": m.stage,
             "error": m.error, "objectives": {o: _value(m.objectives, o) for o in objectives},
             "test": _value(m.test, objectives[0])}
            for m in members[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]]
    return {"page": page, "pages": pages, "total": len(members), "sort": sort,
            "descending": descending, "objectives": objectives, "rows": rows}


def _agreement(child: dict[str, float], parent: dict[str, float]) -> dict:
    """Item-level agreement on the items both answered: the share of equal scores, and where
    the child is right and the parent wrong (gained) or the reverse (lost)."""
    common = child.keys() & parent.keys()
    if not common:
        return {"items": 0, "agree": None, "gained": 0, "lost": 0}
    agree = sum(child[i] == parent[i] for i in common)
    return {"items": len(common), "agree": agree / len(common),
            "gained": sum(child[i] > parent[i] for i in common),
            "lost": sum(child[i] < parent[i] for i in common)}


def _ancestry(index: RunIndex, identifier: str, depth: int) -> dict:
    individual = index.individuals.get(identifier)
    node = {"id": identifier, "operator": individual.operator if individual else None,
            "generation": individual.generation if individual else None, "parents": []}
    if individual and depth > 0:
        node["parents"] = [_ancestry(index, p, depth - 1) for p in individual.parents]
    elif individual and individual.parents:
        node["more"] = len(individual.parents)
    return node


def individual_payload(index: RunIndex, identifier: str) -> dict | None:
    index.refresh()
    individual = index.individuals.get(identifier)
    if individual is None:
        return None
    answers = index.answers(identifier)
    parents = []
    for parent_id in individual.parents:
        parent = index.individuals.get(parent_id)
        parents.append({"id": parent_id, "known": parent is not None,
                        "operator": parent.operator if parent else None,
                        "objectives": parent.objectives if parent else {},
                        "agreement": _agreement(answers, index.answers(parent_id))})
    tasks = sorted({name.split("/", 1)[1] for name in (individual.objectives or {})
                    | (individual.test or {}) if name.startswith("accuracy/")})
    return {
        "id": identifier, "run": index.run_dir.name, "generation": individual.generation,
        "operator": individual.operator, "stage": individual.stage, "items": individual.items,
        "error": individual.error, "objectives": individual.objectives, "test": individual.test,
        "tasks": [{"task": task, "search": _value(individual.objectives, f"accuracy/{task}"),
                   "test": _value(individual.test, f"accuracy/{task}")} for task in tasks],
        "recipe": index.recipe(identifier), "parents": parents,
        "children": index.children.get(identifier, []),
        "ancestry": _ancestry(index, identifier, ANCESTRY_DEPTH),
        "answered": len(answers),
        "export": " ".join(["evoforge", "export", shlex.quote(str(index.run_dir)),
                            shlex.quote(identifier), "--out",
                            shlex.quote(f"exports/{identifier}")]),
    }


def compare_payload(indices: dict[str, RunIndex]) -> list[dict]:
    """Each run's final front in its own two objectives, and its hypervolume curve."""
    runs = []
    for name, index in indices.items():
        index.refresh()
        names = list(index.plan["objectives"])
        x, y = (names[1] if len(names) > 1 else "params"), names[0]
        points = points_payload(index, None, x, y, dominated=False)
        runs.append({"run": name, "x": x, "y": y, "front": points["front"],
                     "hypervolume": [{"generation": g["generation"],
                                      "hypervolume": g["hypervolume"]}
                                     for g in _planned_generations(index)]})
    return runs
