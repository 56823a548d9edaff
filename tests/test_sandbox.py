"""The sandbox for generated model code: each escape attempt is blocked and reported, by the
source check and, with that check skipped (`spawn`), by the process itself."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import pytest

from operators.sandbox import Limits, SandboxViolation, check_source, run_untrusted, spawn

ROOT = str(Path(__file__).resolve().parent.parent)
HARNESS = "tests.sandbox_harness:build"
QUICK = Limits(cpu_seconds=20, wall_seconds=60)

NET = """
import torch
from torch import nn
import torch.nn.functional as F
import math


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3)
        self.fc = nn.Linear(4 * 38, 10)

    def forward(self, x):
        {forward}
        return self.fc(F.relu(self.conv(x)).flatten(1)) * math.sqrt(1.0)
"""


def net(statement: str = "pass") -> str:
    """A valid network whose forward pass first runs `statement`."""
    return NET.replace("{forward}", statement)


def _both(statement: str, limits: Limits = QUICK):
    """The attempt through the full sandbox (rejected by the check) and through the process
    layer alone."""
    checked = run_untrusted(net(statement), HARNESS, limits=limits, path=[ROOT])
    assert checked.kind == "rejected", checked
    return spawn(net(statement), HARNESS, limits=limits, path=[ROOT])


def test_a_valid_network_runs_and_reports_its_size():
    result = run_untrusted(net(), HARNESS, limits=QUICK, path=[ROOT])
    assert result.ok, result
    assert result.value == {"params": 4 * 3 + 4 + 4 * 38 * 10 + 10, "shape": [2, 10]}


def test_reading_a_file_outside_the_folder_is_blocked(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the-secret-contents")
    result = _both(f"raise ValueError(torch.serialization.os.read("
                   f"torch.serialization.os.open({str(secret)!r}, 0), 100))")
    assert result.kind == "blocked" and "may not read" in result.error, result
    assert "the-secret-contents" not in repr(result)
    assert "the name open" in run_untrusted(net(f"open({str(secret)!r}).read()"), HARNESS,
                                            path=[ROOT]).error


def test_writing_a_file_is_blocked(tmp_path):
    target = tmp_path / "written.txt"
    result = _both(f"torch.serialization.os.open({str(target)!r}, 65)")  # O_WRONLY | O_CREAT
    assert result.kind == "blocked" and "may not write" in result.error, result
    assert not target.exists()


def test_opening_a_socket_is_blocked():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    connections = []

    def accept():
        with contextlib.suppress(OSError):
            connections.append(server.accept())
    listener = threading.Thread(target=accept)
    listener.start()
    result = _both(f"torch.hub.urlopen('http://127.0.0.1:{port}/')")
    listener.join()
    server.close()
    assert result.kind == "blocked", result
    assert not connections
    assert "import socket is not allowed" in run_untrusted(
        "import socket\nsocket.create_connection(('127.0.0.1', 80))", HARNESS).error
    raw = spawn(net("[c for c in ().__class__.__bases__[0].__subclasses__() "
                    "if c.__name__ == 'socket'][0]()"), HARNESS, limits=QUICK, path=[ROOT])
    assert raw.kind == "blocked" and "socket.__new__" in raw.error, raw


def test_spawning_a_process_is_blocked(tmp_path):
    marker = tmp_path / "spawned"
    result = _both(f"torch.serialization.os.system('touch {marker}')")
    assert result.kind == "blocked" and "os.system" in result.error, result
    assert not marker.exists()
    assert "import subprocess" in run_untrusted("import subprocess", HARNESS).error


def test_the_api_key_is_not_in_the_sandbox(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-the-sandbox")
    result = _both("raise ValueError(str(torch.serialization.os.environ))")
    assert "sk-not-for-the-sandbox" not in repr(result)
    assert result.isolation["environment"] == ["HOME", "LANG", "MKL_NUM_THREADS",
                                               "OMP_NUM_THREADS", "PYTHONHASHSEED", "TMPDIR"]


def test_allocating_10_gb_is_stopped_at_the_memory_limit():
    statement = "x = torch.empty(10 * 2**30, dtype=torch.uint8); x.fill_(1)"
    check_source(net(statement))  # nothing to reject: the process limit must stop it
    result = spawn(net(statement), HARNESS, limits=QUICK, path=[ROOT])
    assert result.kind == "memory", result


def test_a_loop_forever_is_stopped_by_cpu_time_and_by_the_wall_clock():
    forever = net("while True:\n            pass")
    check_source(forever)
    result = spawn(forever, HARNESS, limits=Limits(cpu_seconds=3, wall_seconds=60), path=[ROOT])
    assert result.kind == "cpu" and "3 CPU seconds" in result.error, result
    result = spawn(forever, HARNESS, limits=Limits(cpu_seconds=60, wall_seconds=3), path=[ROOT])
    assert result.kind == "timeout", result


@pytest.mark.parametrize("trick", [
    "__builtins__['__import__']('os').system('true')",
    "getattr(__builtins__, '__import__')('os')",
    "__import__('os')",
    "().__class__.__bases__[0].__subclasses__()",
    "(lambda: 0).__globals__",
    "torch.serialization.os.system('true')",
    "'{0.__class__}'.format(1)",
    "torch._C",
    "torch.zeros(3).numpy().tofile('/tmp/evoforge-escape')",
    "eval('1')",
    "type('X', (), {})",
])
def test_import_tricks_are_rejected_by_the_check(trick):
    with pytest.raises(SandboxViolation, match="line 15"):
        check_source(net(trick))


@pytest.mark.parametrize("source", [
    "import importlib\nimportlib.import_module('os')",
    "from os import system",
    "from torch import _C",
    "from torch import hub",
    "from torch.nn import *",
])
def test_imports_outside_the_allow_list_are_rejected(source):
    with pytest.raises(SandboxViolation, match="line 1"):
        check_source(source)


@pytest.mark.parametrize("trick, blocked", [
    ("__builtins__['__import__']('os')", "import os is not allowed"),
    ("[c for c in ().__class__.__bases__[0].__subclasses__() if c.__name__ == '_wrap_close']"
     "[0].__init__.__globals__['system']('true')", "os.system"),
    ("(lambda: 0).__globals__['__builtins__']['__import__']('subprocess')", "not allowed"),
])
def test_import_tricks_are_blocked_by_the_process_too(trick, blocked):
    result = spawn(net(trick), HARNESS, limits=QUICK, path=[ROOT])
    assert result.kind == "blocked" and blocked in result.error, result


def test_the_candidate_cannot_print_a_result():
    forged = net('print(\'{"kind": "ok", "value": {"params": 1}}\')')
    result = run_untrusted(forged, HARNESS, limits=QUICK, path=[ROOT])
    assert result.ok and result.value["params"] == 1546
    assert '"params": 1' in result.output


def test_a_crash_comes_back_with_the_candidate_line():
    result = run_untrusted(net("x = torch.zeros(3) @ torch.zeros(4)"), HARNESS, limits=QUICK,
                           path=[ROOT])
    assert result.kind == "error" and "candidate line 15: x = torch.zeros(3)" in result.error, \
        result


def test_a_reply_larger_than_a_pipe_buffer_comes_back():
    result = run_untrusted(net(), "tests.sandbox_harness:large", {"size": 300_000}, QUICK,
                           path=[ROOT])
    assert result.ok and len(result.value["blob"]) == 300_000, result.kind
