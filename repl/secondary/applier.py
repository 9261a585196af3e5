"""The secondary's applier: complete data sets -> the replica, strictly in order.

Set N is applied only after N-1 (claim 24), and only once its complete flag
is set (claims 20, 21, 25). Applying is redo-safe (repl/apply.py): a marker
is written before every namespace op, and after a crash applying resumes
at the marker (after a power cut of the host, the primary sends the batch's
paths again instead: ``_mend_from_primary``). The complete sets waiting in
a row are applied as one batch under the apply lock; then, the lock let go
(readers see the batch from there), the replica is synced once (``sync_batch``) and
the apply log says the last of them is applied; only then is it reported to
the primary. One sync per batch instead of per set is what lets the replica
keep up with a primary that closes a set at every small fsync.

Sets are applied in a worker thread, so a large set never stalls the
streams; the thread owns the replica's Tree.

An initial sync's set on a replica that has no set to show yet (new, or
in the middle of another sync) is applied as it arrives: from its RESET,
as far as its records run without a gap, while the rest is on its way.
Until it is whole the replica is marked as being applied (APPLYING,
store/hold.py): a reader is told it is torn. Nothing of that progress is
kept: after a crash, or an error, the set is applied again from its RESET,
which empties the replica first. A set whose walk of the tree was cut short
and walked again holds two RESETs: what comes before the last one is moot,
and applying goes on from that one as soon as it is staged.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
from collections.abc import Callable

import trio

from repl.apply import OpenFiles, apply, intent_for, redo
from repl.faults import ApplyFaults
from repl.histograms import APPLY_SECONDS
from repl.pacing import TokenBucket
from repl.secondary.footprint import Footprint, Invalidator, sync_batch
from repl.secondary.rejoin import ask_for_paths
from repl.tree import Tree
from store.hold import (
    ApplyLock,
    clear_applying,
    interrupted,
    is_held,
    lost_to_power,
    mark_applied,
    mark_applying,
)
from store.records import NAMESPACE_OPS, Op
from store.staging import Staging

log = logging.getLogger("replfs.applier")

RETRY_MAX = 5.0
BATCH_SECONDS = 0.05  # a batch ends after the set that takes it past this: readers wait
# Batches start at most this often on average. Each ends in a syncfs (which writes
# back all the replica's filesystem holds dirty) and an apply-log sync; a primary
# that closes a set at every fsync would otherwise get both for each set. At 100
# batches a second (10 ms), on the bench's one shared disk, they took a fifth of the
# primary's fsync latency. Lag grows by as much at most; what the secondary staged,
# which an fsync with --fsync remote waits for, does not. The pace is a token
# bucket: a set that comes alone, soon after a batch, starts its own at once; only
# a run of sets waits, gathered into fewer batches.
APPLY_INTERVAL = 0.05
APPLY_BURST = 2  # batches that may start back to back before the pace holds
# While a set is applied, the record reached is told to the primary this often (if
# it moved): a set that takes minutes to apply is progress, not a stall.
PROGRESS_SECONDS = 1.0
# Errors the replica's disk can recover from: the set is retried at once, under the
# lock, so readers wait instead of seeing it torn.
TRANSIENT = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM})
# With a mount that caches (an invalidator), a batch is first read for what it touches;
# it ends after the set that takes that past this many records, so the read stays short.
FOOTPRINT_RECORDS = 20_000
# A sync set applied as it arrives goes this many records a step at most, and is
# looked at this often for more while it streams in. A step reads in one LMDB
# transaction, and while it lasts the receiver's commits cannot reuse freed pages:
# steps of 20,000 small files (seconds each) added 35-50 MiB of mapped pages to the
# daemon's peak memory; of 2,000, none.
ARRIVED_RECORDS = 2_000
ARRIVED_POLL = 0.1


def _complete(staging: Staging, set_id: int) -> bool:
    state = staging.state(set_id)
    return state is not None and state.complete


class Stopping(Exception):
    """The daemon stops while a set is being retried; it resumes at the next start."""


class Applier:
    def __init__(self, staging: Staging, replica: str | os.PathLike[str],
                 on_applied: Callable[[int], None] = lambda _: None,
                 invalidator: Invalidator | None = None,
                 on_progress: Callable[[int, int], None] = lambda _set, _seq: None) -> None:
        """*on_applied*: sets through that one are applied; *on_progress*: every
        PROGRESS_SECONDS while a set is being applied, the record reached."""
        self.staging = staging
        self.replica = replica
        self.on_applied = on_applied
        self.on_progress = on_progress
        self.reached = (0, 0)  # (set, seq) of the last record the apply took up
        self.invalidator = invalidator  # the standby mount's kernel caches, if it has them
        self.applied = staging.applied
        self.applying: int | None = None
        self.files = OpenFiles()  # the files a batch writes, open through it (apply thread)
        self.error: str | None = None
        self._wakeup = trio.Event()
        self._applied_changed = trio.Event()
        self.faults = ApplyFaults()
        self.lock = ApplyLock(staging.path)
        self.stopping = threading.Event()  # tells a retrying apply thread to give up
        self._reset: int | None = None  # an initial sync's set, to reset to between sets
        # A batch a crash cut short: finished first, held or not (a hold only stops
        # new sets from starting; the replica is torn until this one is whole).
        self.redo_through: int | None = None
        # (sync set, next seq, staging epoch): how far the set was applied as it arrived.
        self._arrived: tuple[int, int, int] | None = None
        self._not_as_arrived: int | None = None  # a sync set that failed so: whole, then
        # The sync set the replica is torn by (applied in part as it arrived, or reset to
        # over a torn replica): once whole it is finished held or not, as a redo is.
        self._torn_sync: int | None = None
        if (torn := interrupted(staging.path)) is not None:
            whole = _complete(staging, torn[0])
            if torn[0] <= staging.applied:
                if staging.syncing is None:
                    clear_applying(staging.path)  # killed after the batch was recorded applied
                else:  # a sync was reset to over a torn replica; killed before it said so
                    self._tear(staging.syncing)
            elif torn[0] == staging.syncing and (
                    staging.reset_seq(torn[0]) is not None or not whole):
                # A sync set, maybe applied in part as it arrived: it is applied again
                # from its RESET, which empties the replica, once whole; a marker left in
                # it may name a record since replaced (a primary's restart).
                staging.clear_marker()
                self._torn_sync = torn[0]
                self.redo_through = torn[1] if whole else None
            elif lost_to_power(staging.path) is not None:
                self._mend_from_primary(torn)
            else:
                self.redo_through = torn[1]

    def _mend_from_primary(self, batch: tuple[int, int]) -> None:
        """Batch *batch* (first, last set) was begun on another boot and never made
        durable: the host lost its power. The replica's disk may have kept any part of
        its ops, and a redo from the marker mends only a crash of the daemon. So the
        primary is asked for every path the batch's sets touched, as an old primary
        rejoining asks for what it changed (repl/secondary/rejoin.py): its sync set
        makes them equal to its own. The replica reads as torn until then."""
        what = ask_for_paths(self.staging, range(batch[0], batch[1] + 1),
                             self.staging.applied, self.replica)
        self._tear(self.staging.applied + 1)
        log.warning("sets %d to %d were being applied when this host lost its power: the "
                    "replica may hold part of them; the primary sends %s again",
                    batch[0], batch[1], what)

    def notify(self) -> None:
        """A set became complete (called by the receiver)."""
        self._wakeup.set()

    def reset_to(self, set_id: int) -> None:
        """An initial sync begins at *set_id* (called by the receiver).

        Carried out by the applier between two sets, under the apply lock.
        """
        self._reset = set_id
        self._wakeup.set()

    def _do_reset(self, set_id: int) -> None:
        with self.lock.exclusive():
            torn = interrupted(self.staging.path) is not None
            self.staging.reset_to(set_id)
            if torn:  # and stays torn until the sync's set empties and fills it
                self._tear(set_id)
            self.redo_through = None  # the sync's RESET empties the replica: no redo

    def _tear(self, set_id: int) -> None:
        """Mark the replica torn until sync set *set_id* is applied whole."""
        mark_applying(self.staging.path, set_id, set_id)
        self._torn_sync = set_id

    async def wait_applied(self, set_id: int) -> None:
        while self.applied < set_id:
            await self._applied_changed.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        tree = Tree(self.replica)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_thread_on_cancel)
                nursery.start_soon(self._tell_progress)
                task_status.started()
                await self._apply_in_order(tree)
        except* Stopping:
            pass  # cancelled in the middle of retrying a set: the next start resumes it
        finally:
            tree.close()
            self.lock.close()

    async def _tell_progress(self) -> None:
        """While a set is applied, say which record it reached, if that moved."""
        told = self.reached
        while True:
            await trio.sleep(PROGRESS_SECONDS)  # a periodic report, not a wait for an event
            if self.applying is not None and self.reached != told:
                told = self.reached
                self.on_progress(*told)

    async def _stop_thread_on_cancel(self) -> None:
        """A thread cannot be cancelled: tell a retrying apply to give up instead."""
        try:
            await trio.sleep_forever()
        finally:
            self.stopping.set()

    async def _apply_in_order(self, tree: Tree) -> None:
        delay = 0.1
        pace = TokenBucket(1 / APPLY_INTERVAL, burst_seconds=APPLY_BURST * APPLY_INTERVAL)
        while True:
            self._wakeup = trio.Event()
            if self._reset is not None:
                reset, self._reset = self._reset, None
                await trio.to_thread.run_sync(self._do_reset, reset)
                self.applied = reset - 1
            nxt = self.applied + 1
            last = self.staging.applicable_through()
            held = is_held(self.staging.path)
            torn = self._torn_sync == nxt
            if torn and last >= nxt and self.redo_through is None:
                self.redo_through = nxt  # whole: finished as a redo is, held or not
            if self.redo_through is not None:
                # A torn batch: finish it even when held, then hold.
                last = self.redo_through if held else max(last, self.redo_through)
            elif last < nxt or held:
                # Once begun, held or not: the replica is torn until the set is whole.
                as_arrived = (not held or torn) and self.applies_as_arrived(nxt)
                if as_arrived:
                    self.applying = nxt
                    try:
                        if await trio.to_thread.run_sync(self.apply_arrived, tree, nxt):
                            continue
                    finally:
                        self.applying = None
                # Waits out a resume without a daemon to tell, or the sync set's records.
                with trio.move_on_after(1.0 if held else ARRIVED_POLL if as_arrived
                                        else math.inf):
                    await self._wakeup.wait()
                continue
            self.applying = nxt
            began = trio.current_time()
            try:
                if not await trio.to_thread.run_sync(self.apply_sets, tree, nxt, last):
                    continue  # a hold arrived while we waited for the lock
            except OSError as exc:
                # Not a disk that may free up: the replica is torn until this set can
                # finish (readers see it marked as such), so say it and try later.
                self.error = f"applying set {nxt} failed: {exc}; retrying in {delay:g}s"
                log.error("%s", self.error)
                tree.forget_dirs()
                with trio.move_on_after(delay):
                    await self._wakeup.wait()
                delay = min(delay * 2, RETRY_MAX)
                continue
            finally:
                self.applying = None
            delay = 0.1
            APPLY_SECONDS.observe(trio.current_time() - began)
            self.applied = self.staging.applied  # nxt, unless an initial sync reset it
            self._applied_changed.set()
            self._applied_changed = trio.Event()
            self.on_applied(self.applied)
            await pace.take(1)  # see APPLY_INTERVAL

    def applies_as_arrived(self, set_id: int) -> bool:
        """Whether *set_id* is a sync set to apply as it arrives (see the module's doc).

        Not with a standby mount of our own (its kernel caches are dropped per
        batch), nor after a crash cut a batch short (that redo comes first)."""
        return (self.invalidator is None and self.redo_through is None
                and self._not_as_arrived != set_id and self.staging.syncing == set_id
                and self.staging.from_scratch)

    def apply_arrived(self, tree: Tree, set_id: int) -> bool:
        """Apply what arrived of sync set *set_id* past what was applied of it, from its
        last RESET on and as far as its records run without a gap (ARRIVED_RECORDS at most).
        Returns whether it applied any.

        A failure ends applying the set as it arrives: once whole, it is applied from
        its RESET, with the retries of a whole set.
        """
        staging = self.staging
        reset = staging.reset_seq(set_id)
        if reset is None:
            return False  # a rejoin's set of what diverged: markers and all, once whole
        epoch = staging.epoch
        arrived = self._arrived
        if arrived is None or arrived[0] != set_id or arrived[2] != epoch or arrived[1] < reset:
            # From the (last) RESET, which empties the replica. A later one than we began
            # from (a walk cut short, and walked again) makes the records before it moot:
            # journaled against the primary's whole tree, they need not apply to a part.
            arrived = (set_id, reset, epoch)
        start = arrived[1]
        end = min(staging.staged_run(set_id, start), start + ARRIVED_RECORDS)
        if end <= start:
            return False
        with self.lock.exclusive():
            if start == reset:
                if is_held(staging.path) and self._torn_sync != set_id:
                    return False  # a hold keeps the replica as it is, if not yet torn
                self._tear(set_id)
            at = start
            try:
                for record in staging.records(set_id, start, view=True):
                    if record.seq >= end:
                        break
                    self.faults.step(set_id, record.seq)
                    self.reached = (set_id, record.seq)
                    apply(tree, record, self.files)
                    at = record.seq + 1
            except (OSError, ValueError) as exc:
                log.warning("applying sync set %d as it arrives stopped at seq %d (%s); it "
                            "is applied once whole", set_id, at, exc)
                self._arrived, self._not_as_arrived = None, set_id
                tree.forget_dirs()
                return False
            finally:
                self.files.close()
        self._arrived = (set_id, at, epoch)
        return at > start

    def apply_sets(self, tree: Tree, first: int, last: int, retry: bool = True) -> bool:
        """Apply complete sets *first*..*last* (or fewer, see BATCH_SECONDS) under the
        apply lock, unless a hold came first; then make them durable.

        A batch that fails half way (a full disk, most often) is retried under the
        same lock until it is whole: readers wait rather than see a torn replica.
        Once its ops are done the lock goes, and readers see the batch while the
        replica is synced and the apply log records it (store/hold.py). Returns
        False if held. Raises Stopping if the daemon stops meanwhile.

        With an invalidator, the kernel's caches of what the batch touches are
        dropped first, while readers go on (the replica still shows the set
        before), until, with the lock taken, nothing of it was read back in since
        (repl/secondary/footprint.py, Invalidator); then the batch is applied.
        """
        if self.invalidator is None:
            with self.lock.exclusive():
                done = self._apply_locked(tree, first, last, retry)
        else:
            done = self._apply_swept(self.invalidator, tree, first, last, retry)
        if done is None:
            return False
        self._make_durable(tree, first, done, retry)
        return True

    def _apply_swept(self, invalidator: Invalidator, tree: Tree, first: int, last: int,
                     retry: bool) -> int | None:
        """_apply_locked, with the kernel's caches of the batch dropped first."""
        touched, last = self._footprint(tree, first, last)
        try:
            invalidator.begin(touched)
            while True:
                # Readers that waited for the lock would read again as soon as it
                # went: the lock is taken only once nothing was read back in.
                while not invalidator.settled():
                    invalidator.sweep()
                with self.lock.exclusive():
                    if invalidator.settled():
                        done = self._apply_locked(tree, first, last, retry)
                        if done is not None:
                            invalidator.applied(touched.created_inodes())
                        return done
                invalidator.sweep()
        finally:
            invalidator.end()

    def _footprint(self, tree: Tree, first: int, last: int) -> tuple[Footprint, int]:
        """What sets *first*.. touch, and the last of them (FOOTPRINT_RECORDS).

        A batch a crash cut short leaves the replica torn, not at a set: it is
        named by nothing then, and all the kernel knows is dropped.
        """
        if self.redo_through is not None:
            return Footprint(tree, everything=True), last
        touched = Footprint(tree)
        for set_id in range(first, last + 1):
            for record in self.staging.records(set_id, data=False):
                touched.add(record)
            if touched.records >= FOOTPRINT_RECORDS:
                return touched, set_id
        return touched, last

    def _apply_locked(self, tree: Tree, first: int, last: int, retry: bool) -> int | None:
        """The ops of the batch, holding the apply lock: the last set applied, or
        None if held."""
        delay = 0.1
        redo = self.redo_through
        if redo is None and is_held(self.staging.path):
            return None
        # A crash before the batch is recorded leaves it after `applied`, so the
        # replica reads as torn until the redo completes it; the redo must reach
        # `last`, as the crash may have reached any set up to there.
        self.redo_through = last if redo is None else max(redo, last)
        mark_applying(self.staging.path, first, self.redo_through)
        while True:
            try:
                done = self._apply_batch(tree, first, last, at_least=self.redo_through)
                mark_applied(self.staging.path, first, self.redo_through)
                return done
            except OSError as exc:
                self._retry_or_raise(tree, first, exc, retry, delay)
                delay = min(delay * 2, RETRY_MAX)

    def _make_durable(self, tree: Tree, first: int, set_id: int, retry: bool) -> None:
        """Sync the replica and record *set_id* applied, without the lock."""
        delay = 0.1
        while True:
            try:
                self.faults.step(set_id, -1)
                sync_batch(tree, self.staging, first, set_id)
                self.staging.finish(set_id)
                clear_applying(self.staging.path)
                self.redo_through = None
                self.error = None
                log.debug("applied sets %d to %d", first, set_id)
                return
            except OSError as exc:
                self._retry_or_raise(tree, first, exc, retry, delay)
                delay = min(delay * 2, RETRY_MAX)

    def _retry_or_raise(self, tree: Tree, first: int, exc: OSError, retry: bool,
                        delay: float) -> None:
        """Wait *delay* before trying again after a transient error; raise others."""
        if not retry or exc.errno not in TRANSIENT:
            raise exc
        if self.invalidator is not None and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self.invalidator.let_go()
        self.error = f"applying sets from {first} failed: {exc}; retrying"
        log.error("%s", self.error)
        tree.forget_dirs()
        if self.stopping.wait(delay):
            raise Stopping from exc

    def _apply_batch(self, tree: Tree, first: int, last: int, at_least: int) -> int:
        """Apply sets *first*.. in order; returns the last one applied.

        Stops after *last*, or earlier once past BATCH_SECONDS but never before
        *at_least* (the end of a batch a crash cut short). Resumes at the marker
        if a crash interrupted a batch: every record before it was applied (the
        marker moves only when the op before it is done), so the sets before the
        marker's are skipped, and only its op is in doubt.
        """
        marker = self.staging.marker()
        if marker is not None and first < marker[0] <= last:
            first = marker[0]
        began = time.monotonic()
        set_id = first
        try:
            while True:
                self._apply_records(tree, set_id, marker if marker and marker[0] == set_id
                                    else None)
                if set_id == last or (set_id >= at_least
                                      and time.monotonic() - began > BATCH_SECONDS):
                    return set_id
                set_id += 1
        finally:
            self.files.close()  # before the sync, and before a retry after an error

    def _apply_records(self, tree: Tree, set_id: int,
                       marker: tuple[int, int, bytes | None] | None) -> None:
        """Apply one complete set, from its *marker* if a crash interrupted it there.

        After a RESET, the rest of the set goes without markers: the marker stays
        at the RESET, and a crash redoes the set from there, on an empty tree
        (an initial sync's tens of thousands of creates, one commit).
        """
        start, intent, continued = 0, None, False
        arrived = self._arrived
        if (arrived is not None and arrived[0] == set_id
                and arrived[2] == self.staging.epoch
                and arrived[1] > self.staging.last_reset(set_id)):
            # Applied as it arrived up to there, its last RESET included: the rest, no
            # markers. (Up to an earlier RESET only: from the last, as below.)
            start, marker, continued = arrived[1], None, True
        elif marker is not None:
            start, intent = marker[1], marker[2]
        elif self.staging.syncing == set_id:
            start = self.staging.last_reset(set_id)  # an initial sync starts from empty
        in_doubt, after_reset = marker is not None, continued
        try:
            for record in self.staging.records(set_id, start, view=True):
                self.faults.step(set_id, record.seq)
                self.reached = (set_id, record.seq)
                if in_doubt:
                    redo(tree, record, intent)
                    in_doubt = False
                elif record.op in NAMESPACE_OPS and (not after_reset
                                                     or record.op == Op.RESET):
                    self.staging.set_marker(record, intent_for(tree, record))
                    self.faults.step(set_id, record.seq)
                    apply(tree, record, self.files)
                else:
                    apply(tree, record, self.files)
                after_reset = after_reset or record.op == Op.RESET
        except BaseException:
            if continued:  # what it did past there left no marker: retried from the RESET
                self._arrived, self._not_as_arrived = None, set_id
            raise
