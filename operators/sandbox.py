"""A sandbox for generated model code (an LLM's or a code mutator's): PyTorch module source that
evoforge did not write is checked, then run in a fresh, locked-down process, and only a JSON
result comes back.

Two layers, each enough against the attempts the tests make, so that one gap is not an escape:

1. **The source is read before anything runs** (`check_source`): an allow-list of imports (torch,
   torch.nn, torch.nn.functional, math), no name that reaches the interpreter's machinery (`eval`,
   `open`, `getattr`, `__import__`, `__builtins__`, …), no attribute that starts with `_` (bar
   `__init__`, which `super().__init__()` needs), none that names a module that can reach the
   system (`os`, `sys`, `subprocess`, …), a frame, or a torch API that reads, writes, compiles or
   loads code (`load`, `save`, `hub`, `jit`, `utils`, …).
2. **The process** (`spawn`): a new Python (`-I`: no user site, no environment-driven paths) in a
   new session, with an empty environment (no API key or any other secret is inherited), in a
   fresh temporary folder, without network where the kernel allows a new network namespace, under
   resource limits (CPU seconds, address space, file size, open files, no core dumps) and a wall
   clock. Inside, once torch and the trusted harness are imported, an audit hook (which cannot be
   removed) refuses to open files outside the folder (reads are also allowed under Python's own
   install), sockets, processes, signals, ctypes and file-system changes; the source runs with a
   reduced set of builtins whose `__import__` admits the allow-list only.

The caller names a *harness*: a trusted function `module:function` called in the sandbox as
`harness(namespace, **arguments)` with the names the source defined; it returns a JSON-able dict
(say, a trained network's accuracy and parameter count). The source cannot print a forged result:
its output is captured and the result goes back on a pipe it cannot name.
"""

from __future__ import annotations

import ast
import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

IMPORTS = frozenset({"torch", "torch.nn", "torch.nn.functional", "math"})
DENIED_NAMES = frozenset({
    "eval", "exec", "compile", "open", "input", "breakpoint", "help", "getattr", "setattr",
    "delattr", "hasattr", "globals", "locals", "vars", "dir", "type", "memoryview", "object",
    "classmethod", "staticmethod", "property", "exit", "quit", "copyright", "credits", "license",
})
DENIED_ATTRIBUTES = frozenset({
    # modules that reach the system, wherever torch or math happen to hold them
    "os", "sys", "subprocess", "socket", "shutil", "pathlib", "io", "importlib", "builtins",
    "ctypes", "pickle", "marshal", "signal", "threading", "multiprocessing", "inspect", "gc",
    "types", "code", "codeop", "runpy", "pty", "posix", "tempfile", "glob", "urllib", "http",
    "functools", "weakref", "warnings", "logging", "platform", "resource",
    # frames, code and globals: the way out of a function to the interpreter's state
    "f_globals", "f_locals", "f_back", "f_builtins", "f_code", "gi_frame", "gi_code", "cr_frame",
    "cr_code", "ag_frame", "ag_code", "tb_frame", "tb_next", "func_globals", "mro",
    # string formatting reads attributes by name
    "format", "format_map",
    # torch APIs that read or write files, fetch, compile or load code, or start processes
    "load", "save", "hub", "jit", "compile", "utils", "ops", "classes", "library", "backends",
    "package", "distributed", "from_file", "storage", "untyped_storage", "Storage",
    "UntypedStorage", "serialization", "onnx", "export", "fx", "overrides", "cpp", "cuda",
    "profiler", "autograd", "testing", "set_default_device", "use_deterministic_algorithms",
    # numpy's file access is C code that the audit hook does not see: no way to numpy at all
    "numpy", "tofile", "fromfile", "memmap", "dump", "dumps",
})
SAFE_BUILTINS = (
    "abs", "all", "any", "bool", "dict", "divmod", "enumerate", "filter", "float", "int",
    "isinstance", "len", "list", "map", "max", "min", "pow", "print", "range", "reversed", "round",
    "set", "slice", "sorted", "str", "sum", "super", "tuple", "zip", "frozenset", "ArithmeticError",
    "AssertionError", "Exception", "IndexError", "KeyError", "NotImplementedError", "RuntimeError",
    "TypeError", "ValueError", "ZeroDivisionError", "NotImplemented", "__build_class__",
)
MAX_SOURCE_BYTES = 64 * 1024
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000


class SandboxViolation(ValueError):
    """The source uses something the allow-list does not admit (the message says what, where)."""


@dataclass(frozen=True)
class Limits:
    """What one sandboxed run may use. The defaults fit training a small MNIST-1D network."""
    cpu_seconds: int = 120
    wall_seconds: float = 180.0
    memory_bytes: int = 3 * 2**30  # address space: torch alone maps about 0.7 GB
    file_bytes: int = 16 * 2**20
    open_files: int = 256


@dataclass
class SandboxResult:
    """What came back. `kind`: ok, rejected (the source check), blocked (the audit hook), error
    (the source raised), memory, cpu (CPU-seconds limit), timeout (wall clock), crashed."""
    kind: str
    value: dict | None = None
    error: str | None = None
    output: str = ""
    seconds: float = 0.0
    isolation: dict = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # what the harness wrote, if asked

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


def _violation(node: ast.AST, what: str) -> SandboxViolation:
    return SandboxViolation(f"line {getattr(node, 'lineno', '?')}: {what}")


def check_source(source: str) -> None:
    """Raise `SandboxViolation` unless `source` keeps to the allow-list (the module docstring)."""
    if len(source.encode()) > MAX_SOURCE_BYTES:
        raise SandboxViolation(f"source is over {MAX_SOURCE_BYTES // 1024} KiB")
    try:
        tree = ast.parse(source, "<candidate>")
    except SyntaxError as error:
        raise SandboxViolation(f"line {error.lineno}: syntax error: {error.msg}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name not in IMPORTS:
                    raise _violation(node, f"import {alias.name} is not allowed (allowed: "
                                           f"{', '.join(sorted(IMPORTS))})")
        elif isinstance(node, ast.ImportFrom):
            if node.level or node.module not in IMPORTS:
                raise _violation(node, f"from {node.module} import is not allowed (allowed: "
                                       f"{', '.join(sorted(IMPORTS))})")
            for alias in node.names:
                if alias.name == "*" or alias.name.startswith("_") \
                        or alias.name in DENIED_ATTRIBUTES:
                    raise _violation(node, f"from {node.module} import {alias.name} is not "
                                           "allowed")
        elif isinstance(node, ast.Name):
            if node.id in DENIED_NAMES or node.id.startswith("__"):
                raise _violation(node, f"the name {node.id} is not allowed")
        elif isinstance(node, ast.Attribute):
            if (node.attr.startswith("_") and node.attr != "__init__") \
                    or node.attr in DENIED_ATTRIBUTES:
                raise _violation(node, f"the attribute .{node.attr} is not allowed")
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.arg, ast.alias)):
            name = getattr(node, "name", None) or getattr(node, "arg", None) \
                or getattr(node, "asname", None)
            if name and name.startswith("__") and name != "__init__":
                raise _violation(node, f"the name {name} is not allowed")


def sandbox_environment(workdir: Path) -> dict[str, str]:
    """The whole environment a sandboxed process gets: nothing inherited (no keys, no tokens)."""
    return {"HOME": str(workdir), "TMPDIR": str(workdir), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}


def _limit(limits: Limits) -> None:
    """In the child before exec: a new session, limits, and a network namespace if allowed (the
    child reports whether it got one)."""
    os.setsid()
    for which, value in ((resource.RLIMIT_CPU, limits.cpu_seconds),
                         (resource.RLIMIT_AS, limits.memory_bytes),
                         (resource.RLIMIT_FSIZE, limits.file_bytes),
                         (resource.RLIMIT_NOFILE, limits.open_files),
                         (resource.RLIMIT_CORE, 0)):
        hard = value + 1 if which == resource.RLIMIT_CPU else value
        resource.setrlimit(which, (value, hard))
    libc = ctypes.CDLL(None, use_errno=True)
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    libc.unshare(flags)  # refused where namespaces are off: the audit hook still refuses sockets


def _drain(descriptor: int) -> bytes:
    with os.fdopen(descriptor, "rb") as pipe:
        return pipe.read()


def spawn(source: str, harness: str, arguments: dict | None = None,
          limits: Limits = Limits(), files: dict[str, bytes] | None = None,
          path: list[str] | None = None, collect: tuple[str, ...] = ()) -> SandboxResult:
    """The process layer alone (`run_untrusted` checks the source first): run `source` and then
    `harness(namespace, **arguments)` in a locked-down child. `files` are written into the
    child's folder first (data it may read); `path` entries are importable there (where the
    harness lives when it is not installed); the files named in `collect` that the run left in
    its folder come back in the result (a trained model's weights)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="evoforge-sandbox-") as folder:
        workdir = Path(folder)
        for name, data in (files or {}).items():
            (workdir / Path(name).name).write_bytes(data)
        read, write = os.pipe()
        job = json.dumps({"source": source, "harness": harness, "arguments": arguments or {},
                          "workdir": str(workdir), "path": path or [], "result_fd": write,
                          "roots": sorted({sys.prefix, sys.base_prefix, sys.exec_prefix}),
                          "parent_network": os.stat("/proc/self/ns/net").st_ino})
        env = sandbox_environment(workdir)
        process = subprocess.Popen(
            [sys.executable, "-I", "-m", "operators.sandbox_child"], cwd=workdir, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            pass_fds=(write,), preexec_fn=lambda: _limit(limits))
        os.close(write)
        replies: list[bytes] = []  # read while the child runs: a reply over the pipe's
        reader = threading.Thread(target=lambda: replies.append(_drain(read)), daemon=True)
        reader.start()  # buffer would otherwise block it before it exits
        try:
            output, _ = process.communicate(job.encode(), timeout=limits.wall_seconds)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            timed_out = True
        reader.join()
        reply = replies[0]
        written = {name: (workdir / name).read_bytes() for name in collect
                   if (workdir / name).is_file()}
    seconds = time.perf_counter() - started
    text = output.decode(errors="replace")[-4000:]
    if timed_out:
        return SandboxResult("timeout", error=f"stopped after {limits.wall_seconds:.0f} s of wall "
                             "clock", output=text, seconds=seconds)
    if reply:
        result = json.loads(reply)
        return SandboxResult(result["kind"], result.get("value"), result.get("error"),
                             result.get("output", "") or text, seconds, result.get("isolation", {}),
                             written if result["kind"] == "ok" else {})
    if process.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return SandboxResult("cpu", error=f"stopped at its limit of {limits.cpu_seconds} CPU "
                             "seconds", output=text, seconds=seconds)
    return SandboxResult("crashed", error=f"the sandboxed process died (exit "
                         f"{process.returncode}) without a result: {text[-500:]}", output=text,
                         seconds=seconds)


def run_untrusted(source: str, harness: str, arguments: dict | None = None,
                  limits: Limits = Limits(), files: dict[str, bytes] | None = None,
                  path: list[str] | None = None, collect: tuple[str, ...] = ()) -> SandboxResult:
    """Check `source`, then run it with `harness` in the sandbox (the module docstring)."""
    try:
        check_source(source)
    except SandboxViolation as violation:
        return SandboxResult("rejected", error=str(violation))
    return spawn(source, harness, arguments, limits, files, path, collect)
