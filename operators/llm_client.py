"""A client for OpenAI-compatible chat-completions endpoints: vLLM, llama.cpp's server, Ollama,
LM Studio or a hosted API, by base URL and model name.

The key is read from an environment variable at each call (`api_key_env`, none for a local
server) and sent only in the request's Authorization header: it is never written to the run store
or passed to a sandbox. Every failure (unreachable, HTTP error, timeout, a reply without a
message) is an `LLMError` that says what happened and where, so a proposer can fall back.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass


class LLMError(RuntimeError):
    """The endpoint did not give a usable reply (the message says why)."""


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # e.g. http://127.0.0.1:8000/v1 (vLLM), http://localhost:11434/v1 (Ollama)
    model: str
    api_key_env: str | None = None
    timeout: float = 120.0
    temperature: float = 0.7
    max_tokens: int = 2048


def chat(endpoint: Endpoint, messages: list[dict], seed: int | None = None) -> str:
    """The assistant's reply to `messages` (one completion)."""
    body = {"model": endpoint.model, "messages": messages, "temperature": endpoint.temperature,
            "max_tokens": endpoint.max_tokens} | ({"seed": seed} if seed is not None else {})
    headers = {"Content-Type": "application/json"}
    if endpoint.api_key_env:
        key = os.environ.get(endpoint.api_key_env)
        if not key:
            raise LLMError(f"the environment variable {endpoint.api_key_env} (the API key) is "
                           "not set")
        headers["Authorization"] = f"Bearer {key}"
    url = endpoint.base_url.rstrip("/") + "/chat/completions"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=endpoint.timeout) as response:
            payload = response.read()
    except urllib.error.HTTPError as error:
        detail = error.read()[:300].decode(errors="replace")
        raise LLMError(f"{url} answered HTTP {error.code}: {detail}") from None
    except TimeoutError:
        raise LLMError(f"{url} did not answer within {endpoint.timeout:g} s") from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, TimeoutError):
            raise LLMError(f"{url} did not answer within {endpoint.timeout:g} s") from None
        raise LLMError(f"cannot reach {url}: {reason}") from None
    try:
        return json.loads(payload)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise LLMError(f"{url} replied with something that is not a chat completion: "
                       f"{payload[:200]!r}") from None
