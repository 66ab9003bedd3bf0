"""The web stand-in of bench/openweb.py (bench/webserve.py): its host model and what each kind of host answers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.helpers import ROOT
from tests.redis_server import free_port

_SPEC = importlib.util.spec_from_file_location("webserve", ROOT / "bench" / "webserve.py")
assert _SPEC is not None and _SPEC.loader is not None
webserve = importlib.util.module_from_spec(_SPEC)
sys.modules["webserve"] = webserve  # dataclasses look their module up there
_SPEC.loader.exec_module(webserve)

# a sample shaped like LAION's: one CDN, a few medium hosts, 40 hosts seen once (100 URLs in all)
SAMPLE = [("cdn.example", 30, 30), *((f"m{i}.example", 6, 0) for i in range(5)), *((f"o{i}.example", 1, i % 2)
          for i in range(40))]  # fmt: skip


def test_web_keeps_the_sample_structure_at_twice_its_size() -> None:
    web = webserve.build_web(SAMPLE, 200, seed=7)
    stats = web.stats()
    assert stats["urls"] == 200 and len(web.url_hosts) == 200
    assert stats["top1"] == pytest.approx(0.30)
    assert stats["once"] == pytest.approx(0.40)  # once-seen hosts get fresh hosts, not a second URL
    assert stats["hosts"] == 1 + 5 + 80
    assert len({host.address for host in web.hosts}) == len(web.hosts)
    assert all(host.kind == "ok" for host in web.hosts[: webserve.ALWAYS_OK_TOP])
    assert webserve.build_web(SAMPLE, 200, seed=7) == web
    assert webserve.build_web(SAMPLE, 200, seed=8).url_hosts != web.url_hosts


@pytest.fixture
def web_server(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """bench/webserve.py with one host of each kind that answers at once (not ``slow``); yields kind -> base URL."""
    kinds = [("ok", False), ("ok", True), ("notfound", True), ("html", False), ("ratelimit", False),
             ("reset", False), ("never", True), ("refused", False)]  # fmt: skip
    addresses = [webserve._address(5000 + index) for index in range(len(kinds))]
    ca_file, certs, _ = webserve.ensure_tls(tmp_path / "tls", addresses)
    port = free_port()
    spec = {
        "seed": 1,
        "http_port": port,
        "https_port": port,
        "hosts": [
            [address, https, kind, str(certs[address])] for address, (kind, https) in zip(addresses, kinds, strict=True)
        ],
    }
    (tmp_path / "web.json").write_text(json.dumps(spec))
    spec_file = tmp_path / "web.json"
    command = [sys.executable, str(ROOT / "bench" / "webserve.py"), "--spec", str(spec_file), "--procs", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().startswith("ready listeners=7")
        urls = {
            f"{kind}-{'https' if https else 'http'}": f"{'https' if https else 'http'}://{address}:{port}"
            for address, (kind, https) in zip(addresses, kinds, strict=True)
        }
        yield urls, ca_file
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_each_kind_of_host_answers_as_stated(web_server: tuple[dict[str, str], Path]) -> None:
    urls, ca_file = web_server

    def get(name: str, path: str = "/img/3-12345.jpg") -> requests.Response:
        return requests.get(urls[name] + path, timeout=(2, 2), verify=str(ca_file))

    for name in ("ok-http", "ok-https"):
        response = get(name)
        assert response.status_code == 200 and len(response.content) == 12345
        assert response.content[:3] == b"\xff\xd8\xff"
    assert get("notfound-https").status_code == 404
    html = get("html-http")
    assert html.status_code == 200 and html.headers["Content-Type"].startswith("text/html")
    limited = get("ratelimit-http")
    assert limited.status_code == 429 and limited.headers["Retry-After"] == str(webserve.RETRY_AFTER)
    with pytest.raises(requests.ConnectionError, match="reset"):
        get("reset-http")
    with pytest.raises(requests.ConnectionError, match="refused"):
        get("refused-http")
    with pytest.raises(requests.exceptions.Timeout):
        requests.get(urls["never-https"] + "/img/1-100.jpg", timeout=(2, 0.5), verify=str(ca_file))


def test_waits_are_log_normal_around_the_median() -> None:
    waits = sorted(webserve.wait_seconds(1, "ok", f"/img/{i}-100.jpg".encode()) for i in range(2000))
    assert waits[1000] == pytest.approx(webserve.WAIT_MEDIAN, rel=0.1)
    assert waits[1900] > 2.5 * webserve.WAIT_MEDIAN  # a long tail
    slow = [webserve.wait_seconds(1, "slow", f"/img/{i}-100.jpg".encode()) for i in range(200)]
    assert min(slow) >= webserve.SLOW_RANGE[0] and max(slow) <= webserve.SLOW_RANGE[1]
