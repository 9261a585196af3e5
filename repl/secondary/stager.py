"""The secondary's stager: what every stream read -> staging, then acknowledged.

One task takes whatever all streams delivered (``put``), stages it in one
LMDB transaction, syncs, and only then acknowledges those records on the
streams they came from, before their set is complete (claims 5, 10): group
commit across streams. A set whose last record arrives is flagged complete
in that same transaction, and the applier is woken (*on_complete*).

Records read and not yet staged are bounded, STAGE_QUEUE_BYTES across all
streams (a stream stops reading until the stager catches up), and so are the
acknowledgements a stream leaves unread (OUTBOX_FRAMES: past that it is cut
off). Records of a session that a newer one replaced are dropped: the new
session sends them again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import lmdb
import trio

from repl.link import Link
from repl.protocol import Frame, staged
from store.records import Op, Record
from store.reserve import disk_free
from store.staging import Staged, Staging

if TYPE_CHECKING:
    from repl.secondary.receiver import ReceiverStatus

log = logging.getLogger("replfs.receiver")

STAGE_BATCH = 4096
STAGE_BYTES = 8 << 20  # a transaction holds its pages in memory until it commits
# A batch this small is staged and synced in trio's own thread: its flushes write a
# few pages, and the round trip to a worker thread and back costs as much again
# (0.2-1 ms here), which an fsync waiting for the secondary (--fsync remote) would
# wait too. With receipts (--fsync received) too: a frame's receipt is sent (on the
# socket, not only queued) before its records are staged, but one that arrives while
# a staging flush holds trio's thread waits for it (staging in a thread instead made
# an fsync 0.4 ms slower here).
INLINE_SYNC_BYTES = 256 << 10
# Before a staging in trio's thread, the receipts queued are sent; a stream whose
# primary does not read them holds the staging up this long at most.
RECEIPTS_SEND_SECONDS = 1.0
# Records read and not yet staged, all streams together: twice what a primary keeps in
# flight (its window, 16 MiB), so a real one never waits for it.
STAGE_QUEUE_BYTES = 32 << 20
# Acknowledgement frames a stream may leave unread (each names at most STAGE_BATCH
# records, 48 KiB): a primary reads them as they come, so only a peer that does
# not read them reaches this.
OUTBOX_FRAMES = 256
STAGE_RETRY_SECONDS = 5.0  # a batch the staging store failed to take is tried again

_Item = tuple["Stream", Record, bytes]  # a record, as read (raw), and its stream


@dataclass
class Stream:
    """One stream of the primary's session, as the receiver and the stager see it."""

    conn: Link
    outbox: trio.MemorySendChannel[Frame]
    scope: trio.CancelScope
    session: str
    compressed: bool  # RECORDS_ZSTD frames were agreed on in the handshake
    progress: bool = False  # the primary takes APPLYING frames (offered in its HELLO)
    receipts: bool = False  # the primary takes RECEIVED frames (asked for in its HELLO)
    batched: bool = False  # RECORDS frames were agreed on in the handshake
    dropped: str | None = None  # why the stager cut it off
    queued: int = 0  # acknowledgement frames put in the outbox
    sent: int = 0  # of those, sent on the socket by the writer
    progress_sent: trio.Event = field(default_factory=trio.Event)  # set as .sent moves

    def wrote(self, frames: int) -> None:
        """The writer sent *frames* more (or stopped: 0)."""
        self.sent += frames
        self.progress_sent.set()
        self.progress_sent = trio.Event()

    async def drained(self) -> None:
        """Return once every acknowledgement queued so far is sent, or the writer
        stopped."""
        target = self.queued
        while self.sent < target and not self.scope.cancel_called:
            await self.progress_sent.wait()


class Stager:
    def __init__(self, staging: Staging, status: ReceiverStatus,
                 on_complete: Callable[[], None]) -> None:
        """Stage into *staging*, counting in *status*; *on_complete*: a set is complete."""
        self.staging = staging
        self.status = status
        self.on_complete = on_complete
        self.session: str | None = None  # records of other sessions are dropped
        self._incoming_send, self._incoming = trio.open_memory_channel[_Item](STAGE_BATCH)
        self.queued = 0  # bytes of the records read and not yet staged
        self._dequeued = trio.lowlevel.ParkingLot()  # readers waiting for queued to drop

    async def put(self, stream: Stream, record: Record, raw: bytes) -> None:
        """Queue *record* (*raw*, as read from *stream*) for staging; wait while
        STAGE_QUEUE_BYTES are queued already (backpressure: the peer waits, not our
        memory). Put all of a frame's records before yielding to the stager: a set
        sent in one frame is then staged in one transaction and one sync, not two."""
        size = len(raw)
        while self.queued and self.queued + size > STAGE_QUEUE_BYTES:
            await self._dequeued.park()
        self.queued += size
        try:
            try:
                self._incoming_send.send_nowait((stream, record, raw))
            except trio.WouldBlock:
                await self._incoming_send.send((stream, record, raw))
        except BaseException:  # not sent: the stager will not give it back
            self.queued -= size
            self._dequeued.unpark_all()
            raise

    async def run(self) -> None:
        """Stage what is put, batch by batch, until cancelled; then, blocking, what
        was read and not staged yet."""
        batch: list[_Item] = []
        try:
            while True:
                batch = [await self._incoming.receive()]
                size = len(batch[0][2])
                while len(batch) < STAGE_BATCH and size < STAGE_BYTES:
                    try:
                        batch.append(self._incoming.receive_nowait())
                    except trio.WouldBlock:
                        break
                    size += len(batch[-1][2])
                try:
                    await self._stage_until_done(batch)
                finally:
                    self.queued -= sum(len(raw) for _, _, raw in batch)
                    self._dequeued.unpark_all()
                batch = []
        except trio.Cancelled:
            self._stage_left(batch)
            raise

    async def _stage_until_done(self, batch: list[_Item]) -> None:
        """Stage *batch* (what a newer session replaced left out). While the staging
        store fails (its disk full...), say why in status and try again every
        STAGE_RETRY_SECONDS, reading nothing more meanwhile: the primary's window
        fills, and it waits, or ends the session and sends the records again."""
        while True:
            try:
                await self._stage([item for item in batch if item[0].session == self.session])
            except (OSError, lmdb.Error) as exc:
                free = disk_free(self.staging.path)
                error = (f"staging failed: {exc} (its disk has {free >> 20} MiB free); "
                         f"retrying in {STAGE_RETRY_SECONDS:g}s")
                if error != self.status.staging_error:
                    log.error("%s", error)
                self.status.staging_error = error
                await trio.sleep(STAGE_RETRY_SECONDS)  # a retry's pace: no event to wait for
                continue
            if self.status.staging_error is not None:
                log.info("staging works again")
                self.status.staging_error = None
            return

    def _stage_left(self, batch: list[_Item]) -> None:
        """As the receiver stops: stage what was read and not staged yet (*batch*, cut
        short, and what waits behind it), blocking. A primary may have taken a receipt
        for it (--fsync received) and be gone: a promote stops this daemon first."""
        while True:
            try:
                batch.append(self._incoming.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        batch = [item for item in batch if item[0].session == self.session]
        if batch:  # staged already, some of it, maybe: duplicates are dropped
            try:
                self._stage_durably([record for _, record, _ in batch],
                                    [raw for _, _, raw in batch])
            except (OSError, lmdb.Error) as exc:
                log.error("staging the %d records read before the stop failed: %s",
                          len(batch), exc)
            else:
                log.info("staged the %d records read before the stop", len(batch))

    def _stage_durably(self, records: list[Record], raws: list[bytes]) -> Staged:
        result = self.staging.stage(records, raws)
        self.staging.sync()
        return result

    async def _stage(self, batch: list[_Item]) -> None:
        """Stage *batch* durably, acknowledge it on the streams it came from, and wake
        the applier if a set is complete."""
        if not batch:
            return  # all from streams a newer session replaced
        records, raws = [record for _, record, _ in batch], [raw for _, _, raw in batch]
        receipts = any(stream.receipts for stream, _, _ in batch)
        # With receipts, only a batch that ends a set waits for the disk in trio's thread
        # (its receipts sent first): the rest of a set, shipped ahead of its close (a
        # write before an fsync), is staged in a thread, so that while its flush waits
        # the frame that closes the set is still read, and its receipt sent, at once.
        if sum(map(len, raws)) <= INLINE_SYNC_BYTES and (
                not receipts or any(record.op == Op.SYNC for record in records)):
            with trio.move_on_after(RECEIPTS_SEND_SECONDS):
                for stream in {id(s): s for s, _, _ in batch if s.receipts}.values():
                    await stream.drained()  # the receipts leave before the disk is waited on
            result = self._stage_durably(records, raws)
        else:  # its commit flushes the pages it wrote too: not in trio's thread
            result = await trio.to_thread.run_sync(self._stage_durably, records, raws)
        self.status.staged += len(result.keys) - result.duplicates
        self.status.duplicates += result.duplicates
        self.status.stale += result.stale
        if result.keys:
            self.status.last_staged = max(self.status.last_staged, max(result.keys))
        acks: dict[int, tuple[Stream, list[tuple[int, int]]]] = {}
        for stream, record, _ in batch:
            acks.setdefault(id(stream), (stream, []))[1].append((record.set, record.seq))
        for stream, keys in acks.values():
            acknowledge(stream, staged(keys))
        if result.completed:
            self.status.last_complete = max(self.status.last_complete, *result.completed)
            self.on_complete()


def acknowledge(stream: Stream, frame: Frame) -> None:
    """Send *frame* (STAGED or RECEIVED) on *stream*, or cut off a stream that leaves
    OUTBOX_FRAMES of them unread."""
    try:
        stream.outbox.send_nowait(frame)
        stream.queued += 1
    except trio.WouldBlock:
        stream.dropped = (f"{OUTBOX_FRAMES} acknowledgements unread: it sends and "
                          "does not read")
        stream.scope.cancel()
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass  # unacknowledged records are sent again; duplicates are dropped
