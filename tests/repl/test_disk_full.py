"""A full disk: of the replica (a clear error, a replica that is never torn, and
recovery) and of the primary (ENOSPC, as natively, and nothing else lost)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    checkpoint,
    diff,
    primary,
    replfs,
    secondary,
    snapshot,
    status,
    tmpfs,
    until,
)


@pytest.fixture
def small_replica(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "r", "1m") as replica:
        yield replica


def test_replica_disk_full_then_space_returns(tmp_path: Path, small_replica: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", small_replica
    backing.mkdir()
    with secondary(replica) as sec:
        port = sec.port
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}") as pri:
            (mount / "small").write_bytes(b"fits")
            checkpoint(mount)
            before = snapshot(replica)
            (mount / "big").write_bytes(b"x" * (3 << 20))  # three times the replica's disk
            last = int(replfs("checkpoint", mount).stdout)
            sec.wait_for("No space left on device")
            st = json.loads(replfs("status", replica, "--json").stdout)
            assert "No space left" in st["apply_error"]
            held = replfs("pause", replica, "--timeout", "1")
            assert held.returncode == 1
            assert "in the middle of a set" in held.stderr
            assert "not paused" in replfs("resume", replica).stderr, "refused: no hold left"
            assert sec.stop(timeout=20) == 0, "stops cleanly while a set is stuck"

            subprocess.run(["mount", "-o", "remount,size=64m", str(replica)], check=True)
            with secondary(replica, port=port):
                assert checkpoint(mount) >= last
                assert diff(snapshot(backing), snapshot(replica)) == []
            assert before != snapshot(replica)
    assert "No space" not in pri.log()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A filesystem of 16 MiB for the primary's BACKING and journal (beside it)."""
    with tmpfs(tmp_path / "disk", "16m") as disk:
        yield disk


def fill(path: Path) -> tuple[OSError, int]:
    """Append to *path* 64 KiB at a time, each fsync'd, until that fails; the error,
    and how many bytes were written (the last fsync's too)."""
    with open(path, "wb") as f:
        for count in range(1, 1000):
            try:
                f.write(os.urandom(64 << 10))
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:
                return exc, count << 16
    raise AssertionError("the disk never filled")


def test_primary_disk_full_refuses_writes_and_frees_space(tmp_path: Path,
                                                           small_disk: Path) -> None:
    """When the disk of BACKING and the journal fills, fsyncs and new files fail with
    ENOSPC, but what the kernel took into its cache before is written, in the room
    the journal's reserve leaves; the daemon goes on serving, closing sets and
    shipping them; a file can be removed through the mount, and then writes work
    again. The replica ends equal to BACKING."""
    backing, mount, replica = small_disk / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec, \
            primary(backing, mount, "--secondary", f"127.0.0.1:{sec.port}") as pri:
        (mount / "kept").write_bytes(b"kept" * 1000)
        (mount / "more").write_bytes(b"")
        checkpoint(mount)
        assert not status(mount)["journal_reserve_in_use"]
        failed, wrote = fill(mount / "big")
        assert failed.errno == errno.ENOSPC
        pri.wait_for("its reserve of 1 MiB is in use")
        assert status(mount)["journal_reserve_in_use"]
        assert (backing / "big").stat().st_size == wrote, "its last write too, though"
        with pytest.raises(OSError) as raised:
            (mount / "new").write_bytes(b"")
        assert raised.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as raised:
            with open(mount / "more", "ab") as f:
                f.write(b"x" * 10_000)
                os.fsync(f.fileno())
        assert raised.value.errno == errno.ENOSPC
        assert (backing / "more").read_bytes() == b"x" * 10_000, "written all the same"
        full = checkpoint(mount)  # a set still closes and reaches the replica
        assert (mount / "kept").read_bytes() == b"kept" * 1000
        (mount / "big").unlink()
        # Its blocks are freed once the daemon closes it too: the kernel's RELEASE of
        # the writer's handle comes after close() returned
        until(lambda: shutil.disk_usage(small_disk).free, lambda free: free > 5 << 20)
        (mount / "after").write_bytes(b"after")
        with open(mount / "after", "rb+") as f:
            os.fsync(f.fileno())
        pri.wait_for("has room again")
        st = status(mount)
        assert not st["journal_reserve_in_use"] and st["journal_disk_free"] > 1 << 20
        assert checkpoint(mount) > full
        assert diff(snapshot(backing), snapshot(replica)) == []
        assert (replica / "after").read_bytes() == b"after"
        assert pri.proc is not None and pri.proc.poll() is None
    assert "Traceback" not in pri.log()


def test_staging_disk_full_then_space_returns(tmp_path: Path) -> None:
    """The disk of the replica and its staging store fills while the replica is held:
    the secondary says why in status and stays up, reading nothing more, and once
    there is room it stages, applies, and the replica is the primary's tree."""
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    with tmpfs(tmp_path / "disk", "16m") as disk:
        replica = disk / "r"  # its staging store is beside it, on the same disk
        with secondary(replica) as sec, \
                primary(backing, mount, "--secondary", f"127.0.0.1:{sec.port}"):
            (mount / "small").write_bytes(b"fits")
            checkpoint(mount)
            assert replfs("pause", replica).returncode == 0
            for n in range(4):
                (mount / f"big{n}").write_bytes(os.urandom(5 << 20))
            last = int(replfs("checkpoint", mount).stdout)
            sec.wait_for("staging failed")
            st = json.loads(replfs("status", replica, "--json").stdout)
            assert "MiB free" in st["staging_error"]
            # The staging store is beside the replica: one disk, nearly full.
            assert st["staging_disk_free"] < 5 << 20 and st["replica_disk_free"] < 5 << 20
            assert sec.proc is not None and sec.proc.poll() is None
            subprocess.run(["mount", "-o", "remount,size=96m", str(disk)], check=True)
            assert replfs("resume", replica).returncode == 0
            assert checkpoint(mount) >= last
            assert diff(snapshot(backing), snapshot(replica)) == []
            st = json.loads(replfs("status", replica, "--json").stdout)
            assert st["staging_error"] is None
            assert st["staging_disk_free"] > 16 << 20
        assert "Traceback" not in sec.log()
