"""Where an image is stored, and writing it there atomically through a per-worker temporary folder."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil

from laion5b.imageformat import EXTENSIONS
from laion5b.imaging import Processed
from laion5b.leases import STORED
from laion5b.sidecars import Sidecars
from laion5b.storehealth import StoreHealth
from laion5b.tasks import Task

log = logging.getLogger(__name__)

FILES_PER_FOLDER = 10_000
TEMP_FOLDER = ".tmp"
LISTING_MAX_AGE = 10.0  # seconds a folder listing answers existing() before the folder is listed again
_KNOWN_FOLDERS_LIMIT = 100_000
_LISTED_FOLDERS_LIMIT = 32  # listings kept (each at most about FILES_PER_FOLDER names), oldest dropped first
Claimed = Callable[[list[str]], set[str]]
"""Of the names of temporary folders (``<worker>.<pid>``), those that a live worker's heartbeat claims."""


def image_folder(store_dir: str, task: Task) -> str:
    """``store_dir/<subset>/<part>/<shard>``: at most FILES_PER_FOLDER rows of one part share a shard."""
    return f"{store_dir}/{task.subset}/{task.part}/{task.row // FILES_PER_FOLDER:05d}"


class Store:
    """Stores images under ``store_dir`` (``output_format`` "files"); one instance per worker process, shared by its
    threads.

    Paths are plain strings inside: pathlib costs more than the system calls on this per-image path.
    """

    def __init__(
        self, store_dir: Path, host_id: str, worker_name: str, fsync: bool, sidecars: Sidecars | None = None
    ) -> None:
        self.store_dir = store_dir
        self.fsync = fsync
        self.sidecars = sidecars or Sidecars()
        self.temp_dir = worker_temp_folder(store_dir, host_id, worker_name)
        self.health = StoreHealth()
        self._root = os.fspath(store_dir)
        self._temp = os.fspath(self.temp_dir)
        self._known_folders: set[str] = set()
        self._listings: dict[str, tuple[float, set[str]]] = {}
        self._listing_lock = threading.Lock()

    def open(self, claimed: Claimed | None = None) -> None:
        """Create this worker's empty temporary folder, removing those of dead workers of this host."""
        fresh_temp_folder(self.temp_dir, claimed)

    def close(self) -> None:
        """Remove this worker's temporary folder."""
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def existing(self, task: Task) -> Path | None:
        """The stored file of this task, if an earlier try stored it.

        Answered from a listing of the image's folder, taken at most LISTING_MAX_AGE seconds ago and kept up to date
        with this process's own saves: one system call per folder instead of one per extension per image. A file
        that another process stored since the listing is missed, which costs one redundant download, never a
        wrong count (the task's outcome is recorded once either way, and the file is replaced atomically).
        """
        folder = image_folder(self._root, task)
        names = self._listing(folder)
        for extension in EXTENSIONS:
            name = f"{task.id}.{extension}"
            if name in names:
                return Path(folder, name)
        return None

    def put(self, task: Task, raw: str, image: Processed, final_url: str | None) -> tuple[str, str, int]:
        """Store an image with the files asked for beside it; the outcome counts it as stored."""
        assert image.data is not None and image.extension is not None
        self.save(task, image.data, image.extension, self.sidecars.files(task, image, final_url))
        return STORED, raw, len(image.data)

    def save(self, task: Task, data: bytes, extension: str, sidecars: Mapping[str, bytes] | None = None) -> Path:
        """Write ``data`` to a temporary file and rename it to its final name; return that name. The ``sidecars``
        (extension -> content: caption, metadata) are written beside it the same way, first: an image on disk always
        has them."""
        folder = image_folder(self._root, task)
        name = f"{task.id}.{extension}"
        final = f"{folder}/{name}"
        with self.health.watch(final):
            if folder not in self._known_folders:
                os.makedirs(folder, exist_ok=True)
                if len(self._known_folders) >= _KNOWN_FOLDERS_LIMIT:
                    self._known_folders.clear()
                self._known_folders.add(folder)
            for sidecar, content in (sidecars or {}).items():
                self._write(content, f"{folder}/{task.id}.{sidecar}")
            self._write(data, final)
        listed = self._listings.get(folder)
        if listed is not None:
            listed[1].add(name)
        return Path(final)

    def _write(self, data: bytes, final: str) -> None:
        """Write ``data`` under a temporary name of this thread, then rename it to ``final`` (atomic). A write that
        fails leaves no temporary file behind (on a full disk, its space is given back)."""
        temporary = f"{self._temp}/{threading.get_ident()}.part"
        try:
            with open(temporary, "wb") as file:
                file.write(data)
                if self.fsync:
                    file.flush()
                    os.fsync(file.fileno())
            os.replace(temporary, final)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def _listing(self, folder: str) -> set[str]:
        now = time.monotonic()
        listed = self._listings.get(folder)
        if listed is not None and now - listed[0] <= LISTING_MAX_AGE:
            return listed[1]
        try:
            with self.health.watch(folder):  # a listing that hangs is a store that does not answer too
                names = set(os.listdir(folder))
        except (FileNotFoundError, NotADirectoryError):
            names = set()
        with self._listing_lock:  # the only place that adds or drops listings
            self._listings.pop(folder, None)
            while len(self._listings) >= _LISTED_FOLDERS_LIMIT:
                del self._listings[next(iter(self._listings))]
            self._listings[folder] = (now, names)
        return names


def temp_root(store_dir: Path, host_id: str) -> Path:
    """The folder that holds the temporary folders of this host's workers."""
    return store_dir / TEMP_FOLDER / file_safe(host_id)


def worker_temp_folder(store_dir: Path, host_id: str, worker_name: str) -> Path:
    """This process's temporary folder: ``<worker>.<pid>`` under the host's, on the store's file system."""
    return temp_root(store_dir, host_id) / f"{file_safe(worker_name)}.{os.getpid()}"


def fresh_temp_folder(folder: Path, claimed: Claimed | None = None) -> None:
    """Make ``folder`` an empty folder, removing the temporary folders of dead workers beside it."""
    remove_dead_temp_folders(folder.parent, claimed)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def remove_dead_temp_folders(root: Path, claimed: Claimed | None = None) -> None:
    """Remove temporary folders (named ``<worker>.<pid>``) that no live heartbeat claims (``claimed``, asked after
    the listing: a worker registers before it makes its folder) and whose PID is gone or a zombie here. A PID that
    looks free is no proof alone: the folder may be a process's of another PID namespace sharing the store."""
    if not root.is_dir():
        return
    folders = list(root.iterdir())
    live = claimed([folder.name for folder in folders]) if claimed is not None and folders else set()
    for folder in folders:
        pid = folder.name.rpartition(".")[2]
        if folder.name not in live and (not pid.isdigit() or not _alive(int(pid))):
            log.info("temp_removed folder=%s", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def file_safe(name: str) -> str:
    """``name`` with every character but letters, digits and ``-_.`` replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
