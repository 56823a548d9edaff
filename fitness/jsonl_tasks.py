"""User tasks in JSONL: one item per line, validated on load with the line number of any error.

Schema (one JSON object per line; blank lines and lines starting with `//` are skipped):

    {"prompt": "2+2=", "answer": "4", "max_new_tokens": 8}         generation (exact match)
    {"prompt": "Sky is", "choices": [" blue", " green"], "answer": 0}  multiple choice
    {"features": [0.1, -0.3, ...], "label": 3}                       classification

Optional on every line: `"format"` (`generation`, `choice` or `classification`; inferred from
the fields when absent), `"split"` (`search` or `test`) and `"id"`. All lines of a file share one
format. A file with no `split` fields is split in two by a hash of each line's content (stable
across runs and machines, about half each); a file must not mix lines with and without `split`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fitness.errors import TaskFormatError
from fitness.items import FORMATS, ChoiceItem, ClassificationItem, GenerationItem, Item, Task

DEFAULT_MAX_NEW_TOKENS = 32
FIELDS = {
    "generation": {"prompt", "answer"},
    "choice": {"prompt", "choices", "answer"},
    "classification": {"features", "label"},
}
OPTIONAL = {"format", "split", "id", "max_new_tokens"}


def _infer_format(record: dict[str, Any]) -> str:
    if "format" in record:
        return record["format"]
    if "choices" in record:
        return "choice"
    if "features" in record:
        return "classification"
    return "generation"


def _item(record: dict[str, Any], fmt: str, where: str) -> Item:
    missing = FIELDS[fmt] - record.keys()
    if missing:
        raise TaskFormatError(f"{where}: a {fmt} item needs {sorted(missing)}")
    unknown = record.keys() - FIELDS[fmt] - OPTIONAL
    if unknown:
        raise TaskFormatError(f"{where}: unknown fields {sorted(unknown)} for a {fmt} item")

    def expect(name: str, kind: type | tuple[type, ...], what: str) -> Any:
        value = record[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TaskFormatError(f"{where}: {name!r} must be {what}, got {value!r}")
        return value

    if fmt == "generation":
        bound = record.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if not isinstance(bound, int) or isinstance(bound, bool) or bound < 1:
            raise TaskFormatError(f"{where}: 'max_new_tokens' must be a positive integer")
        answer = expect("answer", str, "a string")
        if not answer.strip():
            raise TaskFormatError(f"{where}: 'answer' is empty")
        return GenerationItem(expect("prompt", str, "a string"), answer, bound)
    if fmt == "choice":
        choices = expect("choices", list, "a list of strings")
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise TaskFormatError(f"{where}: 'choices' must list at least two strings")
        answer = expect("answer", int, "the index of the correct choice")
        if not 0 <= answer < len(choices):
            raise TaskFormatError(f"{where}: 'answer' {answer} is not an index of 'choices' "
                                  f"(0..{len(choices) - 1})")
        return ChoiceItem(expect("prompt", str, "a string"), tuple(choices), answer)
    features = expect("features", list, "a list of numbers")
    if not features or not all(isinstance(v, int | float) and not isinstance(v, bool)
                               for v in features):
        raise TaskFormatError(f"{where}: 'features' must be a non-empty list of numbers")
    label = expect("label", int, "a class index")
    if label < 0:
        raise TaskFormatError(f"{where}: 'label' must be >= 0")
    return ClassificationItem(tuple(float(v) for v in features), label)


def load_jsonl_task(path: str | Path, name: str | None = None) -> Task:
    """A task from a JSONL file (schema above); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise TaskFormatError(f"task file {path} not found")
    splits: dict[str, list[Item]] = {"search": [], "test": []}
    formats: set[str] = set()
    has_split: set[bool] = set()
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            text = line.strip()
            if not text or text.startswith("//"):
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise TaskFormatError(f"{where}: not valid JSON ({error.msg} at column "
                                      f"{error.colno})") from None
            if not isinstance(record, dict):
                raise TaskFormatError(f"{where}: each line must be a JSON object")
            fmt = _infer_format(record)
            if fmt not in FORMATS:
                raise TaskFormatError(f"{where}: unknown format {fmt!r}; use one of {FORMATS}")
            formats.add(fmt)
            if len(formats) > 1:
                raise TaskFormatError(f"{where}: {fmt} item in a file of {formats - {fmt}} "
                                      "items; put each format in its own task file")
            item = _item(record, fmt, where)
            has_split.add("split" in record)
            if len(has_split) > 1:
                raise TaskFormatError(f"{where}: some lines have 'split' and some do not; give "
                                      "every line a split or none")
            split = record.get("split") or (
                "test" if hashlib.sha256(text.encode()).digest()[0] & 1 else "search")
            if split not in splits:
                raise TaskFormatError(f"{where}: 'split' must be 'search' or 'test', not "
                                      f"{split!r}")
            splits[split].append(item)
    if not formats:
        raise TaskFormatError(f"{path}: no items")
    for split, items in splits.items():
        if not items:
            raise TaskFormatError(f"{path}: the {split} split is empty; every task needs items "
                                  "in both splits")
    return Task(name or path.stem, formats.pop(), tuple(splits["search"]), tuple(splits["test"]))
