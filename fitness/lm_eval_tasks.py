"""lm-eval-harness tasks as item sources, prompted and scored by lm-eval itself, offline.

`load_lm_eval_task(name, include_paths)` reads the task's YAML from the user's folders only
(never lm-eval's built-in tasks, which fetch their data from the Hub) and refuses, before loading
anything, a task whose dataset is not local files: `dataset_path` must be one of `datasets`'
file builders (`json`, `csv`, `parquet`, `text`, `arrow`) with `dataset_kwargs.data_files`
naming files that exist. Relative data files are read from the task YAML's folder, so a folder of
YAML and data works from any working directory. Hugging Face libraries run in offline mode
while lm-eval loads and evaluates, so nothing can reach the network by accident.

Splits: a task with both a `validation_split` and a `test_split` searches on every validation
document and tests on every test document, so its final report is lm-eval's own number on the
full test split. A task with one of them is halved by a hash of each document's content (stable
across runs and machines, about half each), as JSONL files without split fields are.

`LmEvalEvaluator` scores `LmEvalItem`s of an in-memory transformers model through lm-eval's
HFLM (built once per evaluator, so per model object): lm-eval builds the prompts, runs the
model and applies the task's filters and metric, for only the documents asked. Per item:
- correct: the task's metric as 0/1, `acc` for multiple_choice and `exact_match` for
  generate_until unless `load_lm_eval_task(metric=...)` names another 0/1 metric;
- score: the log-likelihood of the gold choice (multiple_choice; the best of several golds),
  nan for generate_until (lm-eval computes no likelihood there);
- prediction: the highest-likelihood choice, or the generated text after the task's filters
  (the first filter when the task has several).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from fitness.errors import FitnessError, TaskFormatError
from fitness.items import LmEvalItem, Task
from fitness.results import ItemResults

FORMAT = "lm-eval"
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
DEFAULT_METRICS = {"multiple_choice": "acc", "generate_until": "exact_match"}
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True, eq=False)
class LmEvalSplit:
    """One lm-eval split as evoforge evaluates it.

    `task` is lm-eval's task object whose evaluation documents are this split (lm-eval selects
    documents by their position in those), `keys` the content hash of each of them in order, and
    `metric` the per-document metric read as `correct`. Compared by identity: the evaluator
    groups items by the split object they came from.
    """

    task: Any  # lm_eval.api.task.ConfigurableTask
    split: str
    keys: tuple[str, ...]
    metric: str


def doc_key(doc: Mapping[str, Any]) -> str:
    """A hash of a document's content, independent of field order, to join results by."""
    text = json.dumps(doc, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face libraries in offline mode, restored afterwards.

    `datasets` and `huggingface_hub` read the environment once, at import, so the flags they
    already hold are set as well as the environment (which covers later imports)."""
    import datasets.config
    import huggingface_hub.constants

    flags = [(module, name) for module, name in (
        (datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
        (huggingface_hub.constants, "HF_HUB_OFFLINE")) if hasattr(module, name)]
    saved_flags = [getattr(module, name) for module, name in flags]
    saved_env = {name: os.environ.get(name) for name in OFFLINE_ENV}
    os.environ.update(dict.fromkeys(OFFLINE_ENV, "1"))
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved_flags, strict=True):
            setattr(module, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# -- loading ------------------------------------------------------------------------------------


def load_lm_eval_task(name: str, include_paths: Sequence[str | Path],
                      metric: str | None = None) -> Task:
    """The evoforge task (format "lm-eval") of lm-eval task `name` from the YAMLs under
    `include_paths`; `metric` (a 0/1 per-document metric of the task) defaults to `acc` for
    multiple_choice and `exact_match` for generate_until."""
    from lm_eval.tasks import TaskManager

    folders = _folders(include_paths)
    with _offline():
        manager = TaskManager(include_path=[str(f) for f in folders], include_defaults=False)
        yaml_path, config = _local_config(manager, name, folders)
        metric = metric or DEFAULT_METRICS[config.get("output_type", "generate_until")]
        search, test = _splits(manager, name, config, metric)
    if search is test:
        halves: dict[bool, list[LmEvalItem]] = {False: [], True: []}
        for index, key in enumerate(search.keys):
            halves[bool(int(key[0], 16) & 1)].append(LmEvalItem(index, key, search))
        search_items, test_items = halves[False], halves[True]
    else:
        search_items = [LmEvalItem(i, key, search) for i, key in enumerate(search.keys)]
        test_items = [LmEvalItem(i, key, test) for i, key in enumerate(test.keys)]
    for split, items in (("search", search_items), ("test", test_items)):
        if not items:
            raise TaskFormatError(f"lm-eval task {name!r} ({yaml_path}): the {split} split is "
                                  "empty; every task needs items in both splits")
    how = (f"{search.split} docs / {test.split} docs" if search is not test
           else f"its {search.split} docs halved by a hash")
    return Task(name, FORMAT, tuple(search_items), tuple(test_items),
                description=f"lm-eval task {name} ({yaml_path}); search / test: {how}",
                metadata={"lm_eval": {"search": search, "test": test, "yaml": yaml_path}})


def _folders(include_paths: Sequence[str | Path]) -> list[Path]:
    folders = [Path(p).expanduser().resolve() for p in include_paths]
    if not folders:
        raise TaskFormatError("lm-eval tasks: give at least one include path (a folder of task "
                              "YAMLs); evoforge never uses lm-eval's built-in tasks")
    for folder in folders:
        if not folder.is_dir():
            raise TaskFormatError(f"lm-eval include path {folder} is not a folder")
    return folders


def _local_config(manager, name: str, folders: list[Path]) -> tuple[Path, dict[str, Any]]:
    """The task's full config, checked to need no download, with its data files made absolute.

    The check reads the config as indexed (functions unresolved), so nothing of the task runs
    and nothing is loaded before it passes."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None or name not in manager.all_subtasks:
        what = "a group or tag" if entry is not None else "not a task"
        raise TaskFormatError(
            f"lm-eval task {name!r} is {what} in the include path "
            f"{[str(f) for f in folders]}; its tasks: {manager.all_subtasks or 'none'} (YAML files "
            "with a `task:` key)")
    raw = entry.cfg or {}
    if "class" in raw:
        raise TaskFormatError(f"lm-eval task {name!r} ({entry.yaml_path}) is a Python class; "
                              "evoforge loads YAML tasks only, whose data it can check is local")
    output_type = raw.get("output_type", "generate_until")
    if output_type not in DEFAULT_METRICS:
        raise TaskFormatError(f"lm-eval task {name!r}: output_type {output_type!r}; evoforge "
                              f"evaluates {sorted(DEFAULT_METRICS)} tasks")
    data_files = _local_data_files(name, raw, entry.yaml_path.parent)
    config = load_yaml(entry.yaml_path, resolve_func=True)
    config["dataset_kwargs"] = {**(config.get("dataset_kwargs") or {}), "data_files": data_files}
    return entry.yaml_path, config


def _local_data_files(name: str, raw: dict[str, Any], folder: Path) -> Any:
    fix = ("point `dataset_path: json` (or csv, parquet, text, arrow) and `dataset_kwargs: "
           f"{{data_files: ...}}` at local files (relative paths are read from {folder})")
    path = raw.get("dataset_path")
    data_files = (raw.get("dataset_kwargs") or {}).get("data_files")
    if "custom_dataset" in raw or path not in LOCAL_BUILDERS or not data_files:
        raise TaskFormatError(f"lm-eval task {name!r} would download its dataset (dataset_path "
                              f"{path!r}); evoforge evaluates offline: {fix}")
    return _resolve_files(name, data_files, folder, fix)


def _resolve_files(name: str, files: Any, folder: Path, fix: str) -> Any:
    """`data_files` (a path, a list, or a mapping of split to either) with absolute paths."""
    if isinstance(files, Mapping):
        return {split: _resolve_files(name, f, folder, fix) for split, f in files.items()}
    if isinstance(files, list):
        return [_resolve_files(name, f, folder, fix) for f in files]
    text = str(files)
    if "://" in text or text.startswith("hf:"):
        raise TaskFormatError(f"lm-eval task {name!r}: data file {text!r} is remote; {fix}")
    path = Path(text).expanduser()
    path = path if path.is_absolute() else folder / path
    if not glob.glob(str(path)):
        raise TaskFormatError(f"lm-eval task {name!r}: data file {text!r} not found (looked for "
                              f"{path})")
    return str(path)


def _splits(manager, name: str, config: dict[str, Any],
            metric: str) -> tuple[LmEvalSplit, LmEvalSplit]:
    """(search, test): validation and test docs when the task has both, else one split twice."""
    validation, test = config.get("validation_split"), config.get("test_split")
    if validation and test:
        return (_split(manager, name, {**config, "test_split": None}, validation, metric),
                _split(manager, name, config, test, metric))
    if not (validation or test):
        raise TaskFormatError(f"lm-eval task {name!r} has neither a validation_split nor a "
                              "test_split to evaluate on")
    only = _split(manager, name, config, validation or test, metric)
    return only, only


def _split(manager, name: str, config: dict[str, Any], split: str, metric: str) -> LmEvalSplit:
    task = manager.load([config])["tasks"][name]
    if metric not in task.aggregation():
        raise TaskFormatError(f"lm-eval task {name!r} computes {sorted(task.aggregation())}, not "
                              f"{metric!r}; add it to the task's metric_list or choose another "
                              "0/1 metric")
    return LmEvalSplit(task, split, tuple(doc_key(doc) for doc in task.eval_docs), metric)


# -- evaluation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    correct: bool
    score: float
    prediction: str


class LmEvalEvaluator:
    """Scores `LmEvalItem`s of an in-memory model with lm-eval's prompts, filters and metrics."""

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @cached_property
    def _lm(self):
        """lm-eval's wrapper of the model, built on first use and reused for every call (the
        model object is shared, so weights loaded into it later are what it evaluates)."""
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=self.model, tokenizer=self.tokenizer, batch_size=self.batch_size)

    def evaluate(self, task: str, items: Sequence[LmEvalItem]) -> ItemResults:
        """Per-item results of `items` (in their order; repeats allowed) under the name `task`."""
        if not items:
            return ItemResults(task, (), (), ())
        for index, item in enumerate(items):
            _check(task, index, item)
        outcomes: dict[LmEvalSplit, dict[str, _Outcome]] = {}
        for item in items:
            outcomes.setdefault(item.source, {})
        for split in outcomes:
            indices = sorted({item.doc_index for item in items if item.source is split})
            outcomes[split] = self._run(task, split, indices)
        rows = [outcomes[item.source][item.doc_key] for item in items]
        return ItemResults(task, tuple(r.correct for r in rows), tuple(r.score for r in rows),
                           tuple(r.prediction for r in rows))

    def _run(self, task: str, split: LmEvalSplit, indices: list[int]) -> dict[str, _Outcome]:
        """Outcomes by document key of the documents at `indices` (sorted, unique: lm-eval
        0.4.13 mislabels the samples of unsorted ids, and results are joined by content)."""
        from lm_eval.evaluator import evaluate

        name = split.task.task_name
        with _offline():
            output = evaluate(lm=self._lm, task_dict={"tasks": {name: split.task}},
                              samples={name: indices}, log_samples=True, bootstrap_iters=0)
        samples = output["samples"][name]
        first_filter = samples[0]["filter"]
        found = {doc_key(s["doc"]): _outcome(task, split, s) for s in samples
                 if s["filter"] == first_filter}
        missing = {split.keys[i] for i in indices} - found.keys()
        if missing:
            raise FitnessError(f"task {task!r}: lm-eval returned no result for {len(missing)} of "
                               f"the {len(indices)} documents asked of its {split.split} split")
        return found


def _check(task: str, index: int, item: Any) -> None:
    if not isinstance(item, LmEvalItem) or not isinstance(item.source, LmEvalSplit):
        raise FitnessError(f"task {task!r}, item {index}: the lm-eval evaluator takes the "
                           f"LmEvalItems of load_lm_eval_task, not {type(item).__name__}")
    keys = item.source.keys
    if not 0 <= item.doc_index < len(keys) or keys[item.doc_index] != item.doc_key:
        raise FitnessError(f"task {task!r}, item {index}: document {item.doc_index} of the lm-eval "
                           f"{item.source.split} split is not the document the item names")


def _outcome(task: str, split: LmEvalSplit, sample: dict[str, Any]) -> _Outcome:
    value = sample[split.metric]
    if value not in (0, 1):
        raise FitnessError(f"task {task!r}: lm-eval's {split.metric!r} is {value!r} for document "
                           f"{sample['doc_id']}; evoforge needs a 0/1 metric per document")
    if split.task.OUTPUT_TYPE != "multiple_choice":
        return _Outcome(bool(value), math.nan, str(sample["filtered_resps"][0]))
    choices = split.task.doc_to_choice(sample["doc"])
    logliks = [float(response[0]) for response in sample["filtered_resps"][:len(choices)]]
    chosen = max(range(len(choices)), key=logliks.__getitem__)
    gold = _gold_indices(sample["target"], choices)
    score = max(logliks[i] for i in gold) if gold else math.nan
    return _Outcome(bool(value), score, str(choices[chosen]))


def _gold_indices(target: Any, choices: Sequence[str]) -> list[int]:
    """lm-eval's gold answer as choice indices: an index, a choice's text, or a list of them."""
    targets = target if isinstance(target, list) else [target]
    indices = [t if isinstance(t, int) else choices.index(t) if t in choices else -1
               for t in targets]
    return [i for i in indices if 0 <= i < len(choices)]
