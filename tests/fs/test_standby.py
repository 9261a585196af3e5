"""The standby mount: read-only, and only ever whole data sets."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from tests.support import checkpoint, diff, primary, replfs, secondary, snapshot, standby


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


def test_standby_samples_are_whole_sets(tmp_path: Path) -> None:
    """Each set ends with a == b; a sample taken between pause and resume must too."""
    backing, mount, replica, view = (tmp_path / n for n in ("b", "m", "r", "v"))
    backing.mkdir()
    done = threading.Event()
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}", "--set-interval", "3600"):
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
        with standby(replica, view):
            while not done.is_set() or len(seen) < 5:
                assert replfs("pause", replica).returncode == 0
                a, b = (view / "a").read_bytes(), (view / "b").read_bytes()
                assert replfs("resume", replica).returncode == 0
                assert a == b, f"torn sample: a={a!r} b={b!r}"
                seen.append(int(a))
        thread.join()
    assert seen == sorted(seen), "the set shown never goes back"
    assert len(set(seen)) > 1, "samples saw the replica move"


def test_standby_directory_replaced_by_a_file_keeps_its_files_reachable(tmp_path: Path
                                                                        ) -> None:
    """A set moves a directory's files out and puts a file of the same name in its
    place: the view shows that set, though it knew each file by its old name.

    ext4 gives the new file the directory's inode number at once, so an old name
    leads to a file where a directory was; each file must still be reached by its
    new name (not fail with ENOTDIR, or ENOENT where the number is not reused).
    """
    backing, mount, replica, view = (tmp_path / n for n in ("b", "m", "r", "v"))
    backing.mkdir()
    names = [f"f{i}" for i in range(32)]  # the old name is tried first half the time
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}"), standby(replica, view):
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
