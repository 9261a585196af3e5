"""Shared test machinery: real daemons in real processes, and tree snapshots.

Daemons replicate over TLS unless a test says ``--insecure``: the session
makes one cluster CA, with a certificate for the node PRIMARY (every
primary) and one for the node SECONDARY (every secondary).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from store.records import Op, Record
    from store.setstate import SetState

from repl import tlsca

ROOT = Path(__file__).resolve().parent.parent
REPLFS = [sys.executable, str(ROOT / "bin" / "replfs.py")]
START_TIMEOUT = 30.0
PRIMARY, SECONDARY = "alpha", "beta"  # the nodes' names, in their certificates


@functools.cache
def cluster_ca() -> Path:
    """The session's cluster CA directory, with PRIMARY's and SECONDARY's certificates.

    Made once per process, removed when it exits.
    """
    base = Path(tempfile.mkdtemp(prefix="replfs-test-ca-"))
    atexit.register(shutil.rmtree, base, True)
    ca = base / "ca"
    tlsca.init_ca(ca)
    for name in (PRIMARY, SECONDARY):
        tlsca.issue(ca, name)
    return ca


def tls_args(me: str, peer: str) -> list[str]:
    """``--tls`` and ``--peer`` for node *me* of the session's CA, talking to *peer*."""
    return ["--tls", str(cluster_ca() / me), "--peer", peer]


def _secure(extra: tuple[str, ...], me: str, peer: str) -> list[str]:
    """*extra*, with TLS as *me* added unless it chose a link already (or iSCSI, whose
    link is authenticated with --chap)."""
    if "--tls" in extra or "--insecure" in extra or "--chap" in extra:
        return list(extra)
    return [*extra, *tls_args(me, peer)]


def record_of(op: Op, path: bytes, **fields: Any) -> Record:
    """A valid record of set 1, seq 0 (for tests of what an op touches)."""
    from store.records import Record

    record = Record(op, 1, 0, path=path, **fields)
    record.validate()
    return record


def golden_bytes(path: Path, raw: bytes) -> bytes:
    """The golden bytes kept at *path* for a format test: written from *raw* instead
    when REPLFS_REGENERATE=1 (after a deliberate format change; review the diff)."""
    if os.environ.get("REPLFS_REGENERATE") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)
    return path.read_bytes()


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def steady_port() -> int:
    """A free loopback port below the kernel's ephemeral range, for a daemon that stops
    and listens on it again: no outgoing connection is given it meanwhile, as one can
    be given a free_port() on a busy machine."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
        low = int(ports.read().split()[0])
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.randrange(max(1024, low - 10_000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


def replfs(
    *args: str | os.PathLike[str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run one replfs command to completion."""
    return subprocess.run([*REPLFS, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


class Daemon:
    """A replfs daemon (or with *command*, another program) in its own process, with
    its log kept in a file.

    ``start()`` returns once the daemon logs *ready* (a mount is in place or
    a port is bound), so tests wait for an event, not for time.
    """

    def __init__(self, args: list[str], log: Path, ready: str,
                 env: dict[str, str] | None = None, command: list[str] = REPLFS) -> None:
        self.command = command
        self.args = args
        self.env = env or {}
        self.log_path = log
        self.ready_text = ready
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._waits: list[tuple[bytes, threading.Event]] = []

    def start(self) -> Daemon:
        # Each start has its own event: a previous process's pump may still be draining.
        ready, said = threading.Event(), threading.Event()
        self.proc = subprocess.Popen([*self.command, *self.args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env={**os.environ, **self.env})
        threading.Thread(target=self._pump, args=(self.proc, ready, said), daemon=True).start()
        if not ready.wait(START_TIMEOUT) or not said.is_set() or self.proc.poll() is not None:
            self.proc.kill()
            code = self.proc.wait()
            raise AssertionError(f"daemon did not start (exit {code}): {self.args}\n"
                                 f"{self.log()}")
        return self

    def _pump(self, proc: subprocess.Popen[bytes], ready: threading.Event,
              said: threading.Event) -> None:
        assert proc.stderr is not None
        with open(self.log_path, "ab") as log:
            for line in proc.stderr:
                log.write(line)
                log.flush()
                if self.ready_text.encode() in line:
                    said.set()
                    ready.set()
                for text, event in self._waits:
                    if text in line:
                        event.set()
        ready.set()  # died: let start() see it

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        """Block until the daemon logs a line containing *text*."""
        found = threading.Event()
        self._waits.append((text.encode(), found))
        if text in self.log():
            found.set()
        if not found.wait(timeout):
            raise AssertionError(f"daemon never logged {text!r}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@contextmanager
def mounted(args: list[str], mount: Path, log: Path, command: list[str] = REPLFS
            ) -> Iterator[Daemon]:
    """A running daemon (`replfs ARGS`, run as *command*) that mounts *mount*,
    unmounted however the test ends."""
    mount.mkdir(exist_ok=True)
    daemon = Daemon(args, log, "serving", command=command)
    daemon.start()
    try:
        yield daemon
    finally:
        if daemon.proc and daemon.proc.poll() is None:
            daemon.stop()
        unmount(mount)


def primary(backing: Path, mount: Path, *extra: str, log: Path | None = None,
            command: list[str] = REPLFS) -> AbstractContextManager[Daemon]:
    """A running `replfs primary BACKING MOUNT` (run as *command*); with
    ``--secondary``, over TLS as PRIMARY unless *extra* says ``--insecure`` or
    ``--tls``."""
    if "--secondary" in extra:
        extra = tuple(_secure(extra, PRIMARY, SECONDARY))
    return mounted(["primary", str(backing), str(mount), *extra], mount,
                   log or backing.parent / f"{mount.name}.log", command)


@contextmanager
def secondary(replica: Path, *extra: str, port: int = 0, log: Path | None = None
              ) -> Iterator[Daemon]:
    """A running `replfs secondary REPLICA` on loopback; ``daemon.port`` is its port,
    a steady_port() unless *port* is given, so the test may start it there again.

    Over TLS as SECONDARY, accepting PRIMARY, unless *extra* says ``--insecure``
    or ``--tls``. With ``--mount VIEW``, VIEW is made, and unmounted however the
    test ends.
    """
    view = Path(extra[extra.index("--mount") + 1]) if "--mount" in extra else None
    if view is not None:
        view.mkdir(exist_ok=True)
    daemon = Daemon(["secondary", str(replica), "--listen",
                     f"127.0.0.1:{port or steady_port()}",
                     *_secure(extra, SECONDARY, PRIMARY)],
                    log or replica.parent / f"{replica.name}.log", "listening on")
    try:
        daemon.start()
        daemon.port = int(daemon.log().split("listening on 127.0.0.1:")[-1].split()[0])
        yield daemon
    finally:
        if daemon.proc and daemon.proc.poll() is None:
            daemon.stop()
        if view is not None:
            unmount(view)


def checkpoint(mount: Path, wait: float = 60.0) -> int:
    """Close a set on the primary and wait until the secondary applied it (with *wait*
    0, only close it); returns the set.

    The request ``replfs checkpoint --wait`` sends, straight to the control socket:
    no process started per call (tests/test_cli.py and tests/repl/test_replication.py
    run the command itself). Waiting, it first lets each of the primary's secondaries
    connect, or fail to, once: closed before that, the set would be the one before
    the initial sync's.
    """
    from repl import control

    if wait:
        until(lambda: status(mount).get("secondaries", []),
              lambda blocks: all(b["connected"] or b["errors"] for b in blocks),
              timeout=wait, what="each secondary connected, or failed to, once")
    reply = control.request(control.socket_path(mount), "checkpoint", timeout=wait + 30,
                            wait=wait)
    assert "error" not in reply, reply["error"]
    return int(reply["set"])


def wait_applied(replica: Path, set_id: int, timeout: float = 60.0) -> int:
    """Block until the secondary serving *replica* applied *set_id*; returns what it applied."""
    from repl import control

    reply = control.request(control.socket_path(replica), "wait", timeout=timeout + 10,
                            set=set_id, seconds=timeout)
    return int(reply["applied"])


def unmount(mount: Path) -> None:
    """Lazy unmount if anything is still mounted there (a killed daemon leaves it).

    A dead FUSE mount fails every stat, so look in the mount table instead.
    """
    target = os.path.realpath(mount).encode()
    with open("/proc/self/mounts", "rb") as table:
        mounted = any(line.split()[1] == target for line in table)
    if mounted:
        subprocess.run(["fusermount3", "-u", "-z", str(mount)], capture_output=True)


Entry = tuple[object, ...]



@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of *size* (mount's size=, 16m...) at *path*, made, and unmounted however
    the test ends: a small disk to fill."""
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def snapshot(root: Path, *, mtimes: bool = True) -> dict[str, Entry]:
    """Everything the guarantee covers of the tree under *root*, by relative path.

    Type, mode, owner, size, nlink, mtime (unless *mtimes* is false), xattrs,
    and content (a digest) or symlink target. atime and ctime are not part of
    it: no copy can reproduce them.
    """
    out: dict[str, Entry] = {}

    def visit(path: Path, rel: str) -> None:
        st = os.lstat(path)
        xattrs = tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False))
                              for n in os.listxattr(path, follow_symlinks=False)))
        if stat.S_ISREG(st.st_mode):
            body: object = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            body = os.readlink(path)
        else:
            body = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else None
        size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
        out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                    size, st.st_nlink, st.st_mtime_ns if mtimes else None, xattrs, body)
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                visit(path / name, f"{rel}/{name}" if rel else name)

    visit(root, "")
    return out


def diff(a: dict[str, Entry], b: dict[str, Entry]) -> list[str]:
    """Human-readable differences between two snapshots (empty when equal)."""
    lines = []
    for path in sorted(a.keys() | b.keys()):
        if a.get(path) != b.get(path):
            lines.append(f"{path or '/'}: {a.get(path)} != {b.get(path)}")
    return lines


def replay(journal: Path, target: Path) -> int:
    """Apply every record of a (stopped daemon's) journal to *target*. Returns sets seen."""
    from repl.apply import apply
    from repl.tree import Tree
    from store.journal import Journal
    from store.records import Op

    j = Journal(journal)
    tree = Tree(target)
    sets = 0
    try:
        for record in j.records():
            apply(tree, record)
            sets += record.op == Op.SYNC
    finally:
        tree.close()
        j.close()
    return sets


def standby(replica: Path, mount: Path, *extra: str) -> AbstractContextManager[Daemon]:
    """A running `replfs mount REPLICA MOUNT` (the read-only standby view)."""
    return mounted(["mount", str(replica), str(mount), *extra], mount,
                   replica.parent / f"{mount.name}.log")


T = TypeVar("T")
POLL_SECONDS = 0.01


def until(probe: Callable[[], T], done: Callable[[T], bool], timeout: float = 30.0,
          what: str = "the condition") -> T:
    """Call *probe* until *done* holds for what it returns, and return that value.

    For states no event announces (a daemon's status, a store's contents):
    fails with the last value seen once *timeout* seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout:g}s; last: {value!r}")
        time.sleep(POLL_SECONDS)  # the polling interval, not a wait for an event


def status(target: Path) -> dict[str, Any]:
    """The status of the daemon serving *target*, straight from its control socket: what
    ``replfs status --json`` prints, without a process per call."""
    from repl import control

    reply = control.request(control.socket_path(target), "status")
    assert "error" not in reply, reply["error"]
    return reply


def state_dir(tree: Path) -> Path:
    """Where a tree's journal and staging store live by default: beside it, hidden."""
    return tree.parent / f".{tree.name}.replfs"


def _read_lmdb(path: Path, *dbs: bytes) -> list[list[tuple[bytes, bytes]]]:
    """Every (key, value) of each of *dbs* in the LMDB environment at *path*, read in
    one transaction, as one more reader beside the daemon that holds it."""
    from store.staging import open_reader

    env = open_reader(path)
    try:
        with env.begin() as txn:
            handles = [env.open_db(db, txn=txn, create=False) for db in dbs]
            return [[(bytes(k), bytes(v)) for k, v in txn.cursor(db=h)] for h in handles]
    finally:
        env.close()


def read_staging(replica: Path) -> dict[int, tuple[SetState, list[Record]]]:
    """Each set in *replica*'s staging store: its state, and its records in seq order."""
    from store.records import Record, decode_set
    from store.setstate import SetState

    sets, records = _read_lmdb(state_dir(replica) / "staging", b"sets", b"records")
    out: dict[int, tuple[SetState, list[Record]]] = {
        decode_set(k): (SetState.decode(v), []) for k, v in sets}
    for _, value in records:
        record = Record.decode(value)
        out.setdefault(record.set, (SetState(), []))[1].append(record)
    return out


def staged_whole(replica: Path, set_id: int) -> bool:
    """True if the secondary of *replica* holds *set_id* durably: staged complete, or
    applied already (read from its staging store, so a stopped daemon can be asked)."""
    from store.records import decode_set
    from store.setstate import SetState

    sets, meta = _read_lmdb(state_dir(replica) / "staging", b"sets", b"meta")
    applied = dict(meta).get(b"applied")
    if applied is not None and set_id <= decode_set(applied):
        return True
    states = {decode_set(k): SetState.decode(v) for k, v in sets}
    return set_id in states and states[set_id].complete


def read_journal(backing: Path) -> list[Record]:
    """Every record the journal of the primary of *backing* holds, in stream order."""
    from store.journal import Journal

    journal = Journal(state_dir(backing) / "journal", read_only=True)  # beside the daemon
    try:
        return list(journal.records())
    finally:
        journal.close()


def open_set_staged(mount: Path, replica: Path, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until every record of the open set of the primary at *mount* is staged by
    the secondary of *replica* and acknowledged; returns the primary's status then.

    Acknowledged: nothing is in flight in the session that shipped the records
    (a session that ends forgets what it had in flight, and says why in
    ``errors``).
    """
    def done(st: dict[str, Any]) -> bool:
        last = [st["open_set"], st["open_set_ops"] - 1]
        return bool(st["open_set_ops"] > 0 and st["last_shipped"] == last
                    and st["inflight_bytes"] == 0 and st["connected"] and st["errors"] == []
                    and status(replica)["last_staged"] == last)

    return until(lambda: status(mount), done, timeout, "the open set staged and acknowledged")
