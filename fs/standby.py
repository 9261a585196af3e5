"""The standby mount: a read-only view of a live replica that shows whole sets only.

Every request runs under the replica's apply lock, taken shared: while the
applier applies set N (holding it exclusively) a request waits, so it sees
N-1 before or N after, never a mix. Served by the secondary itself (``replfs
secondary --mount``), the kernel caches the view like any filesystem and the
applier drops, before each batch, what the batch touches (fs/kernel_cache.py).
Served on its own (``replfs mount``), nothing tells it what a set changed, so
the kernel is told to cache nothing (zero timeouts, direct I/O), and the next
request after N sees N at once. A reader that needs one set across many
requests pauses the replica (``replfs pause``). A replica that a crash cut
short in the middle of a set answers EIO until the secondary's redo finishes
that set (which it does at once when it starts, held or not); so does an old
primary's tree, cut off mid-set by its failover, until its rejoin's set is
applied (store/hold.py: REJOINING). Every change is
refused with EROFS, by the kernel (the mount is ``ro``) and by the handlers.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import pyfuse3

from fs.errors import log
from fs.inodes import Inodes
from fs.kernel_cache import KernelCache
from fs.passthrough import TIMEOUT, Passthrough, request
from store.hold import ApplyLock, is_rejoining, torn

Handler = TypeVar("Handler", bound=Callable[..., Coroutine[Any, Any, Any]])


def whole_sets(handler: Handler) -> Handler:
    """Wrap a handler whose answer shows the replica: it runs holding the apply lock
    shared, so it sees whole sets only, and answers EIO while a crash has left the
    replica cut short in a set (logged once, not at every request)."""

    @functools.wraps(handler)
    async def run(self: StandbyFS, *args: Any, **kwargs: Any) -> Any:
        # Handlers do not await inside, so the lock spans exactly one request.
        with self.apply_lock.shared():
            why = _no_whole_set(self.staging_dir)
            if why != self.refusing:
                with self._refusing_lock:  # request threads: each change logged once
                    if why != self.refusing:
                        if why is not None:
                            log.error("%s", why)
                        self.refusing = why
            if why is not None:
                raise pyfuse3.FUSEError(errno.EIO)
            return await handler(self, *args, **kwargs)

    return cast(Handler, run)


def _no_whole_set(staging_dir: Path) -> str | None:
    """Why the replica shows no whole set now, if it does not."""
    cut = torn(staging_dir)
    if cut is not None:
        return (f"the replica was cut short in set {cut[0]} by a crash; start the "
                "secondary to finish it")
    if is_rejoining(staging_dir):
        return ("the replica is an old primary's tree, cut off in the middle of a set; it "
                "shows a set once the new primary's rejoin set applies")
    return None


class StandbyFS(Passthrough):
    """The read-only passthrough of a replica (fs/passthrough.py), each answer from
    whole sets, every change refused."""

    enable_writeback_cache = False
    timeout = 0.0
    direct_io = True
    cache_listings = False  # the applier changes the replica under the view

    def __init__(self, inodes: Inodes, lock: ApplyLock, staging_dir: Path,
                 cached: bool = False) -> None:
        """With *cached*, the kernel may cache the view: ``self.cache`` is then what
        the applier must drop caches through (its invalidator)."""
        super().__init__(inodes, threading.RLock())
        self.apply_lock = lock
        self.staging_dir = staging_dir
        self.refusing: str | None = None  # why requests answer EIO now, once logged
        self._refusing_lock = threading.Lock()
        self.cache: KernelCache | None = None
        if cached:
            self.cache = KernelCache(inodes, self.lock)
            self.timeout, self.direct_io = TIMEOUT, False

    def _entry(self, st: os.stat_result, ino: int | None = None) -> pyfuse3.EntryAttributes:
        e = super()._entry(st, ino)
        if self.cache is not None:
            e.attr_timeout = self.cache.attr_timeout(e.st_ino, e.attr_timeout)
        return e

    def _named(self, entry: pyfuse3.EntryAttributes, parent: int, name: bytes
               ) -> pyfuse3.EntryAttributes:
        if self.cache is not None:
            entry.entry_timeout = self.cache.entry_timeout(parent, name, entry.entry_timeout)
        return entry

    # --- what shows the replica: whole sets only ------------------------------------

    @whole_sets
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        return await super().lookup(parent_inode, name, ctx)

    @whole_sets
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await super().getattr(inode, ctx)

    @whole_sets
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await super().readlink(inode, ctx)

    @whole_sets
    @request()
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        return self._opened(self._open_fd(inode, flags), inode, flags)

    @whole_sets
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if self.cache is not None:
            self.cache.reading(self.files[fh])
        return await super().read(fh, off, size)

    @whole_sets
    async def lseek(self, fh: int, off: int, whence: int) -> int:
        return await super().lseek(fh, off, whence)

    @whole_sets
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return await super().opendir(inode, ctx)

    @whole_sets
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        await super().readdir(fh, start_id, token)

    @whole_sets
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return await super().statfs(ctx)

    @whole_sets
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return await super().access(inode, mode, ctx)

    @whole_sets
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._xattrs.pop(inode, None)  # the applier changes xattrs under the view
        return await super().getxattr(inode, name, ctx)

    @whole_sets
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return await super().listxattr(inode, ctx)

    # --- changes: none --------------------------------------------------------------

    async def _refused(self, *_: Any, **__: Any) -> NoReturn:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = create = write = (
        setxattr) = removexattr = fallocate = copy_file_range = _refused

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass  # nothing to make durable: the view changes nothing

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass
