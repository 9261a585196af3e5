"""The read side of a passthrough mount of a directory, and the door every request
passes: the base of both mounts (fs/primary.py adds the changes, journaled;
fs/standby.py serves it read-only, whole sets at a time).

Requests are served by several threads (``pyfuse3.main_threads``): the
handlers are ``async`` in name only and never suspend. Each runs holding
``lock``, so handlers never interleave; only the waits let it go (a read's
pread, a change held at the door while the mount is frozen). Names, nodes
and the directory fds that reach them are kept by fs/inodes.py; the file and
directory handles here are the backing directory's own fds.

The daemon is the only writer of the backing directory, which is what makes
long kernel cache timeouts and the writeback cache safe.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import pyfuse3

from fs.counts import RequestCounts
from fs.errors import fuse_error, log
from fs.inodes import NO_FDS, ROOT, Inodes
from store.libc import fd_path

TIMEOUT = 300.0  # the daemon is the only writer, so the kernel may cache long
Handler = TypeVar("Handler", bound=Callable[..., Coroutine[Any, Any, Any]])
# How long SEEK_DATA/SEEK_HOLE waits for the writers of a file to be released: a
# close() returns before the kernel's RELEASE of the handle is served, by the other
# request thread, within a millisecond unless it is busy.
SEEK_WAIT = 0.05


def request(*, changes: bool | Callable[..., bool] = False, locked: bool = True
            ) -> Callable[[Handler], Handler]:
    """Wrap a request handler: it runs holding the lock (unless not *locked*: it
    then takes the lock itself where it needs it); a change (*changes*, or
    ``changes(*args)`` is true) waits while the mount is frozen (verify); an error
    becomes an errno (fs/errors.py); the directory fds the handler borrowed are
    trimmed to the cache's bound once it is done (fs/inodes.py); and the request is
    counted (fs/counts.py)."""

    def wrap(handler: Handler) -> Handler:
        name = handler.__name__

        @functools.wraps(handler)
        async def run(self: Passthrough, *args: object, **kwargs: object) -> Any:
            self.requests.add(name)
            try:
                if not locked:
                    return await handler(self, *args, **kwargs)
                self._enter(changes(*args) if callable(changes) else changes)
                try:
                    return await handler(self, *args, **kwargs)
                finally:
                    self.inodes.trim()
                    self.lock.release()
            except Exception as exc:
                raise fuse_error(exc, name) from None

        return cast(Handler, run)

    return wrap

@dataclass
class DirHandle:
    ino: int
    fd: int
    entries: list[bytes] = field(default_factory=list)


class Passthrough(pyfuse3.Operations):
    """The backing directory as *inodes* reaches it, read only; *lock* is held by
    every request (fs/primary.py passes the capture's, fs/standby.py its own)."""

    enable_writeback_cache = True
    enable_acl = True  # the kernel enforces POSIX ACLs (system.posix_acl_*), as natively
    supports_dot_lookup = True
    timeout = TIMEOUT
    direct_io = False
    cache_listings = True

    def __init__(self, inodes: Inodes, lock: threading.RLock) -> None:
        super().__init__()
        self.inodes = inodes
        self.lock = lock
        self.requests = RequestCounts()
        self.files: dict[int, int] = {}  # fh (== fd) -> inode
        self.writable: set[int] = set()  # the fhs opened for writing
        self.dirs: dict[int, DirHandle] = {}
        self._xattrs: dict[int, dict[bytes, bytes | None]] = {}
        self._released = threading.Condition(self.lock)  # a file handle was released
        self._thawed = threading.Event()  # clear while frozen: changes wait for it
        self._thawed.set()
        # Changes are refused with EROFS from this time.monotonic() on: a cluster's
        # primary may write only while its lease holds (repl/cluster/node.py).
        self.write_until = math.inf
        self.renewed_at = math.inf  # when the renewal that gave write_until was sent
        self._refused_since = math.inf  # the deadline past which changes were refused
        self._renewed = threading.Condition()  # notified at each fence()

    def freeze(self) -> None:
        """Hold every change at the door (reads go on), e.g. while verify compares.

        Returns once no change is under way."""
        with self.lock:
            self._thawed.clear()

    def thaw(self) -> None:
        self._thawed.set()

    def fence(self, until: float = 0.0, renewed: float | None = None) -> None:
        """Refuse every change with EROFS from time.monotonic() *until* on (reads go on);
        math.inf lifts the fence. *renewed*: when the lease renewal that gave *until*
        was sent (``lead_confirmed``).

        A cluster's primary writes only while its lease holds (repl/cluster/node.py): it is
        given a deadline at each renewal, so it stops by itself when they stop
        coming. Returns once no change is under way (a fence in the past is in
        force when it returns: none is journaled after it).
        """
        with self.lock:
            self.write_until = until
        with self._renewed:
            self.renewed_at = (renewed if renewed is not None
                               else math.inf if until == math.inf else -math.inf)
            self._renewed.notify_all()

    def lead_confirmed(self, since: float) -> bool:
        """Block until a lease renewal sent at or after time.monotonic() *since* has
        extended the fence (True), or the fence passes first (False). True at once
        where nothing fences (a primary outside a cluster)."""
        with self._renewed:
            while self.renewed_at < since:
                left = self.write_until - time.monotonic()
                if left <= 0:
                    return False
                self._renewed.wait(left)
            return True

    @property
    def fenced(self) -> bool:
        return time.monotonic() >= self.write_until

    def _enter(self, change: bool) -> None:
        """Take the lock; a change first waits until the mount is not frozen, and is
        refused (EROFS) while it is fenced."""
        while True:
            if change and not self._thawed.is_set():
                self._thawed.wait()
            self.lock.acquire()
            if change and time.monotonic() >= self.write_until:
                if self._refused_since != self.write_until:  # once per deadline passed
                    self._refused_since = self.write_until
                    log.warning("refusing changes (EROFS): fenced, no renewal of the "
                                "lease moved the deadline (writes the kernel still holds "
                                "fail at close or fsync with EIO)")
                self.lock.release()
                raise OSError(errno.EROFS, "fenced: this node may no longer be the primary")
            if not change or self._thawed.is_set():
                return
            self.lock.release()  # frozen in between: wait again

    # --- helpers ----------------------------------------------------------------

    def _entry(self, st: os.stat_result, ino: int | None = None) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino if ino is not None else self.inodes.ino_of(st)
        e.generation = 0
        e.entry_timeout = self.timeout
        e.attr_timeout = self.timeout
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _named(self, entry: pyfuse3.EntryAttributes, parent: int, name: bytes
               ) -> pyfuse3.EntryAttributes:
        """*entry*, the answer for *name* in *parent* (the standby may shorten its
        timeouts)."""
        return entry

    # --- names ----------------------------------------------------------------------

    @request()
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        try:
            if name in (b".", b".."):
                target = self._parent(parent_inode) if name == b".." else parent_inode
                self.inodes.node(target).lookups += 1
                return self._entry(self.inodes.stat(target), target)
            pfd = self.inodes.dir_fd(parent_inode)
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            e = pyfuse3.EntryAttributes()
            e.st_ino = 0
            e.entry_timeout = self.timeout
            return self._named(e, parent_inode, name)
        return self._named(self._entry(st, self.inodes.remember(parent_inode, name, st)),
                           parent_inode, name)

    @request()
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.inodes.forget(ino, count)
            if ino not in self.inodes.nodes:
                self._xattrs.pop(ino, None)

    @request()
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self.inodes.stat(inode), inode)

    @request()
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        fd, name = self.inodes.at(inode)
        return os.readlink(name, dir_fd=fd)

    # --- files ------------------------------------------------------------------------

    def _open_flags(self, flags: int) -> int:
        # The writeback cache may read to fill pages of write-only files, and
        # it handles O_APPEND itself by sending writes at the end offset.
        # O_DIRECT is the kernel's business: requests arrive in unaligned
        # buffers, which the backing file would refuse with EINVAL.
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_TRUNC
                   | os.O_DIRECT)
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags | os.O_NOFOLLOW | os.O_CLOEXEC

    def _open_fd(self, inode: int, flags: int) -> int:
        """An fd of *inode*'s file opened with *flags* (as ``_open_flags`` makes them)."""
        unlinked = self.inodes.unlinked_fd(inode)
        if unlinked is not None:
            # Reopen through the magic link, which O_NOFOLLOW would refuse.
            return os.open(fd_path(unlinked), self._open_flags(flags) & ~os.O_NOFOLLOW)
        dir_fd, name = self.inodes.at(inode)
        return os.open(name, self._open_flags(flags), dir_fd=dir_fd)

    def _opened(self, fd: int, inode: int, flags: int) -> pyfuse3.FileInfo:
        self.files[fd] = inode
        if flags & os.O_ACCMODE != os.O_RDONLY:
            self.writable.add(fd)
        self.inodes.node(inode).fds |= {fd}
        return pyfuse3.FileInfo(fh=fd, keep_cache=not self.direct_io, direct_io=self.direct_io)

    def _closed(self, fd: int, inode: int) -> None:
        """Close a file or directory handle; forget its inode if that was the last use."""
        node = self.inodes.nodes.get(inode)
        if node is not None:
            node.fds = node.fds - {fd} or NO_FDS
            if node.lookups <= 0 and not node.fds:
                self.inodes.forget(inode, 0)
        os.close(fd)

    @request(locked=False)  # the handle stays open until this request is answered
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    @request()
    async def lseek(self, fh: int, off: int, whence: int) -> int:
        """SEEK_DATA and SEEK_HOLE, as BACKING's file answers them.

        Only while no handle has the file open for writing: the kernel asks without
        first writing back what its writeback cache holds (written data BACKING does
        not have yet, past its end perhaps), and that would read as holes. Until the
        writers close (which writes it back), the answer is EINVAL, "not supported
        here", on which cp, tar and friends fall back to reading the whole file.

        Another handle closed just before may not be released yet (the kernel
        releases it after close() returned): this waits up to SEEK_WAIT for the
        other writers to go. A handle that writes itself gets its answer at once.
        """
        inode = self.files[fh]
        if fh not in self.writable and self._writers(inode):
            self._released.wait_for(lambda: not self._writers(inode), SEEK_WAIT)
        if self._writers(inode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.lseek(fh, off, whence)

    def _writers(self, inode: int) -> frozenset[int]:
        return frozenset(fd for fd in self.inodes.node(inode).fds if fd in self.writable)

    async def flush(self, fh: int) -> None:
        # Nothing to do at close(2): ENOSYS once, and the kernel stops asking (its
        # writeback of the file's dirty pages happens before, either way).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @request()
    async def release(self, fh: int) -> None:
        inode = self.files.pop(fh)
        if fh in self.writable:
            self.writable.discard(fh)
            self._released.notify_all()
        self._closed(fh, inode)

    # --- directories --------------------------------------------------------------

    @request()
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode == ROOT:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                         dir_fd=self.inodes.root_fd)
        else:
            dir_fd, name = self.inodes.at(inode)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        self.dirs[fd] = DirHandle(inode, fd)
        self.inodes.node(inode).fds |= {fd}  # fstat, fchmod... after rmdir
        # The kernel keeps the listing until a change through the mount (the only
        # writer) makes it stale: ls of an unchanged directory costs no request.
        return pyfuse3.FileInfo(fh=fd, keep_cache=self.cache_listings,
                                cache_readdir=self.cache_listings)

    @request()
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.dirs[fh]
        if start_id == 0 or not handle.entries:
            # Also when a handle starts past 0: the kernel served the start of the
            # listing from its cache, then lost the rest (evicted) and asks us from
            # there. The offsets are places in this sorted listing, which has not
            # changed since (a change through the mount drops the kernel's cache).
            handle.entries = [b".", b"..", *sorted(map(os.fsencode, os.listdir(handle.fd)))]
        for index in range(start_id, len(handle.entries)):
            name = handle.entries[index]
            try:
                if index < 2:  # "." and "..": the kernel takes no lookup of them
                    ino = handle.ino if index == 0 else self._parent(handle.ino)
                    entry = self._entry(self.inodes.stat(ino), ino)
                else:
                    st = os.stat(name, dir_fd=handle.fd, follow_symlinks=False)
                    ino = self.inodes.ino_for(handle.ino, name, st)
                    entry = self._named(self._entry(st, ino), handle.ino, name)
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, name, entry, index + 1):
                break
            if index >= 2:
                self.inodes.remember(handle.ino, name, st, ino)

    def _parent(self, ino: int) -> int:
        """The parent directory of *ino*; the root is its own, as "/" is."""
        found = self.inodes.name_of(ino) if ino != ROOT else None
        return found[0] if found else ino

    @request()
    async def releasedir(self, fh: int) -> None:
        self._closed(fh, self.dirs.pop(fh).ino)

    @request()
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.inodes.root_fd)
        data = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(data, attr, getattr(sv, attr))
        return data

    @request()
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel checks

    # --- xattrs ---------------------------------------------------------------------

    def _xattr_path(self, inode: int) -> tuple[bytes | int, bool]:
        """Where xattr calls reach *inode*: (path or fd, follow_symlinks)."""
        if inode == ROOT:
            return self.inodes.root_fd, True
        unlinked = self.inodes.unlinked_fd(inode)
        if unlinked is not None:
            return unlinked, True
        fd, name = self.inodes.at(inode)
        return fd_path(fd, name), False

    @request()
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        cache = self._xattrs.setdefault(inode, {})
        if name in cache:
            value = cache[name]
        else:
            where, follow = self._xattr_path(inode)
            try:
                value = os.getxattr(where, name, follow_symlinks=follow)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
                value = None
            cache[name] = value
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @request()
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        where, follow = self._xattr_path(inode)
        names = [os.fsencode(n) for n in os.listxattr(where, follow_symlinks=follow)]
        if ctx.uid != 0:
            # The backing filesystem lists trusted.* only to CAP_SYS_ADMIN, which the
            # daemon (as root) has; uid 0 stands in for the caller's capability.
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names
