"""For the dashboard's tests: fronts computed the slow, obvious way (every pair compared); the
dashboard served on loopback; Debian's chromium driven by Playwright.

No browser is downloaded: Playwright launches the `chromium` that `scripts/ensure-browser`
installs. Without it the browser tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn

from dashboards.app import create_app

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard"
VIEWPORT = {"width": 1280, "height": 1000}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def dominates(a, b, directions) -> bool:
    signs = [1 if d == "min" else -1 for d in directions]
    pairs = [(s * x, s * y) for s, x, y in zip(signs, a, b, strict=True)]
    return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)


def brute_front(points: dict, directions) -> set:
    """The keys of the points that no other point dominates (O(n^2))."""
    return {i for i, p in points.items()
            if not any(dominates(q, p, directions) for j, q in points.items() if j != i)}


def population_front(db, generation: int | None = None) -> set[str]:
    """The front (params min, accuracy max) of a generation's population (the last when None),
    from the store's rows."""
    row = db.execute("SELECT population FROM generations ORDER BY generation DESC LIMIT 1"
                     if generation is None else
                     "SELECT population FROM generations WHERE generation = ?",
                     () if generation is None else (generation,)).fetchone()
    objectives = {i: json.loads(o) for i, o in db.execute(
        "SELECT id, objectives FROM evaluations WHERE error IS NULL")}
    kept = {i: (objectives[i]["params"][0], objectives[i]["accuracy"][0])
            for i in json.loads(row[0]) if i in objectives}
    return brute_front(kept, ("min", "max"))


@contextmanager
def serving(target: Path) -> Iterator[str]:
    """The dashboard over `target` on a free loopback port, in a thread; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(target), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the dashboard did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def chromium() -> Iterator:
    executable = shutil.which("chromium")
    if executable is None:
        message = "Debian's chromium is not installed (scripts/ensure-browser installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str):
    """A new page at `url` (in a new context when given a browser, or in the given context),
    once its script says it has drawn; collects the page's errors."""
    page = (browser.new_page(viewport=VIEWPORT) if hasattr(browser, "new_context")
            else browser.new_page())
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=20_000)
    return page


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def wait_until(page, condition, timeout: float = 20.0) -> None:
    """Poll `condition(page)` (Playwright's wait_for_function evaluates a string in the page,
    which the dashboard's Content-Security-Policy forbids, as it should)."""
    deadline = time.time() + timeout
    while not condition(page):
        assert time.time() < deadline, "the page did not get there in time"
        time.sleep(0.1)


def plotted(page, plot: str) -> list[int]:
    """Markers drawn in the DOM per trace of a plot (SVG paths plotly makes for points)."""
    return page.eval_on_selector_all(
        f"#{plot} .scatterlayer .trace", "traces => traces.map(t => "
        "t.querySelectorAll('.points path.point').length)")
