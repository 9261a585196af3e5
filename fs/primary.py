"""The primary mount: a passthrough of the backing directory that journals every change.

The read side, and the door every request passes, is fs/passthrough.py.
Each mutating handler runs holding ``lock`` (the capture's) and applies its
op to the backing directory inside ``capture.applying``: the op is
journaled, then applied, and its record voided if that failed, before the
handler answers. Only the waits let the lock go: a read's pread, an fsync's
flushes, a change held at the door while the mount is frozen.
Writes through a file that has no name left need no record: no name shows
them (see DESIGN.md, "Hard parts").
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import time

import pyfuse3

from fs.inodes import ROOT, Inodes
from fs.passthrough import Passthrough, request
from repl.apply import intent_for
from repl.histograms import FSYNC_SECONDS
from repl.primary.capture import Capture
from repl.primary.semisync import Semisync, Waited
from store.libc import fallocate, lstat_at, renameat2
from store.records import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    Op,
    Record,
)
from store.reserve import disk_full

_AM_ROOT = os.geteuid() == 0
_CAPABILITY = b"security.capability"
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


class PrimaryFS(Passthrough):
    # The daemon, not the kernel, clears set-ID bits: then the kernel no longer asks
    # for security.capability before each write(2) into its page cache. pyfuse3
    # turns the kernel's requests to clear them into setattrs (journaled as any
    # chmod); BACKING's own write or truncate drops file capabilities.
    handle_killpriv_v2 = True

    def __init__(self, inodes: Inodes, capture: Capture, remote: Semisync | None = None
                 ) -> None:
        super().__init__(inodes, capture.lock)
        self.capture = capture
        self.remote = remote  # --fsync remote: an fsync waits for the secondaries' staging

    # --- helpers ----------------------------------------------------------------

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
        path = self.inodes.child_path(parent, name)
        with self.capture.applying(op, path, None, uid=uid, gid=gid, **fields):
            make(pfd, name, mode)  # type: ignore[operator]
            try:
                if _AM_ROOT:
                    os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
                if op != Op.SYMLINK and stat.S_IMODE(mode) & 0o7000:
                    os.chmod(name, stat.S_IMODE(mode), dir_fd=pfd, follow_symlinks=False)
            except OSError:
                # Undo the node before voiding its record: both sides must agree.
                (os.rmdir if op == Op.MKDIR else os.unlink)(name, dir_fd=pfd)
                raise
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        return self._entry(st, self.inodes.remember(parent, name, st))

    # --- names ----------------------------------------------------------------------

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
        with self.capture.applying(Op.LINK, self.inodes.path(inode),
                                   path2=self.inodes.child_path(new_parent_inode, new_name)):
            os.link(src, new_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd,
                    follow_symlinks=False)
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
        with self.capture.applying(op, self.inodes.child_path(parent, name)):
            if op == Op.RMDIR:
                os.rmdir(name, dir_fd=pfd)
                self.capture.backing.forget_dirs()  # its path may come back as another dir
            else:
                os.unlink(name, dir_fd=pfd)
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
        intent = None
        if path is not None and path2 is not None and flags & pyfuse3.RENAME_EXCHANGE:
            intent = intent_for(self.capture.backing, Record(
                Op.RENAME, 0, 0, path=path, path2=path2, flags=flags))
        with self.capture.applying(Op.RENAME, path, intent, path2=path2, flags=flags):
            renameat2(old_fd, name_old, new_fd, name_new, flags)
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
            with self.capture.applying(Op.TRUNCATE, path, size=attr.st_size):
                self._truncate(inode, fh, attr.st_size)
            self._data_changed(inode)
        if fields.update_uid or fields.update_gid:
            st = self._stat(inode, fh)
            uid = attr.st_uid if fields.update_uid else st.st_uid
            gid = attr.st_gid if fields.update_gid else st.st_gid
            with self.capture.applying(Op.CHOWN, path, uid=uid, gid=gid):
                self._on_node(inode, fh, os.chown, uid, gid)
            self._xattrs.pop(inode, None)
        if fields.update_mode:
            mode = stat.S_IMODE(attr.st_mode)
            with self.capture.applying(Op.CHMOD, path, mode=mode):
                self._on_node(inode, fh, os.chmod, mode)
            self._xattrs.pop(inode, None)  # chmod rewrites the ACL's mask and other
        if fields.update_atime or fields.update_mtime:
            # Given the mtime, BACKING is not asked for its times: see _stat.
            st = self._stat(inode, fh, attr.st_mtime_ns if fields.update_mtime else None)
            times = (attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                     attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns)
            # The kernel's writeback of a written file's times, at every fsync: the
            # set already restates that path's times at its close (repl/primary/touched.py).
            if path is not None and self.capture.restates_times(path, fh, inode):
                self._on_node(inode, fh, os.utime, ns=times)
            else:
                with self.capture.applying(Op.UTIMES, path, atime_ns=times[0],
                                           mtime_ns=times[1]):
                    self._on_node(inode, fh, os.utime, ns=times)
            if fields.update_mtime and stat.S_ISREG(st.st_mode):
                if path is not None:
                    self.capture.keep_mtime(path, times[1])
                # The kernel keeps a regular file's mtime and ctime itself; the rest is
                # as read before, but the atime the utime set.
                entry = self._entry(st, inode)
                entry.st_atime_ns = times[0]
                return entry
        return self._entry(self._stat(inode, fh), inode)

    def _stat(self, inode: int, fh: int | None, mtime_ns: int | None = None
              ) -> os.stat_result:
        """lstat of *inode* (through *fh* if open); given *mtime_ns*, without asking
        BACKING for the change and modification times (they read as *mtime_ns*): a
        question moves the clock of every coarse timestamp at the file's next change,
        and the kernel then sends the mount's files' mtimes at every fsync
        (store/libc.py ``stat_untimed``)."""
        return lstat_at(fh, mtime_ns=mtime_ns) if fh is not None else self.inodes.stat(
            inode, mtime_ns)

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

    @request(changes=lambda inode, flags, ctx: bool(flags & os.O_TRUNC))
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        fd = self._open_fd(inode, flags)
        if flags & os.O_TRUNC:
            try:
                with self.capture.applying(Op.TRUNCATE, self.inodes.path(inode), size=0):
                    os.truncate(fd, 0)
            except OSError:
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
        with self.capture.applying(Op.CREATE, self.inodes.child_path(parent_inode, name),
                                   mode=mode, uid=uid, gid=gid):
            fd = os.open(name, self._open_flags(flags) | os.O_CREAT | os.O_EXCL,
                         stat.S_IMODE(mode), dir_fd=pfd)
            try:
                if _AM_ROOT:
                    os.fchown(fd, uid, gid)
                    if stat.S_IMODE(mode) & 0o7000:
                        os.fchmod(fd, stat.S_IMODE(mode))
            except OSError:
                os.close(fd)
                os.unlink(name, dir_fd=pfd)  # undone, so both sides agree
                raise
        st = os.fstat(fd)
        ino = self.inodes.remember(parent_inode, name, st)
        # A file just made has no capabilities (only a setxattr, which goes through
        # here, gives a file some): the kernel's check before its first write(2) is
        # answered from memory, not with a getxattr of BACKING's file.
        self._xattrs[ino] = {_CAPABILITY: None}
        return self._opened(fd, ino, flags), self._entry(st, ino)

    @request(changes=True)
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        inode = self.files[fh]
        with self.capture.applying(Op.WRITE, self.inodes.path(inode), offset=off,
                                   data=buf) as change:
            change.written = self._pwrite(fh, buf, off)
        self.capture.track(fh, inode)
        self._data_changed(inode)
        return change.written

    def _pwrite(self, fd: int, data: bytes, off: int) -> int:
        """Write *data* to BACKING's file at *off*; returns how much was written. On a
        full disk the journal's reserve is given up for it (the kernel took this
        write already: store/reserve.py), and only past it does it fail or fall short."""
        written = 0
        while written < len(data):
            try:
                done = os.pwrite(fd, memoryview(data)[written:], off + written)
            except OSError as exc:
                if not disk_full(exc) or not self.capture.journal.give_up_reserve():
                    if written:
                        break
                    raise
                continue
            if not done:
                break
            written += done
        return written

    @request(changes=True)
    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        if mode not in _FALLOC_MODES:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        inode = self.files[fh]
        path = self.inodes.path(inode)
        tried = False  # the journaling went through: BACKING's file may have changed
        try:
            with self.capture.applying(Op.FALLOCATE, path, flags=mode, offset=off,
                                       length=length):
                tried, before = True, os.fstat(fh).st_size
                fallocate(fh, mode, off, length)
        except OSError as exc:
            if tried and path is not None and exc.errno not in _FALLOC_REFUSED:
                self._journal_failed_fallocate(fh, path, before, mode, off, length)
            raise
        finally:
            if tried:
                self.capture.track(fh)
                self._data_changed(inode)

    def _journal_failed_fallocate(self, fh: int, path: bytes, before: int, mode: int,
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
        path = self.inodes.path(inode) if data else None  # nothing copied: no record
        with self.capture.applying(Op.WRITE, path, offset=off_out, data=data) as change:
            change.written = os.copy_file_range(fh_in, fh_out, len(data), off_in, off_out)
        self.capture.track(fh_out)
        self._data_changed(inode)
        return change.written

    def _data_changed(self, inode: int) -> None:
        """After a write or truncate, which clear file capabilities on the backing file."""
        cached = self._xattrs.get(inode)
        if cached and cached.get(_CAPABILITY):
            del self._xattrs[inode]

    @request(locked=False)
    async def fsync(self, fh: int, datasync: bool) -> None:
        self._commit(fh, datasync)

    @request(locked=False)
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self._commit(fh, datasync)

    def _commit(self, fd: int, datasync: bool) -> None:
        """Close the set and return once it is durable in the journal (an fsync's
        promise: after a crash the journal brings BACKING back to it; see
        repl/primary/capture.py). Over budget, *fd* itself is synced too. With --fsync
        remote, also wait until the secondaries in step staged the set
        (repl/primary/semisync.py). In a cluster, EIO if no secondary staged the set
        and the node is fenced by then, or was fenced before a lease renewal
        confirmed it still leads after its secondaries in step left step without
        the set: a failover may not have it. ENOSPC while the journal's reserve is in
        use: the disk is full, though what was written is in (store/reserve.py).

        Only closing the set holds the lock: other requests go on while this
        one waits for the disk and the secondaries."""
        began = time.monotonic()
        with self.lock:
            if time.monotonic() >= self.write_until:
                raise OSError(errno.EROFS, "fenced: this node may no longer be the primary")
            closed = self.capture.close_set()
            end = self.capture.journal.end
            unjournaled = self.capture.overflow  # writes went to the dirty map, not the journal
            # Over budget, the resync closes the open set, unless it holds nothing: then
            # what this fsync made durable is in the sets closed already.
            resync_set = closed + (not (self.capture.journal.set_is_empty
                                        and not self.capture.resync.dirty))
        if unjournaled:
            (os.fdatasync if datasync else os.fsync)(fd)
        waited = Waited.LOCAL
        if self.remote is not None and not unjournaled:
            waited = self.remote.wait_staged(closed, functools.partial(
                self.capture.wait_durable, end))
        else:
            self.capture.wait_durable(end)
            if self.remote is not None:
                self.remote.count_local(resync_set)  # its data went to the dirty map
        if waited is Waited.DROPPED:
            # The secondaries in step left step without the set: a cluster's primary
            # returns only once its lease was renewed since (no other node can be
            # elected while it holds), and fails if fenced first (cut off from etcd,
            # and likely from them too: another may be elected without the set).
            confirmed = self.lead_confirmed(time.monotonic())
        else:
            confirmed = waited is Waited.STAGED or time.monotonic() < self.write_until
        if not confirmed:
            raise OSError(errno.EIO, "fenced before a secondary staged the set: a "
                          "failover may not have it")
        with self.lock:  # the reserve changes under it (store/reserve.py)
            room = self.capture.journal.room()
        if not room:  # its data is in, in the reserve: say the disk is full now
            raise OSError(errno.ENOSPC, "the disk is full (the journal's reserve in use)")
        FSYNC_SECONDS.observe(time.monotonic() - began)

    # --- xattrs ---------------------------------------------------------------------

    @request(changes=True)
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        where, follow = self._xattr_path(inode)
        path = self.inodes.path(inode) if inode != ROOT else b""
        with self.capture.applying(Op.SETXATTR, path, name=name, data=value):
            self._xattrs.pop(inode, None)
            os.setxattr(where, name, value, follow_symlinks=follow)

    @request(changes=True)
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        where, follow = self._xattr_path(inode)
        path = self.inodes.path(inode) if inode != ROOT else b""
        with self.capture.applying(Op.REMOVEXATTR, path, name=name):
            self._xattrs.pop(inode, None)
            os.removexattr(where, name, follow_symlinks=follow)
