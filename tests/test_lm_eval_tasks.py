"""lm-eval-harness tasks as item sources: offline loading, splits, and answers that agree with
evoforge's own evaluator on the equivalent JSONL task, item by item."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fitness.causal_lm import CausalLMEvaluator, load_causal_lm
from fitness.errors import FitnessError, TaskFormatError
from fitness.items import ChoiceItem, GenerationItem
from fitness.jsonl_tasks import load_jsonl_task
from fitness.lm_eval_tasks import LmEvalEvaluator, doc_key, load_lm_eval_task

pytest.importorskip("lm_eval")  # the optional dependency: pip install -e '.[lm-eval]'

DATA = Path(__file__).parent / "data" / "lm_eval"


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """`datasets` writes its Arrow copies of the data files under a temporary folder, not $HOME."""
    import datasets.config

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets"))
        yield


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model is fastest on one thread: several spin against each other on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tiny_models):
    return load_causal_lm(tiny_models["base"])


@pytest.fixture(scope="module")
def sums():
    return load_lm_eval_task("evoforge_sums", [DATA])


@pytest.fixture(scope="module")
def lm_eval_evaluator(base):
    return LmEvalEvaluator(*base, batch_size=8)


def docs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def doc_of(item) -> dict:
    return item.source.task.eval_docs[item.doc_index]


def test_splits_are_validation_and_test_docs_or_halves_by_content(sums):
    assert (sums.format, len(sums.search), len(sums.test)) == ("lm-eval", 20, 20)
    assert {i.source.split for i in sums.search} == {"validation"}
    assert {i.source.split for i in sums.test} == {"test"}
    assert [doc_of(i) for i in sums.test] == docs(DATA / "sums_test.jsonl")
    reverse = load_lm_eval_task("evoforge_reverse", [DATA])
    assert len(reverse.search) + len(reverse.test) == 24 and reverse.search and reverse.test
    for split, items in (("search", reverse.search), ("test", reverse.test)):
        for item in items:
            assert item.doc_key == doc_key(doc_of(item))
            assert int(item.doc_key[0], 16) & 1 == (split == "test")
    assert load_lm_eval_task("evoforge_reverse", [DATA]) == reverse  # stable


def test_multiple_choice_agrees_with_choice_items(tmp_path, base, sums, lm_eval_evaluator):
    """lm-eval scores context + target_delimiter + choice; the choice items spell that out."""
    records = [{"prompt": d["question"], "choices": [" " + c for c in d["choices"]],
                "answer": d["label"], "split": split}
               for split, name in (("search", "validation"), ("test", "test"))
               for d in docs(DATA / f"sums_{name}.jsonl")]
    own = load_jsonl_task(write_jsonl(tmp_path / "sums.jsonl", records))
    evaluator = CausalLMEvaluator(*base, batch_size=8)
    for split in ("search", "test"):
        theirs, ours = sums.split(split), own.split(split)
        assert [doc_of(i)["question"] for i in theirs] == [i.prompt for i in ours]
        expected = evaluator.evaluate("sums", ours)
        got = lm_eval_evaluator.evaluate("sums", theirs)
        assert got.correct == expected.correct
        assert tuple(" " + p for p in got.prediction) == expected.prediction
        assert got.score == pytest.approx(expected.score, abs=1e-4)
        assert 0 < got.accuracy < 1


def test_generation_agrees_with_generation_items(tmp_path, base):
    """Greedy, stop at a newline, 4 new tokens, stripped. Half the answers are what the model
    generates, so correct and wrong items both occur."""
    evaluator = CausalLMEvaluator(*base, batch_size=8)
    originals = docs(DATA / "reverse.jsonl")
    generated = evaluator.evaluate("probe", [GenerationItem(d["question"], d["answer"], 4)
                                             for d in originals]).prediction
    assert len(set(generated)) > 1
    answers = [g if i % 2 == 0 and g else d["answer"]
               for i, (d, g) in enumerate(zip(originals, generated, strict=True))]
    shutil.copy(DATA / "reverse.yaml", tmp_path)
    write_jsonl(tmp_path / "reverse.jsonl", [{"question": d["question"], "answer": a}
                                             for d, a in zip(originals, answers, strict=True)])
    theirs = load_lm_eval_task("evoforge_reverse", [tmp_path])
    own = load_jsonl_task(write_jsonl(tmp_path / "reverse_own.jsonl", [
        {"prompt": d["question"], "answer": a, "max_new_tokens": 4}
        for d, a in zip(originals, answers, strict=True)]))
    by_prompt = {i.prompt: i for i in own.search + own.test}
    items = theirs.search + theirs.test
    expected = evaluator.evaluate("reverse", [by_prompt[doc_of(i)["question"]] for i in items])
    got = LmEvalEvaluator(*base, batch_size=8).evaluate("reverse", items)
    assert got.correct == expected.correct and got.prediction == expected.prediction
    assert 0 < got.accuracy < 1


def test_unsorted_subsets_with_repeats_join_by_document(sums, lm_eval_evaluator):
    items = [sums.search[7], sums.test[3], sums.search[2], sums.search[7], sums.test[0],
             sums.search[11]]
    together = lm_eval_evaluator.evaluate("sums", items)
    alone = [lm_eval_evaluator.evaluate("sums", [item]) for item in items]
    assert together.correct == tuple(r.correct[0] for r in alone)
    assert together.prediction == tuple(r.prediction[0] for r in alone)
    assert together.score == pytest.approx([r.score[0] for r in alone], abs=1e-4)
    assert together.score[0] == together.score[3]


def test_a_task_that_would_download_is_refused_before_loading(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the dataset was loaded")

    monkeypatch.setattr("datasets.load_dataset", no_loading)
    with pytest.raises(TaskFormatError, match=r"'evoforge_from_hub'.*dataset_path: json"):
        load_lm_eval_task("evoforge_from_hub", [DATA])


@pytest.mark.parametrize("data_files, message", [
    ("missing.jsonl", "not found"),
    ("https://example.com/data.jsonl", "is remote"),
])
def test_data_files_must_be_local_and_exist(tmp_path, data_files, message):
    (tmp_path / "t.yaml").write_text(
        f"task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data_files}\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_target: a\n")
    with pytest.raises(TaskFormatError, match=message):
        load_lm_eval_task("t", [tmp_path])


def test_an_unknown_task_lists_the_include_path():
    with pytest.raises(TaskFormatError, match=r"'nope'.*evoforge_reverse.*evoforge_sums"):
        load_lm_eval_task("nope", [DATA])


def test_other_items_are_refused(lm_eval_evaluator):
    with pytest.raises(FitnessError, match="LmEvalItems"):
        lm_eval_evaluator.evaluate("t", [ChoiceItem("a", ("b", "c"), 0)])


def test_a_run_on_lm_eval_tasks_completes_offline(tiny_models, tmp_path, monkeypatch):
    """`evoforge run` with lm-eval tasks (multiple choice and generation) from an include path,
    every network switch of the Hugging Face libraries off."""
    import yaml
    from typer.testing import CliRunner

    from evolve.cli import app

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    shutil.copytree(DATA, tmp_path / "tasks")
    config = {"sources": {"base": str(tiny_models["base"]),
                          "experts": [str(tiny_models[n]) for n in ("add", "sort")]},
              "tasks": ["lm-eval/evoforge_sums", "lm-eval/evoforge_reverse"],
              "lm_eval": {"include_path": ["tasks"]}, "population": 4, "generations": 1,
              "fitness": {"calibration": 10, "items_per_task": 3, "promote_items_per_task": 6,
                          "max_full_per_generation": 1, "dims": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "run.yaml"), "--run-dir",
                                      str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.output
