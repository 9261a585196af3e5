"""The primary mount: a passthrough of the backing directory that journals every change.

Requests are served by several threads (``pyfuse3.main_threads``): the
handlers are ``async`` in name only and never suspend. Each runs holding
``lock`` (the capture's), so handlers never interleave, and each mutating
one follows one order inside it: journal the op (``capture.record``), apply
it to the backing directory, void the record if that failed, answer. Only
the waits let the lock go: a read's pread, an fsync's flushes, a change
held at the door while the mount is frozen.
Writes through a file that has no name left need no record: no name shows
them (see DESIGN.md, "Hard parts").

The daemon is the only writer of the backing directory, which is what makes
long kernel cache timeouts and the writeback cache safe.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import stat
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import pyfuse3

from fs.counts import RequestCounts
from fs.errors import fuse_error
from fs.inodes import ROOT, Inodes
from repl.apply import intent_for
from repl.capture import Capture
from repl.histograms import FSYNC_SECONDS
from repl.semisync import Semisync
from store.libc import fallocate, fd_path, renameat2
from store.records import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    Op,
    Record,
)

TIMEOUT = 300.0  # the daemon is the only writer, so the kernel may cache long
_AM_ROOT = os.geteuid() == 0
_CAPABILITY = b"security.capability"
Handler = TypeVar("Handler", bound=Callable[..., Coroutine[Any, Any, Any]])
# fallocate(2) modes passed through; the others (collapse, insert, unshare...) change
# offsets or sharing, and are refused with EOPNOTSUPP, as by a filesystem without them.
_FALLOC_MODES = frozenset({0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE})
# Errors a filesystem gives a fallocate before it changed anything.
_FALLOC_REFUSED = frozenset({errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM,
                             errno.EFBIG, errno.ENODEV, errno.ESPIPE, errno.ETXTBSY,
                             errno.EROFS, errno.EISDIR})
# Bytes one copy_file_range request copies at most: they are read into one WRITE
# record first. A caller loops on a short copy, as it must on any filesystem.
COPY_MAX = 4 << 20
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
        async def run(self: PrimaryFS, *args: object, **kwargs: object) -> Any:
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


class PrimaryFS(pyfuse3.Operations):
    enable_writeback_cache = True
    enable_acl = True  # the kernel enforces POSIX ACLs (system.posix_acl_*), as natively
    supports_dot_lookup = True
    timeout = TIMEOUT
    direct_io = False
    cache_listings = True

    def __init__(self, inodes: Inodes, capture: Capture, remote: Semisync | None = None
                 ) -> None:
        super().__init__()
        self.inodes = inodes
        self.capture = capture
        self.remote = remote  # --fsync remote: an fsync waits for the secondaries' staging
        self.requests = RequestCounts()
        self.files: dict[int, int] = {}  # fh (== fd) -> inode
        self.writable: set[int] = set()  # the fhs opened for writing
        self.dirs: dict[int, DirHandle] = {}
        self._xattrs: dict[int, dict[bytes, bytes | None]] = {}
        self.lock = capture.lock if capture is not None else threading.RLock()
        self._released = threading.Condition(self.lock)  # a file handle was released
        self._thawed = threading.Event()  # clear while frozen: changes wait for it
        self._thawed.set()
        # Changes are refused with EROFS from this time.monotonic() on: a cluster's
        # primary may write only while its lease holds (repl/node.py).
        self.write_until = math.inf

    def freeze(self) -> None:
        """Hold every change at the door (reads go on), e.g. while verify compares.

        Returns once no change is under way."""
        with self.lock:
            self._thawed.clear()

    def thaw(self) -> None:
        self._thawed.set()

    def fence(self, until: float = 0.0) -> None:
        """Refuse every change with EROFS from time.monotonic() *until* on (reads go on);
        math.inf lifts the fence.

        A cluster's primary writes only while its lease holds (repl/node.py): it is
        given a deadline at each renewal, so it stops by itself when they stop
        coming. Returns once no change is under way (a fence in the past is in
        force when it returns: none is journaled after it).
        """
        with self.lock:
            self.write_until = until

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

    def _journal(self, op: Op, path: bytes | None, **fields: object) -> Record | None:
        """Journal *op* unless it touches something no name reaches."""
        if path is None:
            return None
        return self.capture.record(op, path=path, **fields)

    def _void(self, record: Record | None) -> None:
        if record is not None:
            self.capture.void(record)

    def _owner(self, parent_fd: int, ctx: pyfuse3.RequestContext) -> tuple[int, int, bool]:
        """(uid, gid, parent is setgid) a new node gets, as the native filesystem would."""
        parent = os.fstat(parent_fd)
        setgid = bool(parent.st_mode & stat.S_ISGID)
        uid, gid = (ctx.uid, ctx.gid) if _AM_ROOT else (os.geteuid(), os.getegid())
        return uid, parent.st_gid if setgid else gid, setgid

    def _new_node(
        self, parent: int, name: bytes, op: Op, mode: int, ctx: pyfuse3.RequestContext,
        make: object, **fields: object,
    ) -> pyfuse3.EntryAttributes:
        """Create a name (mkdir, mknod, symlink) with the caller's ownership."""
        pfd = self.inodes.dir_fd(parent)
        uid, gid, setgid = self._owner(pfd, ctx)
        if op == Op.MKDIR and setgid:
            mode |= stat.S_ISGID
        if op != Op.SYMLINK:
            fields["mode"] = mode
        record = self._journal(op, self.inodes.child_path(parent, name), uid=uid, gid=gid,
                               **fields)
        try:
            make(pfd, name, mode)  # type: ignore[operator]
        except OSError:
            self._void(record)
            raise
        try:
            if _AM_ROOT:
                os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
            if op != Op.SYMLINK and stat.S_IMODE(mode) & 0o7000:
                os.chmod(name, stat.S_IMODE(mode), dir_fd=pfd, follow_symlinks=False)
        except OSError:
            # Undo the node before voiding its record: both sides must agree.
            (os.rmdir if op == Op.MKDIR else os.unlink)(name, dir_fd=pfd)
            self._void(record)
            raise
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        return self._entry(st, self.inodes.remember(parent, name, st))

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

    @request(changes=True)
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._new_node(
            parent_inode, name, Op.MKNOD, mode, ctx,
            lambda fd, n, m: os.mknod(n, m, rdev, dir_fd=fd), rdev=rdev)

    @request(changes=True)
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._new_node(parent_inode, name, Op.MKDIR, stat.S_IFDIR | mode, ctx,
                              lambda fd, n, m: os.mkdir(n, stat.S_IMODE(m), dir_fd=fd))

    @request(changes=True)
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._new_node(parent_inode, name, Op.SYMLINK, stat.S_IFLNK | 0o777, ctx,
                              lambda fd, n, m: os.symlink(target, n, dir_fd=fd),
                              data=target)

    @request(changes=True)
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        src_fd, src = self.inodes.at(inode)
        dst_fd = self.inodes.dir_fd(new_parent_inode)
        path = self.inodes.path(inode)
        dst_path = self.inodes.child_path(new_parent_inode, new_name)
        record = None
        if path is not None and dst_path is not None:
            record = self.capture.record(Op.LINK, path=path, path2=dst_path)
        try:
            os.link(src, new_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd,
                    follow_symlinks=False)
        except OSError:
            self._void(record)
            raise
        st = os.stat(new_name, dir_fd=dst_fd, follow_symlinks=False)
        return self._entry(st, self.inodes.remember(new_parent_inode, new_name, st))

    @request(changes=True)
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._remove(parent_inode, name, Op.UNLINK)

    @request(changes=True)
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._remove(parent_inode, name, Op.RMDIR)

    def _remove(self, parent: int, name: bytes, op: Op) -> None:
        pfd = self.inodes.dir_fd(parent)
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        record = self._journal(op, self.inodes.child_path(parent, name))
        try:
            if op == Op.RMDIR:
                os.rmdir(name, dir_fd=pfd)
                self.capture.backing.forget_dirs()  # its path may come back as another dir
            else:
                os.unlink(name, dir_fd=pfd)
        except OSError:
            self._void(record)
            raise
        self.inodes.drop_name(self.inodes.ino_of(st), parent, name)

    @request(changes=True)
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        old_fd = self.inodes.dir_fd(parent_inode_old)
        new_fd = self.inodes.dir_fd(parent_inode_new)
        st_old = os.stat(name_old, dir_fd=old_fd, follow_symlinks=False)
        try:
            st_new: os.stat_result | None = os.stat(name_new, dir_fd=new_fd,
                                                    follow_symlinks=False)
        except FileNotFoundError:
            st_new = None
        path = self.inodes.child_path(parent_inode_old, name_old)
        path2 = self.inodes.child_path(parent_inode_new, name_new)
        record = None
        if path is not None and path2 is not None:
            exchange = bool(flags & pyfuse3.RENAME_EXCHANGE)
            intent = intent_for(self.capture.backing, Record(
                Op.RENAME, 0, 0, path=path, path2=path2, flags=flags)) if exchange else None
            record = self.capture.record(Op.RENAME, intent, path=path, path2=path2,
                                         flags=flags)
        try:
            renameat2(old_fd, name_old, new_fd, name_new, flags)
        except OSError:
            self._void(record)
            raise
        self.capture.backing.forget_dirs()
        moved = self.inodes.ino_of(st_old)
        self.inodes.drop_name(moved, parent_inode_old, name_old)
        if st_new is not None:
            other = self.inodes.ino_of(st_new)
            self.inodes.drop_name(other, parent_inode_new, name_new)
            if flags & pyfuse3.RENAME_EXCHANGE:
                self.inodes.add_name(other, parent_inode_old, name_old)
        self.inodes.add_name(moved, parent_inode_new, name_new)

    # --- attributes ---------------------------------------------------------------

    @request(changes=True)
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self.inodes.path(inode) if inode != ROOT else b""
        if path is None and fh is None and self.inodes.unlinked_fd(inode) is None:
            # Gone from every name and closed: the kernel flushing the times of a
            # deleted file (SQLite's WAL after close). Nothing is left to change.
            attr.attr_timeout = attr.entry_timeout = self.timeout
            return attr
        if fields.update_size:
            record = self._journal(Op.TRUNCATE, path, size=attr.st_size)
            self._do(record, self._truncate, inode, fh, attr.st_size)
            self._data_changed(inode)
        if fields.update_uid or fields.update_gid:
            st = self._stat(inode, fh)
            uid = attr.st_uid if fields.update_uid else st.st_uid
            gid = attr.st_gid if fields.update_gid else st.st_gid
            record = self._journal(Op.CHOWN, path, uid=uid, gid=gid)
            self._do(record, self._on_node, inode, fh, os.chown, uid, gid)
            self._xattrs.pop(inode, None)
        if fields.update_mode:
            mode = stat.S_IMODE(attr.st_mode)
            record = self._journal(Op.CHMOD, path, mode=mode)
            self._do(record, self._on_node, inode, fh, os.chmod, mode)
            self._xattrs.pop(inode, None)  # chmod rewrites the ACL's mask and other
        if fields.update_atime or fields.update_mtime:
            st = self._stat(inode, fh)
            times = (attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                     attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns)
            # The kernel's writeback of a written file's times, at every fsync: the
            # set already restates that path's times at its close (repl/touched.py).
            record = None if path is not None and self.capture.restates_times(path, fh, inode) \
                else self._journal(Op.UTIMES, path, atime_ns=times[0], mtime_ns=times[1])
            self._do(record, self._on_node, inode, fh, os.utime, ns=times)
        return self._entry(self._stat(inode, fh), inode)

    def _stat(self, inode: int, fh: int | None) -> os.stat_result:
        return os.fstat(fh) if fh is not None else self.inodes.stat(inode)

    def _do(self, record: Record | None, func: object, *args: object, **kwargs: object) -> None:
        try:
            func(*args, **kwargs)  # type: ignore[operator]
        except OSError:
            self._void(record)
            raise

    def _truncate(self, inode: int, fh: int | None, size: int) -> None:
        fh = fh if fh is not None else self.inodes.unlinked_fd(inode)
        if fh is not None:
            os.truncate(fh, size)
            self.capture.track(fh)
            return
        fd, name = self.inodes.at(inode)
        file_fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        try:
            os.truncate(file_fd, size)
            self.capture.track(file_fd)
        finally:
            os.close(file_fd)

    def _on_node(self, inode: int, fh: int | None, func: object, *args: object,
                 **kwargs: object) -> None:
        """Call chmod/chown/utime on the node itself, never on a symlink's target."""
        fh = fh if fh is not None else self.inodes.unlinked_fd(inode)
        if inode == ROOT:
            func(self.inodes.root_fd, *args, **kwargs)  # type: ignore[operator]
        elif fh is not None:
            func(fh, *args, **kwargs)  # type: ignore[operator]
        else:
            fd, name = self.inodes.at(inode)
            func(name, *args, dir_fd=fd, follow_symlinks=False, **kwargs)  # type: ignore[operator]

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

    def _opened(self, fd: int, inode: int, flags: int) -> pyfuse3.FileInfo:
        self.files[fd] = inode
        if flags & os.O_ACCMODE != os.O_RDONLY:
            self.writable.add(fd)
        self.inodes.node(inode).fds.add(fd)
        return pyfuse3.FileInfo(fh=fd, keep_cache=not self.direct_io, direct_io=self.direct_io)

    def _closed(self, fd: int, inode: int) -> None:
        """Close a file or directory handle; forget its inode if that was the last use."""
        node = self.inodes.nodes.get(inode)
        if node is not None:
            node.fds.discard(fd)
            if node.lookups <= 0 and not node.fds:
                self.inodes.forget(inode, 0)
        os.close(fd)

    @request(changes=lambda inode, flags, ctx: bool(flags & os.O_TRUNC))
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        unlinked = self.inodes.unlinked_fd(inode)
        if unlinked is not None:
            # Reopen through the magic link, which O_NOFOLLOW would refuse.
            fd = os.open(fd_path(unlinked),
                         self._open_flags(flags) & ~os.O_NOFOLLOW)
        else:
            dir_fd, name = self.inodes.at(inode)
            fd = os.open(name, self._open_flags(flags), dir_fd=dir_fd)
        if flags & os.O_TRUNC:
            record = self._journal(Op.TRUNCATE, self.inodes.path(inode), size=0)
            try:
                os.truncate(fd, 0)
            except OSError:
                self._void(record)
                os.close(fd)
                raise
            self.capture.track(fd)
            self._data_changed(inode)
        return self._opened(fd, inode, flags)

    @request(changes=True)
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        pfd = self.inodes.dir_fd(parent_inode)
        uid, gid, _ = self._owner(pfd, ctx)
        mode = stat.S_IFREG | stat.S_IMODE(mode)
        record = self._journal(Op.CREATE, self.inodes.child_path(parent_inode, name),
                               mode=mode, uid=uid, gid=gid)
        try:
            fd = os.open(name, self._open_flags(flags) | os.O_CREAT | os.O_EXCL,
                         stat.S_IMODE(mode), dir_fd=pfd)
        except OSError:
            self._void(record)
            raise
        try:
            if _AM_ROOT:
                os.fchown(fd, uid, gid)
                if stat.S_IMODE(mode) & 0o7000:
                    os.fchmod(fd, stat.S_IMODE(mode))
        except OSError:
            os.close(fd)
            os.unlink(name, dir_fd=pfd)  # undone, so both sides agree
            self._void(record)
            raise
        st = os.fstat(fd)
        ino = self.inodes.remember(parent_inode, name, st)
        return self._opened(fd, ino, flags), self._entry(st, ino)

    @request(locked=False)  # the handle stays open until this request is answered
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    @request(changes=True)
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        inode = self.files[fh]
        record = self.capture.write(self.inodes.path(inode), off, buf)
        try:
            written = os.pwrite(fh, buf, off)
        except OSError:
            self._void(record)
            raise
        if record is not None and written < len(buf):
            self.capture.shorten(record, written)
        self.capture.track(fh, inode)
        self._data_changed(inode)
        return written

    @request(changes=True)
    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        if mode not in _FALLOC_MODES:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        inode = self.files[fh]
        path = self.inodes.path(inode)
        record = self._journal(Op.FALLOCATE, path, flags=mode, offset=off, length=length)
        before = os.fstat(fh).st_size
        try:
            fallocate(fh, mode, off, length)
        except OSError as exc:
            self._void(record)
            if record is not None and exc.errno not in _FALLOC_REFUSED:
                self._journal_failed_fallocate(fh, path, before, mode, off, length)
            raise
        finally:
            self.capture.track(fh)
            self._data_changed(inode)

    def _journal_failed_fallocate(self, fh: int, path: bytes | None, before: int, mode: int,
                                  off: int, length: int) -> None:
        """A fallocate that failed may have done part of its work (ext4 grows the file
        as it allocates, and may zero part of a range): journal what a reader sees now."""
        size = os.fstat(fh).st_size
        if size != before:
            self.capture.record(Op.TRUNCATE, path=path, size=size)
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            for at in range(off, min(off + length, size), COPY_MAX):
                data = os.pread(fh, min(COPY_MAX, min(off + length, size) - at), at)
                self.capture.write(path, at, data)

    @request(changes=True)
    async def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int,
                              length: int, flags: int) -> int:
        """Copied on BACKING, journaled as a WRITE of the bytes it copies (read first,
        under the lock, so they are the ones copied): the replica needs no source."""
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        inode = self.files[fh_out]
        data = os.pread(fh_in, min(length, COPY_MAX), off_in)
        record = self.capture.write(self.inodes.path(inode), off_out, data) if data else None
        try:
            copied = os.copy_file_range(fh_in, fh_out, len(data), off_in, off_out)
        except OSError:
            self._void(record)
            raise
        if record is not None and copied < len(data):
            self.capture.shorten(record, copied)
        self.capture.track(fh_out)
        self._data_changed(inode)
        return copied

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

    def _data_changed(self, inode: int) -> None:
        """After a write or truncate, which clear file capabilities on the backing file."""
        cached = self._xattrs.get(inode)
        if cached and cached.get(_CAPABILITY):
            del self._xattrs[inode]

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

    @request(locked=False)
    async def fsync(self, fh: int, datasync: bool) -> None:
        self._commit(fh, datasync)

    def _commit(self, fd: int, datasync: bool) -> None:
        """Close the set and return once it is durable in the journal (an fsync's
        promise: after a crash the journal brings BACKING back to it; see
        repl/capture.py). Over budget, *fd* itself is synced too. With --fsync
        remote, also wait until the secondaries in step staged the set
        (repl/semisync.py).

        Only closing the set holds the lock: other requests go on while this
        one waits for the disk and the secondaries."""
        began = time.monotonic()
        with self.lock:
            if time.monotonic() >= self.write_until:
                raise OSError(errno.EROFS, "fenced: this node may no longer be the primary")
            closed = self.capture.close_set()
            end = self.capture.journal.end
            unjournaled = self.capture.overflow  # writes went to the dirty map, not the journal
        if unjournaled:
            (os.fdatasync if datasync else os.fsync)(fd)
        self.capture.wait_durable(end)
        if self.remote is not None:
            if unjournaled:
                self.remote.count_local()  # its data went to the dirty map: nothing to wait for
            else:
                self.remote.wait_staged(closed)
        FSYNC_SECONDS.observe(time.monotonic() - began)

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
        self.inodes.node(inode).fds.add(fd)  # fstat, fchmod... after rmdir
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
                    entry = self._named(self._entry(st), handle.ino, name)
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, name, entry, index + 1):
                break
            if index >= 2:
                self.inodes.remember(handle.ino, name, st)

    def _parent(self, ino: int) -> int:
        """The parent directory of *ino*; the root is its own, as "/" is."""
        found = self.inodes.name_of(ino) if ino != ROOT else None
        return found[0] if found else ino

    @request()
    async def releasedir(self, fh: int) -> None:
        self._closed(fh, self.dirs.pop(fh).ino)

    @request(locked=False)
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self._commit(fh, datasync)

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

    @request(changes=True)
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        where, follow = self._xattr_path(inode)
        path = self.inodes.path(inode) if inode != ROOT else b""
        record = self._journal(Op.SETXATTR, path, name=name, data=value)
        self._xattrs.pop(inode, None)
        self._do(record, os.setxattr, where, name, value, follow_symlinks=follow)

    @request(changes=True)
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        where, follow = self._xattr_path(inode)
        path = self.inodes.path(inode) if inode != ROOT else b""
        record = self._journal(Op.REMOVEXATTR, path, name=name)
        self._xattrs.pop(inode, None)
        self._do(record, os.removexattr, where, name, follow_symlinks=follow)

