"""Several "machines" on one box: network namespaces joined by a bridge, for tests of a multi-host deployment.

Every namespace of one ``Network`` is named ``l5b<pid>-<role>``, so parallel and leftover runs never clash. The
bridge lives in a hub namespace of its own and each host namespace has one veth (``eth0``) plugged into it, so
nothing is added to the root namespace: the hosts have no route but their subnet and can reach nothing else.
Processes run through ``ip netns exec`` (which execs the command, so the PID is the real process) in a session of
their own; ``close`` stops them by process group, kills whatever is left in the namespaces by PID and deletes the
namespaces, which takes their veths and the bridge with them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

IP = shutil.which("ip") or ""


class NetnsUnavailable(Exception):
    """Network namespaces cannot be made here (not root, no iproute2, or the kernel or container refuses)."""


@dataclass(frozen=True)
class Host:
    """One namespace playing one machine."""

    role: str
    netns: str
    address: str


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when the obvious requirements are met."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if not IP:
        return "iproute2's ip command is not installed"
    return None


class Network:
    """A /24 with a bridge in a hub namespace and one namespace per host; ``close`` removes everything."""

    def __init__(self, subnet: str, logs: Path, tag: str = "") -> None:
        self.subnet = ipaddress.ip_network(subnet)
        self.logs = logs
        self.prefix = f"l5b{os.getpid()}{tag}"
        self.hub = f"{self.prefix}-hub"
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen] = []

    # --- building ---

    def create(self) -> None:
        """Create the hub namespace and its bridge; raise NetnsUnavailable when the system refuses."""
        reason = unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        self._add_namespace(self.hub)
        self._setup("bridge", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        self._setup("bridge", "-n", self.hub, "link", "set", "br0", "up")

    def add_host(self, role: str, address: str) -> Host:
        """A namespace ``<prefix>-<role>`` with ``lo`` up and ``eth0`` at ``address`` on the bridge."""
        if ipaddress.ip_address(address) not in self.subnet:
            raise ValueError(f"{address} is outside {self.subnet}")
        netns = f"{self.prefix}-{role}"
        port = f"v{len(self.hosts)}"
        self._add_namespace(netns)
        self._setup("veth", "-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns)
        self._setup("veth", "-n", self.hub, "link", "set", port, "master", "br0", "up")
        self._setup("address", "-n", netns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        self._setup("link", "-n", netns, "link", "set", "eth0", "up")
        self._setup("link", "-n", netns, "link", "set", "lo", "up")
        host = Host(role, netns, address)
        self.hosts[role] = host
        return host

    def routes(self, host: Host) -> list[str]:
        """The IPv4 routes of a host, one line each."""
        result = subprocess.run([IP, "-4", "-n", host.netns, "route", "show"], capture_output=True, text=True)
        return result.stdout.strip().splitlines()

    def _add_namespace(self, netns: str) -> None:
        self._setup("namespace", "netns", "add", netns)
        self.namespaces.append(netns)
        self._setup("exec", "netns", "exec", netns, "true")

    def _setup(self, what: str, *args: str) -> None:
        result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            message = " ".join(result.stderr.split()) or f"exit code {result.returncode}"
            raise NetnsUnavailable(f"{what}: `ip {' '.join(args)}` failed: {message}")

    # --- processes ---

    def popen(self, host: Host, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        """Start ``argv`` in ``host``'s namespace, output to ``logs/<role>-<name>.log``; stopped by ``close``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.log_path(host, name), "wb") as log:
            process = subprocess.Popen(
                [IP, "netns", "exec", host.netns, *argv],
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def run(
        self, host: Host, argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` in ``host``'s namespace to its end and capture its output (killed after ``timeout``).

        The output is also appended to ``logs/<role>-run.log``."""
        process = subprocess.Popen(
            [IP, "netns", "exec", host.netns, *argv],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.processes.append(process)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            stdout, stderr = process.communicate()
            raise AssertionError(f"{argv} in {host.role} ran over {timeout} s: {stderr[-2000:]}") from None
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.log_path(host, "run"), "a") as log:
            log.write(f"$ {' '.join(argv)}\n{stdout}{stderr}[exit code {process.returncode}]\n")
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def log_path(self, host: Host, name: str) -> Path:
        return self.logs / f"{host.role}-{name}.log"

    def log_tail(self, host: Host, name: str, size: int = 3000) -> str:
        path = self.log_path(host, name)
        return path.read_text(errors="replace")[-size:] if path.exists() else ""

    # --- cleaning up ---

    def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL), then delete the namespaces; raise if one is left."""
        running = [process for process in self.processes if process.poll() is None]
        for process in running:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            if process.poll() is None:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=10)
        for netns in reversed(self.namespaces):
            self._kill_remaining(netns)
            subprocess.run([IP, "netns", "del", netns], capture_output=True, timeout=30)
        left = set(self.namespaces) & set(list_namespaces())
        self.namespaces = []
        if left:
            raise RuntimeError(f"network namespaces left behind: {sorted(left)}")

    @staticmethod
    def _kill_remaining(netns: str) -> None:
        """Kill, by PID, any process still in ``netns`` (a grandchild that left its process group)."""
        result = subprocess.run([IP, "netns", "pids", netns], capture_output=True, text=True, timeout=30)
        for pid in result.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)


def list_namespaces() -> list[str]:
    """Names of every network namespace ``ip netns`` knows."""
    if not IP:
        return []
    result = subprocess.run([IP, "netns", "list"], capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    """Signal the session ``process`` leads (it is not reaped yet, so its PID is still its own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
