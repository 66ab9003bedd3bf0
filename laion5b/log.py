"""Logging set-up for the scripts: one line per event, to stderr and to a rotating file per process."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
MAX_FILE_BYTES = 20 * 1024 * 1024
KEPT_FILES = 5


def setup(process_name: str, log_dir: str, level: int = logging.INFO) -> None:
    """Send log lines to stderr and, when ``log_dir`` is set, to ``log_dir/<process_name>.log`` (rotated)."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                Path(log_dir) / f"{process_name}.log", maxBytes=MAX_FILE_BYTES, backupCount=KEPT_FILES
            )
        )
    logging.basicConfig(level=level, format=FORMAT, handlers=handlers, force=True)
