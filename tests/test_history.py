"""The history in a real Redis: bounded by construction, small enough for 100 hosts, written by monitor_disk.py,
surviving restarts, shown by speed.py --history."""

from __future__ import annotations

import itertools
import subprocess
import time

from laion5b import history
from laion5b.history import RUN, History, Sample
from laion5b.keys import Keys
from tests.helpers import run_script

KEYS = Keys()
MB = 1024 * 1024
T0 = 1_750_000_000 // 3600 * 3600


def big(at: int, host: bool = True) -> Sample:
    """A sample with the widest figures of a long run (billions of images, hundreds of TB)."""
    queued = None if host else 5_000_000
    return Sample(at, 2_345_678_901, 1_234_567_890, 987_654_321_098_765, queued, 1_234_567 if not host else None,
                  51_200, 12_345.6, 54_321.9, 100)  # fmt: skip


def fill(client, scope: str, days: int, minutes: int, host: bool = True) -> History:
    store = History(client, KEYS, days)
    pipe = client.pipeline(transaction=False)
    keys = [KEYS.history(scope, "minute"), KEYS.history(scope, "hour"), KEYS.history_hosts]
    for minute in range(minutes):
        sample = big(T0 + 60 * minute, host)
        store._append(keys=keys, args=[sample.encode(), sample.at, history.MINUTES_KEPT, days * 24, scope], client=pipe)
    pipe.execute()
    return store


def test_bounded_one_a_minute_then_one_an_hour(redis_server):
    client = redis_server.client()
    store = fill(client, "h1", days=1, minutes=3000)
    assert client.llen(KEYS.history("h1", "minute")) == history.MINUTES_KEPT == 2880
    assert client.llen(KEYS.history("h1", "hour")) == 24
    assert not store.append("h1", big(T0 + 60 * 2999 + 30)), "one sample a minute"
    assert store.append("h1", big(T0 + 60 * 3000))
    assert client.llen(KEYS.history("h1", "minute")) == 2880
    hours = [Sample.decode(text).at for text in client.lrange(KEYS.history("h1", "hour"), 0, -1)]
    assert all(later - earlier == 3600 for earlier, later in itertools.pairwise(hours))
    recent = store.read(["h1"], 3600, T0 + 60 * 3000)["h1"]
    assert len(recent) == 61 and recent[-1] == big(T0 + 60 * 3000)
    assert len(store.read(["h1"], 86400 * 3, T0 + 60 * 3000)["h1"]) == 2880, "no hour older than 48 h is kept"
    store = fill(client, "h2", days=3, minutes=4000)
    longer = store.read(["h2"], 86400 * 3, T0 + 60 * 3999)["h2"]
    first_minute = T0 + 60 * (4000 - 2880)
    assert [sample.at for sample in longer[:19]] == [T0 + 3600 * hour for hour in range(19)]
    assert longer[19].at == first_minute and len(longer) == 19 + 2880, "hours older than the minutes come first"


def test_100_hosts_fit_in_32_mb(redis_server):
    client = redis_server.client()
    fill(client, "h1", days=14, minutes=14 * 24 * 60)
    fill(client, RUN, days=14, minutes=14 * 24 * 60, host=False)
    assert client.llen(KEYS.history("h1", "hour")) == 336
    host = sum(client.memory_usage(KEYS.history("h1", kind), samples=0) for kind in ("minute", "hour"))
    run = sum(client.memory_usage(KEYS.history(RUN, kind), samples=0) for kind in ("minute", "hour"))
    total = 100 * host + run
    print(f"history of 100 hosts and the run: {total / MB:.1f} MB ({host / 1024:.0f} KB a host)")
    assert total <= 32 * MB


def test_monitor_writes_it_and_it_survives_restarts(redis_server, script_env):
    client = redis_server.client()
    for _ in range(2):  # a monitor restarted within the minute adds nothing; two monitors never double the run's
        result = subprocess.run([*run_script("monitor_disk.py"), "--once"], env=script_env, capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
    for scope in ("testhost", RUN):
        minutes = [Sample.decode(text).at // 60 for text in client.lrange(KEYS.history(scope, "minute"), 0, -1)]
        assert 1 <= len(minutes) <= 2 and len(set(minutes)) == len(minutes), scope
    before = {key: client.lrange(key, 0, -1) for key in client.keys(f"{KEYS.task}:history:*")}
    redis_server.restart()
    client = redis_server.client()
    assert {key: client.lrange(key, 0, -1) for key in client.keys(f"{KEYS.task}:history:*")} == before
    assert client.smembers(KEYS.history_hosts) == {"testhost"}


def test_speed_history_table(redis_server, script_env):
    client = redis_server.client()
    store = History(client, KEYS, 14)
    now = int(time.time())
    for minute in range(30, 0, -1):
        at = now - 60 * minute
        store.append(RUN, Sample(at, 600 * (30 - minute), 0, 0, 10, 0, 5, None, None, 2))
        store.append("dl-1", Sample(at, 60 * (30 - minute) ** 2, 0, 0, None, None, 5, 100.0, 900.0, 1))
    result = subprocess.run([*run_script("speed.py"), "--history", "--since", "1h"], env=script_env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    header, _rule, run, host = result.stdout.splitlines()
    assert header.split()[:2] == ["scope", "samples"] and "img/s over the last 1h" in header
    assert run.split()[:5] == ["run", "30", "10.0", "10.0", "10.0"]
    assert host.split()[:2] == ["dl-1", "30"] and "900 GB" in host
    bars = host.split("|")[1]
    assert len(bars) == 32 and bars.strip()[-1] == "█" and bars.strip()[0] == "▁", "a growing rate"
    assert subprocess.run([*run_script("speed.py"), "--history", "--since", "soon"], env=script_env,
                          capture_output=True, timeout=60).returncode == 2  # fmt: skip
