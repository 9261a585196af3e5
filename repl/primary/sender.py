"""The primary's sender: journal -> N parallel streams -> the secondary.

Records go out as soon as they are journaled, set N+1 while N is still in
flight (claims 1, 22, 23), spread across the streams so they arrive out of
order (claims 11, 12). The sender never queues records in memory beyond
one batch: capture notifies it through a one-slot signal and it reads the
journal from its position. What is sent but not yet staged by the
secondary is bounded by ``window`` bytes and WINDOW_RECORDS records (backpressure).

Any failure of any stream ends the whole session; the next session starts
from the set after the one the secondary says it applied, so everything
not applied is sent again and the secondary drops what it already holds.
The journal keeps every record until its set is reported applied (claim 6).

Each stream is a link (repl/link.py) its dialer opens: replfs frames over
TLS or TCP, or iSCSI. The sender only sees frames.
"""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, AsyncExitStack
from dataclasses import dataclass, field

import trio
import zstandard

from repl.diverge import Divergence
from repl.errors import NotYet, ProtocolError, Refused, Repeats
from repl.errors import first_error as _first
from repl.link import Dialer, Link
from repl.pacing import TokenBucket
from repl.primary.semisync import Peer
from repl.protocol import (
    PROTOCOL_VERSION,
    ZSTD,
    Frame,
    FrameType,
    Packer,
    hello,
    parse_applied,
    parse_applying,
    parse_hello,
    parse_keys,
    reset_to,
)
from repl.wake import Waker
from store.journal import Journal
from store.records import is_sync

log = logging.getLogger("replfs.sender")

# What a broken link or a confused peer raises: the session ends and a new one starts.
_LINK_ERRORS = (OSError, trio.BrokenResourceError, trio.EndOfChannel, trio.TooSlowError,
                ProtocolError)


BATCH_BYTES = 1 << 20
# Records journaled one by one (small writes, one set per fsync) would each cost a
# send, an ack and a staging commit on their own: under a steady stream of small sets,
# a batch smaller than BATCH_BYTES waits until this long after the last send, and
# those that follow within it share all three. After an idle spell a batch goes at
# once: waiting then would add this much to every lone set's lag and share nothing
# with the sets of a steady stream, which the next batch's wait gathers.
COALESCE_SECONDS = 0.005
STREAM_SHARE = 256 << 10  # a batch goes to one stream per this many bytes, in turn
# The secondary holds what is in flight in memory. 16 MiB covers 1 Gbit/s at 100 ms
# round trips; 32 MiB added 30 MiB to the secondary's peak in a catch-up and was no
# faster on loopback.
WINDOW_BYTES = 16 << 20
# ... and at most this many records: each costs an entry of its own until it is
# acknowledged, and a walk's namespace records are ~100 bytes (16 MiB of them is
# 160,000 entries, 25 MiB of the primary's memory).
WINDOW_RECORDS = 16_384
RETRY_MAX = 1.0  # on loopback or a LAN a peer back up is worth finding at once
HANDSHAKE_TIMEOUT = 10.0
STALL_SECONDS = 10.0  # a backlog with no progress for this long is reported as a stall
# zstd's own default: on records of text and code it takes a third to a fifth of the
# bytes off the wire, at hundreds of MB/s on one core (see bin/bench).
COMPRESS_LEVEL = 3


@dataclass
class SenderStatus:
    connected: bool = False
    streams: int = 0
    peer_node: str | None = None
    shipped: tuple[int, int] = (0, 0)  # last (set, seq) sent
    staged: int = 0  # records the secondary acknowledged as staged, this session
    applied: int = 0  # last set the secondary applied
    inflight_bytes: int = 0
    sent_bytes: int = 0  # record bytes put on the wire, all sessions
    sent_wire_bytes: int = 0  # ... and the bytes of their frames
    sessions: int = 0
    stalled: bool = False
    compressing: bool = False  # this session's records go out zstd-compressed
    errors: list[str] = field(default_factory=list)  # the last ten
    error_count: int = 0


async def _no_walk() -> None:
    """No walk of the tree to do (a sender no capture wired)."""


class Sender:
    def __init__(self, journal: Journal, dialer: Dialer, *, streams: int = 4,
                 window: int = WINDOW_BYTES, scramble: int | None = None,
                 stall_seconds: float = STALL_SECONDS,
                 settled: AbstractContextManager[object] | None = None,
                 compress_level: int = COMPRESS_LEVEL,
                 max_rate: float | None = None, framed: bool = True) -> None:
        """*framed*: the link carries every replfs frame; not over SCSI, which carries
        one record a WRITE (no RECORDS frames, no receipts)."""
        self.journal = journal
        self.framed = framed
        # --fsync remote: where this secondary stands, for the fsyncs waiting (the
        # fan-out wires it, as it wires the callbacks below).
        self.semisync: Peer | None = None
        self._receipts = False  # this session's secondary sends RECEIVED frames
        self._batched = False  # this session's secondary takes RECORDS frames
        # Held by the journal's writer while the record it just appended may still
        # be voided or shortened (its op not done yet): reads take it, so only
        # final records are ever shipped.
        self.settled = settled if settled is not None else contextlib.nullcontext()
        # This process's incarnation: a primary that restarted may have lost its
        # journal's unsynced tail and reuse those places for other records.
        self.boot = secrets.token_hex(8)
        self.dialer = dialer
        self.address = dialer.address  # the secondary, for logs, status and metrics
        self.nstreams = streams
        self.stall_seconds = stall_seconds
        self.window = window
        self.rng = random.Random(scramble) if scramble is not None else None
        # Records go out zstd-compressed at this level where the secondary takes it (0: never).
        self._compressor = (zstandard.ZstdCompressor(level=compress_level)
                            if compress_level > 0 else None)
        self.bucket = TokenBucket(max_rate) if max_rate else None  # --max-rate
        self.status = SenderStatus()
        self._repeats = Repeats(log)  # the same failure at each retry: logged once a minute
        self._wakeup = trio.Event()
        self._waiting = False  # the feeder waits for durable records: notify() wakes it
        self._waker: Callable[[], None] = lambda: None  # a Waker once run() started
        self._hurried = trio.Event()  # an fsync waits for the secondary: ship at once
        self._gathering = False  # the feeder lets records gather (_gather)
        self._acked = trio.Event()
        # Set (and replaced) whenever `applied` moves or the session ends.
        self.applied_event = trio.Event()
        # The secondary applied a set: the journal's owner trims it (capture).
        self.on_applied: Callable[[int], None] = lambda set_id: None
        # True once the journal went on without this secondary (past its budget,
        # repl/primary/retention.py): it may no longer hold the sets this session reads.
        self.dropped: Callable[[], bool] = lambda: False
        # Where a secondary starts: None to stream on, or an initial sync's set.
        self.bring_up: Callable[[int, int | None, Divergence | None], int | None] = (
            lambda applied, syncing, rejoin: None)
        # Then the tree's walk, if bring_up began a sync of the whole tree (capture's).
        self.walk: Callable[[], Awaitable[None]] = _no_walk
        self._peer_rejoin: Divergence | None = None
        self._peer_syncing: int | None = None
        self._inflight: dict[tuple[int, int], int] = {}
        self._progress_at = trio.current_time()
        self._reached = (0, 0)  # the record the secondary's applier said it reached
        self._acked_at = trio.current_time()  # last ack, or when records went in flight
        # The set of an initial sync the secondary is rebuilding its replica as: the
        # sets before it count as applied (they are moot) but the replica holds none.
        self.sync_set = 0

    async def wait_applied(self, set_id: int) -> None:
        """Return once the connected secondary's replica holds *set_id* or a later set.

        While no secondary is connected, keep waiting: the next one to connect may
        be another (or a restarted) one, with a replica of its own.
        """
        while not self.status.connected or self.status.applied < max(set_id, self.sync_set):
            await self.applied_event.wait()

    def notify(self) -> None:
        """New records are durable in the journal. Called from any thread (capture's
        flush, an fsync's); wakes the feeder only if it waits for records: flushes
        while it ships, or while it lets records gather, cost no handoff to trio."""
        if self._waiting:
            self._waiting = False
            self._waker()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Replicate forever, reconnecting after any failure."""
        self._waker = Waker(lambda: self._wakeup.set())
        if self.semisync is not None:
            hurry = Waker(lambda: self._hurried.set())
            self.semisync.hurry = lambda: hurry() if self._gathering else None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watchdog)
            task_status.started()
            await self._replicate()

    async def _watchdog(self) -> None:
        """Say so, in the log and in status, when a backlog makes no progress."""
        while True:
            # A periodic look at progress: a stall is the absence of an event.
            await trio.sleep(min(1.0, self.stall_seconds / 2))
            backlog = self.journal.set - 1 - self.status.applied
            idle = trio.current_time() - self._progress_at
            stalled = backlog > 0 and idle > self.stall_seconds
            if stalled and not self.status.stalled:
                log.warning("replication stalled: %s is %d sets behind, no progress for "
                            "%.0fs (%s)", self.address, backlog, idle,
                            "connected" if self.status.connected else "unreachable")
            elif self.status.stalled and not stalled:
                log.info("replication is progressing again (%s)", self.address)
            self.status.stalled = stalled

    async def _replicate(self) -> None:
        delay = 0.1
        while True:
            was = self.status.connected
            try:
                await self._session()
            except* Refused as group:
                self._error(f"refused by {self.address}: {_first(group)}")
                delay = RETRY_MAX
            except* NotYet as group:
                log.info("%s", _first(group))
                delay = RETRY_MAX
            except* _LINK_ERRORS as group:
                self._error(f"replication to {self.address} "
                            f"{'lost' if self.status.connected else 'failed'}: "
                            f"{_first(group)!r}")
                delay = 0.1 if self.status.connected or was else min(delay * 2, RETRY_MAX)
            finally:
                if self.semisync is not None:
                    self.semisync.disconnected()
                self.status.connected = False
                self._inflight.clear()
                self.status.inflight_bytes = 0
                self._changed()
            await trio.sleep(delay)  # retry pacing, not a wait for an event

    def _error(self, text: str) -> None:
        self._repeats.warning(text)
        self.status.errors = [*self.status.errors[-9:], text]
        self.status.error_count += 1

    async def _session(self) -> None:
        session = secrets.token_hex(8)
        conns: list[Link] = []
        async with AsyncExitStack() as links:
            start, compress = 0, self._compressor is not None
            deadline = trio.current_time() + HANDSHAKE_TIMEOUT
            for index in range(self.nstreams):
                # The dialer bounds its own connect; no scope may span a link's opening.
                conn = await links.enter_async_context(self.dialer.open())
                conns.append(conn)
                with trio.fail_at(deadline):
                    start, takes_zstd = await self._handshake(conn, session, index)
                compress = compress and takes_zstd
            async with trio.open_nursery() as nursery:
                # Held from the bring-up to the end of a sync's walk of the tree, if it
                # begins one: the request threads wait, so the walk is a snapshot,
                # while this thread ships what was walked between the walk's steps.
                with self.settled:
                    restart = self.bring_up(start, self._peer_syncing, self._peer_rejoin)
                    if restart is not None:
                        await conns[0].send(reset_to(restart))
                        start = restart - 1
                        self.sync_set = restart
                    self.status.connected = True
                    self._repeats.clear()
                    if self.semisync is not None:
                        self.semisync.connected(start, self.journal.set - 1)
                    # This secondary's, maybe not the last's.
                    self._set_applied(start, new_session=True)
                    self._progress_at = trio.current_time()  # a new link: its full timeout
                    self.status.streams = len(conns)
                    self.status.sessions += 1
                    self.status.staged = 0
                    self.status.compressing = compress
                    log.info("replicating to %s over %d streams, from set %d%s",
                             self.address, len(conns), start + 1,
                             ", zstd-compressed" if compress else "")
                    outboxes = []
                    for conn in conns:
                        send, receive = trio.open_memory_channel[list[Frame]](1)
                        outboxes.append(send)
                        nursery.start_soon(self._writer, conn, receive)
                        nursery.start_soon(self._reader, conn)
                    nursery.start_soon(self._feeder, outboxes, start + 1,
                                       self._compressor if compress else None)
                    nursery.start_soon(self._ack_watchdog)
                    await self.walk()

    async def _handshake(self, conn: Link, session: str, index: int) -> tuple[int, bool]:
        """Introduce ourselves on *conn*; returns the set the secondary applied last,
        and whether it takes zstd-compressed records."""
        ident = self.journal.identity
        await conn.send(hello(role="primary", version=PROTOCOL_VERSION, cluster=ident.cluster,
                              node=ident.node, generation=ident.generation, session=session,
                              boot=self.boot, stream=index, streams=self.nstreams,
                              history=ident.history, progress=True,
                              **({"batch": True} if self.framed else {}),
                              **({"receipts": True} if self.framed and self.semisync is not None
                                 and self.semisync.receipts else {}),
                              **({"compress": [ZSTD]} if self._compressor else {})))
        frame = await conn.receive()
        if frame.type == FrameType.ERROR:  # only this is a refusal; a corrupt reply is not
            raise Refused(frame.payload.decode(errors="replace"))
        reply = parse_hello(frame)
        if reply.get("role") != "secondary":
            raise ProtocolError(f"peer is a {reply.get('role')!r}, not a secondary")
        applied = reply.get("applied")
        if type(applied) is not int or not 0 <= applied < 1 << 64:
            raise ProtocolError(f"the secondary's HELLO has no valid applied set: "
                                f"{applied!r:.40}")
        syncing = reply.get("syncing")
        if syncing is not None and (type(syncing) is not int or not 1 <= syncing < 1 << 64):
            raise ProtocolError(f"the secondary's HELLO has a bad syncing set: {syncing!r:.40}")
        self._peer_syncing = syncing  # an initial sync it is in the middle of
        rejoin = reply.get("rejoin")
        self._peer_rejoin = Divergence.from_json(rejoin) if rejoin is not None else None
        self.status.peer_node = reply.get("node")
        self._receipts = reply.get("receipts") is True  # its RECEIVED frames feed semisync
        self._batched = reply.get("batch") is True  # it takes RECORDS frames
        conn.handshake_done()
        return applied, reply.get("compress") == ZSTD

    def _set_applied(self, set_id: int, new_session: bool = False) -> None:
        if set_id > self.status.applied or new_session:
            self.status.applied = set_id
            self._progress_at = trio.current_time()
            self.on_applied(set_id)
            self._changed()

    def _changed(self) -> None:
        """Wake whoever waits for this secondary's applied set or connection."""
        self.applied_event.set()
        self.applied_event = trio.Event()

    async def _feeder(self, outboxes: list[trio.MemorySendChannel[list[Frame]]],
                      start_set: int, compressor: zstandard.ZstdCompressor | None) -> None:
        pos = (start_set, 0)
        turn = 0
        most = BATCH_BYTES if self.bucket is None else min(BATCH_BYTES, self.bucket.chunk)
        sent_at = -COALESCE_SECONDS
        packer = Packer(compressor, self._batched)
        while True:
            self._wakeup = trio.Event()
            self._waiting = True  # before reading: a flush after the read wakes us
            with self.settled:
                self._check_dropped()
                batch = self.journal.read_raw(pos[0], pos[1], most)
            if not batch:
                await self._wakeup.wait()
                continue
            self._waiting = False
            if (sum(len(raw) for _, _, raw in batch) < most
                    and trio.current_time() < sent_at + COALESCE_SECONDS
                    and not self._urgent()):
                await self._gather(sent_at + COALESCE_SECONDS)
                continue
            sent_at = trio.current_time()
            while (self.status.inflight_bytes > self.window
                   or len(self._inflight) > WINDOW_RECORDS):
                self._acked = trio.Event()
                await self._acked.wait()
            per_stream: list[list[bytes]] = [[] for _ in outboxes]
            if not self._inflight:
                self._acked_at = trio.current_time()
            if self.rng is not None:
                self.rng.shuffle(batch)
            shipped = 0
            for set_id, seq, raw in batch:
                if self.rng is not None:
                    index = self.rng.randrange(len(outboxes))
                else:
                    index = (turn + shipped // STREAM_SHARE) % len(outboxes)
                shipped += len(raw)
                per_stream[index].append(raw)
                self.status.sent_bytes += len(raw)
                self._inflight[(set_id, seq)] = len(raw)
                self.status.inflight_bytes += len(raw)
            turn += 1 + shipped // STREAM_SHARE
            last = max((s, q) for s, q, _ in batch)
            pos = (last[0], last[1] + 1)
            self.status.shipped = last
            if self.semisync is not None:
                self.semisync.shipped(sorted((s, q, is_sync(raw)) for s, q, raw in batch))
            for outbox, raws in zip(outboxes, per_stream, strict=True):
                if raws:
                    frames = packer.frames(raws)
                    wire = sum(frame.wire_size for frame in frames)
                    self.status.sent_wire_bytes += wire
                    if self.bucket is not None:
                        await self.bucket.take(wire)
                    await outbox.send(frames)

    def _urgent(self) -> bool:
        return self.semisync is not None and self.semisync.waiting > 0

    async def _gather(self, until: float) -> None:
        """Let records gather until *until* (see COALESCE_SECONDS), unless an fsync
        waits for the secondary to stage them (--fsync remote): then not at all."""
        self._hurried = trio.Event()
        self._gathering = True  # before the look: an fsync that counts after it hurries us
        try:
            if self._urgent():
                return
            with trio.move_on_at(until):
                await self._hurried.wait()
        finally:
            self._gathering = False

    async def _ack_watchdog(self) -> None:
        """End the session when records in flight go unacknowledged for ``stall_seconds``.

        A link can stall without breaking: a black hole, or a frame length
        corrupted into one the secondary waits for in vain. Only a new
        session gets those records through; the secondary drops duplicates.
        """
        while True:
            await trio.sleep(min(1.0, self.stall_seconds / 2))  # a periodic look, as above
            self._check_dropped()
            if self._inflight and trio.current_time() - self._acked_at > self.stall_seconds:
                raise trio.TooSlowError(f"no acknowledgement for {self.stall_seconds:g}s "
                                        f"with {len(self._inflight)} records in flight")

    def _check_dropped(self) -> None:
        """End the session if the journal went on without this secondary: the next one
        brings it up from the backing directory (capture's bring_up)."""
        if self.dropped():
            raise ProtocolError("past the journal's budget: the journal goes on without "
                                "this secondary, which is brought up anew")

    async def _writer(self, conn: Link,
                      frames: trio.MemoryReceiveChannel[list[Frame]]) -> None:
        async for batch in frames:
            await conn.send(*batch)

    async def _reader(self, conn: Link) -> None:
        while True:
            frame = await conn.receive()
            if frame.type == FrameType.STAGED:
                keys = [key for key in parse_keys(frame) if key in self._inflight]
                for key in keys:
                    self.status.inflight_bytes -= self._inflight.pop(key)
                self.status.staged += len(keys)
                if self.semisync is not None and not self._receipts:
                    self.semisync.staged(keys)
                self._progress_at = self._acked_at = trio.current_time()
                self._acked.set()
            elif frame.type == FrameType.RECEIVED and self._receipts:
                if self.semisync is not None:  # each before its STAGED: still in flight
                    self.semisync.staged([k for k in parse_keys(frame) if k in self._inflight])
            elif frame.type == FrameType.APPLIED:
                self._set_applied(parse_applied(frame))
            elif frame.type == FrameType.APPLYING:
                reached = parse_applying(frame)
                if reached[0] > self.status.applied and reached != self._reached:
                    self._reached = reached  # a long apply, moving: not a stall
                    self._progress_at = trio.current_time()
            elif frame.type == FrameType.ERROR:
                raise Refused(frame.payload.decode(errors="replace"))
            else:
                raise ProtocolError(f"unexpected {frame.type.name} frame from the secondary")
