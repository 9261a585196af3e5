"""--fsync remote: an fsync returns once the secondary staged its set, while it is in
step; with local (the default), or a secondary gone or stalled, it does not wait.

A stopped secondary process (SIGSTOP) stages nothing: what its staging store holds
when an fsync returns says whether that fsync waited for it.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from repl import control
from repl.primary.semisync import Semisync
from store.records import Op
from tests.powercut.harness import simulator
from tests.support import (
    Daemon,
    free_port,
    primary,
    read_staging,
    replfs,
    secondary,
    staged_whole,
    status,
    until,
)
from tests.test_cli import assert_one_line_error

# The fsync of a set the stopped secondary cannot stage returns within this, or the
# test fails. With --fsync remote, the time a wrong fsync would have to return early.
RETURN_SECONDS = 30.0
EARLY_SECONDS = 0.5


@contextmanager
def stopped(daemon: Daemon) -> Iterator[None]:
    """The daemon's process stopped (SIGSTOP) until the block ends."""
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        daemon.proc.send_signal(signal.SIGCONT)


@contextmanager
def remote_in_step(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    """A secondary (replica tmp_path/r) and a primary (tmp_path/b mounted at
    tmp_path/m, --fsync remote, --fsync-timeout 1, no set closed by the timer) whose
    fsyncs wait for it: (secondary, primary)."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec, primary(
            backing, mount, "--secondary", f"127.0.0.1:{sec.port}", "--fsync", "remote",
            "--fsync-timeout", "1", "--set-interval", "3600") as pri:
        in_step(mount)
        yield sec, pri


class Fsync(threading.Thread):
    """Write and fsync a file through *mount* in a thread; then note the set the fsync
    closed and whether the secondary of *replica* (if any) had staged it whole then."""

    def __init__(self, mount: Path, replica: Path | None, name: str) -> None:
        super().__init__(daemon=True)
        self.mount, self.replica, self.name = mount, replica, name
        self.closed = 0
        self.staged: bool | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            fd = os.open(self.mount / self.name, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.write(fd, b"x" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.closed = status(self.mount)["last_closed_set"]
            if self.replica is not None:
                self.staged = staged_whole(self.replica, self.closed)
        except BaseException as exc:  # reported by the test
            self.error = exc


def created(replica: Path, path: bytes) -> bool:
    """True if the secondary of *replica* has staged (or applied) the CREATE of *path*."""
    return (replica / os.fsdecode(path)).exists() or any(
        r.op == Op.CREATE and r.path == path
        for _, records in read_staging(replica).values() for r in records)


def in_step(mount: Path, wanted: bool = True) -> dict[str, Any]:
    return until(lambda: status(mount), lambda st: st["fsync_in_step"] is wanted,
                 what=f"fsync_in_step {wanted}")


@pytest.mark.parametrize("mode", ["remote", "received"])
def test_semisync_wait_staged_ok_set_staged_when_fsync_returns(tmp_path: Path,
                                                               mode: str) -> None:
    """An fsync waits for a stopped secondary; it returns once the secondary staged
    its set (remote) or received it (received: staged a moment later)."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec, primary(
            backing, mount, "--secondary", f"127.0.0.1:{sec.port}", "--fsync", mode,
            "--fsync-timeout", "120", "--set-interval", "3600") as pri:
        in_step(mount)
        pri.wait_for("fsyncs wait for it from now on")
        fsync = Fsync(mount, replica, "f")
        with stopped(sec):
            fsync.start()
            fsync.join(EARLY_SECONDS)
            assert fsync.is_alive(), "the fsync did not wait for the stopped secondary"
        fsync.join(RETURN_SECONDS)
        assert not fsync.is_alive() and fsync.error is None, fsync.error
        if mode == "remote":
            assert fsync.staged, f"set {fsync.closed} not staged when the fsync returned"
        until(lambda: staged_whole(replica, fsync.closed), bool, what="set staged")
        st = status(mount)
        assert (st["fsync"], st["fsync_in_step"], st["fsync_local_only"]) == (mode, True, 0)


@pytest.mark.parametrize("mode", ["received", "remote"])
def test_semisync_received_ok_fsync_does_not_wait_for_the_secondary_disk(
        tmp_path: Path, mode: str) -> None:
    """The secondary's disk holds its syncs: an fsync with --fsync received returns on
    the secondary's receipt, its set not staged yet; one with --fsync remote waits
    until the disk answered and the set is staged."""
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    with simulator(tmp_path / "lower", tmp_path / "disk") as sim:
        replica = sim.mountpoint / "r"
        with secondary(replica) as sec, primary(
                backing, mount, "--secondary", f"127.0.0.1:{sec.port}", "--fsync", mode,
                "--fsync-timeout", "120", "--set-interval", "3600"):
            in_step(mount)
            # The initial sync's set staged first: a frame that comes while trio's thread
            # stages (and waits for the disk) is received once that is done.
            until(lambda: staged_whole(replica, 1), bool, what="set 1 staged")
            # So is the file's CREATE, and nothing is in flight: during the hold only
            # the fsync's own records travel, in one frame. (A record shipped alone a
            # moment before, as a slow fsync lets the primary's flush tick do, would be
            # staged in trio's thread, on the held disk, and the receipt of the fsync's
            # frame would wait for that.)
            (mount / "f").touch()
            until(lambda: (created(replica, b"f"), status(mount)["secondaries"][0]),
                  lambda got: got[0] and got[1]["inflight_bytes"] == 0,
                  what="the CREATE staged, nothing in flight")
            fsync = Fsync(mount, replica, "f")
            with sim.holding():
                fsync.start()
                fsync.join(RETURN_SECONDS if mode == "received" else EARLY_SECONDS)
                assert fsync.is_alive() is (mode == "remote"), \
                    f"--fsync {mode}: the fsync {'returned' if mode == 'remote' else 'waited'}"
            fsync.join(RETURN_SECONDS)
            assert not fsync.is_alive() and fsync.error is None, fsync.error
            assert fsync.staged is (mode == "remote")
            until(lambda: staged_whole(replica, fsync.closed), bool, what="set staged")
            assert status(mount)["fsync_local_only"] == 0


def test_semisync_wait_staged_ok_local_does_not_wait_for_a_stopped_secondary(
        tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec, primary(
            backing, mount, "--secondary", f"127.0.0.1:{sec.port}", "--set-interval", "3600",
            "--fsync-timeout", "120"):  # were it to wait, it would wait that long
        until(lambda: status(mount), lambda st: st["connected"], what="connected")
        fsync = Fsync(mount, replica, "f")
        with stopped(sec):
            fsync.start()
            fsync.join(RETURN_SECONDS)  # while the secondary is stopped
            assert not fsync.is_alive(), "an fsync waited for a stopped secondary"
        assert fsync.error is None, fsync.error
        assert fsync.staged is False, "the stopped secondary staged the set"
        assert status(mount)["fsync"] == "local"


def test_semisync_wait_staged_ok_stalled_secondary_left_behind_then_back(
        tmp_path: Path) -> None:
    """A connected secondary that stages nothing holds an fsync up for --fsync-timeout,
    then fsyncs go on without it (said in the log and counted) until it caught up."""
    mount, replica = tmp_path / "m", tmp_path / "r"
    with remote_in_step(tmp_path) as (sec, pri):
        with stopped(sec):
            for name in ("f", "g"):  # the first waits out the timeout, the second not at all
                fsync = Fsync(mount, replica, name)
                fsync.start()
                fsync.join(RETURN_SECONDS)
                assert not fsync.is_alive() and fsync.error is None, fsync.error
                assert fsync.staged is False
            pri.wait_for(f"did not stage set {fsync.closed - 1} within 1s")
            st = status(mount)
            assert (st["fsync_in_step"], st["fsync_local_only"]) == (False, 2)
        in_step(mount)
        pri.wait_for("fsyncs wait for it again")
        fsync = Fsync(mount, replica, "h")
        fsync.start()
        fsync.join(RETURN_SECONDS)
        assert fsync.staged, "in step again, an fsync waits for the secondary"
        assert status(mount)["fsync_local_only"] == 2


def test_semisync_wait_staged_err_fenced_before_a_renewal(tmp_path: Path) -> None:
    """A cluster's primary cut off from everything: an fsync that waited out its silent
    secondary (in step when it began) returns only once a lease renewal confirms the
    node still leads; none comes, so it fails with EIO at the fence, rather than
    return for a set another node may be elected without."""
    mount = tmp_path / "m"
    with remote_in_step(tmp_path) as (sec, _):
        fence(mount, 3.0)  # renewed now, and never again
        with stopped(sec):
            fd = os.open(mount / "f", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.write(fd, b"x" * 4096)
                with pytest.raises(OSError) as failed:
                    os.fsync(fd)  # left step at 1 s, not fenced until 3 s
                assert failed.value.errno == errno.EIO
            finally:
                os.close(fd)
        assert status(mount)["fsync_local_only"] == 1


def test_semisync_wait_staged_ok_renewed_after_the_secondary_left_step(
        tmp_path: Path) -> None:
    """The secondary alone is silent: the fsync that left it behind returns once the
    next renewal of the node's lease comes."""
    mount = tmp_path / "m"
    with remote_in_step(tmp_path) as (sec, pri):
        fence(mount, 60.0)
        with stopped(sec):
            fsync = Fsync(mount, None, "f")
            fsync.start()
            pri.wait_for("did not stage set")
            # Renewals, as a node sends them, until the fsync returns: one sent before
            # the fsync began to wait for it (just after that line) does not count.
            deadline = time.monotonic() + RETURN_SECONDS
            while fsync.is_alive() and time.monotonic() < deadline:
                fence(mount, 60.0)
                fsync.join(0.2)
            assert not fsync.is_alive() and fsync.error is None, fsync.error


def fence(mount: Path, seconds: float) -> None:
    """A cluster's lease renewal, as the node tells its primary: sent now, it lets the
    primary write for *seconds* more."""
    now = time.monotonic()
    control.request(control.socket_path(mount), "fence", until=now + seconds, renewed=now)


def test_semisync_wait_staged_ok_no_secondary_fsync_local(tmp_path: Path) -> None:
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    with primary(backing, mount, "--secondary", f"127.0.0.1:{free_port()}", "--fsync",
                 "remote", "--fsync-timeout", "120"):
        fsync = Fsync(mount, None, "f")
        fsync.run()  # here: it must not wait for a secondary that is not there
        assert fsync.error is None, fsync.error
        st = status(mount)
        assert (st["connected"], st["fsync_in_step"], st["fsync_local_only"]) == (
            False, False, 1)


def test_semisync_err_remote_without_secondary(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "m").mkdir()
    assert_one_line_error(replfs("primary", tmp_path / "b", tmp_path / "m", "--fsync",
                                 "remote"), "--fsync remote", "need --secondary HOST:PORT")


def blocks(mount: Path) -> dict[str, dict[str, Any]]:
    """The primary's status block of each secondary, by address."""
    return {str(b["secondary"]): b for b in status(mount)["secondaries"]}


def test_semisync_wait_staged_ok_waits_for_every_secondary_in_step(tmp_path: Path) -> None:
    """Two secondaries in step: an fsync waits for the one that stages last, not just the
    first to stage."""
    backing, mount, one, two = (tmp_path / n for n in ("b", "m", "r1", "r2"))
    backing.mkdir()
    with secondary(one) as s1, secondary(two) as s2:
        a1, a2 = f"127.0.0.1:{s1.port}", f"127.0.0.1:{s2.port}"
        with primary(backing, mount, "--secondary", a1, "--secondary", a2, "--fsync",
                     "remote", "--fsync-timeout", "120", "--set-interval", "3600"):
            until(lambda: blocks(mount), lambda b: b[a1]["fsync_in_step"]
                  and b[a2]["fsync_in_step"], what="both in step")
            fsync = Fsync(mount, two, "f")
            with stopped(s2):
                fsync.start()
                fsync.join(EARLY_SECONDS)  # a wrong fsync returns here, on s1's staging
                assert fsync.is_alive(), "the fsync did not wait for a secondary in step"
            fsync.join(RETURN_SECONDS)
            assert not fsync.is_alive() and fsync.error is None, fsync.error
            assert fsync.staged, f"set {fsync.closed} not staged by {a2} when the fsync " \
                                 "returned"
            assert staged_whole(one, fsync.closed)
            assert status(mount)["fsync_local_only"] == 0


def test_semisync_wait_staged_ok_stalled_one_of_two_left_behind(tmp_path: Path) -> None:
    """Of two secondaries, the stalled one holds an fsync up for --fsync-timeout, then
    is out of step alone: fsyncs go on with the other's staging, none counted local."""
    backing, mount, one, two = (tmp_path / n for n in ("b", "m", "r1", "r2"))
    backing.mkdir()
    with secondary(one) as s1, secondary(two) as s2:
        a1, a2 = f"127.0.0.1:{s1.port}", f"127.0.0.1:{s2.port}"
        with primary(backing, mount, "--secondary", a1, "--secondary", a2, "--fsync",
                     "remote", "--fsync-timeout", "1", "--set-interval", "3600") as pri:
            until(lambda: blocks(mount), lambda b: b[a1]["fsync_in_step"]
                  and b[a2]["fsync_in_step"], what="both in step")
            with stopped(s2):
                for name in ("f", "g"):  # the first waits out the timeout for s2
                    fsync = Fsync(mount, one, name)
                    fsync.start()
                    fsync.join(RETURN_SECONDS)
                    assert not fsync.is_alive() and fsync.error is None, fsync.error
                    assert fsync.staged, f"{a1} in step did not stage set {fsync.closed}"
                    assert not staged_whole(two, fsync.closed)
                pri.wait_for(f"secondary {a2} did not stage set {fsync.closed - 1} within 1s")
                b = blocks(mount)
                assert (b[a1]["fsync_in_step"], b[a2]["fsync_in_step"]) == (True, False)
                assert status(mount)["fsync_local_only"] == 0
            until(lambda: blocks(mount), lambda b: b[a2]["fsync_in_step"],
                  what=f"{a2} in step again")


def test_semisync_count_local_ok_over_budget_puts_the_secondaries_behind(
        caplog: pytest.LogCaptureFixture) -> None:
    """Over the journal's budget an fsync returns on the primary's disk alone (its data
    is in the dirty map): the secondary in step is behind until it staged the set the
    resync closes, and the log says so (status, and bin/torture, read that)."""
    semi = Semisync(timeout=1.0)
    peer = semi.add("beta:7070")
    peer.connected(applied=4, last_closed=4)
    assert peer.in_step
    semi.count_local(5)
    assert (peer.in_step, semi.local_only) == (False, 1)
    assert "beta:7070 is behind the journal's budget" in caplog.text
    peer.shipped([(5, 0, False), (5, 1, True)])
    peer.staged([(5, 0), (5, 1)])
    assert peer.in_step, "in step again once the resync's set is staged"


@pytest.mark.parametrize("when", ["gone", "catching up"])
def test_semisync_count_local_ok_secondary_out_of_step_owes_the_resyncs_set(
        when: str) -> None:
    """An fsync over the journal's budget while a secondary is gone or catching up:
    once (back and) staged through every set closed before, it is still not in step
    until it staged the set the resync closes, which holds that fsync's data."""
    semi = Semisync(timeout=1.0)
    peer = semi.add("beta:7070")
    if when == "catching up":
        peer.connected(applied=2, last_closed=4)
    semi.count_local(5)
    if when == "gone":
        peer.connected(applied=2, last_closed=4)
    peer.shipped([(3, 0, True), (4, 0, True)])
    peer.staged([(3, 0), (4, 0)])
    assert not peer.in_step, "in step before the fsync's data was staged"
    peer.shipped([(5, 0, True)])
    peer.staged([(5, 0)])
    assert peer.in_step


def test_semisync_count_local_ok_set_staged_already_owes_nothing() -> None:
    """The resync closed the set, and the secondary staged it, before the fsync over
    budget that made it owed got to say so: it stays in step."""
    semi = Semisync(timeout=1.0)
    peer = semi.add("beta:7070")
    peer.connected(applied=4, last_closed=4)
    peer.shipped([(5, 0, True)])
    peer.staged([(5, 0)])
    semi.count_local(5)
    assert peer.in_step
