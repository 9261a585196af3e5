"""The libc calls Python's os module lacks, and the name of a file open as an fd.

One loader for the whole program: each call raises OSError as the syscall
failed, like the os module's own.
"""

from __future__ import annotations

import ctypes
import os
import re

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate64.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
MADV_DONTNEED = 4
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


_OCTAL = re.compile(rb"\\([0-7]{3})")  # mountinfo's escapes: \040 for a space


def _check(result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def renameat2(src_fd: int, src: bytes, dst_fd: int, dst: bytes, flags: int) -> None:
    _check(_libc.renameat2(src_fd, src, dst_fd, dst, flags))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_libc.fallocate64(fd, mode, offset, length))


def syncfs(fd: int) -> None:
    _check(_libc.syncfs(fd))


FUSE_SUPER_MAGIC = 0x65735546


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]


def fs_magic(fd: int) -> int:
    """The magic number of the filesystem *fd* is on (fstatfs(2)'s f_type)."""
    buf = _Statfs()
    _check(_libc.fstatfs(fd, ctypes.byref(buf)))
    return int(buf.f_type)


class _Timestamp(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_int64), ("nsec", ctypes.c_uint32), ("_pad", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    _fields_ = [("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32),
                ("attributes", ctypes.c_uint64), ("nlink", ctypes.c_uint32),
                ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("mode", ctypes.c_uint16),
                ("_pad0", ctypes.c_uint16), ("ino", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("blocks", ctypes.c_uint64), ("attributes_mask", ctypes.c_uint64),
                ("atime", _Timestamp), ("btime", _Timestamp), ("ctime", _Timestamp),
                ("mtime", _Timestamp), ("rdev_major", ctypes.c_uint32),
                ("rdev_minor", ctypes.c_uint32), ("dev_major", ctypes.c_uint32),
                ("dev_minor", ctypes.c_uint32), ("_spare", ctypes.c_uint64 * 14)]


_libc.statx.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                        ctypes.POINTER(_Statx))
# statx(2)'s mask: everything stat(2) gives but the change and modification times.
_UNTIMED = 0x7FF & ~(0x40 | 0x80)  # STATX_BASIC_STATS less STATX_MTIME, STATX_CTIME
_AT_EMPTY_PATH, _AT_SYMLINK_NOFOLLOW = 0x1000, 0x100
_ATIME = 0x20  # STATX_ATIME


def lstat_at(fd: int, name: bytes = b"", mtime_ns: int | None = None) -> os.stat_result:
    """lstat of *name* in directory *fd* (of *fd* itself without a name); given
    *mtime_ns*, one that does not ask for the change and modification times
    (``stat_untimed``)."""
    if mtime_ns is not None:
        return stat_untimed(fd, name, mtime_ns=mtime_ns)
    return os.stat(name, dir_fd=fd, follow_symlinks=False) if name else os.fstat(fd)


def stat_untimed(fd: int, name: bytes = b"", *, mtime_ns: int) -> os.stat_result:
    """lstat of *name* in directory *fd* (of *fd* itself without a name) that never
    asks for its change or modification time, which read as *mtime_ns*.

    Asking matters on a filesystem with multigrain timestamps (ext4, XFS, btrfs,
    tmpfs since Linux 6.13): a file whose times were read gets a fine-grained
    timestamp at its next change, and every such timestamp moves the clock that
    all coarse timestamps read, FUSE's among them. The kernel then finds the
    mount's written files' mtime out of date at each write(2), and sends it
    with a SETATTR at every fsync: one request more per commit for a
    database, for a question the daemon did not need to ask."""
    buf = _Statx()
    flags = _AT_SYMLINK_NOFOLLOW | (0 if name else _AT_EMPTY_PATH)
    _check(_libc.statx(fd, name, flags, _UNTIMED, ctypes.byref(buf)))
    if not buf.mask & _ATIME:  # a filesystem that keeps none: asked the usual way
        return os.stat(name, dir_fd=fd, follow_symlinks=False) if name else os.fstat(fd)
    atime_ns = buf.atime.sec * 1_000_000_000 + buf.atime.nsec
    return os.stat_result(
        (buf.mode, buf.ino, os.makedev(buf.dev_major, buf.dev_minor), buf.nlink, buf.uid,
         buf.gid, buf.size, buf.atime.sec, mtime_ns // 1_000_000_000,
         mtime_ns // 1_000_000_000),
        {"st_atime_ns": atime_ns, "st_mtime_ns": mtime_ns, "st_ctime_ns": mtime_ns,
         "st_blksize": buf.blksize, "st_blocks": buf.blocks,
         "st_rdev": os.makedev(buf.rdev_major, buf.rdev_minor)})


def madvise(address: int, length: int, advice: int) -> None:
    """Advice only: a mapping that went away meanwhile is no error."""
    _libc.madvise(address, length, advice)


PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int) -> None:
    """Have the kernel send this process *signum* when its parent dies (prctl(2)):
    called in a child between fork and exec, so a daemon a killed node started
    does not outlive it."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0))


def mallopt(param: int, value: int) -> None:
    """glibc's mallopt(3); it returns 1 on success and sets no errno."""
    if _libc.mallopt(param, value) != 1:
        raise OSError(f"mallopt({param}, {value}) refused")


def fd_path(fd: int, name: bytes | None = None) -> bytes:
    """A path that names the file open as *fd* (or *name* in that directory) for calls
    that take no fd, through /proc/self/fd."""
    return b"/proc/self/fd/%d/%s" % (fd, name) if name else b"/proc/self/fd/%d" % fd


def mounts() -> list[tuple[str, str]]:
    """(mount point, device as MAJOR:MINOR) of each mount this process sees, in the
    order of /proc/self/mountinfo. Read there, not by a stat of each: a stat of a
    FUSE mount waits for its daemon, which may be stopped, or not serving yet."""
    with open("/proc/self/mountinfo", "rb") as info:
        return [(os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m[1], 8)]), f[4])),
                 f[2].decode()) for f in (line.split(b" ") for line in info)]

