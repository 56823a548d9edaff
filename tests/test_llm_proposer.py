"""The LLM proposer against a real OpenAI-compatible server on loopback: valid edits, malformed
replies repaired, schema violations and timeouts falling back to the heuristic, all recorded in
the run; the key never leaves the Authorization header."""

from __future__ import annotations

import json
import random
import sqlite3

import pytest
import yaml
from typer.testing import CliRunner

from evolve.cli import app
from operators.code_edits import CodeMutator
from operators.llm_client import Endpoint, LLMError, chat
from operators.llm_proposer import LLMCodeProposer, Scored, prompt_messages
from search_spaces.mnist1d_code import REFERENCE_CNN, REFERENCE_MLP
from tests.chat_server import Script, chat_server

KEY = "sk-test-not-for-the-store"
PARENT = Scored("seed-reference-cnn", REFERENCE_CNN,
                {"accuracy": [0.916, 0.012], "params": [5210, 0.0]})


class Memo(dict):
    def reply(self, prompt):
        return self.get(prompt)

    def add_reply(self, prompt, reply):
        self[prompt] = reply


def _proposer(url: str, memo: Memo, events: list, timeout: float = 1.0) -> LLMCodeProposer:
    return LLMCodeProposer(Endpoint(url, "stub", "EVOFORGE_TEST_KEY", timeout), CodeMutator(40),
                           memo, lambda kind, detail: events.append((kind, detail)))


@pytest.mark.parametrize("behaviour, proposer, said", [
    ("valid", "llm", None),
    ("malformed", "llm", None),
    ("schema", "heuristic", "import os is not allowed"),
    ("timeout", "heuristic", "did not answer within 1 s"),
    ("broken", "heuristic", "not a chat completion"),
])
def test_each_reply_is_used_repaired_or_falls_back(monkeypatch, behaviour, proposer, said):
    monkeypatch.setenv("EVOFORGE_TEST_KEY", KEY)
    script, memo, events = Script([behaviour]), Memo(), []
    with chat_server(script) as url:
        child, provenance = _proposer(url, memo, events).child(random.Random(0), [PARENT], [],
                                                                [])
    assert provenance["proposer"] == proposer
    assert child.source != REFERENCE_CNN and "class Net" in child.source
    if proposer == "llm":
        assert provenance["repaired"] == (behaviour == "malformed")
        assert len(provenance["replies"]) == 1 + provenance["repaired"]
    else:
        assert said in provenance["reason"] and events == [("llm-fallback", provenance["reason"])]
    assert all(r["authorization"] == f"Bearer {KEY}" for r in script.requests)
    asked = script.requests[0]["body"]["messages"][1]["content"]
    assert REFERENCE_CNN.strip() in asked and "91.6 ± 1.2 %" in asked and "Target:" in asked


def test_a_remembered_reply_is_not_asked_again(monkeypatch):
    monkeypatch.setenv("EVOFORGE_TEST_KEY", KEY)
    script, memo = Script(["valid"]), Memo()
    with chat_server(script) as url:
        first = _proposer(url, memo, []).child(random.Random(5), [PARENT], [], [])
        again = _proposer(url, memo, []).child(random.Random(5), [PARENT], [], [])
    assert first == again and len(script.requests) == 1


def test_the_prompt_carries_parents_front_failures_and_a_target():
    other = Scored("g1-2", REFERENCE_MLP, {"accuracy": [0.63, 0.02], "params": [15210, 0.0]})
    text = prompt_messages([PARENT, other], [PARENT], ["g1-3: error: ValueError: shape"])[1][
        "content"]
    assert "Parent 2 (g1-2): accuracy 63.0 ± 2.0 %, 15,210 parameters" in text
    assert "- seed-reference-cnn: accuracy 91.6" in text
    assert "g1-3: error: ValueError: shape" in text
    assert "Target: accuracy above 92.6 % with at most 5,210 parameters" in text


def test_a_missing_key_or_endpoint_says_so(monkeypatch):
    monkeypatch.delenv("EVOFORGE_TEST_KEY", raising=False)
    with pytest.raises(LLMError, match=r"EVOFORGE_TEST_KEY .* is not set"):
        chat(Endpoint("http://127.0.0.1:9/v1", "m", "EVOFORGE_TEST_KEY"), [])
    with pytest.raises(LLMError, match="cannot reach"):
        chat(Endpoint("http://127.0.0.1:9/v1", "m", None, timeout=2), [])


def test_a_run_with_the_llm_records_who_wrote_each_child(monkeypatch, tmp_path):
    monkeypatch.setenv("EVOFORGE_TEST_KEY", KEY)
    script = Script(["valid", "malformed", "schema", "timeout"], delay=3.0)
    with chat_server(script) as url:
        config = tmp_path / "llm.yaml"
        config.write_text(yaml.safe_dump({
            "search_space": "mnist1d-code", "population": 4, "generations": 2, "seed": 1,
            "code": {"steps": 5, "proposer": "llm",
                     "llm": {"base_url": url, "model": "stub", "api_key_env": "EVOFORGE_TEST_KEY",
                             "timeout": 1}}}))
        result = CliRunner().invoke(app, ["run", str(config), "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    db = sqlite3.connect(tmp_path / "r" / "run.db")
    proposals = [json.loads(r)["proposal"] for i, r in db.execute(
        "SELECT id, recipe FROM individuals") if i.startswith("g")]
    assert len(proposals) == 8
    kinds = {("llm", False), ("llm", True)} | {("fallback", "SandboxViolation"),
                                              ("fallback", "LLMError")}
    seen = {("llm", p["repaired"]) if p["proposer"] == "llm" else
            ("fallback", p["reason"].split(":")[0]) for p in proposals}
    assert seen == kinds
    fallbacks = db.execute("SELECT COUNT(*) FROM events WHERE kind = 'llm-fallback'").fetchone()[0]
    assert fallbacks == sum(p["proposer"] == "heuristic" for p in proposals)
    stored = db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    answered = sum(1 for r in script.requests)
    assert 0 < stored <= answered  # every reply received is kept for a resume
    for stored_file in (tmp_path / "r").iterdir():  # the store, its WAL, the config, the lock
        assert KEY.encode() not in stored_file.read_bytes(), stored_file
