"""Logging setup shared by every corolla module: ``logger = get_logger(__name__)``."""

from __future__ import annotations

import logging
import os
import sys

_ROOT = "corolla"
_configured = False


def get_logger(name: str) -> logging.Logger:
    """Return a logger under the ``corolla`` hierarchy (configured on first use)."""
    _configure_once()
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


def _configure_once() -> None:
    global _configured
    if _configured:
        return
    _configured = True
    root = logging.getLogger(_ROOT)
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s [%(name)s] %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(os.environ.get("COROLLA_LOGLEVEL", "INFO").upper())
    root.propagate = False
