"""What every script does first: load the settings or exit with a one-line error, and stop on signals."""

from __future__ import annotations

import signal
import sys
import threading
import types
from collections.abc import Mapping

from laion5b import config

EXIT_USAGE = 2


def load_settings(module: types.ModuleType, environ: Mapping[str, str] | None = None) -> config.Config:
    """The settings of ``module`` with their ``LAION_*`` overrides; exit 2 with one line when one is bad."""
    try:
        return config.load(module, environ)
    except config.ConfigError as error:
        print(f"error: bad setting: {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def stop_on_signals(stop: threading.Event) -> None:
    """Set ``stop`` on SIGTERM or SIGINT, so the script can finish what it holds and exit 0."""

    def handle(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
