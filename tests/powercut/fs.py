"""The simulator's FUSE filesystem: a passthrough of LOWER that keeps un-synced data.

LOWER is the disk. Namespace and metadata ops (create, mkdir, mknod,
symlink, link, unlink, rmdir, rename, chmod, chown, utimens, xattrs) reach it
at once, in order, as a filesystem that journals its metadata would make
them durable. File data does not: writes, truncates, fallocates and the size
and mtime they give a file stay in memory (tests/powercut/pending.py) until
an fsync or fdatasync of that file writes them to LOWER and flushes it.
FLUSH (every close) does not count, and neither does syncfs(2) or sync(2):
a plain FUSE mount never tells its daemon about those (the kernel sends
FUSE_SYNCFS to virtiofs only), so a caller that wants its data kept must
fsync each file, as it must on a real disk for the data to be ordered.

A ``cut()`` is the power going off: from then on every request fails with
EIO, and the pending data is dropped, all of it, or all but a seeded random
subset of pages (tests/powercut/pending.py ``Pending.cut``).

Each inode the kernel knows is held by an O_PATH fd of the lower inode, so
hard links, renames and unlinked open files need no path bookkeeping; its
FUSE inode number is the lower one (the root's is ROOT_INODE). A file with
pending data is kept after the kernel forgets it, while a name reaches it.
Every request holds one lock, except an fsync while it waits for LOWER.
The writeback cache is off, so every write reaches the daemon; the kernel's
page cache stays coherent with it (writes through this mount update it), so
LMDB's shared maps of its files read what was written through pwrite.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import random
import stat
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3

from tests.powercut.pending import Pending

log = logging.getLogger("powercut")
ROOT = pyfuse3.ROOT_INODE
TIMEOUT = 5.0  # kernel caching of names and attributes: only this mount changes LOWER
_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400
_FALLOC_KEEP_SIZE, _FALLOC_PUNCH_HOLE, _FALLOC_ZERO_RANGE = 0x01, 0x02, 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate64.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_AM_ROOT = os.geteuid() == 0
T = TypeVar("T")


def _check(result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def handler(*, locked: bool = True
            ) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Run a request handler holding the lock (unless not *locked*), failing with EIO
    once the power is off, and with the errno of any OSError."""

    def wrap(func: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(func)
        async def run(self: PowerCutFS, *args: Any) -> T:
            try:
                if not locked:
                    return await func(self, *args)
                with self.lock:
                    if self.dead:
                        raise pyfuse3.FUSEError(errno.EIO)
                    return await func(self, *args)
            except pyfuse3.FUSEError:
                raise
            except OSError as exc:
                raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
            except Exception:
                log.exception("%s failed", func.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None

        return run

    return wrap


@dataclass
class Node:
    fd: int  # O_PATH | O_NOFOLLOW fd of the lower inode
    lookups: int = 0
    opens: int = 0
    data_fd: int | None = None  # O_RDWR, opened when the file's data is first needed
    pending: Pending | None = None


@dataclass
class Dir:
    ino: int
    fd: int
    entries: list[bytes] = field(default_factory=list)


class PowerCutFS(pyfuse3.Operations):
    enable_writeback_cache = False
    supports_dot_lookup = False

    def __init__(self, lower: str) -> None:
        super().__init__()
        root_fd = os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.root_st_ino = os.fstat(root_fd).st_ino
        self.nodes: dict[int, Node] = {ROOT: Node(root_fd, lookups=1)}
        self.files: dict[int, int] = {}  # fh -> inode
        self.dirs: dict[int, Dir] = {}
        self.next_fh = 1
        self.lock = threading.RLock()
        self.dead = False
        self.syncing = threading.Event()  # clear: fsyncs wait (a slow disk), see hold()
        self.syncing.set()

    # --- the power ---------------------------------------------------------------

    def freeze(self) -> None:
        """The power goes off: every request from now on fails with EIO."""
        with self.lock:
            self.dead = True

    def cut(self, keep: float, seed: int) -> dict[str, int]:
        """The power goes off and LOWER keeps what it had, and of the pending data
        each page (and each file's size and mtime) with probability *keep*, drawn
        from *seed* in the order of the files' lower paths. Returns counts."""
        with self.lock:
            self.dead = True
            rng = random.Random(seed)
            out = {"files": 0, "pages": 0, "kept": 0}
            held = [n for n in self.nodes.values() if n.pending is not None]
            for node in sorted(held, key=self._lower_path):
                assert node.pending is not None and node.data_fd is not None
                out["files"] += 1
                out["pages"] += len(node.pending.pages)
                if os.fstat(node.fd).st_nlink > 0:  # unlinked: nothing reaches it after
                    out["kept"] += node.pending.cut(node.data_fd, rng, keep)
                node.pending = None
            return out

    def hold(self, held: bool) -> None:
        """While *held*, every fsync waits (the disk has not answered yet)."""
        (self.syncing.clear if held else self.syncing.set)()

    def sync_all(self) -> int:
        """Write every pending page to LOWER (a clean unmount). Returns the files."""
        with self.lock:
            synced = [n for n in self.nodes.values() if n.pending is not None]
            for node in synced:
                assert node.pending is not None and node.data_fd is not None
                node.pending.sync(node.data_fd)
                node.pending = None
                os.fsync(node.data_fd)
            return len(synced)

    def pending(self) -> dict[str, int]:
        """How much is pending: files and pages."""
        with self.lock:
            held = [n.pending for n in self.nodes.values() if n.pending is not None]
            return {"files": len(held), "pages": sum(len(p.pages) for p in held)}

    def _lower_path(self, node: Node) -> str:
        return os.readlink(f"/proc/self/fd/{node.fd}")

    # --- inodes ------------------------------------------------------------------

    def _ino(self, st: os.stat_result) -> int:
        return ROOT if st.st_ino == self.root_st_ino else st.st_ino

    def _child(self, parent: int, name: bytes) -> tuple[int, Node]:
        """The node of *name* in *parent*, known or new (its lookups not counted)."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=self.nodes[parent].fd)
        ino = self._ino(os.fstat(fd))
        node = self.nodes.get(ino)
        if node is None:
            node = self.nodes[ino] = Node(fd)
        else:
            os.close(fd)
        return ino, node

    def _drop_if_unused(self, ino: int) -> None:
        """Forget a node nobody uses, unless it holds data a name still reaches."""
        node = self.nodes.get(ino)
        if node is None or ino == ROOT or node.lookups > 0 or node.opens > 0:
            return
        if node.pending is not None and os.fstat(node.fd).st_nlink > 0:
            return
        del self.nodes[ino]
        os.close(node.fd)
        if node.data_fd is not None:
            os.close(node.data_fd)

    def _data_fd(self, node: Node) -> int:
        if node.data_fd is None:
            node.data_fd = os.open(f"/proc/self/fd/{node.fd}", os.O_RDWR | os.O_CLOEXEC)
        return node.data_fd

    def _pending(self, node: Node) -> Pending:
        if node.pending is None:
            node.pending = Pending(os.fstat(self._data_fd(node)))
        return node.pending

    def _entry(self, ino: int) -> pyfuse3.EntryAttributes:
        node = self.nodes[ino]
        st = os.fstat(node.fd)
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        e.entry_timeout = e.attr_timeout = TIMEOUT
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(e, name, getattr(st, name))
        if node.pending is not None:
            e.st_size = node.pending.size
            e.st_mtime_ns = node.pending.mtime_ns
        return e

    def _looked_up(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        ino, node = self._child(parent, name)
        node.lookups += 1
        return self._entry(ino)

    def _owner(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext,
               mode: int) -> None:
        """Give a new node the caller's ownership, as the kernel would (a setgid
        directory's group), and its mode's setuid bits back after the chown."""
        if not _AM_ROOT:
            return
        pfd = self.nodes[parent].fd
        parent_st = os.fstat(pfd)
        gid = parent_st.st_gid if parent_st.st_mode & stat.S_ISGID else ctx.gid
        os.chown(name, ctx.uid, gid, dir_fd=pfd, follow_symlinks=False)
        if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & 0o7000:
            os.chmod(name, stat.S_IMODE(mode), dir_fd=pfd)

    # --- names -------------------------------------------------------------------

    @handler()
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        try:
            return self._looked_up(parent_inode, name)
        except FileNotFoundError:
            e = pyfuse3.EntryAttributes()
            e.st_ino = 0
            e.entry_timeout = TIMEOUT
            return e

    @handler(locked=False)
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        with self.lock:
            for ino, count in inode_list:
                node = self.nodes.get(ino)
                if node is not None:
                    node.lookups -= count
                    self._drop_if_unused(ino)

    @handler()
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(inode)

    @handler()
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.readlink(b"", dir_fd=self.nodes[inode].fd)

    @handler()
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        os.mknod(name, mode, rdev, dir_fd=self.nodes[parent_inode].fd)
        self._owner(parent_inode, name, ctx, mode)
        return self._looked_up(parent_inode, name)

    @handler()
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        os.mkdir(name, stat.S_IMODE(mode), dir_fd=self.nodes[parent_inode].fd)
        self._owner(parent_inode, name, ctx, stat.S_IFDIR | mode)
        return self._looked_up(parent_inode, name)

    @handler()
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        os.symlink(target, name, dir_fd=self.nodes[parent_inode].fd)
        self._owner(parent_inode, name, ctx, stat.S_IFLNK)
        return self._looked_up(parent_inode, name)

    @handler()
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        _check(_libc.linkat(_AT_FDCWD, f"/proc/self/fd/{self.nodes[inode].fd}".encode(),
                            self.nodes[new_parent_inode].fd, new_name, _AT_SYMLINK_FOLLOW))
        return self._looked_up(new_parent_inode, new_name)

    @handler()
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.unlink(name, dir_fd=self.nodes[parent_inode].fd)

    @handler()
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.rmdir(name, dir_fd=self.nodes[parent_inode].fd)

    @handler()
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        _check(_libc.renameat2(self.nodes[parent_inode_old].fd, name_old,
                               self.nodes[parent_inode_new].fd, name_new, flags))

    # --- attributes ----------------------------------------------------------------

    @handler()
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.nodes[inode]
        where = f"/proc/self/fd/{node.fd}"  # the inode itself, a symlink too
        if fields.update_size:
            self._pending(node).truncate(attr.st_size)
        if fields.update_uid or fields.update_gid:
            os.chown(where, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1)
        if fields.update_mode:
            os.chmod(where, stat.S_IMODE(attr.st_mode))
        if fields.update_atime or fields.update_mtime:
            st = os.fstat(node.fd)
            mtime = attr.st_mtime_ns if fields.update_mtime else (
                node.pending.mtime_ns if node.pending is not None else st.st_mtime_ns)
            os.utime(where, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                mtime))
            if node.pending is not None:
                node.pending.mtime_ns = mtime
        return self._entry(inode)

    # --- files ---------------------------------------------------------------------

    def _opened(self, ino: int) -> pyfuse3.FileInfo:
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.files[fh] = ino
        self.nodes[ino].opens += 1
        # The kernel's cache of the file may stay: nothing but this mount changes LOWER.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    @handler()
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        node = self.nodes[inode]
        self._data_fd(node)
        if flags & os.O_TRUNC:
            self._pending(node).truncate(0)
        return self._opened(inode)

    @handler()
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     stat.S_IMODE(mode), dir_fd=self.nodes[parent_inode].fd)
        os.close(fd)
        self._owner(parent_inode, name, ctx, stat.S_IFREG | mode)
        entry = self._looked_up(parent_inode, name)
        return self._opened(entry.st_ino), entry

    @handler()
    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self.nodes[self.files[fh]]
        if node.pending is not None:
            return node.pending.read(self._data_fd(node), off, size)
        return os.pread(self._data_fd(node), size, off)

    @handler()
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self.nodes[self.files[fh]]
        self._pending(node).write(self._data_fd(node), off, buf)
        return len(buf)

    @handler()
    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        node = self.nodes[self.files[fh]]
        pending = self._pending(node)
        if mode & ~_FALLOC_KEEP_SIZE not in (0, _FALLOC_PUNCH_HOLE, _FALLOC_ZERO_RANGE) or (
                mode & _FALLOC_PUNCH_HOLE and not mode & _FALLOC_KEEP_SIZE):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if mode & (_FALLOC_PUNCH_HOLE | _FALLOC_ZERO_RANGE):
            pending.zero(self._data_fd(node), off, length)
        if not mode & _FALLOC_KEEP_SIZE and off + length > pending.size:
            pending.truncate(off + length)

    async def flush(self, fh: int) -> None:
        pass  # close(2) makes nothing durable

    @handler()
    async def release(self, fh: int) -> None:
        ino = self.files.pop(fh)
        self.nodes[ino].opens -= 1
        self._drop_if_unused(ino)

    @handler(locked=False)
    async def fsync(self, fh: int, datasync: bool) -> None:
        """Write the file's pending data to LOWER, and flush it there."""
        self.syncing.wait()
        with self.lock:
            if self.dead:
                raise pyfuse3.FUSEError(errno.EIO)
            node = self.nodes[self.files[fh]]
            fd = self._data_fd(node)
            if node.pending is not None:
                node.pending.sync(fd)
                node.pending = None
            fd = os.dup(fd)  # the node may go while this waits for the disk
        try:
            (os.fdatasync if datasync else os.fsync)(fd)
        finally:
            os.close(fd)

    # --- directories -----------------------------------------------------------------

    @handler()
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fd = os.open(f"/proc/self/fd/{self.nodes[inode].fd}",
                     os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.dirs[fh] = Dir(inode, fd)
        self.nodes[inode].opens += 1
        return pyfuse3.FileInfo(fh=fh)

    @handler()
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.dirs[fh]
        if start_id == 0 or not handle.entries:
            handle.entries = sorted(os.fsencode(n) for n in os.listdir(handle.fd))
        for index in range(start_id, len(handle.entries)):
            name = handle.entries[index]
            try:
                ino, node = self._child(handle.ino, name)
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, name, self._entry(ino), index + 1):
                self._drop_if_unused(ino)
                break
            node.lookups += 1

    @handler()
    async def releasedir(self, fh: int) -> None:
        handle = self.dirs.pop(fh)
        os.close(handle.fd)
        self.nodes[handle.ino].opens -= 1
        self._drop_if_unused(handle.ino)

    @handler()
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass  # names and metadata reached LOWER when they were made

    @handler()
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(f"/proc/self/fd/{self.nodes[ROOT].fd}")
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(data, name, getattr(sv, name))
        return data

    @handler()
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel checks

    # --- xattrs ------------------------------------------------------------------------

    @handler()
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return os.getxattr(f"/proc/self/fd/{self.nodes[inode].fd}", name)

    @handler()
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in os.listxattr(f"/proc/self/fd/{self.nodes[inode].fd}")]

    @handler()
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        os.setxattr(f"/proc/self/fd/{self.nodes[inode].fd}", name, value)

    @handler()
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.removexattr(f"/proc/self/fd/{self.nodes[inode].fd}", name)
