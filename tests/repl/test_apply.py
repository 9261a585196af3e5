"""The applier on real directories: every op, the redo rule, replay, path safety, depth."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import repl.apply
from repl.apply import apply, intent_for, is_done, redo
from repl.tree import CACHE_SIZE, Tree
from store.libc import renameat2
from store.records import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Op,
    Record,
)
from tests.support import diff, snapshot

FILE = stat.S_IFREG
DIR = stat.S_IFDIR
OLD_NS = 1_000_000_000_123_456_789


def rec(op: Op, path: bytes = b"", **fields: Any) -> Record:
    record = Record(op, 1, 0, path=path, **fields)
    record.validate()
    return record


def populate(root: Path) -> None:
    """The tree every test starts from: files, dirs, a symlink, a hard link, xattrs."""
    root.mkdir()
    (root / "f").write_bytes(b"0123456789" * 1000)
    os.chown(root / "f", 1000, 1000)
    os.chmod(root / "f", 0o640)
    os.setxattr(root / "f", "user.keep", b"k")
    (root / "d").mkdir()
    (root / "d" / "g").write_bytes(b"gee")
    os.link(root / "d" / "g", root / "d" / "g2")
    (root / "e").mkdir()
    os.symlink("f", root / "s")
    set_old_times(root)


def set_old_times(root: Path) -> None:
    """Give everything the same old times, so any later change to one shows."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.utime(os.path.join(dirpath, name), ns=(OLD_NS, OLD_NS), follow_symlinks=False)
    os.utime(root, ns=(OLD_NS, OLD_NS))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    populate(tmp_path / "t")
    return tmp_path / "t"


@pytest.fixture
def tree(root: Path) -> Iterator[Tree]:
    with closing(Tree(root)) as t:
        yield t


def run(root: Path, *records: Record) -> None:
    tree = Tree(root)
    try:
        for record in records:
            apply(tree, record)
    finally:
        tree.close()


# --- every op ------------------------------------------------------------------------


def test_apply_write_ok(root: Path, tree: Tree) -> None:
    apply(tree, rec(Op.WRITE, b"f", offset=5, data=b"abc"))
    apply(tree, rec(Op.WRITE, b"d/g", offset=10, data=b"z"))
    assert (root / "f").read_bytes()[:10] == b"01234abc89"
    assert (root / "d" / "g").read_bytes() == b"gee" + bytes(7) + b"z"
    assert (root / "d" / "g2").read_bytes() == b"gee" + bytes(7) + b"z", "one inode, two names"


def test_apply_write_ok_large(root: Path, tree: Tree) -> None:
    data = os.urandom(3 << 20)
    apply(tree, rec(Op.WRITE, b"f", offset=1, data=data))
    assert (root / "f").read_bytes() == b"0" + data


def test_apply_truncate_ok(root: Path, tree: Tree) -> None:
    apply(tree, rec(Op.TRUNCATE, b"f", size=3))
    assert (root / "f").read_bytes() == b"012"
    apply(tree, rec(Op.TRUNCATE, b"f", size=5))
    assert (root / "f").read_bytes() == b"012\0\0"


KEEP, PUNCH, ZERO = FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
FALLOCATES = [  # on f: 10,000 bytes of data
    rec(Op.FALLOCATE, b"f", flags=0, offset=9000, length=7000),  # grows it to 16,000
    rec(Op.FALLOCATE, b"f", flags=KEEP, offset=0, length=1 << 20),  # preallocates past the end
    rec(Op.FALLOCATE, b"f", flags=PUNCH | KEEP, offset=4096, length=4096),
    rec(Op.FALLOCATE, b"f", flags=PUNCH | KEEP, offset=15000, length=9000),  # past the end
    rec(Op.FALLOCATE, b"f", flags=ZERO, offset=100, length=50),
    rec(Op.FALLOCATE, b"f", flags=ZERO | KEEP, offset=15990, length=100),
    rec(Op.FALLOCATE, b"f", flags=ZERO, offset=20000, length=10),  # grows it to 20,010
]


def fallocated(data: bytes) -> bytes:
    """What a reader sees of f, holding *data*, after FALLOCATES."""
    out = bytearray(data.ljust(16000, b"\0"))
    for start, end in ((4096, 8192), (15000, 16000), (100, 150), (15990, 16000)):
        out[start:end] = bytes(end - start)
    return bytes(out.ljust(20010, b"\0"))


def test_apply_fallocate_ok(root: Path, tree: Tree) -> None:
    data = (root / "f").read_bytes()
    run(root, *FALLOCATES)
    assert (root / "f").read_bytes() == fallocated(data)
    fd = os.open(root / "f", os.O_RDONLY)
    try:
        assert os.lseek(fd, 4096, os.SEEK_HOLE) == 4096, "a hole punched"
        assert os.lseek(fd, 4096, os.SEEK_DATA) == 8192
        assert os.fstat(fd).st_blocks * 512 > 1 << 19, "preallocated past the end"
    finally:
        os.close(fd)
    apply(tree, rec(Op.FALLOCATE, b"d/g2", flags=0, offset=0, length=10))
    assert (root / "d" / "g").read_bytes() == b"gee" + bytes(7), "one inode, two names"


def test_apply_fallocate_ok_without_the_mode(root: Path, tree: Tree,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """On a replica whose filesystem lacks a mode, the bytes come out the same."""
    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    data = (root / "f").read_bytes()
    monkeypatch.setattr(repl.apply, "fallocate", unsupported)
    run(root, *FALLOCATES)
    assert (root / "f").read_bytes() == fallocated(data)


def test_apply_fallocate_err_missing(root: Path, tree: Tree) -> None:
    with pytest.raises(FileNotFoundError):
        apply(tree, rec(Op.FALLOCATE, b"nope", flags=0, offset=0, length=1))


def test_apply_create_ok(root: Path, tree: Tree) -> None:
    old = os.umask(0o077)  # the record's mode is exact, whatever the applier's umask
    try:
        apply(tree, rec(Op.CREATE, b"d/new", mode=FILE | 0o4755, uid=1234, gid=5678))
    finally:
        os.umask(old)
    st = os.lstat(root / "d" / "new")
    assert (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode)) == (FILE, 0o4755)
    assert (st.st_uid, st.st_gid, st.st_size) == (1234, 5678, 0)


def test_apply_file_ok(root: Path, tree: Tree) -> None:
    """A FILE record is the whole file: its bytes, owner, exact mode and times."""
    old = os.umask(0o077)
    try:
        apply(tree, rec(Op.FILE, b"d/new", mode=FILE | 0o4755, uid=1234, gid=5678,
                        atime_ns=1_000_000_001, mtime_ns=2_000_000_002, data=b"\0data"))
    finally:
        os.umask(old)
    st = os.lstat(root / "d" / "new")
    assert (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode)) == (FILE, 0o4755)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
    assert (root / "d" / "new").read_bytes() == b"\0data"


def test_apply_file_err_exists(root: Path, tree: Tree) -> None:
    with pytest.raises(FileExistsError):
        apply(tree, rec(Op.FILE, b"f", mode=FILE | 0o644, data=b"x"))
    assert (root / "f").read_bytes().startswith(b"0123")


def test_apply_create_err_exists(root: Path, tree: Tree) -> None:
    with pytest.raises(FileExistsError):
        apply(tree, rec(Op.CREATE, b"f", mode=FILE | 0o644))
    assert (root / "f").read_bytes().startswith(b"0123")


def test_apply_mkdir_ok(root: Path, tree: Tree) -> None:
    apply(tree, rec(Op.MKDIR, b"e/sub", mode=DIR | 0o3750, uid=1, gid=2))
    st = os.lstat(root / "e" / "sub")
    assert (stat.S_ISDIR(st.st_mode), stat.S_IMODE(st.st_mode)) == (True, 0o3750)
    assert (st.st_uid, st.st_gid) == (1, 2)


@pytest.mark.parametrize(("kind", "rdev"), [(stat.S_IFIFO, 0), (stat.S_IFCHR, os.makedev(1, 3)),
                                            (stat.S_IFBLK, os.makedev(7, 0)),
                                            (stat.S_IFSOCK, 0), (stat.S_IFREG, 0)])
def test_apply_mknod_ok(root: Path, tree: Tree, kind: int, rdev: int) -> None:
    apply(tree, rec(Op.MKNOD, b"d/node", mode=kind | 0o604, rdev=rdev, uid=3, gid=4))
    st = os.lstat(root / "d" / "node")
    assert (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode)) == (kind, 0o604)
    assert (st.st_rdev, st.st_uid, st.st_gid) == (rdev, 3, 4)


def test_apply_symlink_ok(root: Path, tree: Tree) -> None:
    apply(tree, rec(Op.SYMLINK, b"d/sl", data=b"../nowhere/\xff", uid=5, gid=6))
    assert os.readlink(os.fsencode(root / "d" / "sl")) == b"../nowhere/\xff"
    st = os.lstat(root / "d" / "sl")
    assert (st.st_uid, st.st_gid) == (5, 6)


def test_apply_link_ok(root: Path, tree: Tree) -> None:
    apply(tree, rec(Op.LINK, b"f", path2=b"e/hard"))
    assert os.lstat(root / "e" / "hard").st_ino == os.lstat(root / "f").st_ino
    assert os.lstat(root / "f").st_nlink == 2


def test_apply_link_ok_symlink_itself(root: Path, tree: Tree) -> None:
    apply(tree, rec(Op.LINK, b"s", path2=b"s2"))
    assert os.lstat(root / "s2").st_ino == os.lstat(root / "s").st_ino


def test_apply_unlink_ok(root: Path, tree: Tree) -> None:
    apply(tree, rec(Op.UNLINK, b"d/g"))
    assert sorted(os.listdir(root / "d")) == ["g2"]
    apply(tree, rec(Op.UNLINK, b"s"))
    assert (root / "f").exists(), "unlinking a symlink leaves its target"


def test_apply_unlink_err_missing(tree: Tree) -> None:
    with pytest.raises(FileNotFoundError):
        apply(tree, rec(Op.UNLINK, b"nothing"))


def test_apply_rmdir_ok(root: Path, tree: Tree) -> None:
    assert tree.lstat(b"e") is not None
    apply(tree, rec(Op.RMDIR, b"e"))
    assert not (root / "e").exists()
    assert tree.lstat(b"e/x") is None, "no stale cached directory"
    apply(tree, rec(Op.MKDIR, b"e", mode=DIR | 0o700))
    apply(tree, rec(Op.CREATE, b"e/x", mode=FILE | 0o600))
    assert (root / "e" / "x").exists()


def test_apply_rmdir_err_not_empty(tree: Tree) -> None:
    with pytest.raises(OSError) as exc:
        apply(tree, rec(Op.RMDIR, b"d"))
    assert exc.value.errno == errno.ENOTEMPTY


def test_apply_rename_ok(root: Path, tree: Tree) -> None:
    ino = os.lstat(root / "f").st_ino
    apply(tree, rec(Op.RENAME, b"f", path2=b"d/g"))
    assert os.lstat(root / "d" / "g").st_ino == ino
    assert not (root / "f").exists()
    assert (root / "d" / "g2").read_bytes() == b"gee"


def test_apply_rename_ok_directory(root: Path, tree: Tree) -> None:
    tree.lstat(b"d/g")  # cache d
    apply(tree, rec(Op.RENAME, b"d", path2=b"e/moved"))
    assert (root / "e" / "moved" / "g").read_bytes() == b"gee"
    apply(tree, rec(Op.MKDIR, b"d", mode=DIR | 0o755))
    apply(tree, rec(Op.CREATE, b"d/new", mode=FILE | 0o644))
    assert os.listdir(root / "d") == ["new"], "the old d's cached fd is not reused"


def test_apply_rename_err_noreplace(root: Path, tree: Tree) -> None:
    with pytest.raises(FileExistsError):
        apply(tree, rec(Op.RENAME, b"f", path2=b"d/g", flags=RENAME_NOREPLACE))
    assert (root / "f").exists()
    apply(tree, rec(Op.RENAME, b"f", path2=b"d/h", flags=RENAME_NOREPLACE))
    assert not (root / "f").exists() and (root / "d" / "h").exists()


def test_apply_rename_ok_exchange(root: Path, tree: Tree) -> None:
    ino_f, ino_d = os.lstat(root / "f").st_ino, os.lstat(root / "d").st_ino
    apply(tree, rec(Op.RENAME, b"f", path2=b"d", flags=RENAME_EXCHANGE))
    assert (os.lstat(root / "f").st_ino, os.lstat(root / "d").st_ino) == (ino_d, ino_f)
    assert (root / "f" / "g").read_bytes() == b"gee"


def test_apply_chmod_ok(root: Path, tree: Tree) -> None:
    apply(tree, rec(Op.CHMOD, b"f", mode=0o6711))
    apply(tree, rec(Op.CHMOD, b"", mode=0o1777))
    assert stat.S_IMODE(os.lstat(root / "f").st_mode) == 0o6711
    assert stat.S_IMODE(os.lstat(root).st_mode) == 0o1777


def test_apply_chmod_err_symlink(root: Path, tree: Tree) -> None:
    """A symlink has no mode; its target is not touched."""
    with pytest.raises(OSError) as exc:
        apply(tree, rec(Op.CHMOD, b"s", mode=0o777))
    assert exc.value.errno in (errno.EOPNOTSUPP, errno.ENOTSUP)
    assert stat.S_IMODE(os.lstat(root / "f").st_mode) == 0o640


def test_apply_chown_ok(root: Path, tree: Tree) -> None:
    apply(tree, rec(Op.CHOWN, b"s", uid=11, gid=12))
    apply(tree, rec(Op.CHOWN, b"", uid=13, gid=14))
    assert (os.lstat(root / "s").st_uid, os.lstat(root / "s").st_gid) == (11, 12)
    assert (os.lstat(root / "f").st_uid, os.lstat(root / "f").st_gid) == (1000, 1000)
    assert (os.lstat(root).st_uid, os.lstat(root).st_gid) == (13, 14)


def test_apply_utimes_ok(root: Path, tree: Tree) -> None:
    apply(tree, rec(Op.UTIMES, b"d/g", atime_ns=-5_000_000_001, mtime_ns=7_000_000_123))
    apply(tree, rec(Op.UTIMES, b"s", atime_ns=1, mtime_ns=2))
    apply(tree, rec(Op.UTIMES, b"", atime_ns=3, mtime_ns=4))
    st = os.lstat(root / "d" / "g")
    assert (st.st_atime_ns, st.st_mtime_ns) == (-5_000_000_001, 7_000_000_123)
    assert os.lstat(root / "s").st_mtime_ns == 2
    assert os.lstat(root / "f").st_mtime_ns == OLD_NS, "a symlink's target keeps its times"
    assert os.lstat(root).st_mtime_ns == 4


def test_apply_setxattr_ok(root: Path, tree: Tree) -> None:
    apply(tree, rec(Op.SETXATTR, b"d/g", name=b"user.k", data=b"\0v1"))
    apply(tree, rec(Op.SETXATTR, b"d/g", name=b"user.k", data=b"v2"))
    apply(tree, rec(Op.SETXATTR, b"", name=b"trusted.r", data=b""))
    assert os.getxattr(root / "d" / "g", "user.k") == b"v2"
    assert os.getxattr(root, "trusted.r") == b""


def test_apply_removexattr_ok(root: Path, tree: Tree) -> None:
    apply(tree, rec(Op.REMOVEXATTR, b"f", name=b"user.keep"))
    assert os.listxattr(root / "f") == []
    apply(tree, rec(Op.REMOVEXATTR, b"f", name=b"user.keep"))  # absent: nothing to do


def test_apply_sync_void_ok(root: Path, tree: Tree) -> None:
    before = snapshot(root)
    apply(tree, Record(Op.SYNC, 1, 3, count=3))
    apply(tree, Record(Op.VOID, 1, 4))
    assert diff(before, snapshot(root)) == []


# --- the redo rule for namespace ops -----------------------------------------------------


def _renameat2(src: str, dst: str, flags: int) -> Callable[[Path], None]:
    def call(root: Path) -> None:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            renameat2(fd, src.encode(), fd, dst.encode(), flags)
        finally:
            os.close(fd)
    return call


def _create(name: str) -> Callable[[Path], None]:
    return lambda root: os.close(os.open(root / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))


@dataclass(frozen=True)
class Case:
    """A namespace op and the bare syscall that does its change (without owner and mode)."""

    record: Record
    syscall: Callable[[Path], None]


CASES: dict[str, Case] = {
    "create": Case(rec(Op.CREATE, b"d/new", mode=FILE | 0o4751, uid=1000, gid=1001),
                   _create("d/new")),
    "file": Case(rec(Op.FILE, b"d/small", mode=FILE | 0o4751, uid=1000, gid=1001,
                     atime_ns=7_000_000_123, mtime_ns=9_000_000_456, data=b"whole" * 100),
                 _create("d/small")),
    "mkdir": Case(rec(Op.MKDIR, b"d/sub", mode=DIR | 0o2750, uid=5, gid=6),
                  lambda r: os.mkdir(r / "d" / "sub")),
    "mknod-fifo": Case(rec(Op.MKNOD, b"fifo", mode=stat.S_IFIFO | 0o640, uid=7, gid=8),
                       lambda r: os.mkfifo(r / "fifo")),
    "symlink": Case(rec(Op.SYMLINK, b"d/sl", data=b"../f", uid=9, gid=10),
                    lambda r: os.symlink("../f", r / "d" / "sl")),
    "link": Case(rec(Op.LINK, b"f", path2=b"e/hard"),
                 lambda r: os.link(r / "f", r / "e" / "hard")),
    "link-second-name": Case(rec(Op.LINK, b"d/g2", path2=b"g3"),
                             lambda r: os.link(r / "d" / "g2", r / "g3")),
    "unlink": Case(rec(Op.UNLINK, b"d/g"), lambda r: os.unlink(r / "d" / "g")),
    "unlink-symlink": Case(rec(Op.UNLINK, b"s"), lambda r: os.unlink(r / "s")),
    "rmdir": Case(rec(Op.RMDIR, b"e"), lambda r: os.rmdir(r / "e")),
    "rename": Case(rec(Op.RENAME, b"f", path2=b"e/f"), lambda r: os.rename(r / "f", r / "e" / "f")),
    "rename-over": Case(rec(Op.RENAME, b"f", path2=b"d/g"),
                        lambda r: os.rename(r / "f", r / "d" / "g")),
    "rename-dir-over": Case(rec(Op.RENAME, b"d", path2=b"e"),
                            lambda r: os.rename(r / "d", r / "e")),
    "rename-noreplace": Case(rec(Op.RENAME, b"d/g", path2=b"e/g", flags=RENAME_NOREPLACE),
                             _renameat2("d/g", "e/g", RENAME_NOREPLACE)),
    "exchange": Case(rec(Op.RENAME, b"f", path2=b"d/g", flags=RENAME_EXCHANGE),
                     _renameat2("f", "d/g", RENAME_EXCHANGE)),
    "exchange-dir-file": Case(rec(Op.RENAME, b"d", path2=b"f", flags=RENAME_EXCHANGE),
                              _renameat2("d", "f", RENAME_EXCHANGE)),
}


def crashed(tmp_path: Path, name: str, case: Case, stage: str) -> tuple[Path, bytes | None]:
    """A tree where *case*'s op was interrupted at *stage*, and the intent its marker holds.

    before: the marker is committed, the syscall never ran.
    syscall: the syscall ran, the rest of the op (owner, mode) did not.
    applied: the whole op ran; only the marker stayed behind.
    """
    root = tmp_path / f"{name}-{stage}"
    populate(root)
    tree = Tree(root)
    try:
        intent = intent_for(tree, case.record)
        if stage == "syscall":
            case.syscall(root)
        elif stage == "applied":
            apply(tree, case.record)
    finally:
        tree.close()
    return root, intent


@pytest.mark.parametrize("stage", ["before", "syscall", "applied"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_apply_redo_ok(tmp_path: Path, name: str, stage: str) -> None:
    case = CASES[name]
    reference = tmp_path / "reference"
    populate(reference)
    run(reference, case.record)
    want = snapshot(reference, mtimes=False)

    root, intent = crashed(tmp_path, name, case, stage)
    tree = Tree(root)  # a restarted applier: nothing cached
    try:
        assert is_done(tree, case.record, intent) == (stage != "before")
        redo(tree, case.record, intent)
        assert diff(want, snapshot(root, mtimes=False)) == []
        redo(tree, case.record, intent)  # killed during redo: the next redo changes nothing
        assert diff(want, snapshot(root, mtimes=False)) == []
    finally:
        tree.close()


def test_apply_redo_ok_intent_only_for_exchange(tree: Tree) -> None:
    assert {name for name, case in CASES.items() if intent_for(tree, case.record)} == {
        "exchange", "exchange-dir-file"}


def test_apply_redo_err_exchange_without_intent(tree: Tree) -> None:
    with pytest.raises(ValueError, match="intent"):
        redo(tree, CASES["exchange"].record, None)


def test_apply_redo_ok_failed_op_fails_again(root: Path, tree: Tree) -> None:
    """An op that failed before the crash fails the same way on redo (and is voided)."""
    record = rec(Op.RENAME, b"f", path2=b"d/g", flags=RENAME_NOREPLACE)
    before = snapshot(root)
    with pytest.raises(FileExistsError):
        redo(tree, record, None)
    assert diff(before, snapshot(root)) == []


# --- replaying data ops from any prefix ---------------------------------------------------

DATA_RUN = [
    rec(Op.WRITE, b"f", offset=100, data=b"A" * 50),
    rec(Op.TRUNCATE, b"f", size=120),
    rec(Op.WRITE, b"f", offset=9000, data=b"B" * 10),
    rec(Op.CHMOD, b"f", mode=0o4755),
    rec(Op.CHOWN, b"f", uid=2000, gid=2001),
    rec(Op.SETXATTR, b"f", name=b"user.a", data=b"1"),
    rec(Op.SETXATTR, b"f", name=b"user.a", data=b"22"),
    rec(Op.REMOVEXATTR, b"f", name=b"user.keep"),
    rec(Op.REMOVEXATTR, b"f", name=b"user.never"),
    rec(Op.WRITE, b"d/g", offset=0, data=b"hello world"),
    rec(Op.TRUNCATE, b"d/g", size=4),
    rec(Op.WRITE, b"d/g", offset=2, data=b"LL"),
    rec(Op.SETXATTR, b"d", name=b"user.dir", data=b"x"),
    rec(Op.CHMOD, b"d", mode=0o700),
    rec(Op.CHMOD, b"", mode=0o711),
    rec(Op.FALLOCATE, b"d/g", flags=0, offset=0, length=9000),
    rec(Op.WRITE, b"d/g", offset=8000, data=b"D" * 2000),
    rec(Op.FALLOCATE, b"d/g", flags=PUNCH | KEEP, offset=4096, length=4096),
    rec(Op.FALLOCATE, b"d/g", flags=ZERO, offset=9990, length=20),
    rec(Op.TRUNCATE, b"d/g", size=9995),
    rec(Op.TRUNCATE, b"f", size=0),
    rec(Op.WRITE, b"f", offset=3, data=b"tail"),
    rec(Op.CHOWN, b"s", uid=3, gid=4),
    rec(Op.UTIMES, b"f", atime_ns=OLD_NS + 1, mtime_ns=OLD_NS + 2),
    rec(Op.UTIMES, b"d/g", atime_ns=OLD_NS + 3, mtime_ns=OLD_NS + 4),
    rec(Op.UTIMES, b"", atime_ns=OLD_NS + 5, mtime_ns=OLD_NS + 6),
]


def test_apply_replay_ok_from_any_prefix(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    populate(reference)
    run(reference, *DATA_RUN)
    want = snapshot(reference)
    populate(tmp_path / "untouched")
    assert diff(want, snapshot(tmp_path / "untouched")) != [], "the run changes something"
    for done in range(len(DATA_RUN) + 1):
        root = tmp_path / f"prefix-{done}"
        populate(root)
        run(root, *DATA_RUN[:done])
        run(root, *DATA_RUN)
        assert diff(want, snapshot(root)) == [], f"after a crash with {done} ops done"


def test_apply_replay_ok_after_torn_write(tmp_path: Path) -> None:
    """A write cut short by the crash is completed by the replay."""
    reference = tmp_path / "reference"
    populate(reference)
    run(reference, *DATA_RUN)
    want = snapshot(reference)
    for i, record in enumerate(DATA_RUN):
        if record.op != Op.WRITE:
            continue
        root = tmp_path / f"torn-{i}"
        populate(root)
        half = Record(Op.WRITE, 1, 0, path=record.path, offset=record.offset,
                      data=record.data[: len(record.data) // 2])
        run(root, *DATA_RUN[:i], half)
        run(root, *DATA_RUN)
        assert diff(want, snapshot(root)) == [], f"torn write {i}"


# --- path safety ------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path, root: Path) -> Path:
    """A directory outside the tree, and symlinks inside the tree pointing at it."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "file").write_bytes(b"secret")
    os.setxattr(out / "file", "user.k", b"v")
    (out / "sub").mkdir()
    os.symlink(out, root / "dirlink")
    os.symlink(out / "file", root / "filelink")
    os.symlink("d", root / "inner")  # a symlink to a directory inside the tree
    return out


THROUGH_SYMLINKED_DIR = [
    rec(Op.WRITE, b"dirlink/file", data=b"pwned"),
    rec(Op.TRUNCATE, b"dirlink/file", size=0),
    rec(Op.FALLOCATE, b"dirlink/file", flags=PUNCH | KEEP, offset=0, length=6),
    rec(Op.CREATE, b"dirlink/new", mode=FILE | 0o644),
    rec(Op.MKDIR, b"dirlink/newdir", mode=DIR | 0o755),
    rec(Op.MKNOD, b"dirlink/fifo", mode=stat.S_IFIFO | 0o644),
    rec(Op.SYMLINK, b"dirlink/sl", data=b"x"),
    rec(Op.LINK, b"f", path2=b"dirlink/hard"),
    rec(Op.LINK, b"dirlink/file", path2=b"stolen"),
    rec(Op.UNLINK, b"dirlink/file"),
    rec(Op.RMDIR, b"dirlink/sub"),
    rec(Op.RENAME, b"dirlink/file", path2=b"stolen"),
    rec(Op.RENAME, b"f", path2=b"dirlink/planted"),
    rec(Op.RENAME, b"f", path2=b"dirlink/file", flags=RENAME_EXCHANGE),
    rec(Op.CHMOD, b"dirlink/file", mode=0o777),
    rec(Op.CHOWN, b"dirlink/file", uid=1, gid=1),
    rec(Op.UTIMES, b"dirlink/file", atime_ns=1, mtime_ns=1),
    rec(Op.SETXATTR, b"dirlink/file", name=b"user.k", data=b"pwned"),
    rec(Op.REMOVEXATTR, b"dirlink/file", name=b"user.k"),
    rec(Op.WRITE, b"inner/g", data=b"pwned"),
    rec(Op.UNLINK, b"inner/g"),
]


@pytest.mark.parametrize("record", THROUGH_SYMLINKED_DIR, ids=lambda r: f"{r.op.name}-{r.path!r}")
def test_apply_err_symlinked_parent(root: Path, outside: Path, record: Record) -> None:
    before_out, before_in = snapshot(outside), snapshot(root)
    tree = Tree(root)
    try:
        with pytest.raises(OSError) as exc:
            apply(tree, record)
        assert exc.value.errno in (errno.ENOTDIR, errno.ELOOP)
        (through,) = (p for p in (record.path, record.path2)
                      if p.startswith((b"dirlink/", b"inner/")))
        assert tree.lstat(through) is None, "lstat does not look through it either"
    finally:
        tree.close()
    assert diff(before_out, snapshot(outside)) == []
    assert diff(before_in, snapshot(root)) == []


FINAL_SYMLINK = [
    (rec(Op.WRITE, b"filelink", data=b"pwned"), errno.ELOOP),
    (rec(Op.TRUNCATE, b"filelink", size=0), errno.ELOOP),
    (rec(Op.FALLOCATE, b"filelink", flags=ZERO, offset=0, length=6), errno.ELOOP),
    (rec(Op.CHMOD, b"filelink", mode=0o777), errno.EOPNOTSUPP),
    (rec(Op.SETXATTR, b"filelink", name=b"user.k", data=b"pwned"), errno.EPERM),
    (rec(Op.CHOWN, b"filelink", uid=1, gid=1), None),
    (rec(Op.UTIMES, b"filelink", atime_ns=1, mtime_ns=1), None),
    (rec(Op.REMOVEXATTR, b"filelink", name=b"user.k"), errno.EPERM),
    (rec(Op.LINK, b"filelink", path2=b"hardlink"), None),
]


@pytest.mark.parametrize(("record", "err"), FINAL_SYMLINK,
                         ids=[r.op.name for r, _ in FINAL_SYMLINK])
def test_apply_ok_final_symlink_not_followed(root: Path, outside: Path, record: Record,
                                             err: int | None) -> None:
    """An op on a symlink acts on the link itself, or fails: never on what it points at."""
    before = snapshot(outside)
    tree = Tree(root)
    try:
        if err is None:
            apply(tree, record)
        else:
            with pytest.raises(OSError) as exc:
                apply(tree, record)
            assert exc.value.errno == err
    finally:
        tree.close()
    assert diff(before, snapshot(outside)) == []
    if record.op == Op.LINK:
        assert os.readlink(root / "hardlink") == str(outside / "file")


# --- deeper than PATH_MAX -----------------------------------------------------------------


def make_deep(root: Path, names: list[bytes]) -> bytes:
    """Directories *names* nested under *root*, made with *at calls. Returns the path."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        for name in names:
            os.mkdir(name, dir_fd=fd)
            next_fd = os.open(name, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    finally:
        os.close(fd)
    return b"/".join(names)


def remove_tree(root: Path) -> None:
    """Empty *root*, however deep, with *at calls and a loop (no recursion, no long paths)."""
    stack: list[tuple[int, str]] = [(os.open(root, os.O_RDONLY | os.O_DIRECTORY), "")]
    try:
        while stack:
            fd, name = stack[-1]
            subdir = None
            for entry in os.listdir(fd):
                if stat.S_ISDIR(os.stat(entry, dir_fd=fd, follow_symlinks=False).st_mode):
                    subdir = entry
                    break
                os.unlink(entry, dir_fd=fd)
            if subdir is not None:
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                stack.append((os.open(subdir, flags, dir_fd=fd), subdir))
                continue
            os.close(fd)
            stack.pop()
            if stack:
                os.rmdir(name, dir_fd=stack[-1][0])
    finally:
        for fd, _ in stack:
            os.close(fd)


def stat_deep(root: Path, path: bytes) -> os.stat_result:
    """lstat *path* by walking it with *at calls (a plain path would be too long)."""
    *dirs, name = path.split(b"/")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        for d in dirs:
            next_fd = os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)


@pytest.mark.parametrize(("depth", "width"), [(2100, 1), (20, 250)],
                         ids=["many-short-names", "few-long-names"])
def test_apply_ok_deeper_than_path_max(root: Path, depth: int, width: int) -> None:
    names = [(b"%c" % (ord("a") + i % 26)) * width for i in range(depth)]
    deep = make_deep(root, names)
    assert len(deep) > os.pathconf(root, "PC_PATH_MAX")
    try:
        tree = Tree(root)
        try:
            new = rec(Op.CREATE, deep + b"/f", mode=FILE | 0o600, uid=7, gid=8)
            assert not is_done(tree, new, None)
            apply(tree, new)
            assert is_done(tree, new, None)
            apply(tree, rec(Op.WRITE, deep + b"/f", offset=2, data=b"deep"))
            apply(tree, rec(Op.SETXATTR, deep + b"/f", name=b"user.d", data=b"1"))
            apply(tree, rec(Op.UTIMES, deep + b"/f", atime_ns=5, mtime_ns=6))
            apply(tree, rec(Op.MKDIR, deep + b"/x", mode=DIR | 0o755))
            apply(tree, rec(Op.RENAME, deep + b"/f", path2=deep + b"/x/g"))
            apply(tree, rec(Op.LINK, deep + b"/x/g", path2=b"e/top"))
            st = stat_deep(root, deep + b"/x/g")
            assert (st.st_size, st.st_mtime_ns, st.st_uid, st.st_nlink) == (6, 6, 7, 2)
            assert (root / "e" / "top").read_bytes() == b"\0\0deep"
            assert os.getxattr(root / "e" / "top", "user.d") == b"1"
            apply(tree, rec(Op.UNLINK, b"e/top"))
            assert tree.lstat(deep + b"/x/g") is not None
        finally:
            tree.close()
    finally:
        remove_tree(root)


def test_apply_ok_rename_between_shallow_and_deep(root: Path) -> None:
    """A rename's two parents both stay open, however many directories the second walk opens."""
    names = [b"n"] * (CACHE_SIZE * 2)
    deep = make_deep(root, names)
    try:
        tree = Tree(root)
        try:
            for i in range(CACHE_SIZE):  # fill the cache
                os.mkdir(root / "e" / f"c{i}")
                tree.dir_fd(b"e/c%d" % i)
            apply(tree, rec(Op.RENAME, b"d/g", path2=deep + b"/g"))
            apply(tree, rec(Op.LINK, b"d/g2", path2=deep + b"/h"))
        finally:
            tree.close()
        assert stat_deep(root, deep + b"/g").st_ino == os.lstat(root / "d" / "g2").st_ino
        assert stat_deep(root, deep + b"/h").st_ino == os.lstat(root / "d" / "g2").st_ino
        assert sorted(os.listdir(root / "d")) == ["g2"]
    finally:
        remove_tree(root)
