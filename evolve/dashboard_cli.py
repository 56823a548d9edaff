"""`evoforge dashboard`: serve the read-only dashboard over a runs folder (or one run)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def dashboard(
    target: Path = typer.Argument(Path("runs"), help="a runs folder, or one run's folder"),
    port: int = typer.Option(8321, "--port", "-p", help="TCP port to listen on"),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="address to listen on; anything but loopback exposes your runs "
                                  "to the network"),
) -> None:
    """Inspect fronts, lineage and scores in a browser (read-only; a running run is never
    disturbed). Over SSH: `ssh -L 8321:127.0.0.1:8321 gpu-box`, then open http://127.0.0.1:8321."""
    import uvicorn

    from dashboards.app import create_app

    if not target.exists():
        console.print(f"[bold red]error:[/] no runs folder or run at {target}")
        raise typer.Exit(code=2)
    if host not in LOOPBACK:
        console.print(f"[bold yellow]warning:[/] listening on {host}: anyone who can reach this "
                      "machine can read these runs (recipes, scores, paths). Prefer the default "
                      "127.0.0.1 and an SSH tunnel.")
    shown = f"[{host}]" if ":" in host else host
    console.print(f"evoforge dashboard on http://{shown}:{port}/ over {target.resolve()} "
                  "(read-only; Ctrl-C stops it)")
    uvicorn.run(create_app(target, host), host=host, port=port, log_level="warning")
