"""What is written beside a stored image: its caption (``<name>.txt``) and its metadata (``<name>.json``)."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any

from laion5b.imaging import Processed
from laion5b.tasks import Task

_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def sample_key(task: Task) -> str:
    """The sample's key: its part and row, so it is unique in its subset even when ids repeat; no ``.`` in it
    (webdataset splits a member's key from its extension at the first dot)."""
    return f"{task.part.replace('.', '_')}-{task.row:09d}"


def sample_metadata(task: Task, image: Processed, final_url: str | None, host_id: str, worker: str) -> dict[str, Any]:
    """The metadata of one stored sample; ``image`` holds the stored and the downloaded sizes and hashes."""
    metadata: dict[str, Any] = {"key": sample_key(task), "id": task.id, "url": task.url, "caption": task.text}
    metadata.update(task.meta or {})
    metadata.update(
        final_url=final_url or task.url,
        ext=image.extension,
        bytes=len(image.data or b""),
        sha256=image.sha256,
        width=image.width,
        height=image.height,
        original_width=image.original_width,
        original_height=image.original_height,
        original_sha256=image.original_sha256,
        original_format=image.original_format or image.extension,
        downloaded_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        host_id=host_id,
        worker=worker,
        attempts=task.attempts + 1,
    )
    return metadata


@dataclass(frozen=True)
class Sidecars:
    """Which files go beside each image (``save_caption``, ``save_metadata``), and who stores it."""

    caption: bool = False
    metadata: bool = False
    host_id: str = ""
    worker: str = ""

    def files(self, task: Task, image: Processed, final_url: str | None) -> dict[str, bytes]:
        """Extension -> content of each file to write beside the image."""
        files: dict[str, bytes] = {}
        if self.caption:
            files["txt"] = caption_file(task)
        if self.metadata:
            files["json"] = metadata_file(self.describe(task, image, final_url))
        return files

    def describe(self, task: Task, image: Processed, final_url: str | None) -> dict[str, Any]:
        """The sample's metadata, stored by this worker."""
        return sample_metadata(task, image, final_url, self.host_id, self.worker)


def caption_file(task: Task) -> bytes:
    """The content of ``<name>.txt``: the caption, UTF-8."""
    return (task.text or "").encode("utf-8", "replace")


def metadata_file(metadata: dict[str, Any]) -> bytes:
    """The content of ``<name>.json``: the metadata as one line of JSON."""
    return _ENCODE(metadata).encode("utf-8", "replace")
