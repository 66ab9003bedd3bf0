"""Run the whole suite on this machine until every task is accounted for: python3 -m tools.run_local [--demo]

Starts a private redis-server when the configured one is local and not running, then add_task.py,
monitor_disk.py, save_error_task.py and N downloader.py workers, shows speed.py, stops everything it started
(by PID) once the queue is drained, and prints a final summary. Ctrl-C stops everything; running again resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

import setting
from laion5b import cli, inputs, redisconn
from laion5b.config import Config
from tools.demo import make_sample
from tools.image_server import ImageServer

ROOT = Path(__file__).resolve().parent.parent
LOCAL_ADDRESSES = ("127.0.0.1", "localhost", "::1")
REDIS_START_TIMEOUT = 20.0


class Interrupted(Exception):
    """Ctrl-C or SIGTERM reached the run."""


def main() -> int:
    args = parse_args()
    config = cli.load_settings(setting)
    env = dict(os.environ)
    demo_server = None
    if args.demo or not has_parquet_files(Path(config.parquet_dir)):
        env.update(demo_environment(args.demo_dir.resolve(), config))
        make_sample(args.demo_dir / "parquet" / "demo" / "sample.parquet", args.demo_rows, config.demo_port)
        demo_server = ImageServer(port=config.demo_port)
        demo_server.start()
        print(f"demo: {args.demo_rows} sample rows served from http://127.0.0.1:{config.demo_port}/", flush=True)
    config = cli.load_settings(setting, env)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    run = LocalRun(config, env, args.workers, args.redis_dir.resolve())
    try:
        return run.execute()
    except Interrupted:
        print("\ninterrupted: stopping; run the same command again to resume", file=sys.stderr, flush=True)
        return 130
    finally:
        run.stop_all()
        if demo_server is not None:
            demo_server.stop()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="download a generated local sample")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="downloader processes")
    parser.add_argument("--demo-rows", type=int, default=3000, help="rows of the generated sample")
    parser.add_argument("--demo-dir", type=Path, default=ROOT / "demo", help="folder of everything the demo writes")
    parser.add_argument("--redis-dir", type=Path, default=ROOT / "redis-data", help="data of a private redis-server")
    return parser.parse_args()


def has_parquet_files(folder: Path) -> bool:
    return folder.is_dir() and bool(inputs.find_files(folder))


def demo_environment(folder: Path, config: Config) -> dict[str, str]:
    """Settings that keep everything the demo writes under ``folder`` and let it reach the local server."""
    return {
        "LAION_PARQUET_DIR": str(folder / "parquet"),
        "LAION_STORE_DIR": str(folder / "images"),
        "LAION_DONE_PATH": str(folder / "done_part.txt"),
        "LAION_STORE_ERROR_DIR": str(folder / "error_task"),
        "LAION_LOG_DIR": str(folder / "logs"),
        "LAION_MONITOR_DISK": str(folder),
        "LAION_ALLOWED_NETWORKS": ",".join([*config.allowed_networks, "127.0.0.1/32"]),
        "LAION_DOWNLOAD_TIMEOUT": "3",
        "LAION_MAX_PER_HOST": "0",
        "LAION_READ_TIMEOUT": "2",
        "LAION_RETRY_BACKOFF": "0.2",
        "LAION_MIN_FREE_GB": str(min(config.min_free_gb, 1.0)),
    }


def _shown(folder: str) -> str:
    """``folder`` relative to the project when it lies inside it (as the demo's do), else absolute."""
    path = Path(folder).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted


class LocalRun:
    """The processes of one local run, started and stopped by PID."""

    def __init__(self, config: Config, env: dict[str, str], workers: int, redis_dir: Path) -> None:
        self.config = config
        self.env = env
        self.workers = workers
        self.redis_dir = redis_dir
        self.redis_process: subprocess.Popen | None = None
        self.services: list[subprocess.Popen] = []
        self.downloaders: list[subprocess.Popen] = []

    def execute(self) -> int:
        client = self.ensure_redis()
        before = _snapshot(self.env)
        started = time.monotonic()
        producer = self.start("add_task.py")
        self.services.append(producer)
        self.wait_for_producer(client, producer)
        self.services.append(self.start("monitor_disk.py"))
        self.services.append(self.start("save_error_task.py"))
        self.downloaders = [self.start("downloader.py", f"local-{i}", "--until-empty") for i in range(self.workers)]
        self.services.append(self.start("speed.py", "--interval", "2", quiet=False))
        codes = [process.wait() for process in self.downloaders]
        producer_code = producer.wait()
        elapsed = time.monotonic() - started
        self.stop_services()
        subprocess.run(self.command("save_error_task.py", "--until-empty"), env=self.env, check=False)
        after = _snapshot(self.env)
        print_summary(self.config, before, after, elapsed, self.env)
        balanced = after["succeeded"] + after["failed"] == after["added"] and after["queued"] == after["delayed"] == 0
        return 0 if balanced and producer_code == 0 and not any(codes) else 1

    def ensure_redis(self) -> redis.Redis:
        """A reachable Redis: the configured one, or a private redis-server started here when it is local."""
        client = redisconn.connect(self.config)
        try:
            client.ping()
            return client
        except redis.AuthenticationError:
            sys.exit(f"error: redis at {redisconn.describe(self.config)} refused the password")
        except redis.ConnectionError:
            if self.config.redis_ip not in LOCAL_ADDRESSES:
                sys.exit(f"error: redis at {redisconn.describe(self.config)} is unreachable")
        server = shutil.which("redis-server")
        if server is None:
            sys.exit("error: redis-server is missing: run 'sudo apt-get install -y redis-server'")
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        command = [
            server,
            "--bind", "127.0.0.1",
            "--port", str(self.config.redis_port),
            "--dir", str(self.redis_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            "--save", "",
            "--logfile", str(self.redis_dir / "redis.log"),
        ]  # fmt: skip
        if self.config.redis_pass:
            command += ["--requirepass", self.config.redis_pass]
        self.redis_process = subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                client.ping()
                print(f"started redis-server (pid {self.redis_process.pid}) with data in {self.redis_dir}", flush=True)
                return client
            except (redis.ConnectionError, redis.ResponseError):
                time.sleep(0.1)
        sys.exit(f"error: redis-server did not start; see {self.redis_dir / 'redis.log'}")

    def wait_for_producer(self, client: redis.Redis, producer: subprocess.Popen) -> None:
        """Wait until add_task.py has announced itself (or finished), so workers do not see an empty queue first."""
        while producer.poll() is None and not client.exists(self.config.keys.producer):
            time.sleep(0.05)

    def command(self, script: str, *args: str) -> list[str]:
        return [sys.executable, str(ROOT / script), *args]

    def start(self, script: str, *args: str, quiet: bool = True) -> subprocess.Popen:
        """Start one script in its own session, so Ctrl-C reaches it only through this run."""
        return subprocess.Popen(
            self.command(script, *args),
            env=self.env,
            stdout=subprocess.DEVNULL if quiet else None,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop_services(self) -> None:
        _terminate(self.services)
        self.services = []

    def stop_all(self) -> None:
        """Stop every process this run started, workers first (they return what they hold), Redis last."""
        _terminate(self.downloaders)
        self.stop_services()
        if self.redis_process is not None:
            _terminate([self.redis_process])
            self.redis_process = None


def _terminate(processes: list[subprocess.Popen], grace: float = 45.0) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _snapshot(env: dict[str, str]) -> dict:
    result = subprocess.run(
        [sys.executable, str(ROOT / "speed.py"), "--json"], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


def print_summary(config: Config, before: dict, after: dict, elapsed: float, env: dict[str, str]) -> None:
    """The final accounting of this run, and where its results are."""
    done = after["succeeded"] + after["failed"] - before["succeeded"] - before["failed"]
    stored_mb = (after["bytes"] - before["bytes"]) / 1024**2
    print("\n=== laion5b-downloader: finished ===")
    print(f"added        {after['added']:>10,}")
    print(f"succeeded    {after['succeeded']:>10,}   images in {_shown(config.store_dir)}")
    print(f"failed       {after['failed']:>10,}   records in {_shown(config.store_error_dir)}")
    print(f"queued       {after['queued']:>10,}")
    print(f"delayed      {after['delayed']:>10,}   waiting to be tried again")
    print(f"this run     {done:>10,} tasks in {elapsed:.1f} s: {done / elapsed:,.0f} images/s, "
          f"{stored_mb / elapsed:.1f} MB/s")  # fmt: skip
    print("\nfailed by reason:")
    sys.stdout.flush()
    subprocess.run([sys.executable, str(ROOT / "save_error_task.py"), "--summary"], env=env, check=False)


if __name__ == "__main__":
    sys.exit(main())
