"""Initial sync: a primary on a tree that is not empty, a new or an older secondary."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from tests.fs.test_ranges import MiB, first_hole
from tests.support import checkpoint, diff, primary, secondary, snapshot, unmount


def populate(root: Path, megabytes: int) -> None:
    """A tree with every kind of entry, made natively before replfs ever sees it."""
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "big.bin").write_bytes(os.urandom(megabytes << 20))
    for i in range(50):
        (root / "docs" / f"note{i}.txt").write_text(f"note {i}\n" * (i + 1))
    os.link(root / "docs" / "note1.txt", root / "docs" / "deep" / "hardlink")
    os.symlink("../big.bin", root / "docs" / "sym")
    os.mkfifo(root / "docs" / "fifo", 0o640)
    (root / "docs" / "deep" / "er" / "secret").write_bytes(b"s")
    os.chmod(root / "docs" / "deep" / "er" / "secret", 0o600)
    os.chown(root / "docs" / "deep" / "er" / "secret", 1234, 4321)
    os.setxattr(root / "docs" / "note3.txt", "user.tag", b"three")
    os.setxattr(root, "user.rootattr", b"r")
    os.chmod(root / "docs", 0o2775)
    (root / "empty").write_bytes(b"")


def test_initial_sync_of_a_busy_non_empty_tree(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    populate(backing, 24)
    stop = threading.Event()
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}") as pri:

        def writer() -> None:  # the application does not wait for the sync
            i = 0
            while not stop.is_set():
                with open(mount / "big.bin", "r+b") as f:
                    f.seek((i * 7919 * 4096) % (24 << 20))
                    f.write(b"%08d" % i)
                (mount / "docs" / f"new{i % 5}").write_bytes(b"n" * i)
                if i % 3 == 0 and (mount / "docs" / f"note{i % 50}.txt").exists():
                    os.rename(mount / "docs" / f"note{i % 50}.txt", mount / f"moved{i}")
                i += 1

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            pri.wait_for("initial sync begins")
            pri.wait_for("initial sync done")
        finally:
            stop.set()
            thread.join()
        checkpoint(mount)
        assert diff(snapshot(backing), snapshot(replica)) == []


def test_older_secondary_is_reset_and_synced(tmp_path: Path) -> None:
    backing, mount = tmp_path / "b", tmp_path / "m"
    old, new = tmp_path / "old", tmp_path / "new"
    backing.mkdir()
    with secondary(old) as s1:
        port = s1.port
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}"):
            (mount / "a").write_bytes(b"a")
            checkpoint(mount)
            s1.stop()
            # Another, new secondary takes the port; the journal moves past `old`.
            with secondary(new, port=port):
                for i in range(5):
                    (mount / f"f{i}").write_bytes(b"%d" % i)
                    checkpoint(mount)
                assert diff(snapshot(backing), snapshot(new)) == []
            (old / "junk").write_bytes(b"left behind")  # the older replica drifted too
            with secondary(old, port=port) as again:
                checkpoint(mount)
                assert diff(snapshot(backing), snapshot(old)) == []
    assert "initial sync" in again.log()


def test_initial_sync_survives_primary_kill9(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    populate(backing, 48)
    with secondary(replica) as sec:
        port = sec.port
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}") as pri:
            pri.wait_for("initial sync begins")
            pri.kill()
            unmount(mount)
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}") as pri:
            (mount / "after").write_bytes(b"written after the crash")
            checkpoint(mount)
            assert diff(snapshot(backing), snapshot(replica)) == []


def test_initial_sync_goes_on_after_secondary_kill9(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    populate(backing, 48)
    with secondary(replica) as sec:
        port = sec.port
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}") as pri:
            sec.wait_for("initial sync from the primary")
            sec.kill()
            with secondary(replica, port=port):
                checkpoint(mount)
                assert diff(snapshot(backing), snapshot(replica)) == []
    assert pri.log().count("initial sync begins") == 1, "resumed, not started over"


def test_initial_sync_ok_sparse_files_stay_sparse(tmp_path: Path) -> None:
    """The sync sends holes as holes, the one that ends a file included."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    fd = os.open(backing / "sparse", os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwrite(fd, b"a" * 5000, 0)
    os.pwrite(fd, b"b" * 100, 3 * MiB)
    os.ftruncate(fd, 64 * MiB)
    os.close(fd)
    (backing / "holes-only").write_bytes(b"")
    os.truncate(backing / "holes-only", 10 * MiB)
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}"):
        checkpoint(mount)
        assert first_hole(replica / "sparse") == first_hole(backing / "sparse") == (
            8192, 3 * MiB)
        assert first_hole(replica / "holes-only") == (0, "ENXIO")
        assert sum(os.stat(replica / n).st_blocks for n in ("sparse", "holes-only")) < 100
        assert diff(snapshot(backing), snapshot(replica)) == []
