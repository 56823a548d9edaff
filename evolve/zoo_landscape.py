"""The zoo's landscape: base, experts and default merges scored on every skill's test split.

This table is why the zoo exists: it shows that merging matters (merges beat the base), that it is
not solved (they stay below what each expert does on its own skill), and so that a search has
headroom. `evoforge zoo show` prints it; `check_landscape` states the conditions it must meet.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from fitness.items import Task
from fitness.worker import LocalWorker
from fitness.worker_spec import WorkerSpec
from search_spaces.builtin_tasks import BUILTIN_TASKS
from search_spaces.merge_space import default_merge_recipes
from search_spaces.merge_zoo import Zoo, zoo_task

LANDSCAPE_FILE = "landscape.json"


def zoo_scorer(zoo: Zoo, tasks: list[Task], batch_size: int = 256) -> LocalWorker:
    """A run's local worker over the zoo's checkpoints, named `zoo/<model>` as run configs name
    them (built from a `WorkerSpec`, as every worker is)."""
    spec = WorkerSpec(tuple((f"zoo/{name}", str(path)) for name, path in zoo.models.items()),
                      "zoo/base", tuple(task.name for task in tasks), builtin_tasks=BUILTIN_TASKS,
                      batch_size=batch_size)
    return spec.build(tasks=tasks)


@dataclass(frozen=True)
class Landscape:
    skills: tuple[str, ...]
    rows: dict[str, dict[str, float]]  # model -> skill -> test accuracy
    kinds: dict[str, str]  # model -> "base" | "expert" | "merge"
    items_per_task: int

    def average(self, model: str) -> float:
        return sum(self.rows[model].values()) / len(self.skills)

    def to_json(self) -> str:
        return json.dumps({"skills": self.skills, "rows": self.rows, "kinds": self.kinds,
                           "items_per_task": self.items_per_task}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Landscape:
        data = json.loads(text)
        return cls(tuple(data["skills"]), data["rows"], data["kinds"], data["items_per_task"])


def compute_landscape(zoo: Zoo, progress: Callable[[str, int, int], None] | None = None,
                      batch_size: int = 128) -> Landscape:
    """Scores every model of the table on each skill's test split; cached in the zoo folder."""
    cached = zoo.folder / LANDSCAPE_FILE
    if cached.is_file():
        return Landscape.from_json(cached.read_text())
    skills = zoo.recipe.skills
    scorer = zoo_scorer(zoo, [zoo_task(skill, zoo.recipe) for skill in skills], batch_size)
    experts = [f"zoo/{s}" for s in skills]
    recipes = {"base": {"model": "zoo/base"},
               **{f"{s} expert": {"model": e} for s, e in zip(skills, experts, strict=True)},
               **{r["method"]: r for r in default_merge_recipes("zoo/base", experts)}}
    kinds = {label: "base" if label == "base" else "expert" if "model" in recipe else "merge"
             for label, recipe in recipes.items()}
    rows = {}
    for done, (label, recipe) in enumerate(recipes.items()):
        if progress:
            progress("scoring the landscape", done, len(recipes))
        results = scorer.test_results(label, recipe)
        rows[label] = {s: r.accuracy for s, r in zip(skills, results, strict=True)}
    if progress:
        progress("scoring the landscape", len(recipes), len(recipes))
    landscape = Landscape(skills, rows, kinds, zoo.recipe.items_per_split)
    cached.write_text(landscape.to_json())
    return landscape


def check_landscape(landscape: Landscape, margin: float = 0.20) -> list[str]:
    """Which of the zoo's promises the landscape breaks (empty: all kept).

    The base is at least `margin` below each expert on the expert's skill; each expert is best on
    its own skill among the experts; every default merge beats the base on average and stays below
    each expert on that expert's skill on average (headroom for a search).
    """
    problems = []
    experts = {s: f"{s} expert" for s in landscape.skills}
    merges = [m for m, kind in landscape.kinds.items() if kind == "merge"]
    for skill, expert in experts.items():
        own = landscape.rows[expert][skill]
        if own - landscape.rows["base"][skill] < margin:
            problems.append(f"base is within {margin:.0%} of the {skill} expert on {skill}")
        others = [landscape.rows[e][skill] for s, e in experts.items() if s != skill]
        if others and own <= max(others):
            problems.append(f"the {skill} expert is not the best expert on {skill}")
    ceiling = sum(landscape.rows[e][s] for s, e in experts.items()) / len(experts)
    for merge in merges:
        average = landscape.average(merge)
        if average <= landscape.average("base"):
            problems.append(f"{merge} does not beat the base on average")
        if average >= ceiling:
            problems.append(f"{merge} leaves no headroom below the experts' own-skill average")
    return problems
