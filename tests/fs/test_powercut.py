"""The primary's host loses power: BACKING and the journal on the power-cut simulator.

The primary keeps BACKING and its journal on a filesystem that loses what
was not fsynced when the power goes (tests/powercut). The power goes, the
primary with it (SIGKILL), and the host comes back: a new simulator over the
same disk, the primary started again on it. Then:

- every commit an application got back is in its database on the primary;
- the replica converges to the primary's tree, byte for byte, metadata too;
- the replica, whenever it is looked at (held with pause), is the primary's
  tree as it was at the close of the set it shows: never a torn set.

BACKING can reach the disk ahead of the journal (a name or a page the cut
took from the journal but not from BACKING): the activity log's notes make
the primary resend those paths after the cut (repl/activity.py), which the
convergence checks see.
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from repl.faults import ENV_BOOT_ID, ENV_SET_HASHES
from repl.secondary.run import pause, resume
from repl.verify import tree_digest
from tests.powercut.harness import Simulator, simulator
from tests.support import (
    PRIMARY,
    SECONDARY,
    Daemon,
    checkpoint,
    diff,
    secondary,
    snapshot,
    status,
    steady_port,
    tls_args,
    unmount,
    wait_applied,
)

# Commits transactions to SQLite (WAL, synchronous=FULL) on the mount, ARGV[2] of them
# (0: until the mount dies), and prints each one's number once its COMMIT returned.
APP = r"""
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
limit = int(sys.argv[2])
db.execute("pragma journal_mode=wal")
db.execute("pragma synchronous=full")
db.execute("create table if not exists t (id integer primary key, body blob)")
i = db.execute("select coalesce(max(id), 0) from t").fetchone()[0]
for _ in iter(int, 1) if limit == 0 else range(limit):
    i += 1
    db.execute("begin")
    db.execute("insert into t values (?, ?)", (i, bytes([i % 251]) * (50 + i * 131 % 6000)))
    db.execute("commit")
    print(i, flush=True)
db.close()
"""


class Host:
    """A primary whose BACKING and journal are on a simulated disk, replicating to a
    secondary on this host's real disk; the digests of every set the primary closed."""

    def __init__(self, tmp: Path, sim: Simulator, sec: Daemon, extra: tuple[str, ...]) -> None:
        self.sim, self.secondary = sim, sec
        self.backing, self.mount = sim.mountpoint / "b", tmp / "m"
        self.replica = tmp / "r"
        self.hashes = tmp / "set-hashes"
        self.mount.mkdir()
        self.backing.mkdir()
        self.primary = Daemon(["primary", str(self.backing), str(self.mount), "--secondary",
                               f"127.0.0.1:{sec.port}", *extra, *tls_args(PRIMARY, SECONDARY)],
                              tmp / "primary.log", "serving",
                              env={ENV_SET_HASHES: str(self.hashes),
                                   ENV_BOOT_ID: str(sim.boot_id)})

    def power_cut(self, keep: float = 0.0, seed: int = 0) -> dict[str, int]:
        """The power goes: the primary dies with the disk; what was not synced is
        lost (but each page with probability *keep*)."""
        counts = self.sim.power_cut(self.primary, keep=keep, seed=seed)
        unmount(self.mount)
        return counts

    def boot(self) -> None:
        """The host comes back: the disk, then the primary."""
        self.sim.start()
        self.primary.start()

    def converged(self) -> None:
        """Close a set, wait for the secondary to apply it, compare the trees."""
        last = checkpoint(self.mount)
        assert wait_applied(self.replica, last) >= last
        assert diff(snapshot(self.backing), snapshot(self.replica)) == [], \
            "the replica differs from the primary"
        assert self.check_replica_whole() >= last

    def set_digests(self) -> dict[int, set[str]]:
        """Every digest the primary recorded for each set id (a power cut may make it
        close a set id again, with other contents)."""
        out: dict[int, set[str]] = defaultdict(set)
        for line in self.hashes.read_text().splitlines():
            set_id, digest = line.split()
            out[int(set_id)].add(digest)
        return out

    def check_replica_whole(self) -> int:
        """Hold the replica, check it is the primary at the close of its set; returns
        the set."""
        held = pause(self.replica, None, timeout=30)
        try:
            if held > 0:
                assert tree_digest(self.replica) in self.set_digests()[held], \
                    f"the replica at set {held} is no state the primary had at its close"
                check, rows = sqlite_rows(self.replica)
                assert check == "ok" and rows == list(range(1, len(rows) + 1)), (check, rows)
        finally:
            resume(self.replica, None)
        return held

    def run_app(self, commits: int, limit: int = 0) -> tuple[subprocess.Popen[str], int]:
        """Start the application; return it once *commits* more were acknowledged,
        with the last acknowledged."""
        app = subprocess.Popen([sys.executable, "-c", APP, str(self.mount / "app.db"),
                                str(limit)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert app.stdout is not None
        first = acknowledged = 0
        for line in app.stdout:
            acknowledged = int(line)
            first = first or acknowledged
            if acknowledged - first + 1 >= commits:
                return app, acknowledged
        raise AssertionError(f"the application stopped after {acknowledged}")


@contextmanager
def host(tmp_path: Path, *extra: str) -> Iterator[Host]:
    """A running Host; its daemons stopped and mounts gone however the test ends."""
    with secondary(tmp_path / "r", port=steady_port()) as sec, \
            simulator(tmp_path / "lower", tmp_path / "disk") as sim:
        h = Host(tmp_path, sim, sec, extra)
        h.primary.start()
        try:
            h.primary.wait_for("initial sync done")  # from here on the journal streams
            yield h
        finally:
            if h.primary.proc is not None and h.primary.proc.poll() is None:
                h.primary.stop()
            unmount(h.mount)


def sqlite_rows(tree: Path) -> tuple[str, list[int]]:
    """(integrity_check, ids) of a copy of the database and its WAL in *tree*."""
    if not (tree / "app.db").exists():
        return "ok", []
    with tempfile.TemporaryDirectory() as scratch:
        for name in ("app.db", "app.db-wal"):
            if (tree / name).exists():
                shutil.copyfile(tree / name, Path(scratch) / name)
        with closing(sqlite3.connect(Path(scratch) / "app.db")) as db:
            try:
                rows = [r[0] for r in db.execute("select id from t order by id")]
            except sqlite3.OperationalError:
                return "ok", []  # the table's creation is not in it yet
            return db.execute("pragma integrity_check").fetchone()[0], rows


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_primary_power_cut_sqlite_ok(tmp_path: Path, seed: int) -> None:
    """SQLite commits through the primary; the power goes after a number of commits
    drawn from *seed*, in the middle of the next one."""
    rng = random.Random(seed)
    with host(tmp_path, "--set-interval", "0.05") as h:
        app, acknowledged = h.run_app(rng.randrange(20, 120))
        cut = h.power_cut()
        assert app.stdout is not None
        acknowledged = max([acknowledged, *map(int, app.stdout.read().split())])
        app.wait()
        assert cut["pages"] > 0, "the cut dropped nothing: it tested nothing"
        h.check_replica_whole()  # what the secondary shows while the primary is down

        h.boot()
        check, rows = sqlite_rows(h.mount)
        assert check == "ok"
        assert rows[:acknowledged] == list(range(1, acknowledged + 1)), \
            "a commit the application got back is lost"
        app, _ = h.run_app(10, limit=10)  # work goes on, and the database is closed
        assert app.wait() == 0
        h.converged()


def test_primary_power_cut_unsynced_write_ok(tmp_path: Path) -> None:
    with host(tmp_path, "--set-interval", "3600") as h:
        (h.mount / "log").write_bytes(b"never fsynced\n")
        write_synced(h.mount / "db", b"committed")
        h.power_cut()
        h.boot()
        assert (h.mount / "db").read_bytes() == b"committed"
        h.converged()


def test_primary_power_cut_metadata_after_fsync_ok(tmp_path: Path) -> None:
    with host(tmp_path, "--set-interval", "3600") as h:
        write_synced(h.mount / "f", b"data")
        os.chmod(h.mount / "f", 0o600)
        os.rename(h.mount / "f", h.mount / "g")
        os.mkdir(h.mount / "d")
        h.power_cut()
        h.boot()
        h.converged()


def test_primary_power_cut_replica_ahead_of_journal_ok(tmp_path: Path) -> None:
    with host(tmp_path, "--set-interval", "0.05") as h:
        write_synced(h.mount / "f", b"synced")
        synced = checkpoint(h.mount)
        fd = os.open(h.mount / "f", os.O_WRONLY)
        os.pwrite(fd, b"LOST", 0)  # one record: the timer closes it alone in a set
        os.close(fd)
        assert wait_applied(h.replica, synced + 1) == synced + 1
        h.power_cut()
        h.secondary.stop()  # it comes back once the primary closed that set id again
        h.boot()
        (h.mount / "after").write_bytes(b"after the cut")
        # The set the secondary applied was durable before it was shipped, so the
        # primary never closes that id again with other ops.
        assert checkpoint(h.mount, wait=0) > synced + 1
        h.secondary.start()
        h.converged()


@pytest.mark.parametrize("seed", [1, 2])
def test_primary_power_cut_partial_writeback_ok(tmp_path: Path, seed: int) -> None:
    """Many writes after the last fsync, each its own journal commit; the power goes
    after the kernel wrote back a random half of the dirty pages."""
    rng = random.Random(seed)
    with host(tmp_path, "--set-interval", "3600") as h:
        write_synced(h.mount / "db", b"committed")
        for _ in range(600):
            with open(h.mount / f"f{rng.randrange(20)}", "ab") as f:
                f.write(rng.randbytes(rng.randrange(1, 3000)))
        h.power_cut(keep=0.5, seed=seed)
        h.boot()
        assert (h.mount / "db").read_bytes() == b"committed"
        h.converged()


def test_primary_power_cut_before_first_fsync_ok(tmp_path: Path) -> None:
    with host(tmp_path, "--set-interval", "3600") as h:
        cluster = status(h.mount)["cluster"]
        (h.mount / "f").write_bytes(b"never fsynced")
        h.power_cut()
        h.boot()
        assert status(h.mount)["cluster"] == cluster, "the primary is now another cluster"
        h.converged()


def test_primary_power_cut_fsynced_before_the_journal_passed_its_budget_ok(
        tmp_path: Path) -> None:
    """A write the journal made durable (its fsync returned), then the journal passes
    its budget (the secondary is held) and writes go to the dirty map, then the
    power goes before BACKING's next sync: the write is still there."""
    with host(tmp_path, "--set-interval", "3600", "--journal-max", "64K") as h:
        write_synced(h.mount / "db", b"first")
        write_synced(h.mount / "big", b"")
        checkpoint(h.mount)  # both files made, and BACKING synced with them
        pause(h.replica, None, timeout=30)
        fd = os.open(h.mount / "db", os.O_WRONLY)
        os.pwrite(fd, b"commit", 0)
        os.fsync(fd)  # journaled: its page in BACKING waits for BACKING's sync
        os.close(fd)
        write_synced(h.mount / "big", bytes(256 << 10))  # a closed set past the budget
        write_synced(h.mount / "big", b"over")  # a write finds it, and goes to the dirty map
        h.primary.wait_for("passed its budget", timeout=0)
        h.power_cut()
        h.boot()
        assert (h.mount / "db").read_bytes() == b"commit", "an fsync'd write is lost"
        resume(h.replica, None)
        h.converged()
