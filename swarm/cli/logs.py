"""Logging set-up for entry points (library code only creates loggers under `swarm`)."""

from __future__ import annotations

import logging
import os


def configure_logging() -> None:
    """INFO for Swarm's own loggers (SWARM_LOG_LEVEL overrides), warnings only for libraries."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    logging.getLogger("swarm").setLevel(os.environ.get("SWARM_LOG_LEVEL", "INFO").upper())
