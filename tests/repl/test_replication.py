"""Primary -> secondary end to end: real processes, real sockets, real mounts."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

from repl.secondary.run import pause, resume
from tests.fs.test_ranges import (
    KEEP_SIZE,
    PUNCH_HOLE,
    ZERO_RANGE,
    MiB,
    copy_all,
    fallocate,
    first_hole,
    pattern,
)
from tests.support import (
    checkpoint,
    diff,
    free_port,
    primary,
    replfs,
    secondary,
    snapshot,
    standby,
    status,
    until,
    wait_applied,
)


def busy_tree(m: Path, rounds: int) -> None:
    for i in range(rounds):
        d = m / f"d{i % 3}"
        d.mkdir(exist_ok=True)
        (m / f"f{i % 5}").write_bytes(os.urandom(1000 + i * 37))
        os.replace(m / f"f{i % 5}", d / f"f{i % 5}")
        with open(d / "log", "ab") as f:
            f.write(b"%d\n" % i)
        if i % 7 == 0:
            os.link(d / "log", m / f"link{i}")
            os.chmod(d / "log", 0o600 | (i % 8))
            os.setxattr(d / "log", "user.round", str(i).encode())
        if i % 11 == 0:
            os.symlink(f"d{i % 3}/log", m / f"sym{i}")


def test_replica_follows_primary_scrambled(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}", "--scramble", "42"):
        busy_tree(mount, 120)
        db = sqlite3.connect(mount / "app.db")
        db.execute("pragma journal_mode=wal")
        db.execute("create table t(x)")
        for i in range(100):
            db.execute("insert into t values (?)", (i,))
            db.commit()
        db.close()
        done = replfs("checkpoint", mount, "--wait", "60")  # the command a user runs
        assert done.returncode == 0, done.stderr
        assert int(done.stdout) > 100
        assert diff(snapshot(backing), snapshot(replica)) == [], "applied once it returned"
    check = sqlite3.connect(replica / "app.db")
    assert check.execute("pragma integrity_check").fetchone() == ("ok",)
    assert check.execute("select count(*) from t").fetchone() == (100,)


def ranges_workload(m: Path) -> None:
    """fallocate in every mode passed through, copy_file_range, and cp of a sparse file."""
    fd = os.open(m / "img", os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, pattern(256 * 1024, 10), 0)
    fallocate(fd, 0, 0, MiB)
    fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 64 * 1024, 64 * 1024)
    fallocate(fd, ZERO_RANGE, 200 * 1024 + 7, 10_000)
    fallocate(fd, ZERO_RANGE | KEEP_SIZE, MiB - 100, MiB)
    fallocate(fd, KEEP_SIZE, MiB, 3 * MiB)
    os.close(fd)
    (m / "src").write_bytes(pattern(6 * MiB, 11))
    src = os.open(m / "src", os.O_RDONLY)
    dst = os.open(m / "dst", os.O_WRONLY | os.O_CREAT, 0o644)
    assert copy_all(src, dst, 6 * MiB, 0, 0) == 6 * MiB
    assert copy_all(src, dst, 5000, 100, 7 * MiB) == 5000
    os.close(dst)
    os.close(src)
    subprocess.run(["cp", m / "img", m / "img-copy"], check=True)


def test_replica_follows_fallocate_and_copies(tmp_path: Path) -> None:
    """What fallocate and copy_file_range change reaches the replica, holes as holes."""
    backing, mount, replica, view = (tmp_path / n for n in ("b", "m", "r", "v"))
    backing.mkdir()
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}"):
        checkpoint(mount)  # the initial sync done: from here on the replica gets each op
        ranges_workload(mount)
        checkpoint(mount)
        # The punched hole, as SEEK_HOLE and SEEK_DATA show it. (Not the preallocated
        # and zeroed ranges: ext4 shows them as data once a read cached their pages.)
        punched = (64 * 1024, 128 * 1024)
        assert first_hole(backing / "img") == punched
        assert first_hole(replica / "img") == punched
        assert os.stat(replica / "img").st_blocks * 512 >= 3 * MiB, "preallocated"
        with standby(replica, view):
            assert first_hole(view / "img") == punched
        assert diff(snapshot(backing), snapshot(replica)) == []


def test_replica_follows_times_of_a_name_left_of_a_changed_file(tmp_path: Path) -> None:
    """A file with two names, changed through one that is then removed in the same set
    (unlinked, or replaced by a rename): the name left has the file's times on the
    replica too, not the time the change was applied there. (A restarted primary
    knows each file by the one name looked up since: the one removed.)"""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec:
        with primary(backing, mount, "--secondary", f"127.0.0.1:{sec.port}"):
            for name in ("unlinked", "renamed"):
                (mount / name).write_bytes(b"x" * 5000)
                os.link(mount / name, mount / f"{name}.left")
                os.utime(mount / name, ns=(1_000_000_000, 1_000_000_000))
            (mount / "other").write_bytes(b"o")
            wait_applied(replica, checkpoint(mount))
        with primary(backing, mount, "--secondary", f"127.0.0.1:{sec.port}"):
            os.truncate(mount / "unlinked", 10)
            os.unlink(mount / "unlinked")
            os.truncate(mount / "renamed", 20)
            os.rename(mount / "other", mount / "renamed")
            wait_applied(replica, checkpoint(mount))
            assert diff(snapshot(backing), snapshot(replica)) == []


def test_status_reports_a_stall(tmp_path: Path) -> None:
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    port = free_port()
    with primary(backing, mount, "--secondary", f"127.0.0.1:{port}",
                 "--stall-seconds", "0.5") as daemon:
        (mount / "f").write_bytes(b"waiting for a secondary")
        assert replfs("checkpoint", mount).returncode == 0
        daemon.wait_for("replication stalled")
        st = json.loads(replfs("status", mount, "--json").stdout)
        assert st["stalled"] is True
        assert st["connected"] is False
        assert st["lag_sets"] >= 1
        assert any("failed" in e for e in st["errors"])
        (mount / "g").write_bytes(b"the mount keeps working")


def test_control_bad_request_answers_error_daemon_lives(tmp_path: Path) -> None:
    from repl import control

    replica = tmp_path / "r"
    with secondary(replica) as sec:
        path = control.socket_path(replica)
        assert "error" in control.request(path, "wait")  # no set given
        assert "error" in control.request(path, "nonsense")
        assert sec.proc is not None and sec.proc.poll() is None
        assert control.request(path, "status")["role"] == "secondary"


def test_primary_status_ok_lag_of_a_held_replica(tmp_path: Path) -> None:
    """lag_sets, lag_seconds and lag_bytes against a backlog of known age and size:
    two sets the held replica has not applied, the older closed over half a second
    before the status is asked, holding 1 MiB of data between them."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    data = os.urandom(1 << 20)
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}", "--set-interval", "3600"):
        first = checkpoint(mount)
        st = status(mount)
        assert (st["lag_sets"], st["lag_seconds"], st["lag_bytes"]) == (0, 0.0, 0)
        pause(replica, None)

        (mount / "big").write_bytes(data[: 1 << 19])
        closing_from = time.monotonic()
        older = checkpoint(mount, wait=0)
        closed_by = time.monotonic()
        until(lambda: status(mount), lambda st: st["lag_seconds"] >= 0.5,
              what="half a second of lag")
        with open(mount / "big", "ab") as f:
            f.write(data[1 << 19 :])
        assert checkpoint(mount, wait=0) == older + 1

        asked_from = time.monotonic()
        st = status(mount)
        asked_by = time.monotonic()
        assert st["lag_sets"] == older + 1 - first == 2
        # The age of the older set, give or take the rounding to milliseconds.
        assert asked_from - closed_by - 0.001 <= st["lag_seconds"] <= asked_by - closing_from
        assert st["lag_seconds"] >= 0.5
        # The journal holds the two sets: the data, and little else.
        assert len(data) <= st["lag_bytes"] <= len(data) + (16 << 10)

        resume(replica, None)
        assert wait_applied(replica, older + 1) == older + 1
        st = until(lambda: status(mount), lambda st: st["last_applied"] == older + 1,
                   what="the primary told of the apply")
        assert (st["lag_sets"], st["lag_seconds"], st["lag_bytes"]) == (0, 0.0, 0)
    assert (replica / "big").read_bytes() == data
