"""`evoforge dashboard`: start the read-only dashboard (`python -m dashboards`) in this process's
place. It is a program of its own, not an import: the dashboard reads the run store, so the
run-side CLI importing it would be a cycle in the house plan."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer


def dashboard(
    target: Path = typer.Argument(Path("runs"), help="a runs folder, or one run's folder"),
    port: int = typer.Option(8321, "--port", "-p", help="TCP port to listen on"),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="address to listen on; anything but loopback exposes your runs "
                                  "to the network"),
) -> None:
    """Inspect fronts, lineage and scores in a browser (read-only; a running run is never
    disturbed). Over SSH: `ssh -L 8321:127.0.0.1:8321 gpu-box`, then open http://127.0.0.1:8321."""
    argv = [sys.executable, "-m", "dashboards", str(target), "--port", str(port), "--host", host]
    os.execv(sys.executable, argv)
