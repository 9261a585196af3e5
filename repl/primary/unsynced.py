"""What changed in the backing directory since its last sync (repl/primary/capture.py).

BACKING is synced lazily; what its next sync must cover is kept here: the
files and directories changed (each held open, to fsync it), whether a
namespace op (or a record under a NAME note) came since, so that the next
flush of the journal syncs BACKING first, and the paths data and attribute
ops journaled, synced ahead of an op that removes or moves a name above
them (recovery after a power cut skips the records under a NAME note).

Every call is made with the capture's lock held.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from repl.tree import Tree
from store.libc import FUSE_SUPER_MAGIC, fd_path, fs_magic, stat_untimed, syncfs
from store.records import is_under

BACKING_SYNC_FILES = 1024  # BACKING is synced as soon as this many files and dirs changed
SYNCFS_FROM = 64  # from this many changed files and dirs, one syncfs(2) instead of an fsync each


class Unsynced:
    """The changes to *backing* since its last sync; *full* is called once
    BACKING_SYNC_FILES nodes changed."""

    def __init__(self, backing: Tree, full: Callable[[], None]) -> None:
        self.backing = backing
        self._full = full
        self.nodes: dict[tuple[int, int], int] = {}  # (dev, ino) -> fd, since the last sync
        self._dev = os.fstat(backing.root_fd).st_dev
        # An fd for ``fsync_all`` to syncfs, unless BACKING is on a FUSE filesystem: the
        # kernel tells a FUSE daemon of an fsync, never of a syncfs (virtiofs aside).
        self.whole = None if fs_magic(backing.root_fd) == FUSE_SUPER_MAGIC else backing.root_fd
        # A namespace op, or a record under a NAME note, since the last sync of BACKING:
        # the next flush syncs BACKING first (see repl/primary/capture.py).
        self.namespace_changed = False
        self._flagged = 0  # times it was set: a sync clears it only if none came meanwhile
        # Paths journaled by data and attribute ops since the last BACKING sync that
        # finished (and those of the sync under way): synced before a name above them
        # is removed or moved, so recovery may skip their records (repl/activity.py).
        self._written: dict[bytes, int] = {}  # path -> where its first such record ends
        self._written_syncing: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self.nodes)

    def flag(self) -> None:
        """A namespace op: the next flush syncs BACKING first."""
        self.namespace_changed = True
        self._flagged += 1

    def wrote(self, path: bytes, end: int) -> None:
        """A data or attribute op on *path* was journaled, its record ending at *end*."""
        self._written.setdefault(path, end)

    def sync_written_under(self, tops: tuple[bytes | None, ...], durable: int,
                           flushing: bool) -> None:
        """fsync the nodes journaled since BACKING's last sync at or under *tops*, if
        one of their records is durable (up to *durable*) or a flush is under way."""
        for written in (self._written, self._written_syncing):
            hit = [p for p in written if any(top is not None and is_under(p, top)
                                             for top in tops)]
            if hit and (flushing or min(written[p] for p in hit) <= durable):
                for path in hit:
                    self.backing.sync_node(path)
                    del written[path]

    def track(self, fd: int, ino: int | None = None) -> None:
        """The file or directory open as *fd* (not an O_PATH fd) changed: sync it at the
        next BACKING sync.

        *ino*, given by a handler for the handle of a regular file (its inode number;
        BACKING is one filesystem), spares the fstat."""
        if ino is not None:
            if (self._dev, ino) not in self.nodes:
                self._keep((self._dev, ino), os.dup(fd))
            return
        st = _untimed(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return  # a fifo, a socket: nothing to sync of its own; its directory is
        if (st.st_dev, st.st_ino) not in self.nodes:
            self._keep((st.st_dev, st.st_ino), os.dup(fd))

    def _keep(self, key: tuple[int, int], own: int) -> None:
        self.nodes[key] = own
        if len(self.nodes) == BACKING_SYNC_FILES:
            self._full()

    def track_node(self, path: bytes, ino: int | None = None) -> None:
        """Track the node *path* names (its attributes change), or if it cannot be
        opened (a symlink, a socket), its directory. *ino*, its inode number if known,
        spares the open if it is tracked already."""
        if ino is not None and (self._dev, ino) in self.nodes:
            return
        try:
            fd = os.open(self.backing.proc_path(path), os.O_RDONLY | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self.track_dir(path)
            return
        try:
            mode = _untimed(fd).st_mode
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                self.track(fd)
            else:
                self.track_dir(path)
        finally:
            os.close(fd)

    def track_dir(self, path: bytes) -> None:
        """Track the directory that holds *path*."""
        try:
            fd = self.backing.parent(path)[0]  # O_PATH: opened again to be synced
            st = _untimed(fd)
            if (st.st_dev, st.st_ino) not in self.nodes:
                self._keep((st.st_dev, st.st_ino),
                           os.open(fd_path(fd), os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            pass  # no such parent: the op fails, and is voided

    def take(self) -> tuple[list[int], int]:
        """A sync of BACKING begins: the fds to fsync (the caller closes them), and a
        token for ``synced``."""
        nodes, self.nodes = self.nodes, {}
        self._written_syncing, self._written = self._written, {}
        return list(nodes.values()), self._flagged

    def synced(self, token: int) -> None:
        """The sync that ``take`` began is done."""
        self._written_syncing = {}
        if self._flagged == token:
            self.namespace_changed = False


def _untimed(fd: int) -> os.stat_result:
    """The type and identity of the node open as *fd*, its times not asked for (which
    would cost the mount a SETATTR: store/libc.py ``stat_untimed``)."""
    return stat_untimed(fd, mtime_ns=0)


def fsync_all(fds: list[int], whole: int | None) -> None:
    """fsync, then close, the fds ``Unsynced.take`` gave (blocking: in a thread).

    From SYNCFS_FROM fds on, and given *whole* (``Unsynced.whole``), one syncfs of
    its filesystem instead: every fsync ends in a flush of the disk's cache, a
    syncfs in one (1,000 new 4 KiB files: 13 ms against 230 ms on an idle disk).
    It also writes back what else is dirty on that filesystem."""
    try:
        if whole is not None and len(fds) >= SYNCFS_FROM:
            syncfs(whole)
            return
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
