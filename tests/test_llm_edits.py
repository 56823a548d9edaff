"""The LLM proposer of decoder architecture edits: replies validated against the architecture
schema, a prompt with what the model needs, and a merge run against a real OpenAI-compatible
server on loopback whose children record who proposed them, which reply was repaired and which
fell back; the key stays out of the store."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter

import pytest
import yaml
from typer.testing import CliRunner

from evolve.cli import app
from operators.llm_edits import DecoderShape, edit_messages, read_architecture
from operators.llm_proposer import Scored
from operators.recipes import layer_plan, pruned_widths
from tests.chat_server import Script, chat_server
from tests.conftest import pick_task, small_run_config

KEY = "sk-test-not-for-the-store"
SHAPE = DecoderShape(layers=4, min_layers=1, mlp_width=128, kv_heads=2, group=2)
PARENT = {"layers": [0, 1, 2, 3], "mlp": 128, "kv_heads": 2}


@pytest.mark.parametrize("reply, expected", [
    ('{"layers": [0, 1, 3]}', {"layers": [0, 1, 3], "mlp": 128, "kv_heads": 2}),
    ('Here:\n```json\n{"mlp": 96, "kv_heads": 1}\n```', {**PARENT, "mlp": 96, "kv_heads": 1}),
    ('{"layers": [0, 1, 1, 2, 3, 3]} stacks two', {**PARENT, "layers": [0, 1, 1, 2, 3, 3]}),
])
def test_a_valid_reply_is_the_child_with_the_parents_other_values(reply, expected):
    assert read_architecture(reply, PARENT, SHAPE) == expected


@pytest.mark.parametrize("reply, said", [
    ("drop a layer", "no JSON object"),
    ('{"layers": [0, 1,', "does not parse"),
    ("[1, 2]", "no JSON object"),
    ('{"heads": 3}', r"unknown or unavailable keys \['heads'\]"),
    ('{"layers": [0, 9]}', '"layers" must be an integer from 0 to 3, got 9'),
    ('{"layers": []}', r'"layers" must be a list of 1 to 6'),
    ('{"layers": [0, 1, 2, 3, 0, 1, 2]}', r'"layers" must be a list of 1 to 6'),
    ('{"mlp": 0}', '"mlp" must be an integer from 1 to 128, got 0'),
    ('{"kv_heads": true}', '"kv_heads" must be an integer from 1 to 2, got True'),
    ('{"mlp": 128}', "the parent's own architecture"),
])
def test_an_unusable_reply_says_why(reply, said):
    with pytest.raises(ValueError, match=said):
        read_architecture(reply, PARENT, SHAPE)


def test_a_cut_the_model_does_not_allow_is_refused():
    no_heads = DecoderShape(layers=4, min_layers=1, mlp_width=128, kv_heads=None, group=1)
    with pytest.raises(ValueError, match=r"unknown or unavailable keys \['kv_heads'\]"):
        read_architecture('{"kv_heads": 1}', {"layers": [0, 1, 2, 3], "mlp": 128}, no_heads)


def test_the_prompt_carries_the_parent_front_failures_bounds_and_a_target():
    parent = Scored("g2-1", json.dumps(PARENT), {"accuracy": [0.62, 0.03], "params": [90000, 0]})
    member = Scored("g1-4", json.dumps({**PARENT, "mlp": 64}),
                    {"accuracy": [0.55, 0.04], "params": [60000, 0]})
    system, user = (m["content"] for m in edit_messages(parent, [member], ["g2-3: NaN"], SHAPE))
    assert "4 decoder layers" in system and "1 to 6 entries" in system
    assert "1 to 128" in system and "1 to 2; each group has 2 query heads" in system
    assert f"architecture: {json.dumps(PARENT)}" in user and "62.0 ± 3.0 %" in user
    assert "g1-4: accuracy 55.0 ± 4.0 %, 60,000 parameters" in user and "g2-3: NaN" in user
    assert "Target: accuracy above 63.0 % with at most 90,000 parameters" in user


def test_a_merge_run_with_the_llm_records_who_proposed_each_edit(monkeypatch, tiny_models,
                                                                 tmp_path):
    monkeypatch.setenv("EVOFORGE_TEST_KEY", KEY)
    script = Script(["json", "json-malformed", "json-schema", "timeout"], delay=3.0)
    config_path = small_run_config(tiny_models, pick_task(tmp_path), tmp_path, generations=2)
    with chat_server(script) as url:
        config = yaml.safe_load(config_path.read_text())
        config["operators"] = {"crossover": {"rate": 0.0}, "weight_noise": {"rate": 0.0},
                               "edit": {"rate": 1.0, "proposer": "llm", "llm": {
                                   "base_url": url, "model": "stub",
                                   "api_key_env": "EVOFORGE_TEST_KEY", "timeout": 1}}}
        config_path.write_text(yaml.safe_dump(config))
        result = CliRunner().invoke(app, ["run", str(config_path), "--run-dir",
                                          str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    db = sqlite3.connect(tmp_path / "r" / "run.db")
    children = [json.loads(r) for i, r, op in db.execute(
        "SELECT id, recipe, operator FROM individuals") if op == "edit"]
    assert len(children) == 8
    seen = set()
    for child in children:
        proposal = child["proposal"]
        if proposal["proposer"] == "llm":
            seen.add(("llm", proposal["repaired"]))
            reply = proposal["replies"][-1].strip().removeprefix("```json").removesuffix("```")
            asked = json.loads(reply)
            assert layer_plan(child, 4) == asked["layers"]
            assert {k: pruned_widths(child).get(k, 128 if k == "mlp" else 4)
                    for k in ("mlp", "kv_heads") if k in asked} == \
                {k: asked[k] for k in ("mlp", "kv_heads") if k in asked}
        else:
            seen.add(("fallback", proposal["reason"].split(":")[0]))
            assert len(proposal["prompt"]) == 64
    assert seen == {("llm", False), ("llm", True), ("fallback", "ValueError"),
                    ("fallback", "LLMError")}
    events = db.execute("SELECT kind, detail FROM events").fetchall()
    fallbacks = Counter(detail for kind, detail in events if kind == "llm-fallback")
    heuristic = Counter(c["proposal"]["reason"] for c in children
                        if c["proposal"]["proposer"] == "heuristic")
    assert not heuristic - fallbacks  # every fallback child was announced, with its reason
    # and every announced fallback made a child, unless the breeder refused it as a repeat
    redrawn = sum(kind == "redrawn" for kind, _ in events)
    assert heuristic.total() <= fallbacks.total() <= heuristic.total() + redrawn
    for stored_file in (tmp_path / "r").iterdir():
        assert KEY.encode() not in stored_file.read_bytes(), stored_file
