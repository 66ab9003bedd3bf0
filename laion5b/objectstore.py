"""Object storage (any S3 API: AWS, GCS's XML API, Ceph RGW, MinIO, R2) through boto3: ``s3://bucket/prefix`` URLs,
uploads of sealed shards (one PUT, or multipart past ``s3_part_mb``, each request with a checksum the server
verifies), and the unfinished multipart uploads a killed worker leaves behind. Credentials come from boto3's own
chain only (the AWS environment variables, ~/.aws files, an instance or container role), never from setting.py."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import boto3
import boto3.exceptions
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig

if TYPE_CHECKING:
    from laion5b.config import Config

log = logging.getLogger(__name__)

SCHEME = "s3://"
UPLOAD_THREADS = 4
"""Parts of one multipart upload sent at once."""
CONNECT_TIMEOUT, READ_TIMEOUT = 10, 60
"""Seconds to connect to the store and to wait for a reply: a store that does not answer is retried, not awaited."""
READ_AHEAD = 8 * 1024 * 1024
"""Bytes one ranged GET of an input file fetches at least: what a reader of it holds in memory."""
CLIENT_ATTEMPTS = 3
"""Tries of one request inside boto3 (its standard retry mode, with backoff on 5xx, throttling and network errors);
the uploader tries the whole upload again after that, on a longer backoff."""


def is_remote(location: str) -> bool:
    """Whether a store_dir or parquet_dir is an object-store URL (``s3://bucket/prefix``)."""
    return location.startswith(SCHEME)


@dataclass(frozen=True)
class Location:
    """``s3://bucket/prefix``: a bucket and a key prefix without slashes at its ends."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Location:
        """Raise ValueError when ``url`` is not ``s3://bucket[/prefix]``."""
        if not is_remote(url):
            raise ValueError(f"{url!r} does not start with {SCHEME}")
        bucket, _, prefix = url[len(SCHEME) :].partition("/")
        if not bucket:
            raise ValueError(f"{url!r} names no bucket")
        return cls(bucket, prefix.strip("/"))

    def key(self, *parts: str) -> str:
        """The key of ``parts`` under the prefix."""
        return "/".join(part.strip("/") for part in (self.prefix, *parts) if part.strip("/"))

    def url(self, *parts: str) -> str:
        return f"{SCHEME}{self.bucket}/{self.key(*parts)}"


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    bucket, _, key = url[len(SCHEME) :].partition("/")
    return bucket, key


@dataclass(frozen=True)
class Endpoint:
    """How to reach the store: settings ``s3_endpoint_url`` (empty: AWS), ``s3_region`` (empty: boto3's
    configuration), ``s3_addressing`` (path or virtual) and ``s3_part_mb``."""

    url: str = ""
    region: str = ""
    addressing: str = "path"
    part_mb: int = 64

    def client(self) -> Any:
        """A boto3 S3 client (thread-safe; credentials from boto3's chain)."""
        config = BotoConfig(
            s3={"addressing_style": self.addressing},
            retries={"mode": "standard", "max_attempts": CLIENT_ATTEMPTS},
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            max_pool_connections=2 * UPLOAD_THREADS,
            request_checksum_calculation="when_supported",
        )
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=self.url or None, region_name=self.region or None, config=config)

    @property
    def transfer(self) -> TransferConfig:
        part = self.part_mb * 1024 * 1024
        return TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=UPLOAD_THREADS,
                              use_threads=True)  # fmt: skip


def error_code(error: BaseException) -> str:
    """A short name of a store error: the S3 error code (``SlowDown``, ``AccessDenied``, ``500``...) or the
    exception's type (``EndpointConnectionError``, ``ReadTimeoutError``...); boto3's upload error is named by the
    error it wraps."""
    cause = error.__cause__ or error.__context__
    if isinstance(error, boto3.exceptions.S3UploadFailedError) and cause is not None:
        return error_code(cause)
    if isinstance(error, botocore.exceptions.ClientError):
        return str(error.response.get("Error", {}).get("Code") or error.response.get("ResponseMetadata", {})
                   .get("HTTPStatusCode") or "ClientError")  # fmt: skip
    return type(error).__name__


class Bucket:
    """The object-store side of one process: uploads, existence checks, deletes and listings under a Location."""

    def __init__(self, location: Location, endpoint: Endpoint) -> None:
        self.location = location
        self.endpoint = endpoint
        self.client = endpoint.client()

    def upload(self, path: str, url: str) -> None:
        """Upload a local file to ``url`` (of this bucket): one PUT, or a multipart upload past ``s3_part_mb`` that
        boto3 aborts itself when a part fails; a killed process's is aborted by ``abort_unfinished``."""
        bucket, key = split_url(url)
        self.client.upload_file(path, bucket, key, Config=self.endpoint.transfer)

    def size(self, url: str) -> int | None:
        """The object's size, or None when there is none under ``url``."""
        bucket, key = split_url(url)
        try:
            return int(self.client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except botocore.exceptions.ClientError as error:
            if error_code(error) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def delete(self, url: str) -> None:
        bucket, key = split_url(url)
        self.client.delete_object(Bucket=bucket, Key=key)

    def abort_unfinished(self, url: str) -> int:
        """Abort every unfinished multipart upload of exactly ``url``'s key; return how many."""
        bucket, key = split_url(url)
        aborted = 0
        for upload in self._unfinished(bucket, key):
            if upload["Key"] == key:
                self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
                aborted += 1
        if aborted:
            log.info("multipart_aborted key=%s uploads=%d", url, aborted)
        return aborted

    def _unfinished(self, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            yield from page.get("Uploads", [])

    def check_writable(self, host_id: str) -> None:
        """Write and delete a small object under the prefix; raise the store's error when it refuses."""
        key = self.location.key(".probe", f"{host_id}-{os.getpid()}-{secrets.token_hex(4)}")
        self.client.put_object(Bucket=self.location.bucket, Key=key, Body=b"probe")
        with contextlib.suppress(botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            self.client.delete_object(Bucket=self.location.bucket, Key=key)

    def list_keys(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of the objects whose key starts with ``prefix`` (a full key prefix in this bucket)."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"], int(item["Size"])

    def read(self, url: str) -> bytes:
        """The whole object at ``url`` (of this bucket)."""
        bucket, key = split_url(url)
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def names(self, folder: str) -> set[str]:
        """Names of the objects directly under the ``folder`` URL (``s3://bucket/prefix/subset``), as a listing of a
        folder would give them."""
        prefix = split_url(folder)[1].rstrip("/") + "/"
        return {key[len(prefix) :] for key, _ in self.list_keys(prefix) if "/" not in key[len(prefix) :]}


def bucket_of(config: Config, url: str | None = None) -> Bucket | None:
    """The bucket of an s3:// store_dir (or of ``url``, an s3:// parquet_dir), or None for a local one."""
    url = config.store_dir if url is None else url
    if not is_remote(url):
        return None
    endpoint = Endpoint(config.s3_endpoint_url, config.s3_region, config.s3_addressing, config.s3_part_mb)
    return Bucket(Location.parse(url), endpoint)


@dataclass(frozen=True)
class RemotePath:
    """An input file in a bucket, where the input readers take a local Path: its ``name``, and ``open`` for reading."""

    url: str
    size: int
    bucket: Bucket = field(compare=False, hash=False, repr=False)

    @property
    def name(self) -> str:
        return self.url.rpartition("/")[2]

    def open(self) -> io.BufferedReader:
        return io.BufferedReader(RangeReader(self.bucket, self.url, self.size), READ_AHEAD)

    def __str__(self) -> str:
        return self.url


class RangeReader(io.RawIOBase):
    """A read-only, seekable view of one object: each read is a ranged GET, so a reader that goes through a file of
    any size (a parquet's row groups, a text file's lines) holds one read at a time, never the object."""

    def __init__(self, bucket: Bucket, url: str, size: int) -> None:
        super().__init__()
        self.bucket_name, self.key = split_url(url)
        self.client = bucket.client
        self.size = size
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer: Any) -> int:
        end = min(self.position + len(buffer), self.size)
        if end <= self.position:
            return 0
        try:
            reply = self.client.get_object(Bucket=self.bucket_name, Key=self.key,
                                           Range=f"bytes={self.position}-{end - 1}")  # fmt: skip
            data = reply["Body"].read()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
            raise OSError(f"s3://{self.bucket_name}/{self.key}: {error_code(error)}: {error}") from None
        memoryview(buffer)[: len(data)] = data
        self.position += len(data)
        return len(data)
