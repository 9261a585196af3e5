"""Bringing a replica up to date from the backing directory, not from the journal.

Three cases end here, each in the open set, which stays open meanwhile
(``overflow``). Over budget: capture journals the namespace and attribute
ops, and the written ranges go to the dirty map (store/dirty.py). After an
unclean stop, what the activity log noted (repl/activity.py) is sent again
as the backing directory holds it (``resend``). For an initial sync (a
replica that the journal cannot bring forward: new, older than what the
journal keeps, or of a tree that was never empty) the open set gets a
snapshot of the tree, or of the paths that differ (repl/primary/snapshot.py), whose
data goes to the dirty map. From there all cases are the same.

The journal budget. Records stay until every secondary that pins the
journal applied their set (repl/primary/retention.py). One that falls past
``journal_max`` while another is within it is dropped alone. When all of
them are past it (always the case with one secondary), capture stops
journaling write data (``begin_overflow``). Once a secondary has applied
every closed set, the resync reads the dirty ranges from the backing
directory into the open set and closes it, so the replica goes from one
whole set to the next.

The data is read in steps of at most STEP bytes: each step journals WRITE
records for a piece of a dirty range and marks it clean, and the
application runs between steps; what it writes meanwhile becomes dirty
again. The step that finds the map empty closes the set. Everything lives
in the journal and the dirty map, so an interrupted sync resumes where it
was.

Holes. The holes in a piece (as SEEK_DATA/SEEK_HOLE show them) are
journaled as FALLOCATE punching them, not as zeros written, so sparse files
stay sparse on the replica. A punch keeps the size, so a hole that ends the
file also takes a TRUNCATE to the size: it only ever grows the replica's
file, whose size never passes the primary's (every op that shrinks a file
is journaled, over budget too; only writes, which grow it, are not).

``Resync`` is owned by the capture (repl/primary/capture.py), which calls it; it
calls back only through ``Front``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

import trio
import trio.lowlevel

from repl.diverge import Divergence
from repl.errors import NotYet
from repl.primary.retention import Retention
from repl.primary.snapshot import Snapshot
from repl.primary.touched import Touched, removed_name
from repl.tree import Tree
from store.dirty import DirtyMap
from store.journal import Journal
from store.libc import fd_path
from store.notes import Note
from store.records import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    RENAME_EXCHANGE,
    Op,
    Record,
    decode_set,
    encode_set,
    peek_op,
)
from store.reserve import disk_full

log = logging.getLogger("replfs.resync")
# A sync's start and end are the capture's sets: logged as capture's.
sets_log = logging.getLogger("replfs.capture")

STEP = 4 << 20  # read per step: small enough that the application barely waits
PROGRESS_EVERY = 2.0
FULL_RETRY_SECONDS = 1.0  # a step the journal's full disk refused is tried again
_OVERFLOW = b"overflow"
_SYNCING = b"syncing"
_SYNC_WHOLE = b"sync_whole"  # the sync under way covers the whole tree (a RESET)
_WALK = b"walk"  # the set of a tree's walk begun and not yet whole (cut short if found)


class Front(Protocol):
    """What the resync needs of the capture that owns it."""

    @property
    def lock(self) -> AbstractContextManager[Any]:
        """Held around every change to the journal and the dirty map."""

    def settle(self) -> None:
        """Account for the last op journaled (it succeeded)."""

    def close_set(self) -> int:
        """Close the open set, if it has ops and is not held open. Returns the last closed."""

    def flush_soon(self) -> None:
        """Flush what was journaled, for the sender (in trio)."""

    def backing_durable(self) -> None:
        """Make BACKING durable as far as the journal goes, and journal that."""


class Resync:
    """The dirty map, the open set held open (``overflow``) and the sync under way
    (``syncing``, its progress), all kept in *journal* across restarts."""

    def __init__(self, journal: Journal, backing: Tree, touched: Touched,
                 retention: Retention, front: Front) -> None:
        self.journal, self.backing, self.touched = journal, backing, touched
        self.retention, self.front = retention, front
        self.dirty = DirtyMap(journal)
        self.overflow = journal.get_meta(_OVERFLOW) is not None
        raw = journal.get_meta(_SYNCING)
        self.syncing: int | None = decode_set(raw) if raw else None
        self.sync_whole = journal.get_meta(_SYNC_WHOLE) is not None
        # A walk of the tree begun (its set): a sync's snapshot, journaled and shipped
        # step by step (``walk``) and whole only at its end. One that a crash or a lost
        # link cut short stays here: the next secondary brought up gets a new one.
        raw = journal.get_meta(_WALK)
        self.walk_begun: int | None = decode_set(raw) if raw else None
        self._walk_due: tuple[int, Snapshot] | None = None  # begun, for walk() to walk
        self._walking: int | None = None  # the set walk() is walking the tree for
        self.progress_done = self.progress_total = 0
        self.wanted = trio.Event()

    def begin_overflow(self) -> None:
        """Hold the open set open: written ranges go to the dirty map, not the journal.

        BACKING is made durable first: a recovery over budget replays no record
        (BACKING holds the only copy of the writes since), so the records before
        must be on disk in BACKING, not only in the journal."""
        self.front.backing_durable()
        self.overflow = True
        self.journal.put_meta(_OVERFLOW, b"1")

    def ready(self) -> bool:
        """Over budget: a secondary applied every closed set, so the dirty map's ranges
        can go (the open set then closes). Never while a walk of the tree is not whole."""
        if self.walk_begun is not None:
            return False
        fastest = self.retention.fastest()
        return fastest is not None and fastest >= self.journal.set - 1

    def caught_up(self) -> None:
        """A secondary applied more (capture's lock held): resync once nothing closed
        is pending."""
        if self.overflow and self.ready():
            if not self.progress_total:
                self.progress_done, self.progress_total = 0, self.dirty.total()
            self.wanted.set()

    # --- the dirty map, as ops go by (capture's lock held) ---------------------------

    def before(self, op: Op, fields: dict[str, Any]) -> None:
        """*op* is about to run: over budget, the dirty data of a name it removes is
        journaled first (``keep_data``)."""
        if self.overflow and self.dirty:
            gone = removed_name(op, fields)
            if gone is not None:
                self.keep_data(gone)

    def follow(self, record: Record) -> None:
        """Keep the dirty map's paths naming the same files across namespace ops."""
        if not (self.overflow and self.dirty):
            return
        if record.op == Op.RENAME:
            if record.flags & RENAME_EXCHANGE:
                self.dirty.move({record.path: record.path2, record.path2: record.path})
            else:
                self.dirty.forget(record.path2)
                self.dirty.move({record.path: record.path2})
        elif record.op in (Op.UNLINK, Op.RMDIR):
            self.dirty.forget(record.path)

    def keep_data(self, path: bytes) -> None:
        """Journal *path*'s dirty data now: an op is about to remove the name, and the
        file may live on under other names that the dirty map does not know.

        The map knows a file by the one name it was written through. A hard-linked
        file keeps its data when that name goes, so the data is read now, as it is,
        into the open set ahead of the op; the replica's other names see it there.
        """
        ranges = self.dirty.files.get(path)
        st = self.backing.lstat(path) if ranges else None
        if ranges is None or st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
            return  # the file goes with its name (or is not one): nothing to keep
        dir_fd, name = self.backing.parent(path)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            for start, end in ranges:
                for offset in range(start, min(end, st.st_size), STEP):
                    data = os.pread(fd, min(STEP, min(end, st.st_size) - offset), offset)
                    self.journal.append(Op.WRITE, path=path, offset=offset, data=data)
                    self.progress_done += len(data)
            self._restate_times(fd, path)  # the other names' too: one inode
        finally:
            os.close(fd)
        self.dirty.forget(path)  # after the data is journaled: a crash between loses nothing

    # --- starting a sync (capture's lock held) ---------------------------------------

    def bring_up(self, address: str, applied: int, syncing: int | None,
                 rejoin: Divergence | None) -> int | None:
        """Where the secondary at *address*, which applied *applied*, starts: None to
        stream from the next set, or the set of a sync just begun, which it must reset to.

        A secondary whose sets the journal still holds streams on; one in the middle
        of a sync (*syncing*) reports the set before it as applied, and is brought on
        the same way. Else it needs a sync: an old primary rejoining (*rejoin*: what it
        changed since *applied*, the set we last shared) and a secondary dropped past
        the budget (repl/primary/retention.py) get just the paths that differ, as one set;
        others get the whole tree.

        Raises:
            NotYet: another secondary's sync of part of the tree, or the walk of the
                tree for one, is under way: this one waits for it to finish (a sync
                must start a set of its own).
        """
        journal = self.journal
        if self._walking is not None:
            raise NotYet(f"the tree's walk for the sync of set {self._walking} is under "
                         f"way; {address} is brought up once it is done")
        if self.walk_begun is not None:
            # A walk cut short (a crash, a lost link): its set holds part of a tree,
            # which no one may apply as a set. Every secondary gets the whole tree anew,
            # in the same open set, after what it holds of the first.
            log.info("the tree's walk for set %d was cut short: %s gets the whole tree",
                     self.walk_begun, address)
            set_id = self.start_full_sync(None)
            self.retention.attach(address, set_id - 1)
            return set_id
        base = journal.base
        follows = base is not None and base <= applied < journal.set
        # A replica waiting for a sync set this journal does not hold as one (a power
        # cut took the set's RESET and snapshot before they were durable, and the
        # recovered journal reused its id): what it holds is known to no one. (A
        # rejoining one waits for the set that undoes its divergence: see below.)
        lost = (rejoin is None and syncing is not None and syncing != self.syncing
                and not self._holds_reset(syncing))
        if rejoin is None and follows and not lost:
            self.retention.attach(address, applied)
            return None
        if lost:
            only: Divergence | None = None
            log.warning("%s waits for sync set %d, which this journal does not hold as one: "
                        "it gets the whole tree", address, syncing)
        elif rejoin is not None:
            only = (rejoin.update(Divergence().add(journal.records(applied + 1))) if follows
                    else None)
        else:
            only = self.retention.missed_since(address, applied)
        if only is not None and only.whole_tree:
            only = None  # all of it: walked step by step, as for a new secondary
        if self.syncing is not None:
            if not self.sync_whole:
                raise NotYet(f"the sync of set {self.syncing} is under way; {address} is "
                             "brought up once it is done")
            # The whole tree is on its way in the open set: join it from its start.
            self.retention.attach(address, self.syncing - 1)
            log.info("%s joins the initial sync of set %d", address, self.syncing)
            return self.syncing
        if self.overflow:
            only = None  # the open set's records so far are no one's to skip: all of it
        else:
            self.front.close_set()  # a sync starts a set of its own
        if only is not None:
            only.follow_links(os.fsdecode(fd_path(self.backing.root_fd)))
        set_id = self.start_full_sync(only, "rejoin sync of what diverged" if rejoin else
                                      f"sync of what {address} missed")
        self.retention.attach(address, set_id - 1)
        return set_id

    def _holds_reset(self, set_id: int) -> bool:
        """Whether the journal holds set *set_id* with a RESET in it (a sync of the tree)."""
        for found, _, raw, _ in self.journal.iter_raw(set_id):
            if found != set_id:
                return False
            if peek_op(raw) == Op.RESET:
                return True
        return False

    def start_full_sync(self, only: Divergence | None = None,
                        what: str = "rejoin sync of what diverged") -> int:
        """Begin an initial sync in the open set. Returns its id.

        With *only*, the sync covers just those paths (a rejoin), and the log calls it
        *what*. Without, the tree is walked by ``walk()``, which the caller must await
        holding the capture's lock.
        """
        set_id = self.journal.set
        # Over budget first, so a crash inside the snapshot never closes this set;
        # `syncing` only once the snapshot is whole, so such a crash starts anew.
        self.begin_overflow()
        snapshot = self._snapshot()
        if only is None:
            self.walk_begun = set_id
            self.journal.put_meta(_WALK, encode_set(set_id))
            self._walk_due = (set_id, snapshot)  # one not walked yet is replaced
            return set_id
        snapshot.paths(only)
        self._begun(set_id, snapshot, what, whole=b"" in only.roots())
        return set_id

    async def walk(self) -> None:
        """Walk the tree for the sync ``start_full_sync`` began, if it began one: step by
        step, letting trio's other tasks in between (the sender ships what was walked).

        The caller holds the capture's lock throughout, so the request threads wait
        and the walk is a snapshot. If cancelled, the walk stays cut short
        (``walk_begun``): the next bring-up starts a new one.
        """
        if self._walk_due is None:
            return  # none begun, or another session's walk() took it
        (set_id, snapshot), self._walk_due = self._walk_due, None
        self._walking = set_id
        steps = snapshot.tree_steps()
        try:
            for _ in steps:
                self.front.flush_soon()
                await trio.lowlevel.checkpoint()
        finally:
            steps.close()
            self._walking = None
        self.walk_begun = None
        self.journal.put_meta(_WALK, None)
        self._begun(set_id, snapshot, "initial sync", whole=True)

    def _begun(self, set_id: int, snapshot: Snapshot, what: str, whole: bool) -> None:
        """The snapshot of sync set *set_id* (of the *whole* tree, or not) is whole: its
        data may follow, step by step."""
        self.syncing = set_id
        self.journal.put_meta(_SYNCING, encode_set(set_id))
        self.sync_whole = whole
        self.journal.put_meta(_SYNC_WHOLE, b"1" if self.sync_whole else None)
        if self.journal.base is None:  # the journal began on a tree that was not empty
            self.journal.base = set_id - 1
        self.progress_done, self.progress_total = 0, snapshot.data
        self.front.flush_soon()
        sets_log.info("%s begins as set %d: %d entries, %.1f MB of data", what, set_id,
                      snapshot.entries, snapshot.data / 1e6)
        self.caught_up()  # its data may go at once, if a secondary applied all before

    def resend(self, notes: list[Note]) -> tuple[int, int, list[bytes]]:
        """After a power cut, in the open set, held open: what makes a replica's copy of
        the paths *notes* name what the backing directory holds now (repl/primary/snapshot.py).

        Returns (entries, data bytes, the paths sent whole).
        """
        if not self.overflow:
            self.begin_overflow()
        snapshot = self._snapshot()
        whole = snapshot.resend(notes)
        return snapshot.entries, snapshot.data, whole

    def _snapshot(self) -> Snapshot:
        return Snapshot(self.journal, self.backing, self.dirty, self.touched)

    # --- the data, step by step -------------------------------------------------------

    def step(self, max_bytes: int = STEP) -> int | None:
        """Journal up to *max_bytes* of dirty data; when none is left, close the set
        (capture's lock held).

        Returns the closed set's id once done, else None.
        """
        chunk = self.dirty.next_chunk(max_bytes)
        if chunk is None:
            return self.finish()
        path, start, end = chunk
        st = self.backing.lstat(path)
        if st is None or not stat.S_ISREG(st.st_mode):
            self.dirty.forget(path)  # gone since, or replaced by something without data
            return None
        dir_fd, name = self.backing.parent(path)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            for at, until, is_data in pieces(fd, start, min(end, st.st_size)):
                if is_data:
                    data = os.pread(fd, until - at, at)  # BACKING's: no reserve for it
                    self.journal.append(Op.WRITE, spare=False, path=path, offset=at,
                                        data=data)
                    continue
                self.journal.append(Op.FALLOCATE, path=path, offset=at, length=until - at,
                                    flags=FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
                if until == st.st_size:
                    self.journal.append(Op.TRUNCATE, path=path, size=until)
            if self.dirty.remove(path, start, end):
                self._restate_times(fd, path)
        finally:
            os.close(fd)
        self.progress_done += end - start
        return None

    def _restate_times(self, fd: int, path: bytes) -> None:
        """The set holds all of *path*'s data now, which changed its times on the replica:
        journal them as BACKING has them, unless the set's close restates them anyway
        (the set noted the path: the application changed the file, an overflow's writes).

        So an initial sync need not remember, until its close, every file whose data
        its steps sent: a million files' paths, in a tree past the journal's budget.
        """
        if not self.touched.covers(path):
            st = os.fstat(fd)
            self.journal.append(Op.UTIMES, path=path, atime_ns=st.st_atime_ns,
                                mtime_ns=st.st_mtime_ns)

    def finish(self) -> int:
        """The dirty map is empty: close the open set and stream again."""
        self.front.settle()
        was = "initial sync" if self.syncing else "resync"
        self.overflow = False
        self.journal.put_meta(_OVERFLOW, None)
        self.syncing = None
        self.journal.put_meta(_SYNCING, None)
        self.sync_whole = False
        self.journal.put_meta(_SYNC_WHOLE, None)
        closed = self.front.close_set()
        sets_log.info("%s done: set %d brings the replica up to date; streaming resumes",
                      was, closed)
        return closed

    async def run(self) -> None:
        """Resync whenever asked (a secondary caught up while over budget)."""
        while True:
            await self.wanted.wait()
            self.wanted = trio.Event()
            started = last_report = trio.current_time()
            done_at_start = self.progress_done
            waiting = False  # for room on the journal's disk
            while self.overflow and self.ready():
                what = "initial sync" if self.syncing else "resync"
                try:
                    with self.front.lock:  # the request threads wait one step at most
                        self.front.settle()
                        finished = self.step() is not None
                except OSError as exc:
                    if not disk_full(exc):
                        raise
                    if not waiting:
                        log.warning("%s waits for room on the journal's disk (%s), tried "
                                    "every %gs", what, exc.strerror, FULL_RETRY_SECONDS)
                    waiting = True
                    await trio.sleep(FULL_RETRY_SECONDS)  # a retry's pace: no event for room
                    continue
                if waiting:
                    log.info("%s goes on: the journal's disk has room again", what)
                    waiting = False
                self.front.flush_soon()
                if finished:
                    break
                now = trio.current_time()
                if now - last_report >= PROGRESS_EVERY:
                    last_report = now
                    log.info("%s", self.progress_line((self.progress_done - done_at_start)
                                                      / max(now - started, 1e-9)))
                await trio.lowlevel.checkpoint()  # let trio's other tasks in between steps

    def progress_line(self, rate: float) -> str:
        total = max(self.progress_total, self.progress_done, 1)
        done = self.progress_done
        bar = "#" * int(30 * done / total)
        eta = (total - done) / rate if rate > 0 else float("inf")
        what = "initial sync" if self.syncing else "resync"
        return (f"{what} [{bar:<30}] {done / 1e6:.1f}/{total / 1e6:.1f} MB "
                f"{rate / 1e6:.1f} MB/s ETA {eta:.0f}s")


def pieces(fd: int, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is data) of the data and the holes of [start, end) of a file.

    A filesystem that cannot tell (SEEK_DATA refused) has only data.
    """
    at = start
    while at < end:
        try:
            data = os.lseek(fd, at, os.SEEK_DATA)
            hole = os.lseek(fd, data, os.SEEK_HOLE) if data < end else end
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data from here on
                data = hole = end
            elif exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                data, hole = at, end
            else:
                raise
        if hole <= data:  # a filesystem answering oddly: data to the end, never a loop
            hole = end
        if data > at:
            yield at, min(data, end), False
        if data < end:
            yield data, min(hole, end), True
        at = min(hole, end)
