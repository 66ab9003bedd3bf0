"""Redis over TLS (redis_tls, redis_tls_ca) with a certificate authority the test makes itself."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.certs import make_certificates
from tests.helpers import run_script, write_wide
from tests.redis_server import REDIS_SERVER, free_port

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make certificates")


@pytest.fixture
def tls_redis(tmp_path: Path):
    ca, cert, key = make_certificates(tmp_path)
    port = free_port()
    server = subprocess.Popen(
        [REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
         "--tls-auth-clients", "no", "--requirepass", "tls-secret", "--save", ""],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(
        host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(ca), password="tls-secret", decode_responses=True
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield port, ca, client
    server.terminate()
    server.wait(timeout=10)


def test_add_task_over_tls_with_auth(tls_redis, script_env, tmp_path):
    port, ca, client = tls_redis
    write_wide(Path(script_env["LAION_PARQUET_DIR"]) / "s" / "a.parquet", ["http://h/1.jpg", "http://h/2.jpg"])
    env = {**script_env, "LAION_REDIS_PORT": str(port), "LAION_REDIS_TLS": "yes", "LAION_REDIS_TLS_CA": str(ca),
           "LAION_REDIS_PASS": "tls-secret"}  # fmt: skip
    result = subprocess.run(run_script("add_task.py"), env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert client.llen("laion5b_task") == 2
    assert "tls-secret" not in result.stderr


def test_a_server_not_signed_by_the_ca_is_refused(tls_redis, script_env):
    port, _, _ = tls_redis
    env = {**script_env, "LAION_REDIS_PORT": str(port), "LAION_REDIS_TLS": "yes", "LAION_REDIS_PASS": "tls-secret"}
    result = subprocess.run([*run_script("speed.py"), "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "certificate verify failed" in result.stderr and len(result.stderr.strip().splitlines()) == 1
