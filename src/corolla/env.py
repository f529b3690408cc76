"""Environment variables that corolla reads, all in one place."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of corolla's on-disk cache (converted models, throughput measurements): ``$COROLLA_CACHE``."""
    return Path(os.environ.get("COROLLA_CACHE", Path.home() / ".cache" / "corolla")).expanduser()
