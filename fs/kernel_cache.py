"""The kernel's caches of a standby mount, dropped set by set so they show whole sets.

The standby mount served by the secondary itself lets the kernel cache the
replica like any filesystem: names, attributes, file pages. Before the
applier applies a batch, everything cached that the batch changes must go
(repl/secondary/footprint.py names it), or a reader would see a file of the new set
next to a cached page of the old one.

The obvious order does not work: with the apply lock held, drop the caches,
apply, let readers in. Dropping a file's pages waits for every read of that
file in flight (the kernel holds the page locked until the answer), and
dropping a name waits for every lookup in flight in its directory (the
kernel holds the directory's lock); such a read or lookup is waiting in
this daemon for the apply lock. Deadlock.

So the caches are dropped *before* the lock is taken, while readers go on:
the replica still shows the set before, so whatever they read is whole, and
nothing the applier waits for waits for the applier. What they read back
into the cache after it was dropped must go too, and three things see to it:

- Names and attributes: while a batch is under way, an answer about
  anything it touches carries a zero timeout, so the kernel keeps nothing
  of it (it asks again at the next use). An answer given before, but not yet
  taken in by the kernel, is covered by the drop itself: the kernel drops
  an attribute answer older than an invalidation, and a name's drop waits
  for the lookup in flight.
- Pages: a read of a file the batch writes, answered after its pages were
  dropped, marks the file, and the applier drops those files' pages again
  until none was marked since. Then, with the apply lock taken (no read in
  flight, none can start), it asks once more: if a file was marked, it lets
  the lock go and starts over; if not, nothing cached holds a byte the
  batch changes, and the batch is applied. A drop is short, so few reads
  land between two, and this ends quickly even under readers. (Asking first
  without the lock matters: readers that waited for the lock would read
  again the moment it went.)
- With the batch applied and the lock still held: attributes are dropped
  once more (that also drops cached ACLs), and the pages of any inode
  number the batch gave to a new node, which the kernel may know from a
  file gone before. Neither waits for a request: an attribute drop never
  waits, and a number the filesystem reused had no open file, so no read
  of it can be in flight.

A path walk that found a file just before the batch removed it, moved it or
replaced it under its name (the rename that writes a file atomically) sends
its OPEN with the old inode number after. On a local filesystem that open
succeeds: the walk holds the inode. Here the number reaches no file any
more (ESTALE); the kernel walks the path once more, and a second batch in
between makes the user's open fail. So the files the kernel knows under
the names a batch changes are opened before it is applied, and those no
name reaches after it stay open (fs/inodes.py: ``hold``) until the kernel
forgets them, or until the first batch after HOLD_SECONDS: opening such a
number opens that file.

Readers never wait for the applier inside a request while it drops
something, so a drop always finishes, whatever the two request threads are
doing. Symbolic links are not cached (their targets would sit in pages that
``readlink`` holds locked), nor directory listings.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field

import pyfuse3

from fs.inodes import Inodes
from repl.secondary.footprint import Footprint

log = logging.getLogger("replfs.standby")
SWEEPS_TO_LOG = 50  # a batch whose pages took more drops than this is worth a line
HOLD_SECONDS = 10.0  # a file a batch removes stays open this long (see the module's comment)
MAX_HELD = 1000  # files held at once, of the 20,000 fds a process may have
_HOLD_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass
class _Batch:
    """What the batch under way touches, as the kernel numbers it."""

    entries: set[tuple[int, bytes]]
    attrs: set[int]
    data: set[int]
    everything: bool
    reread: set[int] = field(default_factory=set)  # read back in since the last drop


class KernelCache:
    """Implements repl.secondary.footprint.Invalidator for a standby mount; the mount's
    request handlers ask it for timeouts and tell it of reads.

    *lock* is the mount's own (PrimaryFS.lock), which guards *inodes*.
    """

    def __init__(self, inodes: Inodes, lock: threading.RLock) -> None:
        self.inodes = inodes
        self.lock = lock
        self._mutex = threading.Lock()
        self._batch: _Batch | None = None
        self._pending: list[int] = []  # files whose pages the next sweep drops
        self._sweeps = 0  # of the batch under way
        self._holding: dict[int, int] = {}  # inode -> fd, of files the batch may remove
        self.mounted = True

    # --- the request threads ---------------------------------------------------------

    def entry_timeout(self, parent: int, name: bytes, timeout: float) -> float:
        batch = self._batch
        if batch is not None and (batch.everything or (parent, name) in batch.entries):
            return 0
        return timeout

    def attr_timeout(self, ino: int, timeout: float) -> float:
        batch = self._batch
        if batch is not None and (batch.everything or ino in batch.attrs):
            return 0
        return timeout

    def reading(self, ino: int) -> None:
        """A read of *ino* is being answered: its pages may be cached again."""
        batch = self._batch
        if batch is not None and (batch.everything or ino in batch.data):
            with self._mutex:
                batch.reread.add(ino)

    # --- the applier (repl.secondary.footprint.Invalidator) ---------------------------

    def begin(self, touched: Footprint) -> None:
        fuse = self.inodes.ino_of_number
        batch = _Batch({(fuse(p), name) for p, name in touched.entries},
                       {fuse(n) for n in touched.attrs}, {fuse(n) for n in touched.data},
                       touched.everything)
        with self._mutex:
            self._batch = batch
        with self.lock:
            self.inodes.release_expired(time.monotonic())
            nodes = self.inodes.nodes
            if batch.everything:
                entries = [place for node in nodes.values() for place in node.names]
                attrs = data = list(nodes)
            else:
                entries = [e for e in batch.entries if e[0] in nodes]
                attrs = [n for n in batch.attrs if n in nodes]
                data = [n for n in batch.data if n in nodes]
                if self.mounted:
                    self._holding = self._files_at(entries)
        for parent, name in entries:
            self._drop_entry(parent, name)
        for ino in attrs:
            self._drop(ino, attr_only=True)
        self._pending = data
        self.sweep()

    def settled(self) -> bool:
        """Whether no page the batch changes was read back in since the last sweep
        (only final when asked holding the apply lock exclusively). If some were,
        the next sweep drops them."""
        assert self._batch is not None
        with self._mutex:
            reread, self._batch.reread = self._batch.reread, set()
        with self.lock:  # the pruner moves nodes in the table (fs/inodes.py: surplus)
            nodes = self.inodes.nodes
            self._pending = [n for n in reread if n in nodes]  # a forgotten inode: no pages
        return not self._pending

    def sweep(self) -> None:
        self._sweeps += 1
        for ino in self._pending:
            self._drop(ino)
        self._pending = []

    def applied(self, created: list[int]) -> None:
        """The batch is applied, the apply lock still held: drop attributes again, and
        the pages of reused numbers (see the module's comment)."""
        batch = self._batch
        assert batch is not None
        with self.lock:
            nodes = self.inodes.nodes
            attrs = list(nodes) if batch.everything else [n for n in batch.attrs if n in nodes]
            reused = [n for n in map(self.inodes.ino_of_number, created)
                      if n in nodes and not nodes[n].fds]
            if batch.everything:
                reused = [n for n, node in nodes.items() if not node.fds]
            until = time.monotonic() + HOLD_SECONDS
            while self._holding:
                ino, fd = self._holding.popitem()
                try:
                    gone = self.mounted and ino in nodes and not self.inodes.reaches(ino)
                except OSError:  # its directory cannot be read: taken for gone
                    gone = True
                if gone:
                    self.inodes.hold(ino, fd, until)
                else:
                    os.close(fd)
        for ino in attrs:
            self._drop(ino, attr_only=True)
        for ino in reused:
            self._drop(ino)

    def end(self) -> None:
        with self._mutex:
            self._batch = None
        self._pending = []
        self._close_holding()  # the batch was not applied
        if self._sweeps > SWEEPS_TO_LOG:
            log.info("readers kept reading what a batch changes: its pages were dropped %d "
                     "times before it could be applied", self._sweeps)
        self._sweeps = 0

    def let_go(self) -> None:
        """Close every file kept open for the kernel: the disk is full, and the files
        a batch removes hold their space while they are open. Their numbers answer
        ESTALE again, as they did before they were held."""
        self._close_holding()
        with self.lock:
            self.inodes.release_all()

    def unmounted(self) -> None:
        """The mount is gone: the kernel will neither drop nor open anything more."""
        with self.lock:
            self.mounted = False
            self.inodes.release_all()

    def _close_holding(self) -> None:
        while self._holding:
            os.close(self._holding.popitem()[1])

    def _files_at(self, entries: list[tuple[int, bytes]]) -> dict[int, int]:
        """Fds of the files the kernel knows at *entries* (see the module's comment),
        within MAX_HELD; with ``self.lock`` held."""
        inodes = self.inodes
        found: dict[int, int] = {}
        room = MAX_HELD - len(inodes.held)
        for parent, name in entries:
            if len(found) >= room:
                break
            try:
                dir_fd = inodes.dir_fd(parent)
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                ino = inodes.ino_of(st)
                node = inodes.nodes.get(ino)
                if (not stat.S_ISREG(st.st_mode) or node is None or node.fds or ino in found
                        or ino in inodes.held):
                    continue
                found[ino] = os.open(name, _HOLD_FLAGS, dir_fd=dir_fd)
            except OSError:
                continue  # not there before the batch: a name it adds
        inodes.trim()
        return found

    # --- the kernel ------------------------------------------------------------------

    def _drop(self, ino: int, attr_only: bool = False) -> None:
        if not self.mounted:
            return
        try:
            pyfuse3.invalidate_inode(ino, attr_only)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel had forgotten it already
                log.debug("dropping the kernel's cache of inode %d: %s", ino, exc)

    def _drop_entry(self, parent: int, name: bytes) -> None:
        if not self.mounted:
            return
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.debug("dropping the kernel's entry %r in %d: %s", name, parent, exc)
