"""Logging set-up for entry points (library code only creates loggers under `swarm`)."""

from __future__ import annotations

import logging
import os


def configure_logging() -> None:
    """INFO for Swarm's own loggers (SWARM_LOG_LEVEL overrides), warnings only for libraries."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    logging.getLogger("swarm").setLevel(os.environ.get("SWARM_LOG_LEVEL", "INFO").upper())
    # bitsandbytes' CPU backend warns at import that it could not fetch an optional kernel from the
    # Hugging Face hub (bitsandbytes/backends/cpu/ops.py); it uses its own kernel instead, and this
    # runs offline, so the warning is noise on every server's stderr, an error line's included.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
