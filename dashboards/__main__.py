"""`python -m dashboards [TARGET] [--port P] [--host H]`: serve the read-only dashboard over a runs
folder (or one run). `evoforge dashboard` starts this program in its own process: the dashboard
reads the run store and sits above it, so the run-side CLI must not import it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn

from dashboards.app import LOOPBACK, create_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evoforge dashboard", description=__doc__.split("\n")[0])
    parser.add_argument("target", nargs="?", type=Path, default=Path("runs"),
                        help="a runs folder, or one run's folder (default: runs)")
    parser.add_argument("--port", "-p", type=int, default=8321)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    if not args.target.exists():
        print(f"error: no runs folder or run at {args.target}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK:
        print(f"warning: listening on {args.host}: anyone who can reach this machine can read "
              "these runs (recipes, scores, paths). Prefer the default 127.0.0.1 and an SSH "
              "tunnel.", file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"evoforge dashboard on http://{shown}:{args.port}/ over {args.target.resolve()} "
          "(read-only; Ctrl-C stops it)", file=sys.stderr)
    uvicorn.run(create_app(args.target, args.host), host=args.host, port=args.port,
                log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
