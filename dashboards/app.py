"""The dashboard's web app: static pages that fetch JSON from a read-only API over the run stores.

Safety by construction, not by escaping after the fact:
- Runs are looked up by name among the folders found under the runs folder; no path is ever built
  from a request, so nothing outside that folder can be named, let alone read.
- Stores are opened read-only (`RunStore.reader`); every route is GET.
- Pages carry no data: their script fetches JSON and writes it with `textContent`, so a recipe or
  task string is never parsed as HTML; the Content-Security-Policy allows scripts from this server
  only (no inline script), so injected markup could not run even if it were parsed.
- Host headers are checked against the bound address, so a web page elsewhere cannot reach a
  dashboard on 127.0.0.1 by DNS rebinding.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import plotly
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from dashboards.payloads import (
    compare_payload,
    individual_payload,
    points_payload,
    run_payload,
    runs_payload,
    table_payload,
)
from dashboards.run_index import RunIndex

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' "
                               "'unsafe-inline'; img-src 'self' data: blob:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _plotly_js() -> Path:
    """Plotly.js as the installed `plotly` package ships it (no CDN: works offline)."""
    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


ASSETS = {"app.js": STATIC / "app.js", "style.css": STATIC / "style.css",
          "plotly.min.js": _plotly_js()}
# One page for every address: app.js routes by path and moves between pages without reloading,
# so plotly (4.6 MB, about 0.8 s to compile on a cold 2-core browser) is loaded once per tab.
SHELL = STATIC / "page.html"


def _finite(value):
    """JSON has no NaN or infinity: an unknown value is sent as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json(data, status: int = 200) -> Response:
    return Response(json.dumps(_finite(data), separators=(",", ":")), status_code=status,
                    media_type="application/json", headers=HEADERS)


class Runs:
    """The run stores under one folder (or the one run it names), opened on first use."""

    def __init__(self, target: Path):
        self.target = Path(target).resolve()
        self._open: dict[str, RunIndex] = {}
        self._lock = threading.Lock()

    def folders(self) -> dict[str, Path]:
        if (self.target / "run.db").is_file():
            return {self.target.name: self.target}
        if not self.target.is_dir():
            return {}
        return {child.name: child for child in sorted(self.target.iterdir())
                if not child.name.startswith(".") and (child / "run.db").is_file()
                and (child / "config.yaml").is_file()}

    def all(self) -> dict[str, RunIndex]:
        return {name: self.get(name) for name in self.folders()}

    def get(self, name: str) -> RunIndex:
        folders = self.folders()
        if name not in folders:
            raise HTTPException(404, f"no run named {name!r} in {self.target}")
        with self._lock:
            if name not in self._open:
                self._open[name] = RunIndex(folders[name])
            return self._open[name]


def create_app(target: Path, host: str = "127.0.0.1") -> Starlette:
    runs = Runs(target)

    def page(request: Request) -> Response:
        """The shell, for an address that names something that exists (checked without loading
        the run: the page's own API requests do that while the browser loads its script)."""
        if "run" in request.path_params:
            index = runs.get(request.path_params["run"])
            if "id" in request.path_params and not index.has(request.path_params["id"]):
                raise HTTPException(404, "no such individual")
        return FileResponse(SHELL, media_type="text/html", headers=HEADERS)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            raise HTTPException(404, "no such file")
        kind = "text/css" if name.endswith(".css") else "text/javascript"
        # cacheable for an hour: the browser keeps plotly's compiled code between visits
        return FileResponse(ASSETS[name], media_type=kind,
                            headers=HEADERS | {"Cache-Control": "private, max-age=3600"})

    def api_runs(request: Request) -> Response:
        return _json({"runs": runs_payload(runs.all())})

    def api_run(request: Request) -> Response:
        return _json(run_payload(runs.get(request.path_params["run"])))

    def api_version(request: Request) -> Response:
        index = runs.get(request.path_params["run"])
        index.refresh()
        return _json({"version": index.version, "generations": len(index.generations)})

    def api_points(request: Request) -> Response:
        index = runs.get(request.path_params["run"])
        query = request.query_params
        names = list(index.plan["objectives"])
        x = query.get("x", names[1] if len(names) > 1 else "params")
        y = query.get("y", names[0])
        generation = _int(query.get("generation"), None)
        return _json(points_payload(index, generation, x, y, query.get("dominated") == "1"))

    def api_table(request: Request) -> Response:
        index = runs.get(request.path_params["run"])
        query = request.query_params
        return _json(table_payload(index, _int(query.get("page"), 0),
                                   query.get("sort", next(iter(index.plan["objectives"]))),
                                   query.get("order", "desc") == "desc",
                                   query.get("front") == "1"))

    def api_individual(request: Request) -> Response:
        data = individual_payload(runs.get(request.path_params["run"]), request.path_params["id"])
        if data is None:
            raise HTTPException(404, "no such individual")
        return _json(data)

    def api_compare(request: Request) -> Response:
        names = request.query_params.getlist("run")
        return _json({"runs": compare_payload({name: runs.get(name) for name in names})})

    async def http_error(request: Request, error: HTTPException) -> Response:
        return _json({"error": error.detail}, status=error.status_code)

    async def no_icon(request: Request) -> Response:
        return Response(status_code=204)

    routes = [
        Route("/", page),
        Route("/favicon.ico", no_icon),
        Route("/runs/{run}", page),
        Route("/runs/{run}/individuals/{id}", page),
        Route("/compare", page),
        Route("/static/{name}", asset),
        Route("/api/runs", api_runs),
        Route("/api/runs/{run}", api_run),
        Route("/api/runs/{run}/version", api_version),
        Route("/api/runs/{run}/points", api_points),
        Route("/api/runs/{run}/table", api_table),
        Route("/api/runs/{run}/individuals/{id}", api_individual),
        Route("/api/compare", api_compare),
    ]
    allowed = ["127.0.0.1", "localhost", "[::1]", "::1"] if host in LOOPBACK else ["*"]
    return Starlette(routes=routes,
                     middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed)],
                     exception_handlers={HTTPException: http_error})


def _int(text: str | None, default):
    try:
        return int(text) if text not in (None, "") else default
    except ValueError:
        raise HTTPException(400, f"not a whole number: {text!r}") from None
