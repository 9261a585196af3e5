"""Test machinery for clusters of nodes: a real etcd, real ``replfs node`` processes, and
network namespaces to cut them apart.

Each test starts its own etcd (``etcd_server``) on free ports with its data in the
test's tmp dir, and its nodes (``Node``) with separate directories, ports and
certificates of the session's CA (tests/support.py). With ``Partition``, every node
runs in a network namespace of its own, joined to the host by a veth pair on a
bridge where etcd listens, so a test can cut a node from etcd, from the others, or
etcd from everyone, with blackhole routes, and join them again.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repl import control, tlsca
from tests.support import (
    REPLFS,
    Daemon,
    cluster_ca,
    free_port,
    replfs,
    unmount,
    until,
)

TTL = 3.0  # the nodes' lease: a dead primary is replaced within TTL and a few seconds
NAMES = ("alpha", "beta", "gamma")
_serial = itertools.count()


def ca() -> Path:
    """The session's CA, with a certificate for each name in NAMES."""
    directory = cluster_ca()
    for name in NAMES:
        if not (directory / f"{name}.pem").exists():
            tlsca.issue(directory, name)
    return directory


@contextmanager
def etcd_server(tmp: Path, host: str = "127.0.0.1") -> Iterator[Daemon]:
    """A one-member etcd with its data in *tmp*, serving clients on loopback (and on
    *host* too); ``daemon.url`` is its loopback client URL, ``daemon.urls`` all."""
    client, peer = free_port(), free_port()
    urls = [f"http://127.0.0.1:{client}"] + ([f"http://{host}:{client}"]
                                              if host != "127.0.0.1" else [])
    data = tmp / f"etcd-{next(_serial)}"
    daemon = Daemon(["--name", "default", "--data-dir", str(data),
                     "--listen-client-urls", ",".join(urls),
                     "--advertise-client-urls", urls[-1],
                     "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                     "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                     "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
                    tmp / f"{data.name}.log", "ready to serve client requests",
                    command=["etcd"])
    daemon.start()
    daemon.url = urls[0]  # type: ignore[attr-defined]
    daemon.urls = urls  # type: ignore[attr-defined]
    try:
        yield daemon
    finally:
        if daemon.proc and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


@dataclass
class Node:
    """One ``replfs node`` of a test cluster, in its own directory under *base*."""

    name: str
    base: Path
    etcd: list[str]
    cluster: str
    host: str = "127.0.0.1"
    netns: str | None = None
    ttl: float = TTL
    fsync: str = "local"  # as a primary: replfs node --fsync
    fsync_timeout: float | None = None  # and --fsync-timeout, if not its default
    env: dict[str, str] = field(default_factory=dict)  # for the node and its daemons
    port: int = field(default_factory=free_port)
    daemon: Daemon | None = None

    def __post_init__(self) -> None:
        self.data = self.base / self.name / "data"
        self.mount = self.base / self.name / "mnt"
        self.data.mkdir(parents=True, exist_ok=True)
        self.mount.mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def args(self) -> list[str]:
        args = ["node", "--name", self.name, str(self.data), str(self.mount),
                "--listen", self.address, "--cluster", self.cluster,
                "--tls", str(ca() / self.name), "--lease-ttl", str(self.ttl),
                "--set-interval", "0.2", "--fsync", self.fsync]
        if self.fsync_timeout is not None:
            args += ["--fsync-timeout", str(self.fsync_timeout)]
        for url in self.etcd:
            args += ["--etcd", url]
        return args

    def start(self) -> Node:
        command = REPLFS if self.netns is None else [
            "nsenter", f"--net=/var/run/netns/{self.netns}", *REPLFS]
        self.daemon = Daemon(self.args(), self.base / f"{self.name}.log",
                             f"node {self.name} of cluster", env=self.env, command=command)
        self.daemon.start()
        return self

    def kill(self) -> None:
        """SIGKILL the node (its daemon dies with it) and clear the mount it left."""
        assert self.daemon is not None
        self.daemon.kill()
        until(lambda: self.child_pids(), lambda pids: not pids, timeout=10,
              what=f"{self.name}'s daemon gone with it")
        unmount(self.mount)

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.proc and self.daemon.proc.poll() is None:
            self.daemon.stop(timeout=60)
        unmount(self.mount)

    def child_pids(self) -> list[int]:
        """The replfs daemons serving this node's data (its children, alive)."""
        found = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(self.data).encode() in cmdline and b"node" not in cmdline:
                found.append(int(pid))
        return found

    def role(self) -> dict[str, Any] | None:
        """What the mount serves now: the daemon's status, or None if none answers
        within a second."""
        return _status(self.mount)

    def replica_status(self) -> dict[str, Any] | None:
        """The status of the secondary that keeps this node's replica, or None if none
        answers within a second (a standby's mount may answer before it does)."""
        return _status(self.data)

    def writable(self) -> bool:
        """True if this node serves its mount read-write now (a primary not fenced)."""
        st = self.role()
        return st is not None and st.get("role") == "primary" and not st.get("fenced")


def stop_all(nodes: list[Node]) -> None:
    """Stop every node at once (one by one, each stop would start an election)."""
    for node in nodes:
        if node.daemon is not None and node.daemon.proc and node.daemon.proc.poll() is None:
            node.daemon.proc.terminate()
    for node in nodes:
        node.stop()


def cluster_status(etcd: str, cluster: str) -> dict[str, Any]:
    result = replfs("cluster", "status", "--etcd", etcd, "--cluster", cluster, "--json",
                    timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def primary_of(nodes: list[Node], timeout: float = 60.0) -> Node:
    """The node that serves its mount read-write, once exactly one does."""
    def writable() -> list[Node]:
        return [n for n in nodes if n.daemon is not None and n.writable()]

    found = until(writable, lambda w: len(w) == 1, timeout=timeout, what="one primary")
    return found[0]


def _status(target: Path) -> dict[str, Any] | None:
    """The status of the daemon serving *target*, or None if none answers within a
    second."""
    try:
        return control.request(control.socket_path(target), "status", timeout=1.0)
    except (OSError, ValueError):
        return None


def standing(nodes: list[Node], timeout: float = 60.0) -> Node:
    """The primary, once every node serves its mount: one read-write, the others the
    standby view."""
    def roles() -> list[str | None]:
        return [(n.role() or {}).get("role") for n in nodes]

    until(roles, lambda r: sorted(map(str, r)) == ["primary"] + ["standby mount"] * (
        len(nodes) - 1), timeout=timeout, what="a primary and standbys")
    return primary_of(nodes)


class Watchdog:
    """A checker that polls every node's role and records any moment with two writable
    primaries (what must never be), and every primary it saw."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.violations: list[list[str]] = []
        self.primaries: list[tuple[float, str]] = []
        self.timeline: list[tuple[float, tuple[str, ...]]] = []  # each change of who writes
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def last_writable(self, name: str) -> float:
        """When *name* was last seen writable (the moment it stopped being, if it did)."""
        ends = [t for (t, who), (_, before) in zip(self.timeline[1:], self.timeline,
                                                    strict=False)
                if name in before and name not in who]
        return ends[-1] if ends else time.monotonic()

    def first_writable(self, name: str, after: float = 0.0) -> float | None:
        found = [t for t, who in self.timeline if name in who and t >= after]
        return found[0] if found else None

    def _run(self) -> None:
        while not self._stop.is_set():
            writable = [n.name for n in self.nodes if n.daemon is not None and n.writable()]
            if not self.timeline or self.timeline[-1][1] != tuple(writable):
                self.timeline.append((time.monotonic(), tuple(writable)))
            self.samples += 1
            if len(writable) > 1:
                self.violations.append(writable)
            if writable and (not self.primaries or self.primaries[-1][1] != writable[0]):
                self.primaries.append((time.monotonic(), writable[0]))
            self._stop.wait(0.02)  # the polling interval of a sampler


BRIDGE = "rfsbr0"
SUBNET = "10.78.{}.{}"


class Partition:
    """Network namespaces for a test's nodes: each node in its own, on a bridge with the
    host, where etcd listens at ``host``. Removed (and every route) on exit."""

    def __init__(self, count: int) -> None:
        self.net = 10 + os.getpid() % 200
        self.bridge = f"rfs{os.getpid() % 100000}"
        self.host = SUBNET.format(self.net, 1)
        self.names = [f"rfs{os.getpid() % 100000}n{i}" for i in range(count)]

    def address(self, index: int) -> str:
        return SUBNET.format(self.net, 11 + index)

    def __enter__(self) -> Partition:
        self.__exit__()  # what an earlier one of this process may have left behind
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, ns in enumerate(self.names):
            _ip("netns", "add", ns)
            _ip("link", "add", f"{ns}h", "type", "veth", "peer", "name", f"{ns}c")
            _ip("link", "set", f"{ns}c", "netns", ns)
            _ip("link", "set", f"{ns}h", "master", self.bridge)
            _ip("link", "set", f"{ns}h", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", f"{ns}c")
            _ip("-n", ns, "link", "set", f"{ns}c", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in self.names:
            # The host's end first: deleting the namespace takes it along only later,
            # and the next Partition of this process reuses the name.
            subprocess.run(["ip", "link", "del", f"{ns}h"], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def isolate(self, index: int) -> None:
        """Node *index* reaches nobody, and nobody it: its link goes down."""
        _ip("-n", self.names[index], "link", "set", f"{self.names[index]}c", "down")

    def reconnect(self, index: int) -> None:
        ns = self.names[index]
        _ip("-n", ns, "link", "set", f"{ns}c", "up")
        # The address stays; the route of the subnet comes back with the link.

    def cut(self, index: int, target: str) -> None:
        """Node *index* can no longer reach *target* (an address): packets to it fail."""
        _ip("-n", self.names[index], "route", "add", "blackhole", f"{target}/32")

    def join(self, index: int, target: str) -> None:
        _ip("-n", self.names[index], "route", "del", "blackhole", f"{target}/32")


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr}"

