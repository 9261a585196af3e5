"""POSIX through the primary mount: the same operations give the same results as natively.

Each scenario is one function that takes a root directory and runs a fixed
sequence of operations under it, noting what a program sees: return values,
and for failing calls the errno name. It runs twice, on a plain directory
and through a mount of an empty backing directory beside it (both on the
same filesystem). The notes must be equal, and so must the trees
(tests.support.snapshot: type, mode, owner, size, nlink, xattrs, content).

mtimes are compared only where a scenario set them explicitly with
nanoseconds and left them alone afterwards: everywhere else they come from
the clock, which differs between the two runs.

What the mount cannot show as the native filesystem does, and what these
tests check instead:

- The mount root's st_ino is FUSE's root inode (1), not the backing
  directory's; the daemon cannot see above the mount, so the root's own
  ".." entry in readdir names the root again, as in "/".
- readdir order is the daemon's (sorted by name), not the backing
  filesystem's hash order; POSIX leaves it unspecified, so names are
  compared as sets.
- O_TMPFILE, and modes in directories with a default ACL: pyfuse3 offers no
  way to match them (test_primary_known_gaps_ok).
- SEEK_DATA/SEEK_HOLE answer EINVAL while the file is open for writing
  (tests/fs/test_ranges.py, with fallocate and copy_file_range).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import mmap
import os
import re
import stat
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyfuse3

from tests.support import REPLFS, Daemon, Entry, diff, primary, replay, snapshot, status

TIMES = (1_000_000_001_123_456_789, 1_200_000_002_987_654_321)  # (atime, mtime) in ns
OLD_TIMES = (-1_500_000_000_123_456_789, -999_999_999)  # before 1970
NOBODY = 65534
BIG_DIR = 2000
# The daemon of the fd test may open FD_LIMIT files (prlimit), enough for the
# directory fds it caches (4096) and its own; it is shown more of each.
FD_LIMIT = 6_000
MANY_FILES = 10_000  # more than FD_LIMIT
MANY_DIRS = 5_000  # more than the daemon keeps directory fds for
FD_BOUND = 5_000  # what it may hold: its directory fd cache and a few fds of its own
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
O_DIR = os.O_RDONLY | os.O_DIRECTORY

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(src: Path, dst: Path, flags: int) -> None:
    if _libc.renameat2(-100, bytes(src), -100, bytes(dst), flags) != 0:  # -100: AT_FDCWD
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class _Dirent(ctypes.Structure):
    _fields_ = (("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256))


_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = (ctypes.c_char_p,)
_libc.readdir.restype = ctypes.POINTER(_Dirent)
_libc.readdir.argtypes = (ctypes.c_void_p,)
_libc.closedir.argtypes = (ctypes.c_void_p,)


def dirents(path: Path) -> dict[str, tuple[int, int]]:
    """Every entry readdir(3) returns, "." and ".." included: name -> (d_ino, d_type)."""
    handle = _libc.opendir(bytes(path))
    assert handle, os.strerror(ctypes.get_errno())
    out = {}
    try:
        while entry := _libc.readdir(handle):
            out[entry.contents.d_name.decode()] = (entry.contents.d_ino, entry.contents.d_type)
    finally:
        _libc.closedir(handle)
    return out


class Probe:
    """What a program sees, step by step: results, and errno names for failures."""

    def __init__(self) -> None:
        self.notes: list[tuple[str, object]] = []

    def note(self, what: str, value: object) -> None:
        self.notes.append((what, value))

    def outcome(self, what: str, func: Callable[[], object]) -> None:
        """Note "ok", or the name of the errno *func* failed with."""
        try:
            func()
        except OSError as exc:
            self.note(what, errno.errorcode[exc.errno])
            return
        self.note(what, "ok")


def differences(want: Probe, got: Probe) -> list[str]:
    lines = [f"{w[0]}: native {w[1]!r} != mount {g[1]!r}"
             for w, g in zip(want.notes, got.notes, strict=False) if w != g]
    if len(want.notes) != len(got.notes):
        lines.append(f"{len(want.notes)} notes natively, {len(got.notes)} through the mount")
    return lines


def posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_* value: version 2, then (tag, permission bits, id) entries.

    Tags: 1 owner, 2 named user, 4 owning group, 8 named group, 0x10 mask, 0x20 other.
    """
    out = (2).to_bytes(4, "little")
    for tag, perm, id_ in entries:
        out += tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + id_.to_bytes(4, "little")
    return out


NO_ID = 0xFFFFFFFF


def touch(path: Path | str, flags: int = os.O_RDONLY, mode: int = 0o600,
          dir_fd: int | None = None) -> None:
    """open(2) and close: for steps where only whether open succeeds matters."""
    os.close(os.open(path, flags, mode, dir_fd=dir_fd))


def read(path: Path | str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def meta(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size


@contextlib.contextmanager
def both(tmp_path: Path, scenario: Callable[[Path, Probe], None],
         frozen: dict[str, int] | None = None) -> Iterator[tuple[Path, Path, Daemon]]:
    """Run *scenario* natively and through a mount; check notes and trees agree.

    Yields (native root, mount root, daemon) with the mount still up, for
    checks of its own; the trees are compared after that, and again on the
    backing directory after unmount, and on a tree rebuilt from the journal.
    *frozen* maps paths whose mtime the scenario set explicitly to that
    mtime: those must match to the nanosecond.
    """
    native, backing, mount = tmp_path / "native", tmp_path / "backing", tmp_path / "mount"
    for root in (native, backing):
        root.mkdir(mode=0o755)
    want, got = Probe(), Probe()
    scenario(native, want)
    with primary(backing, mount) as daemon:
        scenario(mount, got)
        assert differences(want, got) == []
        yield native, mount, daemon
        seen = snapshot(mount)
        assert "Too many open files" not in daemon.log()
    replica = tmp_path / "replica"
    replica.mkdir(mode=0o755)
    replay(tmp_path / ".backing.replfs" / "journal", replica)
    trees = {"native": snapshot(native), "mount": seen, "backing": snapshot(backing),
             "replayed": snapshot(replica)}
    assert diff(trees["backing"], trees["replayed"]) == []
    assert diff(without_mtimes(trees["native"]), without_mtimes(seen)) == []
    assert diff(without_mtimes(seen), without_mtimes(trees["backing"])) == []
    for path, mtime in (frozen or {}).items():
        assert {name: tree[path][6] for name, tree in trees.items()} == dict.fromkeys(
            trees, mtime), path


def without_mtimes(tree: dict[str, Entry]) -> dict[str, Entry]:
    return {path: (*entry[:6], None, *entry[7:]) for path, entry in tree.items()}


# --- files, metadata, names ------------------------------------------------------


def files(r: Path, p: Probe) -> None:
    """create/open flags, reads and writes, truncate."""
    fd = os.open(r / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    p.note("create", os.write(fd, b"hello world"))
    os.close(fd)
    p.outcome("open O_EXCL existing", lambda: touch(r / "f", os.O_RDWR | os.O_CREAT | os.O_EXCL))
    fd = os.open(r / "f", os.O_WRONLY | os.O_CREAT, 0o600)  # exists: opened, mode kept
    os.close(fd)
    fd = os.open(r / "f", os.O_WRONLY | os.O_TRUNC)
    p.note("O_TRUNC size", os.fstat(fd).st_size)
    os.write(fd, b"new")
    os.close(fd)
    p.note("after O_TRUNC", read(r / "f"))
    p.outcome("open missing", lambda: touch(r / "missing", os.O_RDONLY))
    p.outcome("open under a file", lambda: touch(r / "f" / "x", os.O_RDONLY))
    p.outcome("open O_DIRECTORY on a file", lambda: touch(r / "f", O_DIR))

    # Two O_APPEND handles: every write lands at the end, whatever the offset.
    a = os.open(r / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    b = os.open(r / "log", os.O_RDWR | os.O_APPEND)
    os.write(a, b"a" * 10)
    os.write(b, b"b" * 5000)
    os.write(a, b"c" * 3)
    os.pwrite(b, b"d", 0)
    p.note("append offsets", (os.lseek(a, 0, os.SEEK_CUR), os.lseek(b, 0, os.SEEK_CUR)))
    p.note("append read", os.pread(b, 100, 5005))
    reader = os.open(r / "log", os.O_RDONLY)
    p.note("other handle sees it", digest(os.read(reader, 10000)))
    for fd in (a, b, reader):
        os.close(fd)

    # Big, unaligned and sparse writes; truncate down and up.
    blob = bytes(range(256)) * 1200 + b"tail"
    fd = os.open(r / "big", os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, blob)
    os.pwrite(fd, b"XYZ", 4095)
    os.pwrite(fd, b"far", 3 << 20)
    p.note("sparse size", os.fstat(fd).st_size)
    p.note("read across pages", os.pread(fd, 10, 4090))
    p.note("read a hole", os.pread(fd, 8, 2 << 20))
    p.note("read past the end", os.pread(fd, 8, 4 << 20))
    os.ftruncate(fd, 5000)
    os.close(fd)
    os.truncate(r / "big", 9000)
    data = read(r / "big")
    p.note("truncated", (len(data), digest(data)))
    p.outcome("truncate a dir", lambda: os.truncate(r, 0))

    # O_DIRECT with aligned buffers (mmap memory is page-aligned).
    out, back = mmap.mmap(-1, 8192), mmap.mmap(-1, 4096)
    out.write(bytes(range(256)) * 32)
    fd = os.open(r / "direct", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    p.note("O_DIRECT write", os.pwrite(fd, out, 0))
    p.note("O_DIRECT read", (os.preadv(fd, [back], 4096), digest(back[:])))
    os.close(fd)


def metadata(r: Path, p: Probe) -> None:
    """chmod, chown, utimens, symlinks, special files, access."""
    (r / "m").write_bytes(b"meta")
    os.chmod(r / "m", 0o4755)
    p.note("suid set", stat.S_IMODE(os.stat(r / "m").st_mode))
    os.chown(r / "m", 1234, 5678)  # chown clears set-id bits
    p.note("chown", meta(os.stat(r / "m")))
    os.chown(r / "m", -1, 42)
    os.chmod(r / "m", 0o2711)
    p.note("chgrp, chmod", meta(os.stat(r / "m")))
    os.mkdir(r / "sticky", 0o755)
    os.chmod(r / "sticky", 0o1777)

    os.symlink("m", r / "s")
    p.note("readlink", os.readlink(r / "s"))
    p.note("stat follows", meta(os.stat(r / "s")))
    p.outcome("readlink a file", lambda: os.readlink(r / "m"))
    p.outcome("readlink missing", lambda: os.readlink(r / "missing"))
    p.outcome("symlink existing", lambda: os.symlink("x", r / "s"))
    os.lchown(r / "s", 7, 8)
    os.symlink("t" * 4095, r / "long-target")
    p.note("long target", len(os.readlink(r / "long-target")))
    p.outcome("target past PATH_MAX", lambda: os.symlink("t" * 4096, r / "too-long"))
    os.symlink("made-through-link", r / "dangling")
    p.outcome("open O_NOFOLLOW on a symlink",
              lambda: touch(r / "dangling", os.O_RDONLY | os.O_NOFOLLOW))
    os.close(os.open(r / "dangling", os.O_WRONLY | os.O_CREAT, 0o600))  # creates the target
    p.note("created through a symlink", (r / "made-through-link").exists())
    p.outcome("O_CREAT|O_EXCL on a symlink",
              lambda: touch(r / "s", os.O_WRONLY | os.O_CREAT | os.O_EXCL))

    os.mkfifo(r / "fifo", 0o640)
    os.mknod(r / "fifo2", stat.S_IFIFO | 0o600)
    os.mknod(r / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(r / "sock", stat.S_IFSOCK | 0o644)
    os.mknod(r / "plain", stat.S_IFREG | 0o604)
    p.outcome("mknod existing", lambda: os.mknod(r / "fifo", stat.S_IFIFO | 0o600))
    rfd = os.open(r / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    wfd = os.open(r / "fifo", os.O_WRONLY)
    os.write(wfd, b"through the pipe")
    p.note("fifo", os.read(rfd, 100))
    os.close(wfd)
    os.close(rfd)
    p.note("special files", [meta(os.lstat(r / n)) for n in ("fifo", "fifo2", "null", "sock")])
    p.note("rdev", os.lstat(r / "null").st_rdev)

    p.note("access", [os.access(r / "m", os.R_OK | os.W_OK | os.X_OK),
                      os.access(r / "missing", os.F_OK), os.access(r / "s", os.R_OK)])

    # POSIX ACLs: setting one sets the mode; chmod rewrites the ACL's mask and other.
    (r / "acl").write_bytes(b"")
    acl = posix_acl((1, 6, NO_ID), (2, 6, 1234), (4, 4, NO_ID), (0x10, 6, NO_ID), (0x20, 4, NO_ID))
    os.setxattr(r / "acl", "system.posix_acl_access", acl)
    p.note("mode from the ACL", stat.S_IMODE(os.stat(r / "acl").st_mode))
    os.chmod(r / "acl", 0o600)
    p.note("ACL after chmod", os.getxattr(r / "acl", "system.posix_acl_access").hex())

    # Exact times last, on paths nothing touches afterwards.
    os.mkdir(r / "timed")
    (r / "old").write_bytes(b"")
    for name in ("m", "timed", "s", "fifo", "old"):
        os.utime(r / name, ns=OLD_TIMES if name == "old" else TIMES, follow_symlinks=False)
        st = os.lstat(r / name)
        p.note(f"utimens {name}", (st.st_atime_ns, st.st_mtime_ns))
    fd = os.open(r / "dirty", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"x" * 10000)
    os.utime(fd, ns=TIMES)  # while the written data may still be cached
    os.close(fd)
    p.note("utimens dirty", os.stat(r / "dirty").st_mtime_ns)
    os.utime(r / "plain")  # now: checked only for not failing


METADATA_MTIMES = {f"metadata/{name}": TIMES[1] for name in ("m", "timed", "s", "fifo", "dirty")}
METADATA_MTIMES["metadata/old"] = OLD_TIMES[1]


def directories(r: Path, p: Probe) -> None:
    os.mkdir(r / "d", 0o750)
    for name in ("a", "b", "c"):
        os.mkdir(r / "d" / name)
    (r / "d" / "a" / "file").write_bytes(b"in a")
    p.note("nlink of a dir with 3 subdirs", os.stat(r / "d").st_nlink)
    p.outcome("mkdir existing", lambda: os.mkdir(r / "d"))
    p.outcome("mkdir in missing", lambda: os.mkdir(r / "nope" / "x"))
    p.outcome("rmdir not empty", lambda: os.rmdir(r / "d" / "a"))
    p.outcome("rmdir a file", lambda: os.rmdir(r / "d" / "a" / "file"))
    p.outcome("rmdir missing", lambda: os.rmdir(r / "d" / "missing"))
    p.outcome("rmdir dot", lambda: os.rmdir(f"{r}/d/c/."))  # pathlib drops "."
    p.outcome("unlink a dir", lambda: os.unlink(r / "d" / "b"))
    p.outcome("open a dir for writing", lambda: touch(r / "d", os.O_WRONLY))
    os.rmdir(r / "d" / "c")
    p.note("nlink after rmdir", os.stat(r / "d").st_nlink)
    p.note("listdir", sorted(os.listdir(r / "d")))
    p.note("dot-dot", os.stat(r / "d" / "a" / "..").st_ino == os.stat(r / "d").st_ino)

    # A directory removed while open is empty and takes no new names.
    os.mkdir(r / "gone")
    dfd = os.open(r / "gone", O_DIR)
    os.rmdir(r / "gone")
    os.fchmod(dfd, 0o700)
    st = os.fstat(dfd)
    p.note("removed dir", (st.st_nlink, stat.S_IMODE(st.st_mode), os.listdir(dfd)))
    p.outcome("create in a removed dir",
              lambda: touch("x", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=dfd))
    os.close(dfd)

    # setgid directories hand their group down, and the bit to subdirectories.
    os.mkdir(r / "sg")
    os.chown(r / "sg", 0, 4321)
    os.chmod(r / "sg", 0o2775)
    (r / "sg" / "file").write_bytes(b"")
    os.mkdir(r / "sg" / "sub", 0o755)
    os.symlink("file", r / "sg" / "link")
    os.mkfifo(r / "sg" / "fifo")
    os.close(os.open(r / "sg" / "sgid-file", os.O_WRONLY | os.O_CREAT, 0o2755))
    p.note("setgid inheritance", [meta(os.lstat(r / "sg" / n))
                                  for n in ("file", "sub", "link", "fifo", "sgid-file")])


def renames(r: Path, p: Probe) -> None:
    for name in ("x", "y", "z"):
        (r / name).write_bytes(name.encode() * 3)
    os.mkdir(r / "dir")
    (r / "dir" / "inner").write_bytes(b"inner")
    os.mkdir(r / "full")
    (r / "full" / "f").write_bytes(b"")
    os.mkdir(r / "empty")

    os.rename(r / "x", r / "y")  # over an existing file
    p.note("rename over", (read(r / "y"), (r / "x").exists()))
    os.rename(r / "y", r / "y")
    p.outcome("rename a file over a dir", lambda: os.rename(r / "y", r / "dir"))
    p.outcome("rename a dir over a file", lambda: os.rename(r / "dir", r / "y"))
    p.outcome("rename a dir over a full dir", lambda: os.rename(r / "dir", r / "full"))
    p.outcome("rename a dir into itself", lambda: os.rename(r / "dir", r / "dir" / "sub"))
    p.outcome("rename missing", lambda: os.rename(r / "missing", r / "q"))
    os.rename(r / "dir", r / "empty")  # over an empty dir
    p.note("moved dir", (read(r / "empty" / "inner"), (r / "dir").exists()))
    os.rename(r / "empty", r / "full" / "moved")
    p.note("nlinks after a move", (os.stat(r).st_nlink, os.stat(r / "full").st_nlink))
    p.note("child of a moved dir", read(r / "full" / "moved" / "inner"))

    p.outcome("noreplace onto existing", lambda: renameat2(r / "y", r / "z", RENAME_NOREPLACE))
    p.outcome("noreplace onto new", lambda: renameat2(r / "y", r / "y2", RENAME_NOREPLACE))
    p.outcome("exchange", lambda: renameat2(r / "y2", r / "full", RENAME_EXCHANGE))
    p.note("exchanged", (stat.S_ISDIR(os.stat(r / "y2").st_mode), read(r / "full"),
                         read(r / "y2" / "moved" / "inner")))
    p.outcome("exchange with missing", lambda: renameat2(r / "z", r / "nope", RENAME_EXCHANGE))
    p.outcome("exchange|noreplace",
              lambda: renameat2(r / "z", r / "full", RENAME_EXCHANGE | RENAME_NOREPLACE))
    p.outcome("exchange files", lambda: renameat2(r / "z", r / "full", RENAME_EXCHANGE))
    p.note("files exchanged", (read(r / "z"), read(r / "full")))


def links(r: Path, p: Probe) -> None:
    (r / "orig").write_bytes(b"shared")
    os.mkdir(r / "ld")
    os.link(r / "orig", r / "hard")
    os.link(r / "orig", r / "ld" / "hard2")
    names = (r / "orig", r / "hard", r / "ld" / "hard2")
    p.note("one inode", len({os.stat(n).st_ino for n in names}))
    p.note("nlink", [os.stat(n).st_nlink for n in names])
    with open(r / "hard", "ab") as f:
        f.write(b" and appended")
    p.note("written through another name", read(r / "ld" / "hard2"))
    os.unlink(r / "orig")
    p.note("nlink after unlink", os.stat(r / "hard").st_nlink)
    os.rename(r / "hard", r / "ld" / "hard2")  # two names of one inode: a no-op
    p.note("rename between links", sorted(os.listdir(r)) + sorted(os.listdir(r / "ld")))
    p.outcome("link onto existing", lambda: os.link(r / "hard", r / "ld" / "hard2"))
    p.outcome("link a dir", lambda: os.link(r / "ld", r / "ld2"))
    p.outcome("link missing", lambda: os.link(r / "missing", r / "x"))
    os.symlink("hard", r / "sym")
    os.link(r / "sym", r / "sym-link", follow_symlinks=False)
    p.note("hard link to a symlink", (os.readlink(r / "sym-link"), os.lstat(r / "sym").st_nlink))


def xattrs(r: Path, p: Probe) -> None:
    (r / "x").write_bytes(b"")
    os.mkdir(r / "xd")
    os.symlink("x", r / "xs")
    for target in (r / "x", r / "xd", r):
        os.setxattr(target, "user.k", b"v")
        os.setxattr(target, "user.big", b"B" * 3000)
        os.setxattr(target, "user.empty", b"")
        os.setxattr(target, "trusted.t", b"root only")
        p.note("getxattr", (os.getxattr(target, "user.k"), len(os.getxattr(target, "user.big")),
                            os.getxattr(target, "user.empty")))
        p.outcome("getxattr missing", lambda t=target: os.getxattr(t, "user.nope"))
        p.outcome("XATTR_CREATE existing",
                  lambda t=target: os.setxattr(t, "user.k", b"w", os.XATTR_CREATE))
        p.outcome("XATTR_REPLACE missing",
                  lambda t=target: os.setxattr(t, "user.nope", b"w", os.XATTR_REPLACE))
        os.setxattr(target, "user.k", b"replaced", os.XATTR_REPLACE)
        os.setxattr(target, "user.new", b"created", os.XATTR_CREATE)
        os.removexattr(target, "user.big")
        p.outcome("removexattr missing", lambda t=target: os.removexattr(t, "user.big"))
        p.note("listxattr", sorted(os.listxattr(target)))
    p.outcome("user xattr on a symlink",
              lambda: os.setxattr(r / "xs", "user.k", b"v", follow_symlinks=False))
    p.note("listxattr of a symlink", os.listxattr(r / "xs", follow_symlinks=False))
    p.note("through the symlink", os.getxattr(r / "xs", "user.k"))
    with open(r / "x", "wb") as f:
        f.write(b"a write keeps user xattrs")
    p.note("after a write", os.getxattr(r / "x", "user.k"))
    # File capabilities: a write or a truncate drops them, a chmod does not.
    cap = (0x02000001).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)
    for change in (lambda: os.truncate(r / "x", 1), lambda: os.chmod(r / "x", 0o700),
                   lambda: (r / "x").write_bytes(b"rewritten")):
        os.setxattr(r / "x", "security.capability", cap)
        p.note("capability set", os.getxattr(r / "x", "security.capability") == cap)
        change()
        p.outcome("capability after a change",
                  lambda: os.getxattr(r / "x", "security.capability"))


def syncs(r: Path, p: Probe) -> None:
    fd = os.open(r / "synced", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"durable")
    p.note("fsync", os.fsync(fd))
    p.note("fdatasync", os.fdatasync(fd))
    os.close(fd)
    fd = os.open(r / "synced", os.O_RDONLY)
    p.note("fsync read-only", os.fsync(fd))
    os.close(fd)
    for d in (r, r / "synced-dir"):
        if d != r:
            os.mkdir(d)
        fd = os.open(d, O_DIR)
        p.note("fsyncdir", (os.fsync(fd), os.fdatasync(fd)))
        os.close(fd)
    sv = os.statvfs(r)
    p.note("statvfs", (sv.f_bsize, sv.f_frsize, sv.f_blocks, sv.f_files, sv.f_namemax))


def everything(r: Path, p: Probe) -> None:
    for scenario in (files, metadata, directories, renames, links, xattrs, syncs):
        os.mkdir(r / scenario.__name__)
        scenario(r / scenario.__name__, p)


def test_primary_posix_ok(tmp_path: Path) -> None:
    with both(tmp_path, everything, METADATA_MTIMES):
        pass


# --- open, then unlinked -------------------------------------------------------------


def unlinked(r: Path, p: Probe) -> None:
    fd = os.open(r / "u", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"x" * 100)
    os.unlink(r / "u")
    p.note("fstat", meta(os.fstat(fd)))
    os.pwrite(fd, b"yz", 50)
    p.note("pread", os.pread(fd, 4, 49))
    os.fchmod(fd, 0o600)
    os.fchown(fd, 11, 12)
    os.ftruncate(fd, 60)
    os.utime(fd, ns=TIMES)
    os.setxattr(fd, "user.a", b"1")
    p.note("getxattr", (os.getxattr(fd, "user.a"), os.listxattr(fd)))
    st = os.fstat(fd)
    p.note("after f-calls", (meta(st), st.st_atime_ns, st.st_mtime_ns))
    p.note("fsync", os.fsync(fd))

    # /proc/self/fd/N reaches it by path: a second open, truncate and chmod by "name".
    proc = f"/proc/self/fd/{fd}"
    again = os.open(proc, os.O_RDWR)
    os.write(again, b"second handle")
    p.note("read through the first", os.pread(fd, 13, 0))
    os.truncate(proc, 40)
    os.chmod(proc, 0o640)
    p.note("by /proc path", meta(os.stat(proc)))
    os.close(again)
    os.close(fd)

    # One of two names unlinked while open: the other name shows the writes.
    (r / "one").write_bytes(b"1111")
    os.link(r / "one", r / "two")
    fd = os.open(r / "one", os.O_RDWR)
    os.unlink(r / "one")
    os.pwrite(fd, b"22", 1)
    p.note("other name", (read(r / "two"), os.fstat(fd).st_nlink))
    os.close(fd)
    p.note("left", sorted(os.listdir(r)))


def test_primary_unlinked_open_ok(tmp_path: Path) -> None:
    with both(tmp_path, unlinked):
        pass


# --- long names and deep paths --------------------------------------------------


def long_names(r: Path, p: Probe) -> None:
    n255, n256 = "n" * 255, "n" * 256
    wide255, wide256 = "é" * 127 + "x", "é" * 128  # 255 and 256 bytes in UTF-8
    (r / n255).write_bytes(b"longest")
    (r / wide255).write_bytes(b"wide")
    os.mkdir(r / ("d" * 255))
    os.symlink(n255, r / ("s" * 255))
    os.link(r / n255, r / ("h" * 255))
    os.rename(r / ("h" * 255), r / ("m" * 255))
    p.note("255 bytes", (read(r / ("s" * 255)), read(r / wide255), sorted(os.listdir(r))))
    for name in (n256, wide256):
        p.outcome("create 256", lambda n=name: touch(r / n, os.O_WRONLY | os.O_CREAT, 0o600))
        p.outcome("stat 256", lambda n=name: os.stat(r / n))
        p.outcome("mkdir 256", lambda n=name: os.mkdir(r / n))
        p.outcome("mknod 256", lambda n=name: os.mkfifo(r / n))
        p.outcome("symlink 256", lambda n=name: os.symlink("x", r / n))
        p.outcome("link to 256", lambda n=name: os.link(r / n255, r / n))
        p.outcome("rename to 256", lambda n=name: os.rename(r / n255, r / n))

    # Deeper than PATH_MAX (4096 bytes), one directory fd at a time.
    level, depth = "p" * 200, 25
    fds = [os.open(r, O_DIR)]
    for _ in range(depth):
        os.mkdir(level, 0o755, dir_fd=fds[-1])
        fds.append(os.open(level, O_DIR, dir_fd=fds[-1]))
    bottom = fds[-1]
    fd = os.open("leaf", os.O_RDWR | os.O_CREAT, 0o644, dir_fd=bottom)
    os.write(fd, b"deep down")
    os.fsync(fd)
    os.close(fd)
    os.rename("leaf", "leaf2", src_dir_fd=bottom, dst_dir_fd=bottom)
    os.link("leaf2", "leaf3", src_dir_fd=bottom, dst_dir_fd=bottom)
    os.symlink("leaf2", "sym", dir_fd=bottom)
    os.mkfifo("fifo", dir_fd=bottom)
    os.chmod("leaf2", 0o600, dir_fd=bottom)
    os.setxattr(f"/proc/self/fd/{bottom}/leaf2", "user.deep", b"yes")
    fd = os.open("sym", os.O_RDONLY, dir_fd=bottom)
    p.note("deep file", (os.read(fd, 100), meta(os.fstat(fd)),
                         os.getxattr(f"/proc/self/fd/{bottom}/leaf3", "user.deep")))
    os.close(fd)
    p.note("deep listdir", sorted(os.listdir(bottom)))
    p.note("deep dirs", [meta(os.fstat(d)) for d in fds[1:]])
    p.outcome("stat by full path", lambda: os.stat(r.joinpath(*[level] * depth, "leaf2")))
    # Move the chain's middle: the fds below it keep working.
    os.rename(level, "moved", src_dir_fd=fds[10], dst_dir_fd=fds[10])
    p.note("after moving the middle", os.stat("leaf3", dir_fd=bottom).st_size)
    # Take it down again: snapshot() walks by path, which stops at PATH_MAX.
    for name in ("leaf2", "leaf3", "sym", "fifo"):
        os.unlink(name, dir_fd=bottom)
    for i in range(depth, 0, -1):
        os.close(fds[i])
        os.rmdir("moved" if i == 11 else level, dir_fd=fds[i - 1])
    os.close(fds[0])


def test_primary_long_names_ok(tmp_path: Path) -> None:
    with both(tmp_path, long_names):
        pass


# --- readdir ---------------------------------------------------------------------


def big_dir(r: Path, p: Probe) -> None:
    os.mkdir(r / "big")
    dfd = os.open(r / "big", O_DIR)
    for i in range(BIG_DIR):
        os.mknod(f"e{i:04}", stat.S_IFREG | 0o644, dir_fd=dfd)
    for i in range(10):
        os.mkdir(f"sub{i}", dir_fd=dfd)
        os.symlink("e0000", f"link{i}", dir_fd=dfd)
    p.note("listdir", sorted(os.listdir(r / "big")))
    entries = list(os.scandir(r / "big"))
    p.note("types", sorted((e.name, e.is_dir(follow_symlinks=False), e.is_symlink(),
                            e.is_file(follow_symlinks=False)) for e in entries))
    p.note("d_ino is st_ino", all(e.inode() == os.lstat(e.path).st_ino for e in entries))
    raw = dirents(r / "big")
    p.note("raw names and types", sorted((name, t) for name, (_, t) in raw.items()))
    p.note("dots", (raw["."][0] == os.stat(r / "big").st_ino,
                    raw[".."][0] == os.stat(r).st_ino))
    p.note("rewind", sorted(os.listdir(dfd)) == sorted(os.listdir(r / "big")))
    for i in range(0, BIG_DIR, 2):
        os.unlink(f"e{i:04}", dir_fd=dfd)
    p.note("after unlinking half", sorted(os.listdir(r / "big")))
    os.close(dfd)


def test_primary_readdir_big_dir_ok(tmp_path: Path) -> None:
    with both(tmp_path, big_dir) as (native, mount, _):
        # The mount root is FUSE's inode 1, and its readdir ".." names it again.
        assert os.stat(mount).st_ino == pyfuse3.ROOT_INODE
        assert os.stat(mount / "big" / "..").st_ino == pyfuse3.ROOT_INODE
        raw_native, raw_mount = dirents(native), dirents(mount)
        assert sorted(raw_native) == sorted(raw_mount) == [".", "..", "big"]
        assert raw_mount["."][0] == raw_mount[".."][0] == pyfuse3.ROOT_INODE


def relisted(r: Path, p: Probe) -> None:
    """Listings of directories the kernel caches, after each kind of change."""
    os.mkdir(r / "a")
    os.mkdir(r / "b")

    def lists(what: str) -> None:
        for d in ("a", "b", ""):
            p.note(f"{what}: {d}", sorted((e.name, e.inode() == os.lstat(e.path).st_ino)
                                          for e in os.scandir(r / d)))

    lists("empty")
    (r / "a" / "f").write_bytes(b"f")
    os.mkdir(r / "a" / "d")
    os.symlink("f", r / "a" / "s")
    lists("created")
    os.rename(r / "a" / "f", r / "b" / "f")
    os.link(r / "b" / "f", r / "a" / "hard")
    lists("renamed and linked")
    (r / "b" / "g").write_bytes(b"g")
    os.rename(r / "b" / "g", r / "b" / "f")  # over an existing name
    os.rename(r / "a" / "d", r / "d")
    lists("replaced")
    os.unlink(r / "a" / "hard")
    os.rmdir(r / "d")
    os.unlink(r / "a" / "s")
    lists("removed")
    with os.scandir(r / "b") as it:  # a listing open across a change
        first = next(it).name
        (r / "b" / "late").write_bytes(b"")
        p.note("open listing", sorted([first, *(e.name for e in it)]) in (
            ["f"], ["f", "late"]))
    lists("after an open listing")
    for i in range(1500):
        os.mknod(r / "a" / f"e{i:04}", stat.S_IFREG | 0o644)
    lists("many")
    with os.scandir(r / "a") as it:  # the kernel's cached listing evicted half way
        first = [next(it).name for _ in range(10)]
        with open("/proc/sys/vm/drop_caches", "w") as caches:
            caches.write("1")
        p.note("evicted mid-listing", sorted([*first, *(e.name for e in it)]))


def test_primary_readdir_cached_ok_follows_every_change(tmp_path: Path) -> None:
    with both(tmp_path, relisted):
        pass


# --- inode numbers ----------------------------------------------------------------


def test_primary_ino_stable_across_remount_ok(tmp_path: Path) -> None:
    backing, mount = tmp_path / "backing", tmp_path / "mount"
    backing.mkdir()
    names = ("f", "g", "d/h", "d", "d/sub", "s")
    with primary(backing, mount):
        (mount / "f").write_bytes(b"x")
        os.mkdir(mount / "d")
        os.mkdir(mount / "d" / "sub")
        os.link(mount / "f", mount / "g")
        os.link(mount / "g", mount / "d" / "h")
        os.symlink("f", mount / "s")
        first = {n: os.lstat(mount / n).st_ino for n in names}
    assert first["f"] == first["g"] == first["d/h"]
    assert len(set(first.values())) == 4
    with primary(backing, mount):
        # Looked up in another order, after a restart: the same numbers.
        again = {n: os.lstat(mount / n).st_ino for n in reversed(names)}
        assert {e.name: e.inode() for e in os.scandir(mount / "d")} == {
            "h": first["f"], "sub": first["d/sub"]}
        assert os.stat(mount / "g").st_nlink == 3
    assert again == first


# --- permissions and ownership ---------------------------------------------------


def as_nobody(root: Path, steps: Callable[[int, Probe], None]) -> list[list[object]]:
    """Run *steps* in a child process with uid and gid 65534 and no other groups.

    The child reaches *root* through a directory fd opened here, so the
    directories above it need not be open to everyone. Returns its notes.
    """
    dfd = os.open(root, O_DIR)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only os calls, then _exit
        probe, error = Probe(), None
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.umask(0o022)
            steps(dfd, probe)
        except Exception:
            error = traceback.format_exc()
        finally:
            try:
                out = json.dumps({"notes": probe.notes, "error": error}).encode()
                while out:
                    out = out[os.write(wfd, out):]
            finally:
                os._exit(0)  # never back into the test runner
    os.close(wfd)
    os.close(dfd)
    chunks = []
    while chunk := os.read(rfd, 65536):
        chunks.append(chunk)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    result = json.loads(b"".join(chunks))
    assert result["error"] is None, result["error"]
    notes: list[list[object]] = result["notes"]
    return notes


def nobody_steps(dfd: int, p: Probe) -> None:
    def at(name: str) -> str:
        return f"/proc/self/fd/{dfd}/{name}"

    def owner(name: str) -> None:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        p.note(f"owner {name}", [oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid])

    os.close(os.open("pub/mine", os.O_WRONLY | os.O_CREAT, 0o666, dir_fd=dfd))
    os.mkdir("pub/mydir", 0o777, dir_fd=dfd)
    os.symlink("mine", "pub/mylink", dir_fd=dfd)
    os.mkfifo("pub/myfifo", 0o666, dir_fd=dfd)
    os.mknod("pub/mynode", stat.S_IFREG | 0o666, dir_fd=dfd)
    for name in ("pub/mine", "pub/mydir", "pub/mylink", "pub/myfifo", "pub/mynode"):
        owner(name)
    p.outcome("open secret", lambda: touch("secret", os.O_RDONLY, dir_fd=dfd))
    p.note("access secret", os.access("secret", os.R_OK, dir_fd=dfd))
    p.note("access mine", os.access("pub/mine", os.W_OK, dir_fd=dfd))
    p.outcome("open create in ro",
              lambda: touch("ro/new", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=dfd))
    p.outcome("unlink in sticky", lambda: os.unlink("pub/rootfile", dir_fd=dfd))
    p.outcome("rename in sticky",
              lambda: os.rename("pub/rootfile", "pub/taken", src_dir_fd=dfd, dst_dir_fd=dfd))
    p.outcome("chmod secret", lambda: os.chmod("secret", 0o666, dir_fd=dfd))
    p.outcome("mknod a device",
              lambda: os.mknod("pub/dev", stat.S_IFCHR | 0o666, os.makedev(1, 3), dir_fd=dfd))
    p.outcome("link secret",
              lambda: os.link("secret", "pub/secret-link", src_dir_fd=dfd, dst_dir_fd=dfd))
    p.outcome("chown to root", lambda: os.chown("pub/mine", 0, 0, dir_fd=dfd))
    p.outcome("truncate secret", lambda: os.truncate(at("secret"), 0))
    p.outcome("setxattr mine", lambda: os.setxattr(at("pub/mine"), "user.mine", b"1"))
    p.outcome("setxattr secret", lambda: os.setxattr(at("secret"), "user.x", b"1"))
    p.outcome("setxattr trusted", lambda: os.setxattr(at("pub/mine"), "trusted.x", b"1"))
    p.outcome("utimens mine", lambda: os.utime("pub/mine", ns=TIMES, dir_fd=dfd))
    p.outcome("utimens rootfile", lambda: os.utime("pub/rootfile", ns=TIMES, dir_fd=dfd))
    p.outcome("touch rootfile", lambda: os.utime("pub/rootfile", dir_fd=dfd))
    p.outcome("touch world-writable", lambda: os.utime("pub/open", dir_fd=dfd))
    p.outcome("utimens world-writable", lambda: os.utime("pub/open", ns=TIMES, dir_fd=dfd))
    os.close(os.open("sg/file", os.O_WRONLY | os.O_CREAT, 0o2755, dir_fd=dfd))
    os.mkdir("sg/dir", dir_fd=dfd)
    owner("sg/file")
    owner("sg/dir")
    # Writing or truncating someone else's set-id file clears its set-id bits.
    for name in ("pub/suid", "pub/sgid"):
        fd = os.open(name, os.O_WRONLY, dir_fd=dfd)
        os.write(fd, b"changed")
        os.close(fd)
        owner(name)
    os.truncate(at("pub/suid-trunc"), 1)
    owner("pub/suid-trunc")
    # A named-user ACL entry decides over the mode bits, either way.
    p.outcome("read through an ACL", lambda: read(at("acl-allows")))
    p.outcome("refused by an ACL", lambda: read(at("acl-denies")))
    # Only a privileged caller sees trusted.* attributes.
    p.note("listxattr", sorted(os.listxattr(at("pub/labelled"))))
    p.outcome("getxattr trusted", lambda: os.getxattr(at("pub/labelled"), "trusted.t"))
    p.outcome("getxattr user", lambda: os.getxattr(at("pub/labelled"), "user.k"))


def nobody_setup(r: Path) -> None:
    for name, mode in (("pub", 0o1777), ("ro", 0o755), ("sg", 0o2777)):
        os.mkdir(r / name)
        os.chmod(r / name, mode)
    os.chown(r / "sg", 0, 4321)
    (r / "secret").write_bytes(b"root only")
    os.chmod(r / "secret", 0o600)
    (r / "pub" / "rootfile").write_bytes(b"")
    (r / "pub" / "open").write_bytes(b"")
    os.chmod(r / "pub" / "open", 0o666)
    for name, mine, others in (("acl-allows", 4, 0), ("acl-denies", 0, 4)):
        (r / name).write_bytes(b"acl")
        acl = posix_acl((1, 6, NO_ID), (2, mine, NOBODY), (4, 0, NO_ID), (0x10, 4, NO_ID),
                        (0x20, others, NO_ID))
        os.setxattr(r / name, "system.posix_acl_access", acl)
    (r / "pub" / "labelled").write_bytes(b"")
    os.setxattr(r / "pub" / "labelled", "trusted.t", b"hidden")
    os.setxattr(r / "pub" / "labelled", "user.k", b"shown")
    for name, mode in (("suid", 0o4777), ("sgid", 0o2777), ("suid-trunc", 0o6777)):
        (r / "pub" / name).write_bytes(b"set-id")
        os.chmod(r / "pub" / name, mode)


def as_nobody_in(r: Path, p: Probe) -> None:
    nobody_setup(r)
    for what, value in as_nobody(r, nobody_steps):
        p.note(str(what), value)


def test_primary_permissions_nobody_ok(tmp_path: Path) -> None:
    with both(tmp_path, as_nobody_in) as (_, mount, _):
        # Reaching a root daemon's mount at all takes allow_other.
        assert os.stat(mount / "pub" / "mine").st_uid == NOBODY
        assert os.stat(mount / "pub" / "mydir").st_gid == NOBODY
        assert os.stat(mount / "sg" / "file").st_gid == 4321


# --- what the mount cannot do as natively -----------------------------------------


def test_primary_known_gaps_ok(tmp_path: Path) -> None:
    """Where pyfuse3 gives the daemon no way to match the native filesystem.

    - O_TMPFILE: pyfuse3 has no tmpfile handler, so the kernel says EOPNOTSUPP.
    - In a directory with a default ACL, natively the ACL and not the umask
      limits a new node's mode. pyfuse3 cannot ask for FUSE_DONT_MASK, so the
      kernel applies the umask before the daemon sees the mode.
    """
    native, backing, mount = tmp_path / "native", tmp_path / "backing", tmp_path / "mount"
    native.mkdir()
    backing.mkdir()
    inherit = posix_acl((1, 7, NO_ID), (4, 7, NO_ID), (0x10, 7, NO_ID), (0x20, 5, NO_ID))

    def observe(r: Path) -> tuple[str, int]:
        tmpfile = "ok"
        try:
            touch(r, os.O_TMPFILE | os.O_RDWR)
        except OSError as exc:
            tmpfile = errno.errorcode[exc.errno]
        os.mkdir(r / "inherits")
        os.setxattr(r / "inherits", "system.posix_acl_default", inherit)
        old = os.umask(0o022)
        try:
            (r / "inherits" / "new").write_bytes(b"")
        finally:
            os.umask(old)
        return tmpfile, stat.S_IMODE(os.stat(r / "inherits" / "new").st_mode)

    assert observe(native) == ("ok", 0o664)
    with primary(backing, mount):
        assert observe(mount) == (errno.errorcode[errno.EOPNOTSUPP], 0o644)


def test_primary_new_file_capability_check_from_memory(tmp_path: Path) -> None:
    """The kernel asks for security.capability before writes into its page cache; for
    a file made through the mount the daemon answers "none" without asking BACKING
    (the daemon is BACKING's only writer, and a new file has no capabilities).

    Seen by planting a capability on BACKING's file behind the daemon's back: the
    mount does not show it, as it would if the daemon asked BACKING."""
    backing, mount = tmp_path / "backing", tmp_path / "mount"
    backing.mkdir()
    cap = (0x02000001).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)

    def seen() -> str:
        try:
            return repr(os.getxattr(mount / "new", "security.capability"))
        except OSError as exc:
            return errno.errorcode[exc.errno]

    with primary(backing, mount):
        fd = os.open(mount / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
        try:
            os.setxattr(backing / "new", "security.capability", cap)
            assert seen() == "ENODATA"
            os.write(fd, b"first write")
        finally:
            os.close(fd)
        assert read(mount / "new") == b"first write"
        assert seen() == "ENODATA"


def test_primary_writes_into_the_page_cache_ask_the_daemon_nothing(tmp_path: Path) -> None:
    """The daemon clears set-ID bits itself (pyfuse3's handle_killpriv_v2, which needs
    libfuse 3.17): the kernel asks for security.capability once per file, not
    before every write(2), and writes into its page cache cost no request until
    written back. The clearing itself: test_primary_permissions_nobody_ok."""
    backing, mount = tmp_path / "backing", tmp_path / "mount"
    backing.mkdir()
    with primary(backing, mount):
        fd = os.open(mount / "f", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.pwrite(fd, bytes(64 * 4096), 0)
            before = status(mount)["requests"]
            for n in range(200):
                os.pwrite(fd, b"w" * 4096, (n * 37 % 64) * 4096)
            during = status(mount)["requests"]
            os.fsync(fd)
        finally:
            os.close(fd)
    asked = {op: n - before.get(op, 0) for op, n in during.items() if n != before.get(op, 0)}
    assert set(asked) <= {"write"}, f"200 writes into cached pages asked {asked}"


# --- bounded file descriptors ------------------------------------------------------


def test_primary_fds_more_files_than_the_limit_ok(tmp_path: Path) -> None:
    """More files than the daemon may hold fds, in more directories than it caches fds of."""
    backing, mount = tmp_path / "backing", tmp_path / "mount"
    backing.mkdir()
    dirs = [f"d{k:04}" for k in range(MANY_DIRS)]
    per_dir = MANY_FILES // MANY_DIRS
    chunks = [dirs[k::4] for k in range(4)]
    written = dirs[::100]

    def create(chunk: list[str]) -> None:
        for d in chunk:
            os.mkdir(mount / d)
            dfd = os.open(mount / d, O_DIR)
            try:
                for i in range(per_dir):
                    os.mknod(f"f{i}", stat.S_IFREG | 0o644, dir_fd=dfd)
            finally:
                os.close(dfd)

    def check(chunk: list[str]) -> int:
        sizes = [os.lstat(mount / d / f"f{i}").st_size for d in chunk for i in range(per_dir)]
        assert all(read(mount / d / "f0") == d.encode() for d in chunk if d in written)
        return len(sizes)

    def held(daemon: Daemon) -> int:
        assert daemon.proc is not None
        limits = Path(f"/proc/{daemon.proc.pid}/limits").read_text()
        assert re.search(rf"^Max open files\s+{FD_LIMIT}\s", limits, re.M), limits
        return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))

    limited = ["prlimit", f"--nofile={FD_LIMIT}", *REPLFS]
    with primary(backing, mount, command=limited) as daemon:
        with ThreadPoolExecutor(len(chunks)) as pool:
            list(pool.map(create, chunks))
        for d in written:
            (mount / d / "f0").write_bytes(d.encode())
        held_after_create = held(daemon)
    # A fresh daemon has seen none of them: every stat is a lookup.
    with primary(backing, mount, command=limited) as daemon:
        with ThreadPoolExecutor(len(chunks)) as pool:
            assert sum(pool.map(check, chunks)) == MANY_FILES
        held_after_stat = held(daemon)
        log = daemon.log()
    # A bounded directory fd cache, a few fds of its own, none per file.
    assert held_after_create < FD_BOUND and held_after_stat < FD_BOUND, (
        held_after_create, held_after_stat)
    assert "Too many open files" not in log and "EMFILE" not in log
