"""Initial sync: a primary on a tree that is not empty, a new or an older secondary."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from tests.faultproxy import UP, FaultProxy
from tests.fs.test_ranges import MiB, first_hole
from tests.repl.peers import assert_one_line_error
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
    unmount,
    until,
)


def populate(root: Path, megabytes: int) -> None:
    """A tree with every kind of entry, made natively before replfs ever sees it."""
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "big.bin").write_bytes(os.urandom(megabytes << 20))
    for i in range(50):
        (root / "docs" / f"note{i}.txt").write_text(f"note {i}\n" * (i + 1))
    os.link(root / "docs" / "note1.txt", root / "docs" / "deep" / "hardlink")
    os.symlink("../big.bin", root / "docs" / "sym")
    os.mkfifo(root / "docs" / "fifo", 0o640)
    # A symlink and a fifo with two names each: one inode each on the replica too.
    os.link(root / "docs" / "sym", root / "docs" / "deep" / "sym2", follow_symlinks=False)
    os.link(root / "docs" / "fifo", root / "docs" / "deep" / "fifo2")
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


def test_initial_sync_ok_primary_kill9_in_the_walk_the_tree_again(tmp_path: Path) -> None:
    """A primary killed while it walks the tree, after the secondary got part of the
    walk: restarted, it walks the whole tree again in the same set, and the replica
    becomes the tree (nothing of the first walk's part is taken for a set)."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    for d in range(40):
        (backing / f"d{d:02}").mkdir(parents=True)
        for i in range(1000):
            (backing / f"d{d:02}" / f"f{i:04}").write_bytes(b"%d" % i)
    with secondary(replica) as sec:
        port = sec.port
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}") as pri:
            until(lambda: status(replica)["received"], lambda n: n >= 200, timeout=60,
                  what="the first records of the walk")
            pri.kill()
            walked = "initial sync begins" in pri.log()
            unmount(mount)
        assert not walked, "the walk was whole before the kill: the test did not test it"
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}") as pri:
            (mount / "d00" / "f0000").unlink()  # before, during or after the walk
            checkpoint(mount, 120)
            assert "was cut short" in pri.log()
            assert diff(snapshot(backing), snapshot(replica)) == []


def test_initial_sync_goes_on_after_secondary_kill9(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    populate(backing, 48)
    with secondary(replica) as sec:
        port = sec.port
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}") as pri:
            sec.wait_for("sync from the primary")
            sec.kill()
            with secondary(replica, port=port):
                checkpoint(mount)
                assert diff(snapshot(backing), snapshot(replica)) == []
    assert pri.log().count("initial sync begins") == 1, "resumed, not started over"


def test_initial_sync_err_mount_and_promote_while_syncing(tmp_path: Path) -> None:
    """While the initial sync's set is not applied the replica holds no consistent set:
    status says syncing, and both mount and promote refuse it. Once applied, it mounts.

    The link stalls once, past the RESET_TO, so the set stays partial on the
    secondary for as long as the test needs; the next session completes it.
    """
    backing, mount, replica, view = (tmp_path / n for n in ("b", "m", "r", "v"))
    backing.mkdir()
    populate(backing, 4)
    with secondary(replica) as sec, FaultProxy(sec.port, seed=21) as proxy:
        stall = proxy.stall((2_000, 100_000), UP, conn=0)
        # Uncompressed: records one a frame, so the first ones pass before the stall.
        with primary(backing, mount, "--secondary", f"127.0.0.1:{proxy.port}", "--streams", "1",
                     "--stall-seconds", "3600", "--compress-level", "0"):
            assert stall.struck.wait(30)
            # What came before the stall is staged in time, after the reset to the sync.
            st = until(lambda: status(replica),
                       lambda st: st["syncing"] and st["sets_in_flight"] == 1,
                       what="the sync's set staged in part")
            assert (st["last_applied"], st["complete_waiting"]) == (0, 0)

            view.mkdir()
            try:  # a mount that wrongly succeeds would serve until the timeout
                refused = replfs("mount", replica, view, timeout=30)
            finally:
                unmount(view)
            assert_one_line_error(refused, "still in its initial sync")
            refused = replfs("promote", replica, "--force")  # its primary is up, connected
            assert_one_line_error(refused, "never finished its initial sync", "cannot be promoted")
            assert sec.proc is not None and sec.proc.wait(30) == 0, "promote stopped it"

            with secondary(replica, port=sec.port) as again:
                checkpoint(mount)  # the stalled session ended with the secondary
                assert status(replica)["syncing"] is False
                with standby(replica, view):
                    assert diff(snapshot(backing), snapshot(view)) == []
    assert "initial sync" in again.log()


def test_initial_sync_status_ok_progress(tmp_path: Path) -> None:
    """While the sync runs, the primary's status shows it, its total, and how much is
    done, only ever growing; then it streams again. A tree of many files just past
    SMALL_FILE (not sent whole by the snapshot) makes many small steps, so the sync
    lasts long enough to be seen."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    (backing / "d").mkdir(parents=True)
    files, size = 600, 68 << 10
    for i in range(files):
        (backing / "d" / f"f{i}").write_bytes(os.urandom(size))
    total = files * size
    port = free_port()
    with primary(backing, mount, "--secondary", f"127.0.0.1:{port}") as pri:
        samples: list[dict[str, Any]] = []

        def sample() -> dict[str, Any]:
            samples.append(status(mount))
            return samples[-1]

        with secondary(replica, port=port):
            until(sample, lambda st: st["mode"] == "streaming" and st["last_closed_set"] >= 1,
                  what="the initial sync closed")
            checkpoint(mount)
            assert diff(snapshot(backing), snapshot(replica)) == []
    assert "initial sync begins as set 1" in pri.log()

    syncing = [st for st in samples if st["mode"] == "initial sync"]
    done = [st["resync_done_bytes"] for st in syncing]
    assert len({d for d in done if 0 < d < total}) >= 2, f"progress seen: {done}"
    assert done == sorted(done)
    for st in syncing:
        assert st["resync_total_bytes"] == total
        assert st["resync_done_bytes"] + st["dirty_bytes"] == total
        assert st["dirty_files"] <= files
    after = samples[-1]
    assert "resync_done_bytes" not in after and "dirty_bytes" not in after
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
