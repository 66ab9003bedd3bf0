import subprocess
import sys
import tomllib
import types

import pytest

import laion5b
import setting
from laion5b import config
from laion5b.keys import Keys
from tests.helpers import ROOT


def test_defaults_come_from_setting_py():
    loaded = config.load(setting, {})
    assert (loaded.redis_ip, loaded.redis_port, loaded.redis_db, loaded.redis_pass) == ("127.0.0.1", 6379, 0, "")
    assert loaded.addtask_threshold == 5_000_000
    assert loaded.stop_threshold == 5000
    assert loaded.thread_num == 32
    assert loaded.done_path == "./done_part.txt"
    assert loaded.store_error_dir == "./error_task/"
    assert loaded.addtask_batch == 10_000
    assert loaded.heartbeat_ttl == 30
    assert loaded.max_attempts == 3
    assert loaded.allowed_networks == []
    assert (loaded.engine, loaded.engine_loop) == ("threads", "asyncio")


def test_redis_key_names_are_pinned():
    keys = config.load(setting, {}).keys
    assert keys == Keys(
        task="laion5b_task",
        tongji_all="laion5b_tongji_all",
        error="laion5b_task_error",
        tongji_error="laion5b_tongji_error",
        tongji_succ="laion5b_tongji_succ",
        tongji_disk="tongji_worker_disk",
    )
    assert keys.lease("h-1") == "laion5b_task:lease:h-1"
    assert keys.heartbeat("h-1") == "laion5b_task:worker:h-1"
    assert keys.tongji_bytes == "laion5b_task:bytes"
    assert keys.tongji_total == "laion5b_task:total"
    assert keys.delayed == "laion5b_task:delayed"
    assert keys.disk_timestamp_field("h") == "h:ts"
    assert keys.failures == "laion5b_task:failures"
    assert keys.requeued_total == "laion5b_task:requeued"
    assert keys.control == "laion5b_task:control"
    assert keys.control_acks == "laion5b_task:control:acks"
    assert keys.history("h", "minute") == "laion5b_task:history:minute:h"
    assert keys.history("*", "hour") == "laion5b_task:history:hour:*"
    assert keys.history_lock(28000000) == "laion5b_task:history_lock:28000000"
    assert keys.history_hosts == "laion5b_task:history_hosts"


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("LAION_REDIS_IP", "10.1.2.3", "redis_ip", "10.1.2.3"),
        ("LAION_REDIS_PORT", "6380", "redis_port", 6380),
        ("LAION_THREAD_NUM", " 8 ", "thread_num", 8),
        ("LAION_STOP_THRESHOLD", "12.5", "stop_threshold", 12.5),
        ("LAION_FSYNC_IMAGES", "yes", "fsync_images", True),
        ("LAION_REDIS_TLS", "0", "redis_tls", False),
        ("LAION_ALLOWED_NETWORKS", "127.0.0.0/8, ::1/128", "allowed_networks", ["127.0.0.0/8", "::1/128"]),
        ("LAION_DISALLOWED_HEADER_DIRECTIVES", "noai", "disallowed_header_directives", ["noai"]),
        ("LAION_HONOUR_TDM_RESERVATION", "no", "honour_tdm_reservation", False),
        ("LAION_STORE_DIR", "/data/laion", "store_dir", "/data/laion"),
        ("LAION_ENGINE_LOOP", "asyncio", "engine_loop", "asyncio"),
        ("LAION_REDIS_SENTINELS", "10.0.0.1:26379, [::1]:26380", "redis_sentinels", ["10.0.0.1:26379", "[::1]:26380"]),
        ("LAION_REDIS_MIN_REPLICAS", "1", "redis_min_replicas", 1),
    ],
)
def test_environment_overrides(variable, value, field, expected):
    assert getattr(config.load(setting, {variable: value}), field) == expected


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LAION_THREAD_NUM", "many", "LAION_THREAD_NUM: 'many' is not an integer"),
        ("LAION_FSYNC_IMAGES", "perhaps", "LAION_FSYNC_IMAGES: 'perhaps' is not a boolean"),
        ("LAION_THREAD_NUM", "0", "thread_num (LAION_THREAD_NUM) must be at least 1"),
        ("LAION_REDIS_PORT", "70000", "redis_port (LAION_REDIS_PORT) must be between 1 and 65535"),
        ("LAION_DOWNLOAD_TIMEOUT", "-1", "download_timeout (LAION_DOWNLOAD_TIMEOUT) must be greater than 0"),
        (
            "LAION_ALLOWED_NETWORKS",
            "not-a-net",
            "allowed_networks (LAION_ALLOWED_NETWORKS): 'not-a-net' is not a network",
        ),
        ("LAION_MIN_SUCCESS_RATIO", "2", "min_success_ratio (LAION_MIN_SUCCESS_RATIO) must be between 0 and 1"),
        ("LAION_INPUT_FORMAT", "xml", "input_format (LAION_INPUT_FORMAT) must be one of auto, parquet, csv, tsv"),
        ("LAION_VERIFY_HASH", "sha1", "verify_hash (LAION_VERIFY_HASH) must be empty (off) or one of sha256, md5"),
        ("LAION_VERIFY_HASH", "sha256", "verify_hash (LAION_VERIFY_HASH) needs hash_col (LAION_HASH_COL)"),
        ("LAION_SAVE_COLUMNS", "score,key", "save_columns (LAION_SAVE_COLUMNS): 'key' would overwrite a metadata"),
        ("LAION_SAVE_COLUMNS", "score,score", "save_columns (LAION_SAVE_COLUMNS) names a column twice"),
        ("LAION_USER_AGENT_CONTACT", "ops@x.org\r\nX-Evil: 1", "user_agent_contact (LAION_USER_AGENT_CONTACT) must be"),
        ("LAION_USER_AGENT", "bot/1 ♥", "user_agent (LAION_USER_AGENT) must be printable ASCII on one line"),
        ("LAION_ENGINE_LOOP", "trio", "engine_loop (LAION_ENGINE_LOOP) must be one of uvloop, asyncio, got 'trio'"),
        ("LAION_ROBOTS_AGENTS", "", "robots_agents (LAION_ROBOTS_AGENTS) must name at least one token"),
        ("LAION_ROBOTS_AGENTS", "img2dataset,my bot", "robots_agents (LAION_ROBOTS_AGENTS): 'my bot' is not a token"),
        ("LAION_ROBOTS_TTL", "0", "robots_ttl (LAION_ROBOTS_TTL) must be at least 1"),
        ("LAION_MAX_CRAWL_DELAY", "-1", "max_crawl_delay (LAION_MAX_CRAWL_DELAY) must not be negative"),
        ("LAION_REDIS_SENTINELS", "10.0.0.1", "redis_sentinels (LAION_REDIS_SENTINELS): '10.0.0.1' is not host:port"),
        ("LAION_REDIS_SENTINELS", "s1:0", "redis_sentinels (LAION_REDIS_SENTINELS): 's1:0' is not host:port"),
        ("LAION_REDIS_MIN_REPLICAS", "-1", "redis_min_replicas (LAION_REDIS_MIN_REPLICAS) must not be negative"),
    ],
)
def test_bad_values_are_one_line_errors(variable, value, message):
    with pytest.raises(config.ConfigError) as error:
        config.load(setting, {variable: value})
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_user_agent_and_a_contact_it_does_not_hold_are_refused():
    both = {"LAION_USER_AGENT": "my-bot/1", "LAION_USER_AGENT_CONTACT": "https://example.org/bot"}
    with pytest.raises(config.ConfigError, match=r"user_agent_contact \(LAION_USER_AGENT_CONTACT\) is not sent"):
        config.load(setting, both)
    held = {**both, "LAION_USER_AGENT": "my-bot/1 (+https://example.org/bot)"}
    assert config.load(setting, held).user_agent == "my-bot/1 (+https://example.org/bot)"


def test_version_is_pyproject_version():
    assert laion5b.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_missing_setting_is_named():
    module = types.ModuleType("partial_setting")
    with pytest.raises(config.ConfigError, match="'redis_ip' is missing"):
        config.load(module, {})


def test_password_never_shown():
    loaded = config.load(setting, {"LAION_REDIS_PASS": "s3cret-pw"})
    assert loaded.redis_pass == "s3cret-pw"
    assert "s3cret-pw" not in repr(loaded)


def test_script_exits_with_the_bad_variable_named(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "add_task.py")],
        env={"LAION_THREAD_NUM": "lots", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: bad setting: LAION_THREAD_NUM: 'lots' is not an integer"]
