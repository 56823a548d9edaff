"""`evoforge export` of a code search's individual: its source as `model.py`, its weights trained
again in the sandbox exactly as the run trained it, its recipe and a model card.

Training is seeded and single-threaded, so the export's network is the one the run scored; the
export checks that, item by item, against the answers the run journaled for it on the search
split, and refuses to write a model that scores otherwise (another torch build, say).
"""

from __future__ import annotations

import json
from pathlib import Path

from evolve.config import RunConfig
from fitness.errors import FitnessError
from fitness.journal import Recorded
from operators.sandbox import run_untrusted
from search_spaces.mnist1d_code import WEIGHTS_FILE, CodeSpace

LOADING = '''```python
import torch
from safetensors.torch import load_file
from model import Net

net = Net()
net(torch.zeros(1, 40))  # lazy layers take their shapes
net.load_state_dict(load_file("model.safetensors"))
logits = net(signals)    # signals: (batch, 40) float32, MNIST-1D's format
```'''


def export_code_individual(record: dict, config: RunConfig, out: Path, answers: list[Recorded],
                           report: dict | None, objectives: dict) -> None:
    """Write the individual into `out` (see the module docstring)."""
    space = CodeSpace()
    harness, arguments, files = space.harness(config.code.steps, config.seed, save_weights=True)
    result = run_untrusted(record["recipe"]["source"], harness, arguments,
                           config.code.sandbox.limits(), files, collect=(WEIGHTS_FILE,))
    if not result.ok or WEIGHTS_FILE not in result.files:
        raise FitnessError(f"{record['id']} could not be trained again for the export: "
                           f"{result.kind}: {result.error}")
    predictions = result.value["predictions"]
    for row in answers:
        for item, value in zip(row.items, row.values, strict=True):
            if float(predictions[item] == space.task.search[item].label) != value:
                raise FitnessError(
                    f"{record['id']}: trained again, it answers search item {item} otherwise "
                    "than in the run (a different torch build or CPU kernels?); nothing written")
    (out / "model.py").write_text(record["recipe"]["source"])
    (out / WEIGHTS_FILE).write_bytes(result.files[WEIGHTS_FILE])
    (out / "recipe.json").write_text(json.dumps(record["recipe"], indent=2))
    lines = [f"# {record['id']}", "",
             f"An MNIST-1D classifier bred by evoforge's code search ({record['operator']} of "
             f"{', '.join(record['parents']) or 'nothing'}; generation {record['generation']}).",
             "", f"Trained for {config.code.steps} steps of Adam (learning rate 1e-2, batches of "
             f"100, seed {config.seed}, one thread) on MNIST-1D's 4,000 training signals.", "",
             "| split | accuracy |", "|---|---|"]
    for split, scores in (("search (first 500 test signals)", objectives),
                          ("held-out test (last 500)", report or {})):
        if "accuracy" in scores:
            value, stderr = scores["accuracy"]
            lines.append(f"| {split} | {100 * value:.1f} ± {100 * stderr:.1f} % |")
    params = objectives.get("params", [result.value["params"]])[0]
    lines += ["", f"Parameters: {int(params):,}.", "", "Load it:", "", LOADING, ""]
    (out / "README.md").write_text("\n".join(lines))
