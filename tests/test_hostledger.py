"""The fleet's ledger of web host slots (laion5b/hostledger.py) against a real Redis: several ledgers stand for
several workers of one fleet."""

from __future__ import annotations

from laion5b.hostledger import HostLedger, HostReport, read_throttled
from laion5b.keys import Keys

KEYS = Keys()


def ledger(client, worker: str, start: int = 4, limit: int = 8) -> HostLedger:
    return HostLedger(client, KEYS, worker, start, limit, 3)


def commands(client) -> int:
    stats = client.info("commandstats")
    return sum(value["calls"] for name, value in stats.items() if name not in ("cmdstat_info",))


def test_grants_stop_at_the_hosts_limit_and_a_greedy_worker_keeps_only_its_share(redis_server):
    client = redis_server.client()
    one, two = ledger(client, "w1"), ledger(client, "w2")
    assert one.sync([HostReport("h.test", want=10)])[0].granted == 4  # its start limit, whoever asks
    assert two.sync([HostReport("h.test", want=3)])[0].granted == 0
    asked_again = one.sync([HostReport("h.test", held=4, want=6, known=4)])[0]
    assert (asked_again.granted, asked_again.keep) == (0, 2)  # another worker waits: keep half, ask no more
    one.sync([HostReport("h.test", held=2, want=6, known=4)])
    assert two.sync([HostReport("h.test", want=3)])[0].granted == 2
    assert one.sync([HostReport("h.test", held=2, want=6, known=2)])[0].granted == 0


def test_a_host_that_holds_nothing_at_its_start_state_leaves_nothing_behind(redis_server):
    client = redis_server.client()
    one, two = ledger(client, "w1"), ledger(client, "w2")
    one.sync([HostReport(f"h{n}.test", want=1) for n in range(50)])
    two.sync([HostReport("h0.test", want=1), HostReport("other.test", want=2)])
    assert client.hlen(KEYS.web_hosts) == 51
    one.sync([HostReport(f"h{n}.test", known=1) for n in range(50)])
    two.sync([HostReport("h0.test", known=1), HostReport("other.test", known=2)])
    assert not client.exists(KEYS.web_hosts, KEYS.web_holds("w1"), KEYS.web_holds("w2"), KEYS.web_expiry)


def test_one_sync_costs_the_same_few_commands_for_one_host_or_five_hundred(redis_server):
    client = redis_server.client()
    one = ledger(client, "w1")
    one.sync([HostReport("warm.test", want=1)])
    before = commands(client)
    one.sync([HostReport("h.test", want=1)])
    single = commands(client) - before
    before = commands(client)
    one.sync([HostReport(f"h{n}.test", want=1) for n in range(500)])
    many = commands(client) - before
    before = commands(client)
    one.sync([HostReport(f"h{n}.test", known=1) for n in range(500)])
    released = commands(client) - before
    assert single <= 6 and many <= 6 and released <= 6, (single, many, released)


def test_a_429_halves_the_limit_and_its_retry_after_pauses_the_host_for_every_worker(redis_server):
    client = redis_server.client()
    one, two = ledger(client, "w1"), ledger(client, "w2")
    one.sync([HostReport("h.test", want=4)])
    answer = one.sync([HostReport("h.test", held=4, known=4, throttles=1, retry_after=2.0)])[0]
    assert answer.limit == 2 and 1.5 < answer.pause <= 2.0
    assert answer.keep == 2  # holds 4 of a limit now 2: gives two back as downloads end
    paused = two.sync([HostReport("h.test", want=1)])[0]
    assert paused.granted == 0 and paused.limit == 2 and paused.pause > 1.5
    [throttled] = read_throttled(client, KEYS)
    assert (throttled.host, throttled.throttles, throttled.limit, throttled.held) == ("h.test", 1, 2, 4)
    assert throttled.paused > 1.5


def test_good_answers_raise_the_limit_by_one_per_rounds_and_timeouts_in_a_burst_cut_it(redis_server):
    client = redis_server.client()
    one = ledger(client, "w1", start=4, limit=5)
    assert one.sync([HostReport("h.test", want=9, good=7)])[0].limit == 4
    assert one.sync([HostReport("h.test", held=4, known=4, want=5, good=1)])[0].limit == 5  # 2 rounds of 4 good answers
    assert one.sync([HostReport("h.test", held=4, known=4, want=5, good=100)])[0].limit == 5  # never past max_per_host
    assert one.sync([HostReport("h.test", held=4, known=4, timeouts=2)])[0].limit == 5
    assert one.sync([HostReport("h.test", held=4, known=4, timeouts=1)])[0].limit == 2


def test_a_ledger_whose_last_reply_may_be_lost_counts_from_the_workers_holds(redis_server):
    client = redis_server.client()
    assert ledger(client, "w1").sync([HostReport("h.test", want=3)])[0].granted == 3
    again = ledger(client, "w1")  # its first call (like a call sent again after an error) does not trust ``known``
    assert again.sync([HostReport("h.test", held=1, known=0)])[0].limit == 4
    assert client.hget(KEYS.web_hosts, "h.test").startswith("1|1|")
    assert again.sync([HostReport("h.test", held=0, known=1)])[0].granted == 0
    assert not client.exists(KEYS.web_hosts, KEYS.web_holds("w1"))


def test_a_dead_workers_slots_are_dropped_and_a_live_ones_kept(redis_server):
    client = redis_server.client()
    dead, live = ledger(client, "dead"), ledger(client, "live")
    dead.sync([HostReport("h.test", want=3), HostReport("solo.test", want=1)])
    live.sync([HostReport("h.test", want=1)])
    client.set(KEYS.heartbeat("live"), "token", ex=30)  # "dead" has no heartbeat
    assert live.reap() == (4, 0)
    assert live.reap() == (-1, -1)  # one reaper per turn for the whole fleet
    assert client.hkeys(KEYS.web_hosts) == ["h.test"]
    assert client.hget(KEYS.web_hosts, "h.test").startswith("1|1|")  # the live worker's one slot
    assert client.smembers(KEYS.web_holders) == {"live"}


def test_a_throttled_state_is_forgotten_once_it_expires(redis_server):
    client = redis_server.client()
    one = ledger(client, "w1")
    one.sync([HostReport("h.test", throttles=1)])
    assert client.hexists(KEYS.web_hosts, "h.test") and read_throttled(client, KEYS)
    client.zadd(KEYS.web_expiry, {"h.test": 0})  # as if STATE_SECONDS had passed
    assert one.reap() == (0, 1)
    assert not client.exists(KEYS.web_hosts, KEYS.web_expiry, KEYS.web_throttled)
