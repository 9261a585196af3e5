"""The secondary's receiver: streams -> staging, acknowledged once durable.

Records of any open set are accepted in any order from any stream (claims
1, 11, 12, 23), checked, and handed to the stager (repl/secondary/stager.py),
which stages what all streams delivered in one transaction and only then
acknowledges it (group commit across streams). A primary that asks for receipts
(``--fsync received``) also gets each frame's records acknowledged as
received as soon as they are read and checked, before they are staged.

A primary's connections share a session id; a new session replaces the
old one (the primary reconnected). A connection first passes the gate
(repl/secondary/gate.py: TLS, the cluster's CA, the primary's name, and its HELLO). A
peer turned away there, or that is not replfs, speaks another version,
belongs to another cluster or sends an invalid record, is refused with one
log line (counted by reason in ``status``), and nothing of the replica
changes.

What a peer can make the receiver hold is bounded, whoever it is:
strangers by the gate; past it, MAX_STREAMS streams of the current session
(a new session closes the old one's); on each stream one frame being read
(MAX_FRAME) and at most OUTBOX_FRAMES acknowledgements it has not read
(past that it is dropped, as ``not-reading``); and records read but not
yet staged (the stager's STAGE_QUEUE_BYTES).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from repl.errors import ProtocolError, Refused
from repl.errors import first_error as _first
from repl.link import Link
from repl.protocol import (
    MAX_STREAMS,
    PROTOCOL_VERSION,
    ZSTD,
    Connection,
    Frame,
    FrameType,
    applied,
    applying,
    hello,
    parse_applied,
    parse_hello,
    parse_plain_records,
    parse_records,
    received,
)
from repl.secondary.gate import HANDSHAKE_SECONDS, Gate, Rejected
from repl.secondary.rejoin import follow_generation
from repl.secondary.stager import OUTBOX_FRAMES, Stager, Stream, acknowledge
from repl.tls import broken_record
from store.errors import RecordError
from store.records import Record
from store.staging import Staging

log = logging.getLogger("replfs.receiver")

HANDSHAKE_TIMEOUT = 10.0  # the rest of the replfs handshake, once the HELLO is in
# Refusals logged per second at most: a flood is counted, not written out line by line.
REFUSALS_LOGGED = 20


@dataclass
class ReceiverStatus:
    connected_streams: int = 0
    peer_node: str | None = None
    received: int = 0
    received_bytes: int = 0  # of records
    received_wire_bytes: int = 0  # of their frames
    staged: int = 0
    duplicates: int = 0
    stale: int = 0
    bad_frames: int = 0
    refused: int = 0
    refused_by: dict[str, int] = field(default_factory=dict)  # reason -> connections
    last_staged: tuple[int, int] = (0, 0)
    last_complete: int = 0
    staging_error: str | None = None  # why the last batch could not be staged, until one is
    errors: list[str] = field(default_factory=list)


class Receiver:
    def __init__(self, staging: Staging, gate: Gate, on_complete: Callable[[], None],
                 on_reset: Callable[[int], None],
                 on_hello: Callable[[dict[str, Any]], dict[str, Any]] = lambda info: {},
                 replica: Path | None = None) -> None:
        """*on_complete*: a set is complete; *on_reset*: an initial sync begins at that
        set; *on_hello*: the extra fields of our HELLO answer, given the primary's;
        *replica*: the tree, for what a rejoin offers (``follow_generation``)."""
        self.staging = staging
        self.replica = replica
        self.gate = gate
        self.on_complete = on_complete
        self.on_reset = on_reset
        self.on_hello = on_hello
        self.status = ReceiverStatus()
        self.stager = Stager(staging, self.status, lambda: self.on_complete())
        self._streams: list[Stream] = []
        self._session: str | None = None
        self._boot: str | None = None  # the primary process the session came from
        self._refusal_second = -1  # the second whose refusals are being logged
        self._refusals_logged = self._refusals_unlogged = 0
        self._unlogged = trio.Event()  # set once a refusal goes unlogged

    async def serve(self, listeners: list[trio.SocketListener], *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stage what every link brings: those accepted on *listeners* (replfs frames,
        through the gate) and those handed to ``serve_link`` or ``serve_stream``,
        until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.stager.run)
            nursery.start_soon(self._log_unlogged)
            if listeners:
                await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started()

    async def serve_link(self, link: Link, peer: str) -> None:
        """Serve a link that another listener accepted and authenticated (an iSCSI
        session after its CHAP login): its HELLO within the gate's deadline, then
        like any stream, until it ends. Closes *link*."""
        try:
            with trio.fail_after(HANDSHAKE_SECONDS):
                info = parse_hello(await link.receive())
        except ProtocolError as exc:
            self._refused(peer, "protocol", str(exc))
            await _tell(link, str(exc))
            return
        except (OSError, trio.BrokenResourceError, trio.EndOfChannel, trio.TooSlowError) as exc:
            self._refused(peer, "no-handshake", f"no HELLO ({exc!r})")
            await link.aclose()
            return
        await self._serve(link, info, peer)

    async def serve_stream(self, stream: trio.abc.Stream, peer: str) -> None:
        """Serve a byte stream that no gate admitted (the end of an in-memory stream, in
        tests): both magics and its HELLO within the gate's deadline, then like any
        stream, until it ends. Closes *stream*."""
        try:
            with trio.fail_after(HANDSHAKE_SECONDS):
                conn, info = await self._greet(stream)
        except (Rejected, trio.TooSlowError) as exc:
            reason, text = ((exc.reason, exc.text) if isinstance(exc, Rejected) else
                            ("no-handshake", f"no handshake within {HANDSHAKE_SECONDS:g}s"))
            self._refused(peer, reason, text)
            await trio.aclose_forcefully(stream)
            return
        await self._serve(conn, info, peer)

    def report_applied(self, set_id: int) -> None:
        """Tell the connected primary that *set_id* is applied (called by the applier)."""
        self._to_primary(applied(set_id))  # lost, it is learnt at the next handshake

    def report_applying(self, set_id: int, seq: int) -> None:
        """Tell the connected primary, if it takes it, that the applier is at record
        (*set_id*, *seq*): applying is progress, however long a set takes."""
        self._to_primary(applying(set_id, seq), progress=True)  # lost, the next says it

    def _to_primary(self, frame: Frame, progress: bool = False) -> None:
        """*frame* on the primary's first stream (with *progress*, if it takes those),
        unless its outbox is full or gone."""
        for stream in self._streams[:1]:
            if progress and not stream.progress:
                return
            try:
                stream.outbox.send_nowait(frame)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    def _error(self, text: str) -> None:
        log.warning("%s", text)
        self.status.errors = [*self.status.errors[-9:], text]

    def _refused(self, peer: str, reason: str, text: str) -> None:
        """Count a refusal, and log it in one line unless a flood is under way: past
        REFUSALS_LOGGED in a second, the rest are counted, and the count is logged
        once that second is over (``_log_unlogged``)."""
        self.status.refused += 1
        self.status.refused_by[reason] = self.status.refused_by.get(reason, 0) + 1
        second = int(trio.current_time())
        if second != self._refusal_second:
            self._log_count()
            self._refusal_second, self._refusals_logged = second, 0
        if self._refusals_logged >= REFUSALS_LOGGED:
            self._refusals_unlogged += 1
            self._unlogged.set()
            return
        self._refusals_logged += 1
        self._error(f"refused connection from {peer} ({reason}): {text}")

    def _log_count(self) -> None:
        if self._refusals_unlogged:
            log.warning("%d more connections refused in a second, not logged one by one "
                        "(see replfs status)", self._refusals_unlogged)
            self._refusals_unlogged = 0

    async def _log_unlogged(self) -> None:
        """Log the count of refusals not logged one by one when their second is over,
        whether another refusal comes after them or not."""
        while True:
            await self._unlogged.wait()
            self._unlogged = trio.Event()
            await trio.sleep_until(self._refusal_second + 1)
            self._log_count()

    async def _handle(self, socket_stream: trio.SocketStream) -> None:
        host, peer = _peer(socket_stream)
        try:
            conn, info = await self.gate.admit(socket_stream, host, self._greet)
        except Rejected as exc:
            self._refused(peer, exc.reason, exc.text)
            return
        await self._serve(conn, info, peer)

    async def _greet(self, stream: trio.abc.Stream) -> tuple[Connection, dict[str, Any]]:
        """Both magics, and the peer's HELLO (while it is a stranger at the gate).

        Raises:
            Rejected: it is not replfs, or the link broke; it was told why if it could be.
        """
        conn = Connection(stream)
        try:
            # Our magic goes first, so a peer we refuse can still read why (even one
            # speaking another wire version): the ERROR frame follows it.
            await conn.send_magic()
            await conn.expect_magic()
            return conn, parse_hello(await conn.receive())
        except ProtocolError as exc:
            await _tell(conn, str(exc))
            raise Rejected("protocol", str(exc)) from None
        except (OSError, trio.BrokenResourceError, trio.EndOfChannel) as exc:
            raise Rejected("no-handshake", f"the link broke during the handshake ({exc!r})"
                           ) from None

    async def _serve(self, conn: Link, info: dict[str, Any], peer: str) -> None:
        """Answer the HELLO, then stage what the stream brings until it ends."""
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await self._accept(conn, info)
        except (ProtocolError, Refused, Rejected) as exc:
            reason = (exc.reason if isinstance(exc, Rejected) else
                      "protocol" if isinstance(exc, ProtocolError) else "not-served")
            self._refused(peer, reason, str(exc))
            await _tell(conn, str(exc))
            return
        except (OSError, trio.BrokenResourceError, trio.EndOfChannel, trio.TooSlowError) as exc:
            self._error(f"connection from {peer} failed during handshake: {exc!r}")
            await conn.aclose()
            return

        conn.handshake_done()
        session = str(info["session"])
        if session != self._session:
            if self._session is not None:
                log.info("primary reconnected (session %s); closing the old streams", session)
            for old in self._streams:
                old.scope.cancel()
            self._streams = []
            self._session = self.stager.session = session  # the old streams' records dropped
            boot = info.get("boot")
            if boot is None or boot != self._boot:
                # A primary that restarted may have lost its journal's unsynced tail
                # and now puts other records at those places: what we hold of its
                # open sets is no longer theirs. It sends every unapplied set again.
                dropped = self.staging.drop_partial()
                if dropped and self._boot is not None:
                    log.info("the primary restarted; erased partial sets %s", dropped)
                self._boot = boot if isinstance(boot, str) else None
        outbox, pending = trio.open_memory_channel[Frame](OUTBOX_FRAMES)
        with trio.CancelScope() as scope:
            stream = Stream(conn, outbox, scope, session, takes_zstd(info),
                             info.get("progress") is True, info.get("receipts") is True,
                             info.get("batch") is True)
            self._streams.append(stream)
            self.status.connected_streams = len(self._streams)
            self.status.peer_node = info.get("node")
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, stream, pending)
                    await self._read(stream)
                    nursery.cancel_scope.cancel()
            except* (ProtocolError, RecordError) as group:
                self.status.bad_frames += 1
                self._error(f"dropped stream from {peer}: {_first(group)}")
            except* (OSError, trio.BrokenResourceError, trio.EndOfChannel) as group:
                broken = broken_record(_first(group))
                if broken is not None:  # what a bad checksum is to a plain link
                    self.status.bad_frames += 1
                    self._error(f"dropped stream from {peer}: {broken}")
                else:
                    self._error(f"stream from {peer} closed: {_first(group)!r}")
            finally:
                if stream in self._streams:
                    self._streams.remove(stream)
                self.status.connected_streams = len(self._streams)
                with trio.CancelScope(shield=True):
                    await conn.aclose()
        if stream.dropped:
            self._refused(peer, "not-reading", stream.dropped)

    async def _accept(self, conn: Link, info: dict[str, Any]) -> None:
        """Check the primary's HELLO, follow what it says, and answer it.

        Raises:
            ProtocolError: the HELLO is malformed.
            Refused: the primary may not be served (version, cluster, generation).
            Rejected: it has MAX_STREAMS streams open already.
        """
        ident = self.staging.identity
        if info.get("role") != "primary":
            raise ProtocolError(f"peer is a {info.get('role')!r}, not a primary")
        if info.get("version") != PROTOCOL_VERSION:
            raise Refused(f"peer speaks protocol {info.get('version')}, "
                          f"this secondary speaks {PROTOCOL_VERSION}")
        cluster = info.get("cluster")
        if not isinstance(cluster, str) or not cluster:
            raise ProtocolError("HELLO without a cluster id")
        # The whole HELLO is checked before it changes anything (joining a cluster).
        for name in ("session", "stream", "streams", "generation", "node"):
            if name not in info:
                raise ProtocolError(f"HELLO without {name}")
        generation = info["generation"]
        if type(generation) is not int:
            raise ProtocolError(f"HELLO with generation {generation!r}")
        if str(info["session"]) == self._session and len(self._streams) >= MAX_STREAMS:
            raise Rejected("too-many-streams", f"this primary has {MAX_STREAMS} streams open "
                           "already")
        if ident.cluster is not None and cluster != ident.cluster:
            raise Refused(f"peer belongs to cluster {cluster}, this replica to {ident.cluster}")
        if generation < ident.generation:
            raise Refused(f"primary {info['node']} is of generation {generation}, which is "
                          f"stale: this node is at generation {ident.generation} (a newer "
                          "primary was promoted); rejoin it as a secondary instead")
        if ident.cluster is None:
            ident.cluster = cluster
            self.staging.save_identity()
            log.info("joined cluster %s", cluster)
        if generation > ident.generation:
            follow_generation(self.staging, info.get("history"), generation, self.replica)
        extra = self.on_hello(info)  # a rejoin: what this node changed on its own
        await conn.send(hello(role="secondary", version=PROTOCOL_VERSION, node=ident.node,
                              cluster=ident.cluster, generation=ident.generation,
                              applied=self.staging.applied,
                              syncing=self.staging.syncing,
                              **({"compress": ZSTD} if takes_zstd(info) else {}),
                              **({"receipts": True} if info.get("receipts") is True else {}),
                              **({"batch": True} if info.get("batch") is True else {}),
                              **extra))

    async def _writer(self, stream: Stream, frames: trio.MemoryReceiveChannel[Frame]
                      ) -> None:
        try:
            async for frame in frames:
                batch = [frame]
                while True:
                    try:
                        batch.append(frames.receive_nowait())
                    except trio.WouldBlock:
                        break
                await stream.conn.send(*batch)
                stream.wrote(len(batch))
        finally:
            stream.scope.cancel()  # no more sends: nobody waits for them (``drained``)
            stream.wrote(0)

    async def _read(self, stream: Stream) -> None:
        while True:
            frame = await stream.conn.receive()
            if frame.type == FrameType.RESET_TO:
                set_id = parse_applied(frame)
                log.info("sync from the primary (an initial sync, or a rejoin's: what "
                         "diverged): set %d brings the replica up to date", set_id)
                self.on_reset(set_id)
                continue
            if frame.type == FrameType.RECORD:
                raws = [frame.payload]
            elif frame.type == FrameType.RECORDS_ZSTD and stream.compressed:
                raws = parse_records(frame)
            elif frame.type == FrameType.RECORDS and stream.batched:
                raws = parse_plain_records(frame)
            else:
                raise ProtocolError(f"unexpected {frame.type.name} frame from the primary")
            self.status.received_wire_bytes += frame.wire_size
            # Checked whole, held without their data: raw, which holds it, is staged.
            records = [Record.decode(raw, data=False) for raw in raws]
            self.status.received += len(raws)
            self.status.received_bytes += sum(map(len, raws))
            if stream.receipts:  # before the stager runs: it may take trio's thread a while
                acknowledge(stream, received([(r.set, r.seq) for r in records]))
            for record, raw in zip(records, raws, strict=True):
                await self.stager.put(stream, record, raw)


async def _tell(conn: Link, text: str) -> None:
    """Say why in an ERROR frame (if the peer takes it within a second), then close."""
    with trio.move_on_after(1):
        try:
            await conn.send(Frame(FrameType.ERROR, text.encode()))
        except trio.BrokenResourceError:
            pass  # the peer is gone already; it was refused all the same
    await conn.aclose()


def takes_zstd(hello: dict[str, Any]) -> bool:
    """Whether the primary's HELLO offers zstd-compressed records (it is then taken)."""
    offer = hello.get("compress")
    return isinstance(offer, list) and ZSTD in offer


def _peer(stream: trio.SocketStream) -> tuple[str, str]:
    """The peer's host, and its host:port for the log."""
    try:
        host, port = stream.socket.getpeername()[:2]
        return str(host), f"{host}:{port}"
    except OSError:
        return "?", "?"
