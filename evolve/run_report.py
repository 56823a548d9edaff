"""A run store read as plain data: what `runs`, `status` and `front` print, as tables or as JSON.

The JSON has a stable, versioned schema (`SCHEMA`, documented in the README) so that scripts and
CI read a run without parsing tables; the tables are printed from the same data.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from evolve.config import load_config
from evolve.store import RunStore

SCHEMA = 1  # of the JSON below; a change that removes or renames a field bumps it


def run_state(store: RunStore) -> str:
    """What the run is doing, truthfully: 'done', 'failed: <reason>', 'interrupted', 'running'
    (its driver is alive), or 'stopped' when the driver that marked it running is gone (killed)."""
    status = store.meta("status", "not started")
    if status in ("failed", "interrupted"):
        return f"{status}: {store.meta('error', '?')}"
    if status != "running":
        return status
    driver = store.meta("driver") or {}
    if driver.get("host") != socket.gethostname():
        return f"running (driver pid {driver.get('pid')} on {driver.get('host')})"
    try:
        os.kill(driver["pid"], 0)
    except ProcessLookupError:
        return (f"stopped: its driver (pid {driver['pid']}) ended without finishing (killed?); "
                "`evoforge resume` continues it")
    except (KeyError, TypeError, PermissionError):
        pass
    return "running"


def _status(state: str) -> str:
    return state.split(":")[0].split(" ")[0]


def plan(run_dir: Path) -> dict:
    """What the run's config asks for, as the readers of a store need it: the objectives with
    their directions, the generations planned, the strategy and mode."""
    config = load_config(run_dir / "config.yaml", saved_run=True)
    return {"objectives": dict(config.objectives), "planned": len(config.generation_sizes()),
            "strategy": config.strategy, "mode": config.mode}


def summary(run_dir: Path) -> dict:
    """A run's progress: status, generations, counts, hypervolume per generation."""
    store = RunStore.reader(run_dir)
    config = load_config(run_dir / "config.yaml", saved_run=True)
    planned = len(config.generation_sizes())
    generations = store.generations()
    state = run_state(store)
    final = next((g for g in generations if g["generation"] > planned), None)
    return {
        "run": run_dir.name, "path": str(run_dir), "status": _status(state), "state": state,
        "error": store.meta("error") if _status(state) in ("failed", "interrupted") else None,
        "mode": config.mode, "strategy": config.strategy,
        "generations": {"done": sum(g["generation"] <= planned for g in generations),
                        "planned": planned},
        "individuals": store.count("individuals"), "results": store.count("answers"),
        "hypervolume": [{"generation": g["generation"], "hypervolume": g["hypervolume"],
                         "front": len(g["front"])} for g in generations
                        if g["generation"] <= planned],
        "final": None if final is None else {"front": final["front"],
                                             "hypervolume": final["hypervolume"]},
        "environment": store.meta("environment"),
    } | cost(store)


def cost(store: RunStore) -> dict:
    """The run's fitness cost: items asked per stage (calibration, reduced, promoted, full,
    final; test: the final front's held-out reports), and what evaluating every candidate the
    run asked anything on the full search split would have asked instead."""
    return {"items_asked": store.items_asked(),
            "items_if_full": store.candidates_asked() * store.meta("search_items", 0)}


def cost_line(data: dict) -> str:
    """One line of `cost`: the search stages' total against full evaluation, then by stage."""
    asked = data["items_asked"]
    search = sum(n for stage, n in asked.items() if stage != "test")
    if not search:
        return "fitness cost: nothing asked yet"
    stages = ", ".join(f"{stage} {n:,}" for stage, n in asked.items())
    if not data["items_if_full"]:  # a store from before the run recorded its pool's size
        return f"fitness cost: {search:,} items asked on the search split; by stage: {stages}"
    return (f"fitness cost: {search:,} items asked on the search split, "
            f"{data['items_if_full'] / search:.1f}x fewer than evaluating every candidate fully "
            f"({data['items_if_full']:,}); by stage: {stages}")


def front(run_dir: Path) -> dict | None:
    """The last saved front (the final one once the run is done) with each member's objectives
    (value, stderr), held-out report, lineage and recipe; None before any generation."""
    store = RunStore.reader(run_dir)
    generations = store.generations()
    if not generations:
        return None
    last = generations[-1]
    planned = len(load_config(run_dir / "config.yaml", saved_run=True).generation_sizes())
    members = []
    for identifier in last["front"]:
        individual = store.individual(identifier) or {}
        evaluation = store.evaluation(identifier) or {}
        members.append({"id": identifier, "generation": individual.get("generation"),
                        "operator": individual.get("operator"),
                        "parents": individual.get("parents", []),
                        "stage": evaluation.get("stage"),
                        "objectives": evaluation.get("objectives", {}),
                        "test": store.report(identifier), "recipe": individual.get("recipe")})
    members.sort(key=lambda m: -m["objectives"].get("params", (0, 0))[0])
    return {"run": run_dir.name, "generation": min(last["generation"], planned),
            "planned": planned, "final": last["generation"] > planned,
            "state": run_state(store), "members": members}
