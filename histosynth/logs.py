"""Logging for stage scripts: everything a job says, progress bars included, goes to its log file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def log_to(path: str | Path) -> logging.Logger:
    """Send logging and stderr (tqdm progress, warnings) to `path`; return the histosynth logger."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(path, "a", buffering=1)
    sys.stderr = stream
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=stream, force=True
    )
    logging.captureWarnings(True)
    return logging.getLogger("histosynth")
