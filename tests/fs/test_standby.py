"""The standby mount: read-only, and only ever whole data sets."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from repl.version import VERSION
from tests.support import (
    checkpoint,
    diff,
    primary,
    replfs,
    secondary,
    snapshot,
    standby,
    tmpfs,
)

BIG = 8 << 20  # a file of many pages: reads of it are in flight while sets arrive


@contextmanager
def replicated(tmp_path: Path, cached: bool, *primary_extra: str
               ) -> Iterator[tuple[Path, Path, Path]]:
    """A primary replicating to a secondary, and the standby view of the replica:
    served by the secondary (``--mount``, cached by the kernel) or by ``replfs mount``
    (uncached, mounted once the initial sync is applied: before that the replica
    has no consistent set to show). Yields (primary mount, replica, view)."""
    backing, mount, replica, view = (tmp_path / n for n in ("b", "m", "r", "v"))
    backing.mkdir()
    extra = ("--mount", str(view)) if cached else ()
    with secondary(replica, *extra) as sec, primary(backing, mount, "--secondary",
                                                    f"127.0.0.1:{sec.port}", *primary_extra):
        if cached:
            yield mount, replica, view
        else:
            checkpoint(mount)
            with standby(replica, view):
                yield mount, replica, view


def test_standby_refuses_every_change_with_erofs(tmp_path: Path) -> None:
    backing, mount, replica, view = (tmp_path / n for n in ("b", "m", "r", "v"))
    backing.mkdir()
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}"):
        (mount / "f").write_bytes(b"data")
        (mount / "d").mkdir()
        checkpoint(mount)
        with standby(replica, view):
            assert (view / "f").read_bytes() == b"data"
            changes = [
                lambda: open(view / "f", "wb"),
                lambda: open(view / "new", "wb"),
                lambda: open(view / "f", "ab"),
                lambda: os.truncate(view / "f", 0),
                lambda: os.mkdir(view / "x"),
                lambda: os.rmdir(view / "d"),
                lambda: os.unlink(view / "f"),
                lambda: os.rename(view / "f", view / "g"),
                lambda: os.link(view / "f", view / "g"),
                lambda: os.symlink("f", view / "s"),
                lambda: os.mkfifo(view / "p"),
                lambda: os.chmod(view / "f", 0o600),
                lambda: os.chown(view / "f", 1, 1),
                lambda: os.utime(view / "f", (1, 1)),
                lambda: os.setxattr(view / "f", "user.x", b"1"),
                lambda: os.removexattr(view / "f", "user.x"),
            ]
            for change in changes:
                with pytest.raises(OSError) as info:
                    change()
                assert info.value.errno == errno.EROFS
            assert diff(snapshot(backing), snapshot(replica)) == []


def test_standby_getxattr_ok_shows_each_new_set(tmp_path: Path) -> None:
    """An xattr the applier changes is seen at once: the view caches no xattr."""
    backing, mount, replica, view = (tmp_path / n for n in ("b", "m", "r", "v"))
    backing.mkdir()
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}"), standby(replica, view):
        (mount / "f").write_bytes(b"data")
        for i in range(3):
            os.setxattr(mount / "f", "user.v", b"%d" % i)
            checkpoint(mount)
            assert os.getxattr(view / "f", "user.v") == b"%d" % i
        os.removexattr(mount / "f", "user.v")
        checkpoint(mount)
        with pytest.raises(OSError) as info:
            os.getxattr(view / "f", "user.v")
        assert info.value.errno == errno.ENODATA


def test_standby_shows_new_set_at_once(tmp_path: Path) -> None:
    backing, mount, replica, view = (tmp_path / n for n in ("b", "m", "r", "v"))
    backing.mkdir()
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}"), standby(replica, view):
        for i in range(20):
            (mount / "f").write_bytes(b"version %d" % i)
            os.rename(mount / "f", mount / f"g{i % 2}")
            (mount / "f").write_bytes(b"x" * i)
            checkpoint(mount)
            assert (view / f"g{i % 2}").read_bytes() == b"version %d" % i
            assert (view / "f").read_bytes() == b"x" * i
            assert sorted(os.listdir(view)) == sorted(os.listdir(mount))
        status = replfs("status", view)
        assert status.returncode == 0 and "shows set" in status.stdout


@pytest.mark.parametrize("cached", [False, True], ids=["mount", "cached"])
def test_standby_samples_are_whole_sets(tmp_path: Path, cached: bool) -> None:
    """Each set ends with a == b; a sample taken between pause and resume must too."""
    done = threading.Event()
    with replicated(tmp_path, cached, "--set-interval", "3600") as (mount, replica, view):
        (mount / "a").write_bytes(b"0")
        (mount / "b").write_bytes(b"0")
        checkpoint(mount)

        def writer() -> None:
            for i in range(1, 400):
                (mount / "a").write_bytes(b"%d" % i)
                with open(mount / "b", "wb") as f:
                    f.write(b"%d" % i)
                    f.flush()
                    os.fsync(f.fileno())  # closes the set: a == b at every set boundary
            done.set()

        thread = threading.Thread(target=writer)
        thread.start()
        seen = []
        while not done.is_set() or len(seen) < 5:
            assert replfs("pause", replica).returncode == 0
            a, b = (view / "a").read_bytes(), (view / "b").read_bytes()
            assert replfs("resume", replica).returncode == 0
            assert a == b, f"torn sample: a={a!r} b={b!r}"
            seen.append(int(a))
        thread.join()
    assert seen == sorted(seen), "the set shown never goes back"
    assert len(set(seen)) > 1, "samples saw the replica move"


@pytest.mark.parametrize("cached", [False, True], ids=["mount", "cached"])
def test_standby_directory_replaced_by_a_file_keeps_its_files_reachable(tmp_path: Path,
                                                                        cached: bool) -> None:
    """A set moves a directory's files out and puts a file of the same name in its
    place: the view shows that set, though it knew each file by its old name.

    ext4 gives the new file the directory's inode number at once, so an old name
    leads to a file where a directory was; each file must still be reached by its
    new name (not fail with ENOTDIR, or ENOENT where the number is not reused).
    """
    names = [f"f{i}" for i in range(32)]  # the old name is tried first half the time
    with replicated(tmp_path, cached) as (mount, replica, view):
        (mount / "d").mkdir()
        for name in names:
            (mount / "d" / name).write_bytes(name.encode())
        checkpoint(mount)
        assert sorted(os.listdir(view / "d")) == sorted(names)  # the view learns the names
        held = os.open(view / "d", os.O_PATH)  # the kernel keeps the directory's inode
        try:
            for name in names:
                os.rename(mount / "d" / name, mount / f"moved-{name}")
            os.rmdir(mount / "d")
            (mount / "d").write_bytes(b"a file now")
            checkpoint(mount)
            assert diff(snapshot(replica), snapshot(view)) == []
        finally:
            os.close(held)


def test_standby_file_the_kernel_holds_never_shows_the_one_that_took_its_number(
        tmp_path: Path) -> None:
    """The kernel holds a file of the view (an O_PATH open here; a path walk about to
    open it does the same) while a set removes it, the replica's filesystem gives its
    number to a new file (ext4 does at once), and a reader looks that one up. A
    request names the number only: opened again, the held file must not show the new
    one (it is gone: ESTALE). The view served by the secondary keeps such a file open
    instead (the next test), so that its number is not given again."""
    with replicated(tmp_path, cached=False) as (mount, replica, view):
        for _ in range(100):
            (mount / "old").write_bytes(b"old")
            checkpoint(mount)
            held = os.open(view / "old", os.O_PATH)
            try:
                number = os.stat(replica / "old").st_ino
                os.unlink(mount / "old")
                (mount / "new").write_bytes(b"new")
                checkpoint(mount)
                if os.stat(replica / "new").st_ino == number:
                    assert (view / "new").read_bytes() == b"new"
                    with pytest.raises(OSError) as info:
                        with open(f"/proc/self/fd/{held}", "rb") as f:
                            assert f.read() == b"old", "the held file shows another"
                    assert info.value.errno == errno.ESTALE
                    return
            finally:
                os.close(held)
            os.unlink(mount / "new")
    pytest.skip("the replica's filesystem never gave a removed file's number to a new "
                "one (tmpfs numbers every file anew): nothing to test")


@pytest.mark.parametrize("change", ["replaced", "removed", "moved"])
def test_standby_cached_ok_a_file_found_before_a_set_removed_it_opens(tmp_path: Path,
                                                                     change: str) -> None:
    """A path walk finds a file of the view (an O_PATH open holds it here as the walk
    does), a set renames another file over it, removes it or moves it, and then the
    walk opens it. As on a local filesystem, that opens the file it found. It used to
    fail with ESTALE, which the kernel's one walk again does not cure when a second
    set lands in between (a reader of a file written by rename, under load)."""
    with replicated(tmp_path, cached=True) as (mount, replica, view):
        (mount / "f").write_bytes(b"old")
        checkpoint(mount)
        held = os.open(view / "f", os.O_PATH)
        try:
            if change == "replaced":
                (mount / "new").write_bytes(b"new")
                os.rename(mount / "new", mount / "f")
            elif change == "removed":
                os.unlink(mount / "f")
            else:
                os.rename(mount / "f", mount / "g")
            checkpoint(mount)
            assert diff(snapshot(tmp_path / "b"), snapshot(replica)) == []
            assert os.path.exists(view / "f") == (change == "replaced")  # the view is on
            with open(f"/proc/self/fd/{held}", "rb") as f:
                assert f.read() == b"old"
        finally:
            os.close(held)


def test_standby_cached_ok_held_files_let_go_when_the_replica_is_full(tmp_path: Path) -> None:
    """A set removes a file the view knows and writes as much anew, on a replica with
    room for one of them: the removed file, kept open for the kernel while the set is
    applied, is let go, and the set applies (it was retried for ever, the view held)."""
    backing, mount, view = (tmp_path / n for n in ("b", "m", "v"))
    backing.mkdir()
    size = 7 << 20
    with tmpfs(tmp_path / "r", "12m") as replica, secondary(
            replica, "--mount", str(view)) as sec, primary(
            backing, mount, "--secondary", f"127.0.0.1:{sec.port}"):
        (mount / "x").write_bytes(b"x" * size)
        checkpoint(mount)
        assert os.stat(view / "x").st_size == size  # the kernel knows x now
        os.unlink(mount / "x")
        (mount / "y").write_bytes(b"y" * size)
        checkpoint(mount, wait=30)
        assert diff(snapshot(backing), snapshot(replica)) == []
        assert os.stat(view / "y").st_size == size
        assert not (view / "x").exists()


def test_standby_cached_ok_untouched_files_keep_their_cache(tmp_path: Path) -> None:
    """Sets that touch other files leave a file's cached pages and attributes alone.

    The replica's copy is changed behind the view's back: only a cache that was
    kept still shows the old bytes.
    """
    with replicated(tmp_path, cached=True) as (mount, replica, view):
        (mount / "kept").write_bytes(b"old")
        (mount / "other").write_bytes(b"0")
        checkpoint(mount)
        assert (view / "kept").read_bytes() == b"old"
        before = os.stat(view / "kept")
        (replica / "kept").write_bytes(b"new")
        os.chmod(replica / "kept", 0o600)
        for i in range(1, 4):
            (mount / "other").write_bytes(b"%d" % i)
            checkpoint(mount)
            assert (view / "other").read_bytes() == b"%d" % i
            assert (view / "kept").read_bytes() == b"old"
            assert os.stat(view / "kept").st_mode == before.st_mode
        status = replfs("status", view, "--json")
        assert status.returncode == 0, status.stderr
        shown = json.loads(status.stdout)
        assert shown["cached"] is True and shown["version"] == VERSION


def test_standby_cached_ok_secondary_goes_on_when_unmounted(tmp_path: Path) -> None:
    backing, mount, replica, view = (tmp_path / n for n in ("b", "m", "r", "v"))
    backing.mkdir()
    with secondary(replica, "--mount", str(view)) as sec, primary(
            backing, mount, "--secondary", f"127.0.0.1:{sec.port}"):
        (mount / "f").write_bytes(b"1")
        checkpoint(mount)
        assert (view / "f").read_bytes() == b"1"
        subprocess.run(["fusermount3", "-u", str(view)], check=True)
        sec.wait_for("the secondary goes on without it")
        (mount / "f").write_bytes(b"2")
        checkpoint(mount)
        assert (replica / "f").read_bytes() == b"2"
        assert sec.proc is not None and sec.proc.poll() is None


def test_standby_cached_ok_readers_under_load_see_sets_only_grow(tmp_path: Path) -> None:
    """Readers that keep the whole tree in the kernel's cache read it while sets arrive.

    Set i writes i into a and b, into the first and a far page of a large file,
    into a new file renamed over e, as c's mtime, and as the one name in n/.
    Sizes and mtimes of the written files stay the same, so only dropping the
    pages tells the kernel they changed. Whatever order a reader reads these in,
    without a pause, what it reads can only grow: one value older than one read
    before it is a stale cache. A pause holds one set, so a sample between pause
    and resume shows one value everywhere. The readers keep reads and lookups in
    flight while the applier drops their caches: a deadlock there stops the test
    at its deadlines.
    """
    sets = 150
    with replicated(tmp_path, True, "--set-interval", "3600") as (mount, replica, view):
        (mount / "n").mkdir()
        (mount / "n" / "0").write_bytes(b"")
        for name in ("a", "b", "c", "e"):
            (mount / name).write_bytes(b"%08d" % 0)
            os.utime(mount / name, ns=(1, 1))
        os.utime(mount / "c", ns=(0, 0))
        with open(mount / "big", "wb") as f:
            f.truncate(BIG)
            f.write(b"%-4096d" % 0)
            f.seek(BIG - 4096)
            f.write(b"%-4096d" % 0)
        os.utime(mount / "big", ns=(1, 1))
        checkpoint(mount)
        done = threading.Event()
        failures: list[str] = []

        def writer() -> None:
            try:
                for i in range(1, sets + 1):
                    (mount / "a").write_bytes(b"%08d" % i)
                    os.utime(mount / "a", ns=(1, 1))
                    with open(mount / "big", "r+b") as big:  # close hands the pages over
                        os.pwrite(big.fileno(), b"%-4096d" % i, 0)
                        os.pwrite(big.fileno(), b"%-4096d" % i, BIG - 4096)
                    os.utime(mount / "big", ns=(1, 1))
                    (mount / "new").write_bytes(b"%08d" % i)
                    os.rename(mount / "new", mount / "e")
                    (mount / "n" / str(i)).write_bytes(b"")
                    os.unlink(mount / "n" / str(i - 1))
                    os.utime(mount / "c", ns=(i, i))
                    with open(mount / "b", "wb") as f:
                        f.write(b"%08d" % i)
                        f.flush()
                        os.utime(f.fileno(), ns=(1, 1))
                        os.fsync(f.fileno())  # closes set i
            except OSError as exc:
                failures.append(f"writer: {exc}")
            finally:
                done.set()

        def big_page(at: int) -> int:
            with open(view / "big", "rb") as f:
                f.seek(at)
                return int(f.read(4096))

        probes: dict[str, Callable[[], int]] = {
            "a": lambda: int((view / "a").read_bytes()),
            "b": lambda: int((view / "b").read_bytes()),
            "c": lambda: os.stat(view / "c").st_mtime_ns,
            "e": lambda: int((view / "e").read_bytes()),
            "n": lambda: int(os.listdir(view / "n")[0]),
            "big0": lambda: big_page(0),
            "big_end": lambda: big_page(BIG - 4096),
        }

        def reader(order: list[str]) -> None:
            last, last_name, name = 0, "start", ""
            try:
                while not done.is_set():
                    for name in order:
                        value = probes[name]()
                        if value < last:
                            failures.append(f"{name}={value} read after {last_name}={last}")
                            return
                        last, last_name = value, name
            except (OSError, ValueError, IndexError) as exc:
                failures.append(f"reader {order} at {name} after {last_name}={last}: "
                                f"{exc!r} {getattr(exc, 'filename', '')}")

        orders = [list(probes), list(reversed(probes)), ["big_end", "a", "big0", "n"],
                  ["c", "b", "n", "a"]]
        threads = [threading.Thread(target=writer)] + [
            threading.Thread(target=reader, args=(order,)) for order in orders]
        for t in threads:
            t.start()
        samples = 0
        while not done.is_set() and not failures:
            assert replfs("pause", replica).returncode == 0
            seen = {name: probe() for name, probe in probes.items()}
            assert replfs("resume", replica).returncode == 0
            assert len(set(seen.values())) == 1, f"torn sample under pause: {seen}"
            samples += 1
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a reader or the writer hangs"
        assert failures == [], failures
        checkpoint(mount)
        assert {name: probe() for name, probe in probes.items()} == dict.fromkeys(probes, sets)
        assert samples > 0
