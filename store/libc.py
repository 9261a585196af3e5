"""The libc calls Python's os module lacks, and the name of a file open as an fd.

One loader for the whole program: each call raises OSError as the syscall
failed, like the os module's own.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate64.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
MADV_DONTNEED = 4
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


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
