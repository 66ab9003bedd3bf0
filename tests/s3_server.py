"""A real S3 server (moto's server mode) started on a free loopback port in a temporary folder, stopped by PID, with
its signature checks on: requests are signed with an access key made through its IAM API, a wrong secret is
refused. It keeps objects in memory; an outage is simulated by freezing it (SIGSTOP / SIGCONT)."""

from __future__ import annotations

import copy
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import psutil
from botocore.config import Config as BotoConfig

from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent

REGION = "us-east-1"
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
UNSIGNED_CALLS = 3
"""Calls the server answers before it checks signatures: making the admin user, its policy and its key."""
_BUCKETS = itertools.count()


class S3Server:
    """One private moto server: ``start`` makes ``bucket`` and two IAM users with a key each: the downloader's
    (``key_id``, ``secret``), whose permission ``revoke`` and ``grant`` take and give back, and an admin's."""

    def __init__(self, folder: Path, bucket: str = "laion-test") -> None:
        self.folder = folder
        self.port = free_port()
        self.bucket = bucket
        self.key_id = ""
        self.secret = ""
        self.admin: tuple[str, str] = ("", "")
        self.revoked = False
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(UNSIGNED_CALLS), "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-m", "tests.moto_s3", "-H", "127.0.0.1", "-p", str(self.port)]
        with open(self.folder / "moto.log", "wb") as log:
            self.process = subprocess.Popen(command, cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT)
        self._wait_listening()
        self.admin = self._user("admin", *self.admin)
        self.key_id, self.secret = self._user("downloader", *self.admin)
        self.client().create_bucket(Bucket=self.bucket)

    def _user(self, name: str, key_id: str, secret: str) -> tuple[str, str]:
        """Make a user allowed everything, signed as (key_id, secret); return its key."""
        iam = self._iam(key_id or "setup", secret or "setup")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def _iam(self, key_id: str, secret: str) -> Any:
        return boto3.client("iam", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=key_id,
                            aws_secret_access_key=secret)  # fmt: skip

    def with_new_bucket(self) -> S3Server:
        """This server seen through a new, empty bucket of its own."""
        view = copy.copy(self)
        view.bucket = f"{self.bucket}-{next(_BUCKETS)}"
        view.client().create_bucket(Bucket=view.bucket)
        return view

    def revoke(self) -> None:
        """Take every permission from the downloader's key: the store refuses it (AccessDenied)."""
        self._iam(*self.admin).delete_user_policy(UserName="downloader", PolicyName="all")
        self.revoked = True

    def deny(self, action: str) -> None:
        """Allow the downloader's key everything but ``action`` (e.g. ``s3:ListBucketMultipartUploads``)."""
        policy = {**ALLOW_ALL, "Statement": [*ALLOW_ALL["Statement"], {"Effect": "Deny", "Action": action,
                                                                       "Resource": "*"}]}  # fmt: skip
        self._iam(*self.admin).put_user_policy(
            UserName="downloader", PolicyName="all", PolicyDocument=json.dumps(policy)
        )
        self.revoked = True

    def grant(self) -> None:
        self._iam(*self.admin).put_user_policy(UserName="downloader", PolicyName="all",
                                               PolicyDocument=json.dumps(ALLOW_ALL))  # fmt: skip
        self.revoked = False

    def _wait_listening(self) -> None:
        """Readiness by a TCP connect: an HTTP probe would use up one of the unsigned calls."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"moto server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            os.kill(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        self.process = None

    def cpu(self) -> float:
        """CPU seconds the server has used so far."""
        assert self.process is not None
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def freeze(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def client(self) -> Any:
        """A boto3 S3 client signed with the admin's key."""
        config = BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 2})
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=self.admin[0],
                            aws_secret_access_key=self.admin[1], config=config)  # fmt: skip

    def environ(self, prefix: str = "run") -> dict[str, str]:
        """Environment that points the suite's scripts at this bucket (credentials in the standard AWS variables)."""
        return {
            "LAION_STORE_DIR": f"s3://{self.bucket}/{prefix}",
            "LAION_S3_ENDPOINT_URL": self.endpoint,
            "LAION_S3_REGION": REGION,
            "LAION_S3_ADDRESSING": "path",
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_CONFIG_FILE": str(self.folder / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.folder / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def objects(self, prefix: str = "") -> dict[str, int]:
        """Key -> size of every object under ``prefix``."""
        found: dict[str, int] = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
        return found

    def unfinished_uploads(self) -> list[str]:
        """Keys of the multipart uploads started and neither completed nor aborted."""
        reply = self.client().list_multipart_uploads(Bucket=self.bucket)
        return [upload["Key"] for upload in reply.get("Uploads", [])]
