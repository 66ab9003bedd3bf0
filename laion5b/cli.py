"""What every script does first: load the settings or exit with a one-line error, stop on signals, and keep out
modules it does not use that a library would import."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import signal
import sys
import threading
import types
from collections.abc import Mapping, Sequence

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


class _KeptOut(importlib.abc.MetaPathFinder):
    """Refuses to import some top-level packages, as if they were not installed."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"{fullname} is kept out of this process", name=fullname)
        return None


def keep_out(*names: str) -> None:
    """Make importing these packages (not imported yet) fail in this process as if they were not installed: for
    optional imports of libraries (pyarrow imports pandas when it can) that the script never needs."""
    sys.meta_path.insert(0, _KeptOut(frozenset(name for name in names if name not in sys.modules)))
