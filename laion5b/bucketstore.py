"""Files output to object storage (``output_format`` files, an s3:// store_dir): each image and each of its sidecars
is one object, under the same keys as the files on disk (``<prefix>/<subset>/<part>/<shard>/<id>.<ext>``)."""

from __future__ import annotations

import errno
import secrets
import shutil
from pathlib import Path

from laion5b.imaging import Processed
from laion5b.leases import STORED
from laion5b.objectstore import Bucket, split_url
from laion5b.sidecars import Sidecars
from laion5b.store import Claimed, fresh_temp_folder, image_folder, worker_temp_folder
from laion5b.storehealth import StoreHealth
from laion5b.tasks import Task
from laion5b.uploads import STORE_ERRORS, describe


class BucketStore:
    """Stores images as objects: the sidecars first, then the image, each one PUT (a whole object or none), before
    the outcome counts the image stored; a download of the same task again replaces them whole. A store that
    refuses or does not answer raises EIO: the task is returned, the worker stops claiming (``store_failing EIO``)
    and probes the bucket (a small PUT) until it takes writes again."""

    def __init__(
        self, bucket: Bucket, store_dir: str, staging_dir: Path, host_id: str, worker_name: str, sidecars: Sidecars
    ) -> None:
        self.bucket = bucket
        self.root = store_dir.rstrip("/")
        self.sidecars = sidecars
        self.temp_dir = worker_temp_folder(staging_dir, host_id, worker_name)
        self.health = StoreHealth(probe=self._probe)

    def open(self, claimed: Claimed | None = None) -> None:
        fresh_temp_folder(self.temp_dir, claimed)

    def close(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def existing(self, task: Task) -> Path | None:
        """Not looked up (a request per image and extension would cost more than the rare download it saves): a task
        that comes back is downloaded again and its objects replaced, counted once all the same."""
        return None

    def put(self, task: Task, raw: str, image: Processed, final_url: str | None) -> tuple[str, str, int]:
        assert image.data is not None and image.extension is not None
        folder = image_folder(self.root, task)
        for extension, content in self.sidecars.files(task, image, final_url).items():
            self._put(f"{folder}/{task.id}.{extension}", content)
        self._put(f"{folder}/{task.id}.{image.extension}", image.data)
        return STORED, raw, len(image.data)

    def _put(self, url: str, data: bytes) -> None:
        bucket, key = split_url(url)
        with self.health.watch(url):
            try:
                self.bucket.client.put_object(Bucket=bucket, Key=key, Body=data)
            except STORE_ERRORS as error:
                raise OSError(errno.EIO, f"{url}: {describe(error)}") from None

    def _probe(self, size: int) -> None:
        """Write and delete ``size`` bytes under ``<prefix>/.probe/``; OSError EIO when the store refuses."""
        url = f"{self.root}/.probe/{secrets.token_hex(8)}"
        self._put(url, bytes(size))
        try:
            self.bucket.delete(url)
        except STORE_ERRORS as error:
            raise OSError(errno.EIO, f"{url}: {describe(error)}") from None
