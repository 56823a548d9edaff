"""Each dashboard page in real headless Chromium over a real run: what is drawn matches the store,
clicks and the generation slider work, and nothing the run stores is run as HTML. Screenshots
are saved under test-artifacts/dashboard/."""

from __future__ import annotations

import json
import shlex
import shutil
import sqlite3
from urllib.parse import quote

import pytest

from tests.conftest import HOSTILE
from tests.dashboard_helpers import (
    chromium,
    open_page,
    plotted,
    population_front,
    screenshot,
    serving,
    wait_until,
)


@pytest.fixture(scope="module")
def site(finished_run, tmp_path_factory):
    """The runs folder of the finished run, with a copy of it as a second run to compare."""
    runs = finished_run.parent
    copy = runs / "copy"
    if not copy.exists():
        shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("driver.lock"))
    with serving(runs) as url, chromium() as browser:
        yield url, browser


def _db(run_dir):
    return sqlite3.connect(f"file:{run_dir / 'run.db'}?mode=ro", uri=True)


def _safe(page) -> None:
    """No markup from the store became an element or ran."""
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img[src='x']").count() == 0
    assert not page.errors, page.errors


def test_runs_page_lists_the_runs_and_opens_one(site, finished_run):
    url, browser = site
    page = open_page(browser, url + "/")
    names = page.locator("#runs tbody a.run-link").all_inner_texts()
    assert sorted(names) == sorted([finished_run.name, "copy"])
    _safe(page)
    screenshot(page, "runs")
    page.locator("#runs tbody a.run-link", has_text=HOSTILE).click()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("h1").inner_text() == finished_run.name
    page.close()


def test_run_page_draws_the_store_and_the_slider_moves_the_front(site, finished_run):
    url, browser = site
    db = _db(finished_run)
    page = open_page(browser, f"{url}/runs/{quote(finished_run.name, safe='')}")
    final = population_front(db)
    scored = db.execute("SELECT COUNT(*) FROM evaluations WHERE error IS NULL").fetchone()[0]
    dominated, front = plotted(page, "front-plot")
    assert front == len(final) and dominated == scored - len(final)
    generations = db.execute("SELECT COUNT(*) FROM generations WHERE generation <= 3"
                             ).fetchone()[0]
    assert plotted(page, "hv-plot") == [generations]
    reported = db.execute("SELECT COUNT(*) FROM reports").fetchone()[0]
    assert plotted(page, "svt-plot")[0] == reported
    rows = page.locator("#individuals-table tbody tr").count()
    assert rows == min(50, db.execute("SELECT COUNT(*) FROM individuals").fetchone()[0])
    assert page.locator("#generations-done").inner_text() == "3 / 3"
    screenshot(page, "run")
    _safe(page)

    # the slider: generation 1's front, then without the dominated points
    page.eval_on_selector("#generation", "e => { e.value = 1; e.dispatchEvent(new Event('input')) }")
    page.wait_for_selector("#front-plot[data-generation='1']")
    first = population_front(db, 1)
    born = db.execute("SELECT COUNT(*) FROM evaluations e JOIN individuals i USING (id) "
                      "WHERE i.generation <= 1 AND e.error IS NULL").fetchone()[0]
    assert plotted(page, "front-plot") == [born - len(first), len(first)]
    page.uncheck("#show-dominated")
    wait_until(page, lambda p: len(plotted(p, "front-plot")) == 1)
    assert plotted(page, "front-plot") == [len(first)]
    screenshot(page, "run-generation-1")
    page.close()


def test_a_click_on_a_front_point_opens_that_individual(site, finished_run):
    url, browser = site
    db = _db(finished_run)
    page = open_page(browser, f"{url}/runs/{quote(finished_run.name, safe='')}")
    point = page.locator("#front-plot .scatterlayer .trace").last.locator("path.point").first
    box = point.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_url("**/individuals/**")
    page.wait_for_selector("body[data-ready='1']")
    identifier = page.locator("h1").inner_text()
    assert identifier in population_front(db)

    parents = json.loads(db.execute("SELECT parents FROM individuals WHERE id = ?",
                                    (identifier,)).fetchone()[0])
    assert page.locator("#parents tbody tr").count() == len(parents)
    objectives = json.loads(db.execute("SELECT objectives FROM evaluations WHERE id = ?",
                                       (identifier,)).fetchone()[0])
    report = db.execute("SELECT objectives FROM reports WHERE id = ?", (identifier,)).fetchone()
    names = set(objectives) | set(json.loads(report[0]) if report else {})
    assert page.locator("#scores tbody tr").count() == len(names)
    assert HOSTILE in page.locator("#scores").inner_text()  # the task's name, shown as text
    assert page.locator("#export-command").inner_text() == shlex.join(
        ["evoforge", "export", str(finished_run), identifier, "--out", f"exports/{identifier}"])
    assert page.locator("#recipe details").count() >= 1
    bars = page.eval_on_selector_all("#task-plot .barlayer .trace", "t => t.length")
    assert bars == 2  # search estimate and held-out score per task
    _safe(page)
    screenshot(page, "individual")
    page.close()


def test_compare_overlays_the_fronts_of_both_runs(site, finished_run):
    url, browser = site
    page = open_page(browser, f"{url}/compare?run={quote(finished_run.name, safe='')}&run=copy")
    front = len(population_front(_db(finished_run)))
    assert plotted(page, "compare-fronts") == [front, front]
    generations = len(plotted(page, "compare-hv"))
    assert generations == 2
    _safe(page)
    screenshot(page, "compare")
    page.close()


def test_pages_move_without_reloading_and_a_left_page_stops(site, finished_run):
    """Links move within one document (plotly is loaded once); back returns to the run; a page
    that was left makes no more requests and cannot draw over the page on screen."""
    url, browser = site
    page = open_page(browser, url + "/")
    page.evaluate("window.__kept = 'same document'")
    page.locator("#runs tbody a.run-link", has_text=HOSTILE).click()
    page.wait_for_selector("body[data-ready='1']")
    page.locator("#individuals-table tbody a").first.click()
    page.wait_for_url("**/individuals/**")
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#export-command").count() == 1
    assert page.evaluate("window.__kept") == "same document"
    assert page.evaluate("document.querySelectorAll('script[src$=\"plotly.min.js\"]').length") == 1

    page.go_back()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("h1").inner_text() == finished_run.name
    assert plotted(page, "front-plot")[-1] == len(population_front(_db(finished_run)))
    page.go_back()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("h1").inner_text() == "Runs"
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    page.wait_for_timeout(2500)  # longer than the run page's poll
    assert not [r for r in requests if "/version" in r or "/api/runs/" in r], requests
    assert page.locator("h1").inner_text() == "Runs"
    _safe(page)
    page.close()
