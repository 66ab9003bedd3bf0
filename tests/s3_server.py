"""A real S3 server (moto's server mode) started on a free loopback port in a temporary folder, stopped by PID, with
its signature checks on: requests are signed with an access key made through its IAM API, a wrong secret is
refused. It keeps objects in memory; an outage is simulated by freezing it (SIGSTOP / SIGCONT)."""

from __future__ import annotations

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
from botocore.config import Config as BotoConfig

from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent

REGION = "us-east-1"
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
UNSIGNED_CALLS = 3
"""Calls the server answers before it checks signatures: making the user, its policy and its key."""


class S3Server:
    """One private moto server: ``start`` makes an IAM user with a key (``key_id``, ``secret``) and ``bucket``."""

    def __init__(self, folder: Path, bucket: str = "laion-test") -> None:
        self.folder = folder
        self.port = free_port()
        self.bucket = bucket
        self.key_id = ""
        self.secret = ""
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
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id="setup",
                           aws_secret_access_key="setup")  # fmt: skip
        iam.create_user(UserName="downloader")
        iam.put_user_policy(UserName="downloader", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
        key = iam.create_access_key(UserName="downloader")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        self.client().create_bucket(Bucket=self.bucket)

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

    def freeze(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def client(self, secret: str | None = None) -> Any:
        """A boto3 S3 client signed with the user's key (or with ``secret`` instead of its secret)."""
        config = BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 2})
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=self.key_id,
                            aws_secret_access_key=secret or self.secret, config=config)  # fmt: skip

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
