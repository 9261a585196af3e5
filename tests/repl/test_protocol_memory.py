"""The replication protocol in memory: a real sender and a real receiver, no sockets.

The primary's journal and the secondary's staging store are real (LMDB and
log files in a tmp dir); only the network is not. The sender's dialer gets
its streams from ``Net`` (a ``Connect``), which makes each one a
``trio.testing.memory_stream_pair`` and hands the other end to the
receiver (``Receiver.serve_stream``). Every test runs on trio's autojump
clock: timeouts, retry pacing and the stall watchdog run on virtual time,
so a test that waits ten seconds of it takes milliseconds, and nothing
needs root, FUSE or a process of its own. The same conversation over TCP,
TLS, real daemons and a FUSE mount is what tests/repl/test_replication.py,
test_wire_faults.py and test_tls.py run end to end.

Where a test waits for the two sides to finish what they can do, it waits
for every task to be blocked (``wait_all_tasks_blocked``), which trio
gives precedence over a jump of the clock: what they did is then all done,
and no virtual time went by.
"""

from __future__ import annotations

import errno
import logging
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

import store.records as records_module
from repl.diverge import Divergence
from repl.link import FrameDialer
from repl.primary.sender import COALESCE_SECONDS, Sender
from repl.protocol import (
    MAGIC,
    PROTOCOL_VERSION,
    Connection,
    Frame,
    FrameReader,
    FrameType,
    hello,
    parse_hello,
    parse_plain_records,
    parse_records,
    staged,
)
from repl.secondary.gate import HANDSHAKE_SECONDS, Gate
from repl.secondary.receiver import Receiver
from store.journal import Journal
from store.records import Op, Record, peek_key
from store.staging import Staging
from tests.repl.test_protocol import raw_frame

SEED = 7  # the sender's --scramble: records spread over the streams at random, shuffled


# --- the network --------------------------------------------------------------------------


class Tap(trio.abc.Stream):
    """The secondary's end of a stream, noting the (set, seq) of each record that came
    in over it, in the order they came (valid traffic only)."""

    def __init__(self, inner: trio.abc.Stream, index: int,
                 seen: list[tuple[int, tuple[int, int]]]) -> None:
        self.inner, self.index, self.seen = inner, index, seen
        self._magic = len(MAGIC)
        self._frames = FrameReader()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = bytes(await self.inner.receive_some(max_bytes))
        skip = min(self._magic, len(data))
        self._magic -= skip
        self._frames.feed(data[skip:])
        while (frame := self._frames.next()) is not None:
            raws = ([frame.payload] if frame.type == FrameType.RECORD else
                    parse_records(frame) if frame.type == FrameType.RECORDS_ZSTD else
                    parse_plain_records(frame) if frame.type == FrameType.RECORDS else [])
            self.seen += [(self.index, peek_key(raw)) for raw in raws]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


Pair = trio.StapledStream[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]


class Fails(trio.abc.Stream):
    """The primary's end of a stream that fails once the handshake is through (the
    primary's first two sends: its magic, its HELLO): *passes* bytes more arrive,
    then the stream breaks (the secondary reads the end of it, the primary's send
    fails), or with *hole* every byte after them is lost without a word. Sets
    *failed* then."""

    def __init__(self, inner: Pair, passes: int, hole: bool, failed: trio.Event) -> None:
        self.inner, self.passes, self.hole, self.failed = inner, passes, hole, failed
        self._handshake = 2

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._handshake:
            self._handshake -= 1
        elif len(data) > self.passes:
            data, self.passes = data[: self.passes], 0
            await self.inner.send_all(data)
            self.failed.set()
            if self.hole:
                return
            await self.inner.send_stream.aclose()
            raise trio.BrokenResourceError("the link broke (in memory)")
        else:
            self.passes -= len(data)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.inner.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Net:
    """The network between a primary's sender and a secondary's receiver, in memory:
    the sender's ``Connect``. The receiver serves the other end of each stream."""

    receiver: Receiver
    nursery: trio.Nursery
    down: bool = False  # connecting fails, as to a host that cannot be reached
    opened: int = 0
    seen: list[tuple[int, tuple[int, int]]] = field(default_factory=list)  # stream, key
    failed: trio.Event = field(default_factory=trio.Event)  # a stream failed (see fail)
    _fail: tuple[int, bool] | None = None

    def fail(self, passes: int, hole: bool = False) -> None:
        """Make the next stream opened fail after *passes* bytes (see Fails)."""
        self._fail = (passes, hole)

    async def __call__(self) -> trio.abc.Stream:
        if self.down:
            raise OSError(errno.EHOSTUNREACH, "no route to host (in memory)")
        ours, theirs = trio.testing.memory_stream_pair()
        index, self.opened = self.opened, self.opened + 1
        self.nursery.start_soon(self.receiver.serve_stream, Tap(theirs, index, self.seen),
                                f"memory:{index}")
        if self._fail is None:
            return ours
        (passes, hole), self._fail = self._fail, None
        return Fails(ours, passes, hole, self.failed)


# --- the two sides ------------------------------------------------------------------------


@dataclass
class Secondary:
    staging: Staging
    receiver: Receiver
    complete: trio.Event = field(default_factory=trio.Event)  # a set is complete: replaced

    def completed(self) -> None:
        self.complete.set()
        self.complete = trio.Event()

    def apply(self) -> None:
        """What the applier tells the primary: each set complete after the last applied
        (the replica itself is left alone: tests/repl/test_applier.py applies sets)."""
        last = self.staging.applicable_through()
        if last > self.staging.applied:
            self.staging.finish(last)
            self.receiver.report_applied(last)


@asynccontextmanager
async def secondary(tmp_path: Path, applies: bool = False) -> AsyncIterator[Secondary]:
    """A receiver staging into *tmp_path*/staging, serving until the block ends; with
    *applies*, each complete set is reported applied at once."""
    staging = Staging(tmp_path / "staging")
    sec = Secondary(staging, Receiver(staging, Gate(None), lambda: None, lambda _: None))

    def complete() -> None:
        if applies:
            sec.apply()
        sec.completed()

    sec.receiver.on_complete = complete
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sec.receiver.serve, [])
            yield sec
            nursery.cancel_scope.cancel()
    finally:
        staging.close()


def stall_staging(sec: Secondary, monkeypatch: pytest.MonkeyPatch) -> trio.Event:
    """Hold *sec*'s stager (nothing is staged or acknowledged) until the event returned
    is set."""
    free = trio.Event()
    stage = sec.receiver.stager._stage

    async def stalled(batch: list[Any]) -> None:
        await free.wait()
        await stage(batch)

    monkeypatch.setattr(sec.receiver.stager, "_stage", stalled)
    return free


def sender_over(net: Net, journal: Journal, **options: Any) -> Sender:
    """A primary's sender of *journal*, dialing over *net*."""
    return Sender(journal, FrameDialer("memory", net, None), **options)


@asynccontextmanager
async def running(sender: Sender) -> AsyncIterator[Sender]:
    """*sender* replicating, until the block ends."""
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        yield sender
        nursery.cancel_scope.cancel()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    journal = Journal(tmp_path / "journal")
    yield journal
    journal.close()


def write_set(journal: Journal, writes: int = 6) -> list[Record]:
    """Journal one set of *writes* writes of a file (their records all of one size),
    closed and durable; returns its records."""
    set_id = journal.set
    for n in range(writes):
        journal.append(Op.WRITE, path=b"f", offset=n * 300, data=bytes([65 + n % 26]) * 300)
    journal.close_set()
    journal.sync()
    return [r for r in journal.records(set_id) if r.set == set_id]


def staged_records(staging: Staging, set_id: int) -> list[Record]:
    return list(staging.records(set_id))


async def until_complete(sec: Secondary, set_id: int) -> None:
    """Wait (virtual time) until *set_id* is staged whole."""
    with trio.fail_after(60):
        while not ((state := sec.staging.state(set_id)) and state.complete):
            await sec.complete.wait()


async def until_applied(sender: Sender, set_id: int) -> None:
    with trio.fail_after(60):
        await sender.wait_applied(set_id)


# --- handshake ----------------------------------------------------------------------------


async def test_handshake_ok_identity_applied_and_rejoin_answer(
        tmp_path: Path, journal: Journal, autojump_clock: trio.abc.Clock) -> None:
    """Each stream's HELLO and its answer: the secondary joins the primary's cluster and
    names itself, says which set it applied last (the primary ships from the one
    after), what it changed on its own (a rejoin), and takes zstd."""
    for _ in range(3):
        write_set(journal)
    third = write_set(journal)
    async with secondary(tmp_path) as sec, trio.open_nursery() as nursery:
        sec.staging.finish(3)  # the replica holds sets 1 to 3 already
        ours = Divergence({b"d"}, {b"f": [(0, 4096)]})
        asked: list[dict[str, Any]] = []

        def on_hello(info: dict[str, Any]) -> dict[str, Any]:
            asked.append(info)
            return {"rejoin": ours.to_json()}

        sec.receiver.on_hello = on_hello
        net = Net(sec.receiver, nursery)
        brought_up: list[tuple[int, int | None, Divergence | None]] = []
        sender = sender_over(net, journal, streams=3)

        def bring_up(applied: int, syncing: int | None, rejoin: Divergence | None
                     ) -> int | None:
            brought_up.append((applied, syncing, rejoin))
            return None  # stream on from the set after *applied*

        sender.bring_up = bring_up
        async with running(sender):
            await until_complete(sec, 4)
            await wait_all_tasks_blocked()

            ident = journal.identity
            assert [(i["role"], i["node"], i["cluster"], i["generation"], i["stream"],
                     i["streams"], i["version"]) for i in asked] == [
                ("primary", ident.node, ident.cluster, ident.generation, n, 3,
                 PROTOCOL_VERSION) for n in range(3)]
            assert len({i["session"] for i in asked}) == 1, "one session, three streams"
            assert sec.staging.identity.cluster == ident.cluster, "joined the cluster"
            assert brought_up == [(3, None, ours)]
            st = sender.status
            assert (st.connected, st.streams, st.peer_node, st.applied, st.compressing) == (
                True, 3, sec.staging.identity.node, 3, True)
            r = sec.receiver.status
            assert (r.connected_streams, r.peer_node, r.refused) == (3, ident.node, 0)
            assert staged_records(sec.staging, 4) == third
            assert r.received == len(third), "sets 1 to 3 were not sent again"
            nursery.cancel_scope.cancel()


async def test_handshake_err_silent_peer_dropped(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """A peer that opens a stream and says nothing is dropped after the gate's deadline
    (virtual time), and counted."""
    async with secondary(tmp_path) as sec, trio.open_nursery() as nursery:
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(sec.receiver.serve_stream, theirs, "memory:silent")
        start = trio.current_time()
        with trio.fail_after(60):
            await Connection(ours).expect_magic()  # the secondary speaks first
            with pytest.raises(trio.EndOfChannel):
                await Connection(ours).receive()
        assert trio.current_time() - start == HANDSHAKE_SECONDS
        assert sec.receiver.status.refused_by == {"no-handshake": 1}
        assert sec.receiver.status.errors == [
            "refused connection from memory:silent (no-handshake): no handshake within 5s"]
        nursery.cancel_scope.cancel()


# --- out of order -------------------------------------------------------------------------


async def test_out_of_order_ok_sets_over_streams_staged_whole(
        tmp_path: Path, journal: Journal, autojump_clock: trio.abc.Clock) -> None:
    """Three sets' records shuffled over three streams arrive out of order, every stream
    carrying some; each set is staged whole, record for record as journaled, and
    acknowledged to the primary."""
    sets = [write_set(journal, writes=12) for _ in range(3)]
    async with secondary(tmp_path) as sec, trio.open_nursery() as nursery:
        net = Net(sec.receiver, nursery)
        async with running(sender_over(net, journal, streams=3, scramble=SEED)) as sender:
            for set_id in (1, 2, 3):
                await until_complete(sec, set_id)
            await wait_all_tasks_blocked()

            arrived = [key for _, key in net.seen]
            assert sorted(arrived) == [(r.set, r.seq) for s in sets for r in s]
            assert arrived != sorted(arrived), "they arrived out of order"
            assert {stream for stream, _ in net.seen} == {0, 1, 2}
            for set_id, records in enumerate(sets, start=1):
                assert staged_records(sec.staging, set_id) == records
            assert sender.status.staged == sum(map(len, sets))
            assert sender.status.inflight_bytes == 0
            assert sec.receiver.status.duplicates == 0
            nursery.cancel_scope.cancel()


async def test_coalesce_ok_lone_set_at_once_a_steady_stream_shares_a_send(
        tmp_path: Path, journal: Journal, autojump_clock: trio.abc.Clock) -> None:
    """A set journaled after an idle spell is staged with no time gone by. The next
    two, journaled within COALESCE_SECONDS of that send, wait until then and go
    together: staged whole at the same instant."""
    async with secondary(tmp_path) as sec, trio.open_nursery() as nursery:
        net = Net(sec.receiver, nursery)
        async with running(sender_over(net, journal, streams=1)) as sender:
            await trio.sleep(1)  # connected, and idle since
            sent = trio.current_time()
            write_set(journal)
            sender.notify()
            await until_complete(sec, 1)
            assert trio.current_time() == sent, "a lone set waits for nothing"

            for _ in range(2):
                await trio.sleep(COALESCE_SECONDS / 4)
                write_set(journal)
                sender.notify()
            await until_complete(sec, 2)
            assert trio.current_time() == pytest.approx(sent + COALESCE_SECONDS)
            state = sec.staging.state(3)
            assert state is not None and state.complete, "set 3 went with set 2"
            nursery.cancel_scope.cancel()


# --- a broken stream, and the retransmit ----------------------------------------------------


async def test_retransmit_ok_stream_breaks_mid_set(
        tmp_path: Path, journal: Journal, autojump_clock: trio.abc.Clock) -> None:
    """A stream breaks inside a frame in the middle of a set: the set is not complete,
    the session ends, and the next one sends every record of it again; the secondary
    drops those it held and stages the set whole. One record a frame (framed=False,
    as over SCSI), so a stream carries several."""
    records = write_set(journal, writes=16)
    frame = Frame(FrameType.RECORD, records[0].encode()).wire_size
    async with secondary(tmp_path) as sec, trio.open_nursery() as nursery:
        net = Net(sec.receiver, nursery)
        net.fail(passes=2 * frame + frame // 2)  # into its third record frame
        async with running(sender_over(net, journal, streams=3, scramble=SEED,
                                       compress_level=0, framed=False)) as sender:
            with trio.fail_after(60):
                await net.failed.wait()
            net.down = True  # hold the next session back, to look at what is staged
            await wait_all_tasks_blocked()

            state = sec.staging.state(1)
            assert state is not None and not state.complete
            held = staged_records(sec.staging, 1)
            arrived = sorted(key for _, key in net.seen)
            assert 0 < len(held) < len(records)
            assert [(r.set, r.seq) for r in held] == arrived, "whole frames only"
            assert [seq for stream, (_, seq) in net.seen if stream == 0], "some of stream 0"
            assert (sender.status.connected, sender.status.sessions) == (False, 1)
            assert "lost" in sender.status.errors[-1], sender.status.errors

            net.down = False
            await until_complete(sec, 1)
            await wait_all_tasks_blocked()
            assert staged_records(sec.staging, 1) == records
            assert sec.receiver.status.duplicates == len(held), "sent again, dropped"
            assert (sender.status.connected, sender.status.sessions) == (True, 2)
            assert sender.status.inflight_bytes == 0
            nursery.cancel_scope.cancel()


async def test_retransmit_ok_black_hole_ends_the_session(
        tmp_path: Path, journal: Journal, autojump_clock: trio.abc.Clock) -> None:
    """A stream that swallows what it is given, without breaking: with records in
    flight and no acknowledgement for stall_seconds (virtual), the primary ends the
    session, and the next one gets the set through."""
    records = write_set(journal)
    async with secondary(tmp_path) as sec, trio.open_nursery() as nursery:
        net = Net(sec.receiver, nursery)
        net.fail(passes=0, hole=True)
        async with running(sender_over(net, journal, streams=1, stall_seconds=10)) as sender:
            start = trio.current_time()
            await until_complete(sec, 1)
            assert 10 < trio.current_time() - start < 13
            assert "no acknowledgement for 10s with 7 records in flight" in \
                sender.status.errors[-1], sender.status.errors
            assert sender.status.sessions == 2
            assert staged_records(sec.staging, 1) == records
            nursery.cancel_scope.cancel()


# --- the stall watchdog -------------------------------------------------------------------


async def test_stall_watchdog_ok_reported_then_cleared(
        tmp_path: Path, journal: Journal, caplog: pytest.LogCaptureFixture,
        autojump_clock: trio.abc.Clock) -> None:
    """A backlog and an unreachable secondary: after stall_seconds of virtual time the
    sender reports a stall, in status and in one log line; once the secondary is back
    and applies the backlog, the stall is over."""
    write_set(journal)
    caplog.set_level(logging.INFO, logger="replfs.sender")
    async with secondary(tmp_path, applies=True) as sec, trio.open_nursery() as nursery:
        net = Net(sec.receiver, nursery, down=True)
        async with running(sender_over(net, journal, stall_seconds=10)) as sender:
            await trio.sleep(9.5)  # virtual: the stall is about time going by
            assert not sender.status.stalled
            await trio.sleep(2)
            assert sender.status.stalled
            stalls = [r.getMessage() for r in caplog.records if "stalled" in r.getMessage()]
            assert len(stalls) == 1, stalls
            assert "memory is 1 sets behind, no progress for 1" in stalls[0]
            assert stalls[0].endswith("(unreachable)"), stalls[0]
            assert "no route to host" in sender.status.errors[-1]

            net.down = False
            await until_applied(sender, 1)
            await trio.sleep(1.5)  # the watchdog's next look
            assert not sender.status.stalled
            assert "replication is progressing again (memory)" in caplog.messages
            nursery.cancel_scope.cancel()


async def test_stall_watchdog_ok_a_long_apply_is_progress(
        tmp_path: Path, journal: Journal, autojump_clock: trio.abc.Clock) -> None:
    """A set staged whole and applied for longer than stall_seconds: the secondary
    tells the primary which record its applier reached, and that is progress, not a
    stall; once the applier stops moving, the stall is reported."""
    write_set(journal)
    async with secondary(tmp_path) as sec, trio.open_nursery() as nursery:
        async with running(sender_over(Net(sec.receiver, nursery), journal,
                                       stall_seconds=10)) as sender:
            await until_complete(sec, 1)
            for seq in range(6):  # one record every 4 s (virtual): 24 s in all
                sec.receiver.report_applying(1, seq)
                await trio.sleep(4)
            assert sec.staging.applied == 0 and not sender.status.stalled
            sec.receiver.report_applying(1, 5)  # the same record again: not progress
            await trio.sleep(11)
            assert sender.status.stalled
            nursery.cancel_scope.cancel()


# --- fencing ------------------------------------------------------------------------------


async def test_fencing_err_stale_primary_refused(
        tmp_path: Path, journal: Journal, autojump_clock: trio.abc.Clock) -> None:
    """A primary of an older generation than the secondary's is refused at its HELLO,
    says so, and stages nothing; the same primary leading as the newer generation is
    served."""
    write_set(journal)
    cluster = journal.identity.cluster
    assert cluster is not None
    async with secondary(tmp_path) as sec, trio.open_nursery() as nursery:
        sec.staging.identity.cluster, sec.staging.identity.generation = cluster, 2
        sec.staging.save_identity()
        net = Net(sec.receiver, nursery)
        async with running(sender_over(net, journal, streams=2)) as sender:
            await trio.sleep(5.5)  # virtual: a few attempts, a second apart
            await wait_all_tasks_blocked()
            assert 3 <= sender.status.error_count <= 6
            assert not sender.status.connected and sender.status.sessions == 0
            want = (f"refused by memory: primary {journal.identity.node} is of generation 1, "
                    "which is stale: this node is at generation 2")
            assert all(e.startswith(want) for e in sender.status.errors), sender.status.errors
            assert sec.receiver.status.refused_by == {"not-served": sender.status.error_count}
            assert sec.staging.sets() == {} and sec.receiver.status.received == 0
            assert sec.staging.identity.generation == 2

            journal.lead(2, cluster)
            await until_complete(sec, 1)
            assert sender.status.connected and sec.staging.identity.generation == 2
            nursery.cancel_scope.cancel()


# --- bad frames ---------------------------------------------------------------------------

CLUSTER = "c1c1c1c1c1c1c1c1"
RECORD = Record(Op.WRITE, 1, 0, path=b"f", data=b"x" * 100)
GOOD = Frame(FrameType.RECORD, RECORD.encode()).encode()


async def raw_primary(sec: Secondary, nursery: trio.Nursery) -> Connection:
    """A primary of our own, past the handshake: it sends what a test gives it."""
    ours, theirs = trio.testing.memory_stream_pair()
    nursery.start_soon(sec.receiver.serve_stream, theirs, "memory:raw")
    conn = Connection(ours)
    await conn.send_magic()
    await conn.expect_magic()
    await conn.send(hello(role="primary", version=PROTOCOL_VERSION, cluster=CLUSTER,
                          node="a0a0a0a0a0a0a0a0", generation=1, session="5e5e", boot="b0",
                          stream=0, streams=1, history=[]))
    assert parse_hello(await conn.receive())["role"] == "secondary"
    conn.handshake_done()
    return conn


def flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :]


BAD_FRAMES = {
    # what the stream carries after the handshake -> the error it is dropped with
    "garbage": (b"\xff" * 64, "bad frame length 4294967295"),
    "checksum": (flip(GOOD, -1), "frame checksum mismatch"),
    "checksum-payload": (flip(GOOD, 40), "frame checksum mismatch"),
    # cut short, and the next frame taken for its end
    "truncated": (GOOD[:-20] + GOOD, "frame checksum mismatch"),
    "unknown-type": (raw_frame(99, b"{}"), "unknown frame type 99"),
    "unexpected-type": (Frame(FrameType.APPLIED, bytes(8)).encode(),
                        "unexpected APPLIED frame from the primary"),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
async def test_bad_frames_err_stream_dropped_nothing_staged(
        tmp_path: Path, case: str, autojump_clock: trio.abc.Clock) -> None:
    """A frame that is not what it says: the secondary drops the stream, counts a bad
    frame, says why in one line, and stages nothing of it."""
    raw, error = BAD_FRAMES[case]
    async with secondary(tmp_path) as sec, trio.open_nursery() as nursery:
        conn = await raw_primary(sec, nursery)
        await conn.stream.send_all(raw)
        with trio.fail_after(10), pytest.raises(trio.EndOfChannel):  # the secondary closed it
            await conn.receive()
        r = sec.receiver.status
        assert r.errors == [f"dropped stream from memory:raw: {error}"]
        assert (r.bad_frames, r.received, r.connected_streams) == (1, 0, 0)
        assert sec.staging.sets() == {}
        nursery.cancel_scope.cancel()


async def test_bad_frames_err_truncated_at_the_end(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """A frame cut short by the end of the stream is not used: nothing staged."""
    async with secondary(tmp_path) as sec, trio.open_nursery() as nursery:
        conn = await raw_primary(sec, nursery)
        await conn.stream.send_all(GOOD[:-1])
        await conn.stream.aclose()
        await wait_all_tasks_blocked()
        r = sec.receiver.status
        assert r.errors == ["stream from memory:raw closed: EndOfChannel()"]
        assert (r.received, r.connected_streams) == (0, 0)
        assert sec.staging.sets() == {}
        nursery.cancel_scope.cancel()


async def test_bad_frames_ok_good_frame_staged(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """The frame the bad ones are made of is staged and acknowledged: it is not the
    record that they are refused for."""
    async with secondary(tmp_path) as sec, trio.open_nursery() as nursery:
        conn = await raw_primary(sec, nursery)
        await conn.stream.send_all(GOOD)
        with trio.fail_after(10):
            frame = await conn.receive()
        assert frame == staged([(1, 0)])
        assert staged_records(sec.staging, 1) == [RECORD]
        nursery.cancel_scope.cancel()


async def test_backpressure_ok_records_waiting_to_be_staged_hold_their_bytes_once(
        tmp_path: Path, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    """What the receiver read and has not staged yet (as much as a primary's window)
    is in memory once, as the bytes that came and will be staged: a decoded copy of
    each record's data is not kept beside them."""
    async with secondary(tmp_path) as sec, trio.open_nursery() as nursery:
        stager_free = stall_staging(sec, monkeypatch)
        conn = await raw_primary(sec, nursery)
        data = bytes(1 << 20)
        await conn.send(*[Frame(FrameType.RECORD, Record(
            Op.WRITE, 1, seq, path=b"f", offset=seq << 20, data=data).encode())
            for seq in range(8)])
        tracemalloc.start(1)
        try:
            await wait_all_tasks_blocked()  # every record read and waiting to be staged
            decoded = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(True, records_module.__file__)])
        finally:
            tracemalloc.stop()
        assert sec.receiver.status.received == 8
        assert sum(stat.size for stat in decoded.statistics("filename")) < 1 << 20
        stager_free.set()
        while sec.receiver.status.staged < 8:  # no deadline: staging syncs in a thread
            await conn.receive()
        assert [r.data for r in staged_records(sec.staging, 1)] == [data] * 8
        nursery.cancel_scope.cancel()


async def test_backpressure_ok_small_records_in_flight_bounded_by_count(
        tmp_path: Path, journal: Journal, autojump_clock: trio.abc.Clock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Records sent and not yet acknowledged are held to WINDOW_RECORDS (and a batch),
    not only to the window's bytes: each costs the sender an entry of its own, and an
    initial sync's namespace records are ~100 bytes, 160,000 of them to 16 MiB."""
    monkeypatch.setattr("repl.primary.sender.WINDOW_RECORDS", 50)
    monkeypatch.setattr("repl.primary.sender.BATCH_BYTES", 1000)
    for n in range(500):
        journal.append(Op.CHMOD, path=b"f%d" % n, mode=0o644)
    journal.close_set()
    journal.sync()
    async with secondary(tmp_path) as sec, trio.open_nursery() as nursery:
        stager_free = stall_staging(sec, monkeypatch)
        net = Net(sec.receiver, nursery)
        async with running(sender_over(net, journal, compress_level=0)) as sender:
            await wait_all_tasks_blocked()  # nothing acknowledged: the sender waits
            assert 50 < len(sender._inflight) <= 50 + 1000 // 30, len(sender._inflight)
            assert sender.status.inflight_bytes < 1 << 20, "far from the window's bytes"
            stager_free.set()
            await until_complete(sec, 1)
            assert len(staged_records(sec.staging, 1)) == 501
            nursery.cancel_scope.cancel()


async def test_bad_frames_err_not_replfs_refused_at_the_door(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """A peer that does not open with the magic is told why (our magic, then an
    ERROR frame) and refused, before anything of the replica changes."""
    async with secondary(tmp_path) as sec, trio.open_nursery() as nursery:
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(sec.receiver.serve_stream, theirs, "memory:raw")
        await ours.send_all(b"GET / HTTP/1.1\r\n\r\n")
        conn = Connection(ours)
        with trio.fail_after(10):
            await conn.expect_magic()
            frame = await conn.receive()
        assert frame.type == FrameType.ERROR
        assert frame.payload == b"peer is not replfs (it sent b'GET / HT')"
        with pytest.raises(trio.EndOfChannel):
            await conn.receive()
        r = sec.receiver.status
        assert r.refused_by == {"protocol": 1} and r.bad_frames == 0
        assert sec.staging.identity.cluster is None and sec.staging.sets() == {}
        nursery.cancel_scope.cancel()


async def test_bad_frames_err_from_the_secondary_end_the_session(
        tmp_path: Path, journal: Journal, autojump_clock: trio.abc.Clock) -> None:
    """A secondary of our own that answers the HELLO, then sends an acknowledgement
    with a wrong checksum: the primary ends the session with the reason."""
    write_set(journal)

    async def fake_secondary(stream: trio.abc.Stream) -> None:
        conn = Connection(stream)
        await conn.expect_magic()
        await conn.send_magic()
        parse_hello(await conn.receive())
        await conn.send(hello(role="secondary", version=PROTOCOL_VERSION, node="b0", applied=0))
        await stream.send_all(flip(staged([(1, 0)]).encode(), -1))

    async with trio.open_nursery() as nursery:

        async def connect() -> trio.abc.Stream:
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(fake_secondary, theirs)
            return ours

        sender = Sender(journal, FrameDialer("memory", connect, None), streams=1)
        await nursery.start(sender.run)
        with trio.fail_after(5):
            while not sender.status.errors:
                await sender.applied_event.wait()
        assert sender.status.errors[0] == (
            "replication to memory lost: ProtocolError('frame checksum mismatch')")
        nursery.cancel_scope.cancel()
