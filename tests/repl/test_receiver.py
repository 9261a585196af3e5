"""The receiver, end to end: a real secondary, fed by a raw replfs client.

The client speaks the handshake and then sends exactly the records a test
picks, in the order it picks, so what the secondary acknowledges, and when,
is seen frame by frame.
"""

from __future__ import annotations

import signal
import stat
from pathlib import Path

import trio

from repl.protocol import Frame, FrameType, parse_keys, record_frames
from repl.secondary.stager import INLINE_SYNC_BYTES
from store.records import Op, Record
from tests.powercut.harness import simulator
from tests.repl.peers import LOG_TIMEOUT, acknowledged, drain, open_raw, record_frame
from tests.support import read_staging, secondary, status, wait_applied

CLUSTER = "c1c1c1c1c1c1c1c1"


def test_receiver_receipts_ok_received_then_staged_only_when_asked(tmp_path: Path) -> None:
    """A primary that asks for receipts (--fsync received) gets each frame's records as
    RECEIVED before any of them as STAGED; one that does not gets STAGED alone."""
    create = Record(Op.CREATE, 1, 0, path=b"a", mode=stat.S_IFREG | 0o644)
    sync = Record(Op.SYNC, 1, 1, count=1)
    with secondary(tmp_path / "r") as sec:

        async def session(receipts: bool) -> list[tuple[FrameType, tuple[int, int]]]:
            conn, reply = await open_raw(sec.port, CLUSTER, **(
                {"receipts": True} if receipts else {}))
            assert reply.get("receipts", False) is receipts
            await conn.send(record_frame(create), record_frame(sync))
            acks: list[tuple[FrameType, tuple[int, int]]] = []
            with trio.fail_after(LOG_TIMEOUT):
                while sum(kind == FrameType.STAGED for kind, _ in acks) < 2:
                    frame = await conn.receive()
                    if frame.type in (FrameType.RECEIVED, FrameType.STAGED):
                        acks += [(frame.type, key) for key in parse_keys(frame)]
            await conn.aclose()
            return acks

        acks = trio.run(session, True)
        for key in [(1, 0), (1, 1)]:  # each once as received, then once as staged
            assert [kind for kind, k in acks if k == key] == [FrameType.RECEIVED,
                                                              FrameType.STAGED]
        assert trio.run(session, False) == [(FrameType.STAGED, (1, 0)),
                                            (FrameType.STAGED, (1, 1))]


def test_receiver_stop_ok_stages_what_it_acknowledged_as_received(tmp_path: Path) -> None:
    """Records acknowledged as received and not yet staged when the secondary is asked
    to stop (a promote stops it first) are staged before it exits: the primary that
    took the receipt may be gone. Here the first record's staging (large: staged in
    a thread) waits for a held disk while the second is received, and the stop comes
    before the disk answers."""
    create = Record(Op.WRITE, 1, 0, path=b"a", data=bytes(INLINE_SYNC_BYTES))
    sync = Record(Op.SYNC, 1, 1, count=1)
    with simulator(tmp_path / "lower", tmp_path / "disk") as sim:
        replica = sim.mountpoint / "r"
        with secondary(replica) as sec:
            assert sec.proc is not None

            async def session() -> None:
                conn, _ = await open_raw(sec.port, CLUSTER, receipts=True)
                with sim.holding():
                    for record in (create, sync):
                        await conn.send(record_frame(record))
                        with trio.fail_after(LOG_TIMEOUT):
                            frame = await conn.receive()
                        assert (frame.type, parse_keys(frame)) == (
                            FrameType.RECEIVED, [(record.set, record.seq)])
                    sec.proc.send_signal(signal.SIGTERM)
                    await trio.to_thread.run_sync(sec.wait_for, "got SIGTERM")
                await conn.aclose()

            trio.run(session)
            assert sec.proc.wait(LOG_TIMEOUT) == 0
        state, records = read_staging(replica)[1]
        assert records == [create, sync] and state.complete


def test_receiver_records_frame_ok_a_set_in_one_frame_only_when_agreed(tmp_path: Path
                                                                       ) -> None:
    """A primary that offers batch sends a set's records in one RECORDS frame: staged,
    acknowledged and applied as RECORD frames would be. Unagreed, such a frame is
    refused."""
    create = Record(Op.CREATE, 1, 0, path=b"a", mode=stat.S_IFREG | 0o644)
    write = Record(Op.WRITE, 1, 1, path=b"a", data=b"many records a frame")
    sync = Record(Op.SYNC, 1, 2, count=2)
    (frame,) = record_frames([r.encode() for r in (create, write, sync)], None, batch=True)
    assert frame.type == FrameType.RECORDS
    replica = tmp_path / "r"
    with secondary(replica) as sec:

        async def session(batch: bool) -> list[tuple[int, int]] | list[Frame]:
            conn, reply = await open_raw(sec.port, CLUSTER, **({"batch": True} if batch
                                                                 else {}))
            assert reply.get("batch", False) is batch
            await conn.send(frame)
            if not batch:
                return await drain(conn)
            keys = sorted(await acknowledged(conn, 3))
            await conn.aclose()
            return keys

        assert trio.run(session, True) == [(1, 0), (1, 1), (1, 2)]
        assert wait_applied(replica, 1, timeout=LOG_TIMEOUT) == 1
        assert (replica / "a").read_bytes() == b"many records a frame"
        assert trio.run(session, False) == []
        sec.wait_for("unexpected RECORDS frame")


def test_claim_5_records_acknowledged_before_their_set_is_complete(tmp_path: Path) -> None:
    """Three of a set's four records, its SYNC among them, are staged and acknowledged
    while the set cannot be complete; the fourth completes it, and it applies."""
    replica = tmp_path / "r"
    create = Record(Op.CREATE, 1, 0, path=b"a", mode=stat.S_IFREG | 0o644)
    write = Record(Op.WRITE, 1, 1, path=b"a", data=b"acknowledged early")
    mkdir = Record(Op.MKDIR, 1, 2, path=b"d", mode=stat.S_IFDIR | 0o755)
    sync = Record(Op.SYNC, 1, 3, count=3)
    with secondary(replica) as sec:

        async def session() -> None:
            conn, reply = await open_raw(sec.port, CLUSTER)
            assert reply["applied"] == 0
            await conn.send(*map(record_frame, (sync, mkdir, create)))  # seq 1 held back
            assert sorted(await acknowledged(conn, 3)) == [(1, 0), (1, 2), (1, 3)]

            st = status(replica)
            assert (st["last_complete"], st["complete_waiting"], st["last_applied"]) == (0, 0, 0)
            state, records = read_staging(replica)[1]
            assert state.sync_seen and not state.complete
            assert records == [create, mkdir, sync]
            assert sorted(p.name for p in replica.iterdir()) == []

            await conn.send(record_frame(write))
            assert await acknowledged(conn, 1) == [(1, 1)]
            await conn.aclose()

        trio.run(session)
        assert wait_applied(replica, 1, timeout=LOG_TIMEOUT) == 1
        assert (replica / "a").read_bytes() == b"acknowledged early"
        assert (replica / "d").is_dir()


def test_receiver_stage_ok_records_sent_together_staged_at_once(tmp_path: Path) -> None:
    """A set's records sent in one write (as the sender sends a batch) are staged in
    one transaction and acknowledged in one frame, after one sync: an fsync that
    waits for the secondary (--fsync remote) waits for one flush there."""
    replica = tmp_path / "r"
    records = [Record(Op.CREATE, 1, 0, path=b"a", mode=stat.S_IFREG | 0o644),
               Record(Op.WRITE, 1, 1, path=b"a", data=b"together"),
               Record(Op.SYNC, 1, 2, count=2)]
    with secondary(replica) as sec:

        async def session() -> None:
            conn, _ = await open_raw(sec.port, CLUSTER)
            await conn.send(*map(record_frame, records))
            with trio.fail_after(LOG_TIMEOUT):
                frame = await conn.receive()
            assert frame.type == FrameType.STAGED, frame
            assert sorted(parse_keys(frame)) == [(1, 0), (1, 1), (1, 2)]
            await conn.aclose()

        trio.run(session)
        assert wait_applied(replica, 1, timeout=LOG_TIMEOUT) == 1
