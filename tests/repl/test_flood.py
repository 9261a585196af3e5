"""Peers that flood a secondary: many connections, or frames as fast as they go.

Whoever floods, from whatever address (the primary's own included), the
secondary's file descriptors and memory stay bounded, each connection it
turns away is counted in ``replfs status``, and the real primary's
replication goes on. Real secondaries and sockets, except for the queue of
records waiting to be staged, watched in process.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from repl.errors import ProtocolError
from repl.protocol import (
    MAX_STREAMS,
    Connection,
    Frame,
    parse_hello,
)
from repl.secondary.gate import HANDSHAKE_SECONDS, MAX_HANDSHAKES, Gate
from repl.secondary.receiver import REFUSALS_LOGGED, Receiver
from repl.secondary.stager import OUTBOX_FRAMES, STAGE_QUEUE_BYTES, Stream
from store.records import Op, Record
from store.staging import Staging
from tests.repl.peers import (
    LOG_TIMEOUT,
    acknowledged,
    client_context,
    connect,
    open_raw,
    primary_hello,
    record_frame,
    wait_for_log,
)
from tests.repl.test_gate import Flood, wait_until
from tests.support import SECONDARY, Daemon, checkpoint, primary, secondary, status

CLUSTER = "c1c1c1c1c1c1c1c1"


def fds(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


def test_gate_admit_ok_flood_from_the_primarys_address(tmp_path: Path) -> None:
    """Silent connections from 127.0.0.1, the primary's own address, as fast as one
    thread opens them: the primary's handshakes are never pushed out (it speaks at
    once, and a silent connection makes room first; pushing out the oldest instead
    lost one of its handshakes in about one run in three, test_gate.py shows the
    rule itself), and the secondary's fds stay bounded."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec:
        idle = fds(sec)
        with Flood(sec.port, "127.0.0.1", pace=0):
            wait_until("flooded", lambda: status(replica)["refused_by"].get("busy", 0) > 400,
                       timeout=60)
            with primary(backing, mount, "--secondary", f"127.0.0.1:{sec.port}") as prim:
                for i in range(3):
                    (mount / f"f{i}").write_bytes(b"through the flood")
                    checkpoint(mount)
                    assert fds(sec) < idle + 2 * 64
                assert status(replica)["connected_streams"] == 4
        assert "refused by" not in prim.log(), prim.log()
        assert (replica / "f2").read_bytes() == b"through the flood"


def test_gate_admit_err_silent_after_tls(tmp_path: Path) -> None:
    """Links with the primary's own certificate that never send a HELLO are strangers
    still: bounded like any other (the oldest pushed out), and dropped after
    HANDSHAKE_SECONDS, each counted."""
    replica = tmp_path / "r"
    extra = 2
    with secondary(replica) as sec:

        async def silent() -> float:
            links = [await connect(sec.port, client_context())
                     for _ in range(MAX_HANDSHAKES + extra)]
            start = trio.current_time()
            st = await trio.to_thread.run_sync(status, replica)
            assert (st["handshakes"], st["refused_by"]) == (MAX_HANDSHAKES,
                                                            {"busy": extra})
            with trio.fail_after(HANDSHAKE_SECONDS * 4):
                for link in links:
                    try:
                        while await link.receive_some(65536):
                            pass  # our magic, then the close
                    except trio.BrokenResourceError:
                        pass
            for link in links:
                await trio.aclose_forcefully(link)
            return trio.current_time() - start

        took = trio.run(silent)
        assert took < HANDSHAKE_SECONDS * 2, took
        st = status(replica)
        assert st["refused_by"] == {"busy": extra, "no-handshake": MAX_HANDSHAKES}
        assert st["handshakes"] == 0 and st["cluster"] is None


def test_receiver_err_too_many_streams(tmp_path: Path) -> None:
    """A session may hold MAX_STREAMS streams; each one more is refused and told why."""
    replica = tmp_path / "r"
    with secondary(replica) as sec:

        async def flood() -> None:
            session = secrets.token_hex(8)
            conns = [(await open_raw(sec.port, CLUSTER, session=session))[0]
                     for _ in range(MAX_STREAMS)]
            for _ in range(2):
                with pytest.raises(ProtocolError, match=f"peer refused us: this primary has "
                                   f"{MAX_STREAMS} streams open already"):
                    await open_raw(sec.port, CLUSTER, session=session)
            st = await trio.to_thread.run_sync(status, replica)
            assert st["connected_streams"] == MAX_STREAMS
            # The streams it kept still work.
            await conns[-1].send(record_frame(Record(Op.UNLINK, 1, 0, path=b"x")))
            assert await acknowledged(conns[-1], 1) == [(1, 0)]
            for conn in conns:
                await conn.aclose()

        trio.run(flood)
        assert status(replica)["refused_by"] == {"too-many-streams": 2}
        assert len(wait_for_log(sec, "(too-many-streams)")) == 2


async def _blind_link(port: int) -> Connection:
    """A TLS link as PRIMARY whose socket takes in almost nothing it is sent."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    link = trio.SSLStream(trio.SocketStream(sock), client_context(), server_hostname=SECONDARY)
    await link.do_handshake()
    return Connection(link)


def test_receiver_err_not_reading(tmp_path: Path) -> None:
    """A stream that sends records as fast as it can and never reads what the secondary
    answers is dropped once OUTBOX_FRAMES acknowledgements wait for it, and counted;
    the secondary goes on serving."""
    replica = tmp_path / "r"
    record = Record(Op.WRITE, 1, 0, path=b"f", data=b"again and again")
    with secondary(replica) as sec:

        async def blind() -> int:
            conn = await _blind_link(sec.port)
            await conn.send_magic()
            await conn.send(primary_hello(CLUSTER))
            await conn.expect_magic()
            parse_hello(await conn.receive())
            conn.handshake_done()
            raw = record_frame(record).encode()
            sent = 0
            with trio.fail_after(LOG_TIMEOUT * 3):
                try:
                    while True:
                        await conn.stream.send_all(raw * 16)
                        sent += 16
                except trio.BrokenResourceError:
                    pass  # the secondary cut it off
            await trio.aclose_forcefully(conn.stream)
            return sent

        sent = trio.run(blind)
        assert sent > OUTBOX_FRAMES
        wait_for_log(sec, "(not-reading)")
        st = status(replica)
        assert st["refused_by"] == {"not-reading": 1}
        assert st["received"] >= OUTBOX_FRAMES

        async def reader() -> None:  # a primary that reads is served as before
            conn, _ = await open_raw(sec.port, CLUSTER)
            await conn.send(record_frame(record))
            assert await acknowledged(conn, 1) == [(1, 0)]
            await conn.aclose()

        trio.run(reader)


async def test_receiver_read_ok_queue_bounded(tmp_path: Path) -> None:
    """Records read and not yet staged stay within STAGE_QUEUE_BYTES: past it, a stream
    is not read until the stager catches up."""
    staging = Staging(tmp_path / "staging")
    receiver = Receiver(staging, Gate(None), lambda: None, lambda _: None)
    ours, theirs = trio.testing.memory_stream_pair()
    conn = Connection(theirs)
    conn.handshake_done()
    outbox, _ = trio.open_memory_channel[Frame](OUTBOX_FRAMES)
    big = 1 << 20
    count = STAGE_QUEUE_BYTES // big + 16
    await ours.send_all(b"".join(
        record_frame(Record(Op.WRITE, 1, seq, path=b"f", offset=seq * big,
                            data=bytes(big))).encode() for seq in range(count)))
    try:
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as scope:
                stream = Stream(conn, outbox, scope, "session", compressed=False)
                nursery.start_soon(receiver._read, stream)
                await trio.testing.wait_all_tasks_blocked()
                assert receiver.status.received <= STAGE_QUEUE_BYTES // big + 1
                assert receiver.stager.queued <= STAGE_QUEUE_BYTES
                nursery.cancel_scope.cancel()
    finally:
        staging.close()


async def test_receiver_refusals_past_the_bound_logged_as_a_count_once_their_second_ends(
        tmp_path: Path, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A flood's refusals past REFUSALS_LOGGED in a second are logged as one count when
    the second is over, though no refusal comes after them."""
    staging = Staging(tmp_path / "staging")
    receiver = Receiver(staging, Gate(None), lambda: None, lambda _: None)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(receiver.serve, [])
            for i in range(REFUSALS_LOGGED + 5):
                receiver._refused(f"127.0.0.2:{1000 + i}", "busy", "too many handshakes")
            assert "not logged one by one" not in caplog.text
            await trio.sleep(1.5)  # past the end of the flood's second, on trio's mock clock
            assert "5 more connections refused in a second" in caplog.text
            nursery.cancel_scope.cancel()
    finally:
        staging.close()
