"""Where an image is stored, and writing it there atomically through a per-worker temporary folder."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import psutil

from laion5b.imageformat import EXTENSIONS
from laion5b.tasks import Task

log = logging.getLogger(__name__)

FILES_PER_FOLDER = 10_000
TEMP_FOLDER = ".tmp"
_KNOWN_FOLDERS_LIMIT = 100_000


def image_folder(store_dir: Path, task: Task) -> Path:
    """``store_dir/<subset>/<part>/<shard>``: at most FILES_PER_FOLDER rows of one part share a shard."""
    return store_dir / task.subset / task.part / f"{task.row // FILES_PER_FOLDER:05d}"


class Store:
    """Stores images under ``store_dir``; one instance per worker process, shared by its threads."""

    def __init__(self, store_dir: Path, host_id: str, worker_name: str, fsync: bool) -> None:
        self.store_dir = store_dir
        self.fsync = fsync
        self.temp_dir = temp_root(store_dir, host_id) / f"{_file_safe(worker_name)}.{os.getpid()}"
        self._known_folders: set[Path] = set()

    def open(self) -> None:
        """Create this worker's empty temporary folder, removing those of dead workers of this host."""
        remove_dead_temp_folders(self.temp_dir.parent)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir.mkdir(parents=True)

    def close(self) -> None:
        """Remove this worker's temporary folder."""
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def existing(self, task: Task) -> Path | None:
        """The stored file of this task, if an earlier try stored it."""
        folder = image_folder(self.store_dir, task)
        if folder not in self._known_folders and not folder.is_dir():
            return None
        for extension in EXTENSIONS:
            path = folder / f"{task.id}.{extension}"
            if path.exists():
                return path
        return None

    def save(self, task: Task, data: bytes, extension: str) -> Path:
        """Write ``data`` to a temporary file and rename it to its final name; return that name."""
        folder = image_folder(self.store_dir, task)
        if folder not in self._known_folders:
            folder.mkdir(parents=True, exist_ok=True)
            if len(self._known_folders) >= _KNOWN_FOLDERS_LIMIT:
                self._known_folders.clear()
            self._known_folders.add(folder)
        final = folder / f"{task.id}.{extension}"
        temporary = self.temp_dir / f"{task.subset.replace('/', '_')}.{task.part}.{task.id}.{extension}"
        with open(temporary, "wb") as file:
            file.write(data)
            if self.fsync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, final)
        return final


def temp_root(store_dir: Path, host_id: str) -> Path:
    """The folder that holds the temporary folders of this host's workers."""
    return store_dir / TEMP_FOLDER / _file_safe(host_id)


def remove_dead_temp_folders(root: Path) -> None:
    """Remove temporary folders (named ``<worker>.<pid>``) whose process is gone or a zombie."""
    if not root.is_dir():
        return
    for folder in root.iterdir():
        pid = folder.name.rpartition(".")[2]
        if not pid.isdigit() or not _alive(int(pid)):
            log.info("temp_removed folder=%s", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
