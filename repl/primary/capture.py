"""The primary's capture: ops into the journal, cut into data sets.

Every mutating FUSE handler applies its op to the backing directory inside
``applying()``, which journals it first (``record()``) and voids the record
if the op then fails (``void()``), so the journal and the backing directory
move together and seqs stay dense. A set closes on fsync (``close_set()`` +
``durable()``), on ``checkpoint``, on a timer and on a size bound. Closing
appends a UTIMES record for every path the set touched (repl/primary/touched.py),
then the SYNC record.

Threads. The FUSE request threads call in while trio's tasks (the set
closer, the resync, the sender's handshake) do too: ``lock`` is held
around every change to the journal and the dirty map, and a request thread
holds it from ``record()`` to the end of its op, so the journal's order is
the order the ops reached the backing directory. Appends do not wake trio
(a handoff to its thread costs more than an append): its flusher ticks, and
only passing a bound (the set's size, FLUSH_BYTES not durable,
BACKING_SYNC_FILES changed) wakes it, through one ``Waker`` (repl/wake.py).
A flush tells the sender, from its own thread (``on_durable``).

The journal is the durable copy; BACKING follows it. An fsync returns once
its set is durable in the journal (one flush), without syncing the file:
BACKING is synced lazily (repl/primary/backing.py), each sync noted in the
journal as ``backing_at``, and the journal keeps every record past it even
once applied. After any crash, power included, recovery
(repl/primary/recovery.py) replays the records past ``backing_at`` into BACKING
before the mount serves anything. Replay goes by path, so paths must mean
the same files throughout: before a flush makes a namespace op durable in
the journal, BACKING is synced (the changed files and the directories the
op changed), so that op, and every one before it, is before ``backing_at``
(what a sync covers: repl/primary/unsynced.py). Over budget, writes are not
journaled, and an fsync syncs the file itself. Before an op touches
BACKING, what it may change is noted durably in the activity log
(repl/activity.py), for recovery after a power cut.

Group commit: ``wait_durable()`` flushes the journal once for every caller
waiting when the flush starts; callers that arrive while it runs share the
next one. The sender ships only durable records, so a set closed by the
timer or the size bound is flushed at once, and an open set's records
within OPEN_FLUSH_SECONDS (at once past FLUSH_BYTES), so a set streams
before it closes; an fsync meanwhile flushes them first, and no second
flush follows.

The journal budget (repl/primary/retention.py): past ``journal_max`` with every
secondary behind, written ranges go to the dirty map of the ``Resync`` that
capture owns and calls (repl/primary/resync.py), and the open set stays open.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from repl import faults
from repl.activity import ActivityLog
from repl.diverge import Divergence
from repl.histograms import SET_BYTES
from repl.primary.backing import BackingSync
from repl.primary.resync import Resync
from repl.primary.retention import Retention
from repl.primary.touched import Touched, every_entry, removed_name
from repl.primary.unsynced import BACKING_SYNC_FILES, Unsynced
from repl.tree import Tree
from repl.wake import Waker
from store.journal import Journal
from store.records import NAMESPACE_OPS, Op, Record
from store.reserve import disk_full

log = logging.getLogger("replfs.capture")

DEFAULT_SET_INTERVAL = 1.0
DEFAULT_SET_BYTES = 64 << 20
DEFAULT_JOURNAL_MAX = 1 << 30
FLUSH_BYTES = 4 << 20  # journaled but not flushed: flush, so the sender can ship it
OPEN_FLUSH_SECONDS = 0.02  # an open set's records are flushed (and shipped) within this
# ... once the tick found records to flush in the last IDLE_AFTER_SECONDS; else the tick
# comes this often, so an idle daemon wakes 5 times a second, not 50.
IDLE_FLUSH_SECONDS = 0.2
IDLE_AFTER_SECONDS = 1.0
# Attribute ops from the handlers: their node is synced with BACKING (the UTIMES that
# close a set restate times a data op or a namespace op already synced with its node).
_ATTRIBUTE_OPS = frozenset({Op.CHMOD, Op.CHOWN, Op.UTIMES, Op.SETXATTR, Op.REMOVEXATTR})
_MOVES = frozenset({Op.UNLINK, Op.RMDIR, Op.RENAME})  # ops that remove or move a name
_DATA_OPS = frozenset({Op.WRITE, Op.TRUNCATE, Op.FALLOCATE})  # they stamp the file's times
T = TypeVar("T")


def _locked(method: Callable[..., T]) -> Callable[..., T]:
    """Run *method* holding the capture's lock (re-entrant: handlers already hold it)."""

    @functools.wraps(method)
    def run(self: Capture, *args: Any, **kwargs: Any) -> T:
        with self.lock:
            return method(self, *args, **kwargs)

    return run


@dataclass
class Change:
    """What an ``applying`` block applies: its *record* (None: nothing journaled), and
    for a WRITE, the bytes that reached BACKING (*written*, set by the block)."""

    record: Record | None
    written: int | None = None


class Capture:
    def __init__(
        self,
        journal: Journal,
        backing: Tree,
        *,
        set_interval: float = DEFAULT_SET_INTERVAL,
        set_bytes: int = DEFAULT_SET_BYTES,
        journal_max: int = DEFAULT_JOURNAL_MAX,
        secondaries: Iterable[str] = (),
    ) -> None:
        self.journal = journal
        self.backing = backing
        self.set_interval = set_interval
        self.set_bytes = set_bytes
        self.journal_max = journal_max
        self.retention = Retention(journal, secondaries)
        self.touched = Touched()
        # The dirty map, the set held open and the sync under way (repl/primary/resync.py).
        self.resync = Resync(journal, backing, self.touched, self.retention, self)
        self._unsettled: Record | None = None  # journaled, its op not yet known to succeed
        self._record_hash = faults.set_hash_recorder()
        # Called from the thread that made records durable (the senders' notify).
        self.on_durable: Callable[[], None] = lambda: None
        self.closed_at = time.monotonic()
        self.lock = threading.RLock()
        self._flush_lock = threading.Lock()
        self.unsynced = Unsynced(backing, lambda: self._wake())  # what BACKING's sync covers
        self.activity = ActivityLog(journal.notes)
        self.backing_sync = BackingSync(journal, self.unsynced, self)
        self._flush_wanted = trio.Event()  # flush what is journaled now, not at the tick
        self._close_wanted = trio.Event()
        self._close_due = False
        self._wake: Callable[[], None] = self._woken  # a Waker once run() started

    @property
    def overflow(self) -> bool:
        """True while over budget, or syncing: the open set is held open."""
        return self.resync.overflow

    @property
    def backing_at(self) -> int:
        """The journal's log position up to which BACKING is durable."""
        return self.backing_sync.at

    @property
    def replicating(self) -> bool:
        """True with at least one secondary: sets stay until they are applied."""
        return bool(self.retention.followers)

    @_locked
    def add_secondary(self, address: str) -> None:
        """A secondary joins at run time (a cluster's node); it pins the journal."""
        self.retention.add(address)

    # --- called by the FUSE handlers, synchronously ------------------------

    @_locked
    def record(self, op: Op, intent: bytes | None = None, **fields: Any) -> Record:
        """Journal one op before it is applied to the backing directory."""
        self._settle()
        self.resync.before(op, fields)
        if (gone := removed_name(op, fields)) is not None and self.touched.covers(gone):
            self._keep_times(gone)
        record = self._journal(op, intent, fields)
        self._unsettled = record
        return record

    def _journal(self, op: Op, intent: bytes | None, fields: dict[str, Any],
                 ino: int | None = None) -> Record:
        """Journal *op*, which is about to change BACKING: noted first in the activity
        log, what it changes tracked for BACKING's next sync. *ino*: the inode number
        of an attribute op's node, if known."""
        self._ahead(op, fields)
        if op in NAMESPACE_OPS:
            self.unsynced.flag()
            self.unsynced.track_dir(fields["path"])
            if op in (Op.RENAME, Op.LINK):
                self.unsynced.track_dir(fields["path2"])
        else:
            if op in _ATTRIBUTE_OPS:
                self.unsynced.track_node(fields["path"], ino)
            if self.activity.under_name(fields["path"]):
                self.unsynced.flag()
        pending = self.journal.end - self.journal.durable
        record = self.journal.append(op, intent, **fields)
        if op not in NAMESPACE_OPS:
            self.unsynced.wrote(fields["path"], self.journal.end)
        if self.journal.set_bytes >= self.set_bytes and not self._close_due:
            self._close_due = True
            self._wake()
        elif pending < FLUSH_BYTES <= self.journal.end - self.journal.durable:
            self._wake()
        return record

    def _keep_times(self, path: bytes) -> None:
        """*path*, a name whose times this set changed, is about to go. If its file has
        other names, journal its times now: the close restates only the names the set
        touched, and without this the others keep, on the replica, the time the change
        was applied there."""
        st = self.backing.lstat(path)
        if st is not None and not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            self.journal.append(Op.UTIMES, path=path, atime_ns=st.st_atime_ns,
                                mtime_ns=st.st_mtime_ns)

    def _ahead(self, op: Op, fields: dict[str, Any]) -> None:
        """Before *op* touches the backing directory: what it may change there is
        noted, durably, in the activity log (repl/activity.py); and an op that
        removes or moves a name first syncs what was written at or under it since
        BACKING's last sync, if a flush may have made that durable (recovery after
        a power cut skips the records under a NAME note: they must be on disk)."""
        if op in _MOVES:
            self.unsynced.flag()  # first: a flush that begins from here on syncs BACKING first
            self.unsynced.sync_written_under((fields["path"], fields.get("path2")),
                                             self.journal.durable, self._flush_lock.locked())
        notes = self.activity.need(op, fields, self.journal.end)
        if notes:
            self.journal.add_notes(notes)
            self.journal.sync()
            self.on_durable()
            self.activity.add(notes, self.journal.end)

    def flush_soon(self) -> None:
        """In trio: flush what was journaled, for the sender (a resync's step...)."""
        self._flush_wanted.set()

    def _woken(self) -> None:
        """In trio: a bound was passed: the set's size, FLUSH_BYTES not durable,
        BACKING_SYNC_FILES changed.

        Appends do not wake trio one by one (a handoff to the trio thread costs
        more than the append): the flusher's tick finds them."""
        if len(self.unsynced) >= BACKING_SYNC_FILES:
            self.backing_sync.want()
        if self.journal.end - self.journal.durable >= FLUSH_BYTES:
            self._flush_wanted.set()
        if self._close_due:
            self._close_due = False
            self._close_wanted.set()

    @_locked
    def write(self, path: bytes | None, offset: int, data: bytes) -> Record | None:
        """Journal a write, or only mark its range dirty while over budget."""
        if path is None:
            return None  # a file with no name left: nothing any name shows changes
        # The closed sets not yet applied (the journal also keeps applied ones until
        # BACKING's next sync: counted only once the cheap bound is passed).
        if (not self.overflow and self.replicating
                and self.journal.bytes - self.journal.set_bytes > self.journal_max):
            self._budget()
        if self.overflow:
            self._settle()
            self._ahead(Op.WRITE, {"path": path, "offset": offset, "data": data})
            self.resync.dirty.add(path, offset, offset + len(data))
            self.touched.note(path)
            return None
        return self.record(Op.WRITE, path=path, offset=offset, data=data)

    @_locked
    def settle(self) -> None:
        self._settle()

    @_locked
    def restates_times(self, path: bytes, fd: int | None = None, ino: int | None = None
                       ) -> bool:
        """True if the open set ends with *path*'s times as BACKING has them then
        (its close journals a UTIMES of each path it touched), so a change of its
        times alone needs no record of its own. If so, the node (open as *fd*, inode
        *ino*, if given) is tracked for BACKING's sync, and the activity log notes
        the change (usually a note in force covers it), as for a journaled change."""
        self._settle()
        if not self.touched.covers(path):
            return False
        self._ahead(Op.UTIMES, {"path": path})
        if fd is not None:
            self.unsynced.track(fd, ino)
        else:
            self.unsynced.track_node(path)
        return True

    @_locked
    def track(self, fd: int, ino: int | None = None) -> None:
        """A handler changed the file open as *fd* (*ino*: its inode number, if it is a
        regular file's handle): sync it at the next BACKING sync (``Unsynced.track``)."""
        self.unsynced.track(fd, ino)

    def _settle(self) -> None:
        """Account for the last op, now that it succeeded on the backing directory.

        Handlers never await between ``record()`` and ``void()``, so the next
        call into capture proves the previous op was not voided.
        """
        record, self._unsettled = self._unsettled, None
        if record is not None:
            self.touched.add(record)
            self.resync.follow(record)

    def _budget(self) -> None:
        """The journal is over its budget: drop the secondaries past it if another one
        is within it, else keep a dirty map instead of write data (overflow)."""
        if not self.retention.all_past_budget(self.journal_max, self.backing_at):
            return
        log.warning("journal passed its budget (%d > %d bytes) with every secondary behind; "
                    "keeping a dirty map instead of write data until one catches up",
                    self.journal.bytes, self.journal_max)
        self.resync.begin_overflow()

    @_locked
    def bring_up(self, address: str, applied: int, syncing: int | None,
                 rejoin: Divergence | None = None) -> int | None:
        """Where the secondary at *address* starts (``Resync.bring_up``). Raises NotYet
        while another secondary's sync of part of the tree is under way."""
        self._settle()
        return self.resync.bring_up(address, applied, syncing, rejoin)

    async def walk(self) -> None:
        """The tree's walk for the sync ``bring_up`` just began, if it began one
        (``Resync.walk``). The caller holds the capture's lock throughout."""
        await self.resync.walk()

    @_locked
    def caught_up(self, address: str, applied: int) -> None:
        """The secondary at *address* applied *applied*: drop what every secondary
        that pins the journal applied, and resync once nothing closed is pending."""
        self.retention.report(address, applied)
        if (not self.overflow
                and self.journal.bytes - self.journal.set_bytes > self.journal_max):
            self._budget()  # a secondary may have fallen past it with no write since
        self._trim()
        self.retention.forget_closed()
        self.resync.caught_up()

    def _trim(self) -> None:
        self.retention.trim(self.backing_at)

    def followed(self) -> None:
        """BACKING's sync moved ``backing_at`` (capture's lock held): trim the journal,
        or with no secondary drop what passed the budget."""
        if self.replicating:
            self._trim()
        else:
            self.retention.drop_oldest(self.journal_max, self.backing_at)

    def backing_durable(self) -> None:
        """Make BACKING durable as far as the journal goes (``BackingSync.sync_held``),
        for the resync, which holds capture's lock."""
        self.backing_sync.sync_held()

    @_locked
    def redone(self, record: Record) -> None:
        """Recovery redid *record*'s op on BACKING: account for it as a handler's."""
        self._unsettled = record
        self._settle()

    @_locked
    def void(self, record: Record) -> None:
        """Mark *record* as an op that failed on the backing directory. A write that
        failed (ENOSPC) may have moved the file's times all the same (the kernel
        stamps them before it looks for room): the close restates them."""
        if self._unsettled is not None and self._unsettled.key == record.key:
            self._unsettled = None
        if record.op in _DATA_OPS:
            self.touched.note(record.path)
        self.journal.put(record.voided())

    @contextmanager
    def applying(self, op: Op, path: bytes | None, intent: bytes | None = None,
                 **fields: Any) -> Iterator[Change]:
        """Journal *op* on *path*, then run the block, which applies it to BACKING.

        If the block raises OSError the record is voided; a WRITE that reached BACKING
        only in part (the block sets ``written``) is journaled as that part. Nothing
        is journaled for an op on something no name reaches (*path*, or a
        ``path2``, None), nor for a write over budget (``write``)."""
        with self.lock:
            if op == Op.WRITE:
                record = self.write(path, fields["offset"], fields["data"])
            elif path is None or ("path2" in fields and fields["path2"] is None):
                record = None
            else:
                record = self.record(op, intent, path=path, **fields)
            change = Change(record)
            try:
                yield change
            except OSError:
                if record is not None:
                    self.void(record)
                raise
            if (record is not None and change.written is not None
                    and change.written < len(record.data)):
                self.shorten(record, change.written)

    @_locked
    def shorten(self, record: Record, written: int) -> None:
        """A write reached the backing directory only in part: journal that part."""
        self.journal.put(Record(Op.WRITE, record.set, record.seq, path=record.path,
                                offset=record.offset, data=record.data[:written]))

    @_locked
    def close_set(self) -> int:
        """Close the current set, if it has ops. Returns the id of the last closed set.

        While over budget the set stays open (see the module comment).
        """
        self._settle()
        if self.journal.set_is_empty or self.overflow:
            return self.journal.set - 1
        if self.touched.everything:
            for path, st in every_entry(self.backing, self.touched.paths):
                self._restate_times(path, st)
        else:
            for path in sorted(self.touched.paths):
                if not self._set_kept_mtime(path):
                    self._restate_times(path, self.backing.lstat(path))
        self.touched.clear()
        self.closed_at = time.monotonic()
        SET_BYTES.observe(self.journal.set_bytes)
        if self._record_hash is not None:  # before the SYNC: no set closes without it
            self._record_hash(self.journal.set, self.backing.root_fd)
        closed = self.journal.close_set()
        self.retention.closed(closed, self.closed_at)
        if not self.replicating:
            self.retention.drop_oldest(self.journal_max, self.backing_at)
        return closed

    def _restate_times(self, path: bytes, st: os.stat_result | None) -> None:
        """Journal the times *st* BACKING has for *path* (nothing if it is gone)."""
        if st is not None:
            self.journal.append(Op.UTIMES, path=path, atime_ns=st.st_atime_ns,
                                mtime_ns=st.st_mtime_ns)

    def _set_kept_mtime(self, path: bytes) -> bool:
        """If the kernel set *path*'s mtime (``Touched.mtimes``), set it back on BACKING
        (a write since moved it) and journal it with the atime BACKING has, neither
        asked for; True if so."""
        mtime = self.touched.mtimes.get(path)
        if mtime is None:
            return False
        st = self.backing.lstat(path, mtime)
        if st is None:
            return False
        record = self._journal(Op.UTIMES, None, {"path": path, "atime_ns": st.st_atime_ns,
                                                 "mtime_ns": mtime}, st.st_ino)
        try:
            self.backing.utime(path, st.st_atime_ns, mtime)
        except OSError:
            self.journal.put(record.voided())
            return False
        return True

    @_locked
    def keep_mtime(self, path: bytes, mtime_ns: int) -> None:
        """The kernel set regular file *path*'s mtime to *mtime_ns* on BACKING: the close
        restates it as that (``Touched.mtimes``)."""
        self._settle()
        self.touched.keep_mtime(path, mtime_ns)

    @_locked
    def lag_seconds(self, applied: int) -> float:
        """How long the oldest closed set after *applied* has waited."""
        return self.retention.lag_seconds(applied)

    # --- async side -----------------------------------------------------------

    def wait_durable(self, target: int) -> None:
        """Block until the journal is durable up to log position *target*.

        One caller flushes, in its own thread; the others wait on ``_flush_lock``
        meanwhile and find their records covered by that flush, or flush once
        for all of them (group commit). Then wakes the sender, if there is one:
        it ships durable records only.
        """
        with self._flush_lock:
            if self.journal.durable >= target and not self.unsynced.namespace_changed:
                return
            if self.unsynced.namespace_changed:
                self.backing_sync.sync()
            self.journal.sync()
        self.on_durable()

    async def durable(self) -> None:
        """Return once every record journaled so far is durable on disk."""
        await trio.to_thread.run_sync(self.wait_durable, self.journal.end)

    async def checkpoint(self) -> int:
        """Close a set and wait until it is durable. Returns its id.

        Over budget, the set that holds everything so far is the open one,
        which the resync closes; its id is returned. But if it holds nothing and
        no written range waits for it, the resync will not close it (an empty set
        never closes): everything so far is in the sets before it.
        """
        with self.lock:
            set_id = self.close_set()
            if self.overflow and not (self.journal.set_is_empty and not self.resync.dirty):
                set_id = self.journal.set  # the open set: the resync will close it
        await self.durable()
        return set_id

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close sets on the timer and size bound, resync when asked."""
        self._wake = Waker(self._woken)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._closer)
            nursery.start_soon(self._flusher)
            nursery.start_soon(self.backing_sync.run)
            nursery.start_soon(self.resync.run)
            task_status.started()

    async def _closer(self) -> None:
        while True:
            with trio.move_on_after(max(0.0, self.closed_at + self.set_interval
                                        - time.monotonic())):
                await self._close_wanted.wait()
            self._close_wanted = trio.Event()
            with self.lock:
                if not self.journal.set_is_empty:
                    try:
                        self.close_set()
                    except OSError as exc:
                        if not disk_full(exc):
                            raise
                        log.error("closing set %d failed (%s): tried again in %gs",
                                  self.journal.set, exc.strerror, self.set_interval)
                    self._flush_wanted.set()  # for the sender, at once
                # Also when the set stayed open (over budget, or failed to close): the
                # next try is a whole interval away, not at once.
                self.closed_at = time.monotonic()

    async def _flusher(self) -> None:
        """Flush what was journaled, for the sender: at once when asked (a set closed
        by the timer or the size bound, FLUSH_BYTES piled up, a resync's step), else
        at a tick if anything is not durable: every OPEN_FLUSH_SECONDS while the
        ticks find records to flush, every IDLE_FLUSH_SECONDS once they found none
        for IDLE_AFTER_SECONDS. An fsync flushes in its own thread; the tick finds
        nothing left then."""
        found_at = -math.inf  # when a tick last found records to flush
        while True:
            idle = trio.current_time() - found_at > IDLE_AFTER_SECONDS
            with trio.move_on_after(IDLE_FLUSH_SECONDS if idle else OPEN_FLUSH_SECONDS):
                await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            if self.journal.durable < self.journal.end:
                found_at = trio.current_time()
                await self.durable()
