"""A live secondary fed bad frames, fuzzed: over a real TLS link, as its primary.

Each case opens a link with the primary's certificate, says HELLO, then sends
one frame that is not a valid one for a secondary to take: random, of an
unknown or unexpected type, with a broken checksum, a length past the bound,
a RECORD whose record does not decode (damaged, its checksum made valid
again), or a frame cut short before the link closes. The secondary must close
the link, count every complete bad frame in ``bad_frames`` (a cut one is a
closed link), and take nothing from it: the replica, what is staged, and what
it received stay as they were, and it stays up.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import xxhash
from hypothesis import event, given, settings
from hypothesis import strategies as st

from repl.errors import ProtocolError
from repl.protocol import MAX_FRAME, Frame, FrameReader, FrameType
from store.errors import RecordError
from store.records import Op, Record
from tests.fuzz import mutated
from tests.repl.peers import LOG_TIMEOUT, acknowledged, drain, open_raw, record_frame
from tests.repl.test_gate import staging_files
from tests.store.specs import reseal
from tests.store.strategies import records
from tests.support import Daemon, secondary, snapshot, status, wait_applied

CLUSTER = "c1c1c1c1c1c1c1c1"
KEPT = ("received", "last_staged", "last_complete", "last_applied",
        "sets_in_flight", "generation", "cluster")


def _damaged_record(raw: bytes) -> bytes:
    return reseal(raw[:-8]) if len(raw) >= 8 else raw


def raw_frame(kind: int, payload: bytes) -> bytes:
    """A frame with any type byte and a valid checksum."""
    body = bytes([kind]) + payload
    return (len(body).to_bytes(4, "big") + body
            + xxhash.xxh3_64_intdigest(body).to_bytes(8, "big"))


bad_records = (records(set_ids=st.integers(2, 1 << 40)).map(Record.encode)
               .flatmap(mutated).map(_damaged_record))
frames = st.one_of(
    st.builds(raw_frame, st.integers(0, 255), st.binary(max_size=200)),
    bad_records.map(lambda raw: raw_frame(FrameType.RECORD, raw)),
    st.builds(lambda body: (MAX_FRAME + 1 + body).to_bytes(4, "big"),
              st.integers(0, (1 << 32) - MAX_FRAME - 2)),
    records(set_ids=st.integers(2, 1 << 40)).map(record_frame).map(Frame.encode).flatmap(
        mutated),
)


def verdict(raw: bytes) -> str:
    """What the secondary must make of *raw* sent after the handshake, decided here:
    "bad" (a complete frame it must refuse), "cut" (incomplete), or "ok"."""
    reader = FrameReader(MAX_FRAME)
    reader.feed(raw)
    try:
        frame = reader.next()
    except ProtocolError:
        return "bad"
    if frame is None:
        return "cut"
    if frame.type == FrameType.RECORD:
        try:
            Record.decode(frame.payload)
        except RecordError:
            return "bad"
        return "ok"
    if frame.type == FrameType.RESET_TO and len(frame.payload) == 8:
        return "ok"  # an initial sync begins: valid, and not what this test sends
    return "bad"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path]]:
    """A secondary whose replica holds set 1 (one file), from a raw primary of CLUSTER."""
    replica = tmp_path_factory.mktemp("live") / "r"
    with secondary(replica) as sec:

        async def first_set() -> None:
            conn, _ = await open_raw(sec.port, CLUSTER)
            await conn.send(*map(record_frame, [
                Record(Op.CREATE, 1, 0, path=b"kept", mode=0o100644),
                Record(Op.WRITE, 1, 1, path=b"kept", data=b"the replica before"),
                Record(Op.SYNC, 1, 2, count=2)]))
            await acknowledged(conn, 3)
            await conn.aclose()

        trio.run(first_set)
        assert wait_applied(replica, 1, timeout=LOG_TIMEOUT) == 1
        yield sec, replica


@settings(max_examples=max(10, settings.default.max_examples // 2))
@given(frames)
def test_receiver_fuzz_bad_frame(live: tuple[Daemon, Path], raw: bytes) -> None:
    sec, replica = live
    kind = verdict(raw)
    event(kind)
    if kind == "ok":
        return  # a valid frame: the round trips cover those
    before = status(replica)
    tree, staged = snapshot(replica), staging_files(replica)

    async def send() -> list[Frame]:
        conn, _ = await open_raw(sec.port, CLUSTER)
        await conn.stream.send_all(raw)
        if kind == "cut":
            await conn.aclose()
            return []
        return await drain(conn)  # the secondary closes it

    assert trio.run(send) == []
    after = status(replica)
    assert after["bad_frames"] == before["bad_frames"] + (kind == "bad")
    assert {k: after[k] for k in KEPT} == {k: before[k] for k in KEPT}
    assert snapshot(replica) == tree
    assert staging_files(replica) == staged
    assert sec.proc is not None and sec.proc.poll() is None
