"""Export an individual: a Hugging Face checkpoint, its recipe, a mergekit config when mergekit
can reproduce it, and a model card with its held-out scores and lineage."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from operators.architecture import Architecture
from operators.recipes import Recipe, tensors_cut_at_ties
from operators.safetensors_io import DEFAULT_SHARD_BYTES, write_checkpoint
from operators.settings import depth, resolve

# methods whose result mergekit reproduces tensor for tensor (DARE/DELLA draw their own masks)
MERGEKIT_EXACT = ("linear", "slerp", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties")
PER_MODEL = ("weight", "density", "gamma", "epsilon")


def mergekit_config(recipe: Recipe, folders: dict[str, Path], dtype: str,
                    architecture: Architecture) -> dict | None:
    """mergekit's YAML for a flat merge of source models, or None if mergekit cannot express it.

    An edit around the merge (layers left out or stacked) becomes mergekit slices, one per output
    layer, each merging that layer of every source. Inside a one-layer slice mergekit reads a
    gradient at t = 1 (its end) and the embeddings, final norm and head at t = 0 (its start), so
    each per-model setting is written as [value outside the layers, value at this layer], the
    values evoforge resolved; that reproduces gradients over the sources' depth exactly.
    """
    layer_plan = None
    if recipe.get("op") == "edit":
        layer_plan, recipe = recipe["layers"], recipe["input"]
    if recipe.get("op") != "merge" or any("model" not in i for i in recipe["inputs"]):
        return None
    if recipe["method"] not in MERGEKIT_EXACT:
        return None
    params = dict(recipe.get("params", {}))
    per_model = {k: params.pop(k) for k in PER_MODEL if k in params}
    if any(_conditional(v) for v in [*per_model.values(), *params.values()]):
        return None  # per-tensor filters: not written out here
    config = {"merge_method": recipe["method"], "parameters": params, "dtype": "float32",
              "out_dtype": dtype}
    base = str(folders[recipe["base"]["model"]]) if recipe.get("base") else None
    if base is not None:
        config["base_model"] = base
    models = [str(folders[i["model"]]) for i in recipe["inputs"]]

    def values(index: int, layer: int | None = None) -> dict:
        out = {}
        for name, value in per_model.items():
            setting = value[index] if isinstance(value, list) else value
            if layer is None or not isinstance(setting, list):
                out[name] = setting
                continue
            tensor = architecture.layer_names(layer)[0]  # any of the layer's tensors: same depth
            out[name] = [resolve(setting, "", 0.0),
                         resolve(setting, tensor, depth(tensor, architecture.num_layers))]
        return out
    if layer_plan is None:
        config["models"] = [{"model": m, "parameters": values(i)} for i, m in enumerate(models)]
        return config
    config["slices"] = [{"sources": [{"model": base, "layer_range": [k, k + 1]}] * (
        base is not None) + [{"model": m, "layer_range": [k, k + 1], "parameters": values(i, k)}
                             for i, m in enumerate(models)]} for k in layer_plan]
    return config


def _conditional(setting) -> bool:
    """A {filter, value} setting (or a list of them), as opposed to a number or a gradient."""
    return isinstance(setting, dict) or (isinstance(setting, list) and any(
        isinstance(v, dict) or (isinstance(v, list) and _conditional(v)) for v in setting))


def _card(record: dict, base: str, test: dict | None, search: dict, has_mergekit: bool,
          cut: list[str]) -> str:
    front = {"base_model": base, "library_name": "transformers",
             "tags": ["merge", "evoforge", "evolutionary-merge"]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {record['id']}", "",
             f"Bred by evoforge (generation {record['generation']}, operator "
             f"{record['operator']}, parents {', '.join(record['parents']) or 'none'}).", ""]
    if test:
        lines += ["## Scores on the held-out test split", "", "| objective | value |", "|---|---|"]
        lines += [f"| {name} | {value * 100:.1f} ± {stderr * 100:.1f} % |"
                  for name, (value, stderr) in sorted(test.items())]
        lines.append("")
    if search:
        accuracy, stderr = search.get("accuracy", (float("nan"), 0))
        lines += [f"Search-split accuracy during the run: {accuracy * 100:.1f} ± "
                  f"{stderr * 100:.1f} %.", ""]
    lines += ["## Reproduce", "", "The recipe is in `recipe.json`; `evoforge export RUN "
              f"{record['id']} --out DIR` rebuilds these exact tensors."]
    if has_mergekit and not cut:
        lines.append("`mergekit-yaml mergekit_config.yml OUT` reproduces them with mergekit.")
    elif has_mergekit:
        shown = ", ".join(f"`{name}`" for name in cut[:3]) + (", …" if len(cut) > 3 else "")
        lines.append(f"`mergekit-yaml mergekit_config.yml OUT` reproduces them with mergekit, "
                     f"except in {len(cut)} tensors ({shown}) whose trim threshold falls among "
                     "tied magnitudes: of those, evoforge keeps the first by index, mergekit the "
                     "ones its argsort puts first.")
    return "\n".join(lines) + "\n"


def export_individual(record: dict, sources, config, out: Path, test: dict | None,
                      search: dict, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Stream the individual's tensors, in the run's dtype, straight into safetensors shards
    (nothing model-sized is held): the exact bits the run scored. Tied weights stay tied (the
    architecture's tied tensors are not written, as transformers saves them)."""
    from search_spaces.models import resolve_model

    recipe = record["recipe"]
    specs, source = sources.export_specs(recipe)
    write_checkpoint(out, specs, ((spec.name, source.get(spec.name)) for spec in specs),
                     max_shard_bytes)
    model_config = copy.deepcopy(sources.candidate_config(recipe))
    model_config.dtype = str(sources.dtype).removeprefix("torch.")
    model_config.save_pretrained(out)
    sources.tokenizer.save_pretrained(out)
    folders = {name: resolve_model(name) for name in (config.sources.base,
                                                      *config.sources.experts)}
    mergekit = mergekit_config(recipe, folders, model_config.dtype, sources.architecture)
    cut = []
    if mergekit is not None:
        (out / "mergekit_config.yml").write_text(yaml.safe_dump(mergekit, sort_keys=False))
        cut = tensors_cut_at_ties(recipe, sources.bank.source)
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2))
    (out / "README.md").write_text(_card(record, config.sources.base, test, search,
                                         mergekit is not None, cut))
