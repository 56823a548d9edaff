"""A real OpenAI-compatible chat-completions server on loopback for the LLM proposer's tests:
HTTP, JSON, `POST /v1/chat/completions`, with scripted behaviours per conversation."""

from __future__ import annotations

import json
import re
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REWRITE = '''```python
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.LazyConv1d({channels}, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.LazyLinear(10),
        )

    def forward(self, x):
        return self.layers(x.unsqueeze(1))
```'''


def _architecture(prompt: str, serial: int) -> str:
    """A decoder architecture that differs from the parent's in the prompt: one layer fewer
    (or the one stacked), one head group fewer where it can, the MLP a little narrower."""
    parent = json.loads(re.search(r"architecture: (\{.*\})", prompt).group(1))
    layers = parent["layers"]
    child = {"layers": layers[:-1] if len(layers) > 2 else layers + layers[-1:]}
    if parent.get("kv_heads", 1) > 1:
        child["kv_heads"] = parent["kv_heads"] - 1
    if "mlp" in parent:
        child["mlp"] = max(1, parent["mlp"] - serial)
    return json.dumps(child)


class Script:
    """Behaviours by conversation (a conversation: its first user message and seed):
    `valid` an edit of the first parent; `malformed` prose, then a full rewrite when asked to
    repair; `schema` code importing os, twice; `timeout` no answer in time; `broken` a reply
    that is not a chat completion. For decoder edits: `json` an architecture unlike the
    parent's; `json-malformed` prose, then the architecture in a ```json block; `json-schema`
    a layer out of range and an unknown key, twice. Every request is logged."""

    def __init__(self, behaviours: list[str], delay: float = 3.0):
        self.behaviours, self.delay = behaviours, delay
        self.conversations: dict[str, str] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def reply(self, body: dict, headers: dict) -> tuple[int, bytes, float]:
        with self.lock:
            self.requests.append({"body": body, "authorization": headers.get("Authorization")})
            messages = body["messages"]
            key = json.dumps([messages[1]["content"], body.get("seed")])
            if key not in self.conversations:
                self.conversations[key] = self.behaviours[len(self.conversations)
                                                          % len(self.behaviours)]
            behaviour, repair = self.conversations[key], len(messages) > 2
            serial = len(self.requests)
        content = None
        if behaviour == "json" or (behaviour == "json-malformed" and repair):
            content = _architecture(messages[1]["content"], serial)
            content = f"```json\n{content}\n```" if repair else content
        elif behaviour == "json-malformed":
            content = "Dropping a middle layer should keep most of the accuracy."
        elif behaviour == "json-schema":
            content = '{"layers": [0, 99], "heads": 3}'
        elif behaviour == "valid" or (behaviour == "malformed" and repair):
            content = REWRITE.format(channels=3 + serial) if repair else (
                "Widen the head.\n<<<<<<< SEARCH\n            nn.Flatten(),\n=======\n"
                f"            nn.Flatten(),\n            nn.LazyLinear({8 + serial}),\n"
                "            nn.ReLU(),\n>>>>>>> REPLACE")
        elif behaviour == "malformed":
            content = "I would make the network a bit wider, perhaps."
        elif behaviour == "schema":
            content = "```python\nimport os\nclass Net: pass\n```"
        elif behaviour == "timeout":
            return 200, b"{}", self.delay
        elif behaviour == "broken":
            return 200, b'{"choices": []}', 0.0
        payload = {"id": f"c{serial}", "object": "chat.completion", "model": body["model"],
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": content}}]}
        return 200, json.dumps(payload).encode(), 0.0


@contextmanager
def chat_server(script: Script):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # the http.server interface
            if self.path != "/v1/chat/completions":
                self.send_error(404)
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, payload, delay = script.reply(body, dict(self.headers))
            time.sleep(delay)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        server.server_close()
