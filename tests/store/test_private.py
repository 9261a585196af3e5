"""replfs's own state is private whatever the umask, and state others can change is refused."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from repl import control
from store.errors import UnsafeState
from store.private import private_dir, write_private
from tests.support import checkpoint, primary, replfs, secondary


def modes(root: Path) -> Iterator[tuple[Path, int]]:
    yield root, stat.S_IMODE(os.lstat(root).st_mode)
    for parent, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(parent) / name
            yield path, stat.S_IMODE(os.lstat(path).st_mode)


def test_private_dir_ok_0700_under_umask_0(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        made = private_dir(tmp_path / "a" / "b" / "c")
        write_private(made / "f", b"x")
    finally:
        os.umask(old)
    assert [m for _, m in modes(tmp_path / "a")] == [0o700, 0o700, 0o700, 0o600]


def test_private_dir_ok_sticky_world_writable_parent(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o1777)
    assert private_dir(tmp_path / "state").is_dir()


@pytest.mark.parametrize("mode", [0o777, 0o720, 0o702])
def test_private_dir_err_writable_by_others(tmp_path: Path, mode: int) -> None:
    (tmp_path / "state").mkdir()
    os.chmod(tmp_path / "state", mode)
    with pytest.raises(UnsafeState, match=r"can be written by other users .*chmod go-w"):
        private_dir(tmp_path / "state")


def test_private_dir_err_parent_writable_by_others(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o777)
    with pytest.raises(UnsafeState, match="can be written by other users"):
        private_dir(tmp_path / "state")


def test_private_dir_err_other_owner(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir(mode=0o700)
    os.chown(tmp_path / "state", 65534, 65534)
    with pytest.raises(UnsafeState, match="belongs to uid 65534"):
        private_dir(tmp_path / "state")


def test_daemons_ok_state_private_and_unreadable_to_others(tmp_path: Path) -> None:
    """The journal, staging and control sockets: dirs 0700, files 0600, content hidden."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    os.chmod(tmp_path, 0o755)  # others may look around; the state must stop them
    secret = b"only-root-may-read-this-" + os.urandom(8).hex().encode()
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}"):
        (mount / "f").write_bytes(secret)
        os.chmod(mount / "f", 0o600)
        checkpoint(mount)
        sockets = [control.socket_path(mount), control.socket_path(replica)]
        found = [*modes(tmp_path / ".b.replfs"), *modes(tmp_path / ".r.replfs"),
                 *((p, stat.S_IMODE(os.lstat(p).st_mode)) for p in sockets),
                 (sockets[0].parent, stat.S_IMODE(os.lstat(sockets[0].parent).st_mode))]
        loose = [(str(p), oct(m)) for p, m in found
                 if m != (0o700 if p.is_dir() and not p.is_symlink() else 0o600)]
        assert loose == []
        assert any(p.name == "data.mdb" for p, _ in found)
        nobody = subprocess.run(
            ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
             "grep", "-rla", secret, str(tmp_path / ".b.replfs"), str(tmp_path / ".r.replfs")],
            capture_output=True, text=True)
        assert nobody.returncode == 2 and "Permission denied" in nobody.stderr
        mine = subprocess.run(["grep", "-rla", secret, str(tmp_path / ".b.replfs")],
                              capture_output=True)
        assert mine.returncode == 0, "the journal does hold the content: the check is real"


def test_primary_err_journal_writable_by_others(tmp_path: Path) -> None:
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    mount.mkdir()
    journal = tmp_path / ".b.replfs" / "journal"
    journal.mkdir(parents=True)
    os.chmod(journal, 0o777)
    result = replfs("primary", backing, mount)
    assert result.returncode == 1
    assert result.stderr == (f"replfs: {journal} can be written by other users (mode 0777); "
                             f"run chmod go-w {journal} and check nothing in it was changed\n")
    assert list(journal.iterdir()) == [], "nothing opened, nothing made"
