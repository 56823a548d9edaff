"""The sandboxed process (`operators.sandbox.spawn` starts it; never run by hand): import what is
trusted, lock the process down, run the candidate's source and the harness, send back JSON.

Locked down means an audit hook (PEP 578; once added it cannot be removed) that refuses, with
`PermissionError`, every event below that the source could use to reach outside: opening a file
outside the work folder (reads are allowed under Python's install too, where torch imports
from), sockets, processes, signals, ctypes and changes to the file system.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import io
import json
import math  # noqa: F401  (imported while imports are still free)
import os
import sys
import traceback

import torch
import torch.nn.functional  # noqa: F401  (imported while imports are still free)

from operators.sandbox import IMPORTS, SAFE_BUILTINS

BLOCKED_PREFIXES = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
                    "os.kill", "os.killpg", "os.system", "os.chdir", "os.chmod", "os.chown",
                    "os.remove", "os.rename", "os.rmdir", "os.symlink", "os.link", "os.truncate",
                    "os.setxattr", "os.removexattr", "os.utime",
                    "shutil.", "ctypes.", "pty.", "signal.", "sys.addaudithook",
                    "sys.settrace", "sys.setprofile", "webbrowser.", "urllib.", "ftplib.",
                    "http.", "smtplib.", "telnetlib.", "imaplib.", "poplib.", "nntplib.")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _inside(path: str, roots: list[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots)


def lock_down(workdir: str, roots: list[str]) -> None:
    readable = [os.path.realpath(workdir)] + [os.path.realpath(r) for r in roots]
    writable = [os.path.realpath(workdir)]

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return  # an already open descriptor
            path = os.fsdecode(path)
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) \
                or bool((flags or 0) & WRITE_FLAGS)
            if not _inside(path, writable if writes else readable):
                raise PermissionError(f"sandbox: may not {'write' if writes else 'read'} {path}")
        elif event == "os.mkdir" and not _inside(os.fsdecode(args[0]), writable):
            raise PermissionError(f"sandbox: may not create {args[0]}")
        elif event.startswith(BLOCKED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)


def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    """The candidate's `__import__`: the allow-list only."""
    if level or name not in IMPORTS:
        raise ImportError(f"sandbox: import {name} is not allowed")
    return importlib.__import__(name, globals, locals, fromlist, level)


def namespace() -> dict:
    safe = {name: getattr(builtins, name) for name in SAFE_BUILTINS}
    safe["__import__"] = guarded_import
    return {"__builtins__": safe, "__name__": "candidate"}


def _error(error: BaseException, source: str) -> str:
    """The error as the proposer should see it: type, message, and the candidate's own lines."""
    lines, text = [f"{type(error).__name__}: {error}"], source.splitlines()
    for frame in traceback.extract_tb(error.__traceback__):
        if frame.filename == "<candidate>" and frame.lineno and frame.lineno <= len(text):
            lines.append(f"  candidate line {frame.lineno}: {text[frame.lineno - 1].strip()}")
    return "\n".join(lines)[:2000]


def _kind(error: BaseException) -> str:
    if isinstance(error, PermissionError) and str(error).startswith("sandbox:"):
        return "blocked"
    if isinstance(error, ImportError) and str(error).startswith("sandbox:"):
        return "blocked"
    if isinstance(error, MemoryError) or "can't allocate memory" in str(error) \
            or "not enough memory" in str(error):
        return "memory"
    return "error"


def main() -> None:
    job = json.loads(sys.stdin.read())
    result_fd = job["result_fd"]
    isolation = {"network_namespace": os.stat("/proc/self/ns/net").st_ino != job["parent_network"],
                 "environment": sorted(os.environ)}
    sys.path[:0] = job["path"]
    module, function = job["harness"].split(":")
    harness = getattr(importlib.import_module(module), function)
    captured = io.StringIO()
    reply: dict
    try:
        code = compile(job["source"], "<candidate>", "exec")
        lock_down(job["workdir"], job["roots"])
        names = namespace()
        with contextlib.redirect_stdout(captured):
            exec(code, names)  # the checked source, with reduced builtins, under the hook
            value = harness(names, **job["arguments"])
        json.dumps(value, allow_nan=False)
        reply = {"kind": "ok", "value": value}
    except BaseException as error:  # every failure is the candidate's, and reported
        reply = {"kind": _kind(error), "error": _error(error, job["source"])}
    reply |= {"output": captured.getvalue()[-4000:], "isolation": isolation}
    os.write(result_fd, json.dumps(reply, default=str).encode())
    os.close(result_fd)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
