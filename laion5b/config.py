"""Typed settings: the values of setting.py, each overridable by a ``LAION_<NAME>`` environment variable."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from laion5b.keys import Keys
from laion5b.objectstore import Location, is_remote
from laion5b.tasks import HASH_DIGITS, METADATA_FIELDS

ENV_PREFIX = "LAION_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
ENGINES = ("threads", "async")
ENGINE_LOOPS = ("uvloop", "asyncio")
OUTPUT_FORMATS = ("files", "webdataset")
S3_ADDRESSING = ("path", "virtual")
S3_PART_MB = (5, 5120)  # the smallest and largest part S3 takes
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
ENCODE_FORMATS = ("jpg", "png", "webp")
INPUT_FORMATS = ("auto", "parquet", "csv", "tsv", "jsonl", "txt")
_ROBOTS_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
QUALITY_RANGES = {"jpg": (0, 100), "png": (0, 9), "webp": (0, 100)}  # png: zlib compression level, as img2dataset


class ConfigError(ValueError):
    """A setting is missing or has a value that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Config:
    """Every setting of the suite; defaults live in setting.py only."""

    redis_ip: str
    redis_port: int
    redis_db: int
    redis_pass: str = field(repr=False)
    redis_tls: bool
    redis_tls_ca: str
    redis_sentinels: list[str]
    redis_master_name: str
    redis_min_replicas: int
    parquet_dir: str
    addtask_threshold: int
    addtask_batch: int
    done_path: str
    input_format: str
    url_col: str
    caption_col: str
    id_col: str
    hash_col: str
    verify_hash: str
    input_columns: list[str]
    save_columns: list[str]
    status_dir: str
    store_dir: str
    staging_dir: str
    s3_endpoint_url: str
    s3_region: str
    s3_addressing: str
    s3_part_mb: int
    engine: str
    engine_loop: str
    thread_num: int
    concurrency: int
    max_inflight_bytes: int
    max_per_host: int
    host_start_concurrency: int
    max_per_ip: int
    host_id: str
    heartbeat_ttl: int
    max_attempts: int
    retry_backoff: float
    max_retry_after: float
    connect_timeout: float
    read_timeout: float
    download_timeout: float
    max_image_bytes: int
    max_redirects: int
    user_agent: str
    user_agent_contact: str
    disallowed_header_directives: list[str]
    honour_tdm_reservation: bool
    robots: bool
    robots_agents: list[str]
    robots_ttl: int
    max_crawl_delay: float
    dns_cache_ttl: float
    dns_timeout: float
    tls_ca_file: str
    allowed_networks: list[str]
    fsync_images: bool
    save_caption: bool
    save_metadata: bool
    output_format: str
    shard_size: int
    shard_max_seconds: float
    webdataset_keep_format: bool
    log_dir: str
    resize_mode: str
    image_size: int
    resize_only_if_bigger: bool
    encode_format: str
    encode_quality: int
    skip_reencode: bool
    min_image_size: int
    max_aspect_ratio: float
    max_image_area: int
    monitor_disk: str
    monitor_interval: int
    stop_threshold: float
    min_free_gb: float
    store_stall_seconds: float
    store_error_dir: str
    min_success_ratio: float
    history_days: int
    dashboard_token: str = field(repr=False)
    demo_port: int
    keys: Keys = field(default_factory=Keys)

    def __post_init__(self) -> None:
        _validate(self)


_AT_LEAST_ONE = (
    "addtask_threshold",
    "addtask_batch",
    "thread_num",
    "concurrency",
    "heartbeat_ttl",
    "max_attempts",
    "max_image_bytes",
    "monitor_interval",
    "image_size",
    "history_days",
    "shard_size",
    "robots_ttl",
    "host_start_concurrency",
)
_POSITIVE = (
    "connect_timeout",
    "read_timeout",
    "download_timeout",
    "dns_timeout",
    "shard_max_seconds",
    "store_stall_seconds",
)
_NOT_NEGATIVE = (
    "redis_db",
    "redis_min_replicas",
    "max_redirects",
    "max_per_host",
    "max_per_ip",
    "retry_backoff",
    "max_retry_after",
    "dns_cache_ttl",
    "stop_threshold",
    "min_free_gb",
    "min_success_ratio",
    "min_image_size",
    "max_aspect_ratio",
    "max_image_area",
    "max_crawl_delay",
)


def _validate(config: Config) -> None:
    for name in _AT_LEAST_ONE:
        if getattr(config, name) < 1:
            raise ConfigError(f"{_named(name)} must be at least 1, got {getattr(config, name)!r}")
    for name in _POSITIVE:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{_named(name)} must be greater than 0, got {getattr(config, name)!r}")
    for name in _NOT_NEGATIVE:
        if getattr(config, name) < 0:
            raise ConfigError(f"{_named(name)} must not be negative, got {getattr(config, name)!r}")
    for name in ("redis_port", "demo_port"):
        if not 0 < getattr(config, name) < 65536:
            raise ConfigError(f"{_named(name)} must be between 1 and 65535, got {getattr(config, name)!r}")
    if config.min_success_ratio > 1:
        raise ConfigError(f"{_named('min_success_ratio')} must be between 0 and 1, got {config.min_success_ratio!r}")
    for network in config.allowed_networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(
                f"{_named('allowed_networks')}: {network!r} is not a network such as 127.0.0.0/8"
            ) from None
    for name in ("retry_backoff", "max_retry_after", "dns_cache_ttl", "dns_timeout", "max_crawl_delay"):
        if not math.isfinite(getattr(config, name)):
            raise ConfigError(f"{_named(name)} must be a finite number, got {getattr(config, name)!r}")
    if config.engine not in ENGINES:
        raise ConfigError(f"{_named('engine')} must be one of {', '.join(ENGINES)}, got {config.engine!r}")
    if config.engine_loop not in ENGINE_LOOPS:
        raise ConfigError(
            f"{_named('engine_loop')} must be one of {', '.join(ENGINE_LOOPS)}, got {config.engine_loop!r}"
        )
    if config.output_format not in OUTPUT_FORMATS:
        raise ConfigError(
            f"{_named('output_format')} must be one of {', '.join(OUTPUT_FORMATS)}, got {config.output_format!r}"
        )
    _validate_processing(config)
    _validate_inputs(config)
    _validate_object_store(config)
    if config.max_inflight_bytes < config.max_image_bytes:
        raise ConfigError(
            f"{_named('max_inflight_bytes')} must be at least max_image_bytes ({config.max_image_bytes}), "
            f"got {config.max_inflight_bytes!r}"
        )
    if config.tls_ca_file and not os.path.isfile(config.tls_ca_file):
        raise ConfigError(f"{_named('tls_ca_file')}: {config.tls_ca_file!r} is not a file")
    for name in ("redis_ip", "store_dir"):
        if not getattr(config, name):
            raise ConfigError(f"{_named(name)} must not be empty")
    _validate_user_agent(config)
    _validate_robots(config)
    _validate_sentinels(config)


def _validate_sentinels(config: Config) -> None:
    for address in config.redis_sentinels:
        if sentinel_address(address) is None:
            raise ConfigError(f"{_named('redis_sentinels')}: {address!r} is not host:port (port 1-65535)")
    if config.redis_sentinels and not config.redis_master_name:
        raise ConfigError(f"{_named('redis_master_name')} must not be empty when redis_sentinels is set")


def sentinel_address(address: str) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port`` for an IPv6 address) as (host, port), or None when it is not one."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def _validate_object_store(config: Config) -> None:
    if config.s3_addressing not in S3_ADDRESSING:
        raise ConfigError(
            f"{_named('s3_addressing')} must be one of {', '.join(S3_ADDRESSING)}, got {config.s3_addressing!r}"
        )
    low, high = S3_PART_MB
    if not low <= config.s3_part_mb <= high:
        raise ConfigError(f"{_named('s3_part_mb')} must be {low}-{high}, got {config.s3_part_mb!r}")
    for name in ("store_dir", "parquet_dir"):
        try:
            if is_remote(getattr(config, name)):
                Location.parse(getattr(config, name))
        except ValueError as error:
            raise ConfigError(f"{_named(name)}: {error}; use s3://bucket/prefix") from None
    if not is_remote(config.store_dir):
        return
    if not config.staging_dir or is_remote(config.staging_dir):
        raise ConfigError(
            f"{_named('staging_dir')} must be a local folder with an s3:// store_dir, got {config.staging_dir!r}"
        )


def _validate_user_agent(config: Config) -> None:
    for name in ("user_agent", "user_agent_contact"):
        value = getattr(config, name)
        if not (value.isascii() and value.isprintable()) or value != value.strip():
            raise ConfigError(f"{_named(name)} must be printable ASCII on one line, got {value!r}")
    if config.user_agent and config.user_agent_contact and config.user_agent_contact not in config.user_agent:
        raise ConfigError(
            f"{_named('user_agent_contact')} is not sent while {_named('user_agent')} is set: "
            "empty user_agent, or put the contact in it"
        )


def _validate_robots(config: Config) -> None:
    if config.robots and not config.robots_agents:
        raise ConfigError(f"{_named('robots_agents')} must name at least one token while robots is on")
    for token in config.robots_agents:
        if not _ROBOTS_TOKEN.fullmatch(token):
            raise ConfigError(f"{_named('robots_agents')}: {token!r} is not a token (letters, digits, _ and -)")


def _validate_processing(config: Config) -> None:
    if config.resize_mode not in RESIZE_MODES:
        raise ConfigError(
            f"{_named('resize_mode')} must be one of {', '.join(RESIZE_MODES)}, got {config.resize_mode!r}"
        )
    if config.encode_format not in ENCODE_FORMATS:
        raise ConfigError(
            f"{_named('encode_format')} must be one of {', '.join(ENCODE_FORMATS)}, got {config.encode_format!r}"
        )
    low, high = QUALITY_RANGES[config.encode_format]
    if not low <= config.encode_quality <= high:
        raise ConfigError(
            f"{_named('encode_quality')} must be {low}-{high} for encode_format {config.encode_format}, "
            f"got {config.encode_quality!r}"
        )
    if 0 < config.max_aspect_ratio < 1:
        raise ConfigError(
            f"{_named('max_aspect_ratio')} must be 0 (off) or at least 1, got {config.max_aspect_ratio!r}"
        )


def _validate_inputs(config: Config) -> None:
    if config.input_format not in INPUT_FORMATS:
        raise ConfigError(
            f"{_named('input_format')} must be one of {', '.join(INPUT_FORMATS)}, got {config.input_format!r}"
        )
    if config.verify_hash and config.verify_hash not in HASH_DIGITS:
        raise ConfigError(
            f"{_named('verify_hash')} must be empty (off) or one of {', '.join(HASH_DIGITS)}, "
            f"got {config.verify_hash!r}"
        )
    if config.verify_hash and not config.hash_col:
        raise ConfigError(f"{_named('verify_hash')} needs {_named('hash_col')}: the column that holds each row's hash")
    clashes = [name for name in config.save_columns if name in METADATA_FIELDS]
    if clashes:
        raise ConfigError(
            f"{_named('save_columns')}: {', '.join(map(repr, clashes))} would overwrite a metadata field of the same "
            f"name ({', '.join(sorted(METADATA_FIELDS))})"
        )
    if len(set(config.save_columns)) != len(config.save_columns):
        raise ConfigError(f"{_named('save_columns')} names a column twice: {config.save_columns!r}")


def env_variable(setting: str) -> str:
    """The environment variable that overrides ``setting``: LAION_ + its name upper-cased."""
    return ENV_PREFIX + setting.upper()


def setting_types() -> dict[str, Any]:
    """Each setting read from setting.py (every field of Config but ``keys``) and the type it is converted to."""
    hints = get_type_hints(Config)
    return {item.name: hints[item.name] for item in dataclasses.fields(Config) if item.name != "keys"}


def _named(setting: str) -> str:
    """A setting's name with the variable that overrides it, for messages."""
    return f"{setting} ({env_variable(setting)})"


def load(module: types.ModuleType, environ: Mapping[str, str] | None = None) -> Config:
    """Read every setting from ``module`` (setting.py), apply ``LAION_*`` overrides, convert and validate."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, kind in setting_types().items():
        variable = env_variable(name)
        if variable in environ:
            values[name] = convert_setting(variable, environ[variable], kind)
        elif hasattr(module, name):
            values[name] = convert_setting(name, getattr(module, name), kind)
        else:
            raise ConfigError(f"setting {name!r} is missing from {module.__name__} and {variable} is not set")
    values["host_id"] = values["host_id"] or socket.gethostname()
    if hasattr(module, "RedisKey"):
        values["keys"] = Keys.from_redis_key(module.RedisKey)
    return Config(**values)


def convert_setting(source: str, value: Any, kind: Any) -> Any:
    """Convert ``value`` (a string from the environment, or a Python value) to ``kind``."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ConfigError(f"{source}: {value!r} is not a boolean (use 1/0/true/false/yes/no)")
    if kind == list[str]:
        items = value.split(",") if isinstance(value, str) else list(value)
        return [str(item).strip() for item in items if str(item).strip()]
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{source}: {value!r} is not a number")
        try:
            return kind(str(value).strip().replace("_", "")) if isinstance(value, str) else kind(value)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise ConfigError(f"{source}: {value!r} is not {noun}") from None
    return str(value)
