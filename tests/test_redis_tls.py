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


def test_sentinels_are_asked_over_tls_too(tls_redis, script_env, tmp_path):
    """With redis_sentinels and redis_tls, the sentinel (TLS only) and the master it names are both reached over
    TLS with the password, the certificates checked against redis_tls_ca."""
    port, ca, client = tls_redis
    sentinel_port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port 0\ntls-port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\ntls-cert-file {tmp_path / 'server.crt'}\n"
        f"tls-key-file {tmp_path / 'server.key'}\ntls-ca-cert-file {ca}\ntls-auth-clients no\ntls-replication yes\n"
        f"requirepass tls-secret\nsentinel monitor laion5b 127.0.0.1 {port} 1\n"
        "sentinel auth-pass laion5b tls-secret\n"
    )
    sentinel = subprocess.Popen([REDIS_SERVER, str(config), "--sentinel"], stdout=subprocess.DEVNULL)
    try:
        asked = redis.Redis(host="127.0.0.1", port=sentinel_port, ssl=True, ssl_ca_certs=str(ca), password="tls-secret")
        deadline = time.monotonic() + 10
        while True:
            try:
                if asked.sentinel_master("laion5b")["port"] == port:
                    break
            except redis.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the sentinel did not come up"
            time.sleep(0.05)
        env = {**script_env, "LAION_REDIS_SENTINELS": f"127.0.0.1:{sentinel_port}", "LAION_REDIS_PORT": "1",
               "LAION_REDIS_TLS": "yes", "LAION_REDIS_TLS_CA": str(ca), "LAION_REDIS_PASS": "tls-secret"}  # fmt: skip
        result = subprocess.run([*run_script("monitor_disk.py"), "--once"], env=env, capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        assert client.hget("tongji_worker_disk", "testhost") is not None
    finally:
        sentinel.terminate()
        sentinel.wait(timeout=10)
