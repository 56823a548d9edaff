"""Where evoforge keeps what it builds: built-in models, compiled kernels (EVOFORGE_CACHE)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """EVOFORGE_CACHE, default ~/.cache/evoforge."""
    return Path(os.environ.get("EVOFORGE_CACHE", Path.home() / ".cache" / "evoforge"))
