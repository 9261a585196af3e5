"""The FCP target and initiator against each other over FCIP, in one process on loopback.

The secondary's receiver is stood in for by the test, which drives the
LUN's link by hand: so it can acknowledge records in the order it likes,
hold them back, or refuse them, and watch what the initiator makes of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from repl.errors import ProtocolError
from repl.fc import els, login, target
from repl.fc.fcip import FcipStream, SpecialFrame
from repl.fc.initiator import connect, open_session
from repl.fc.names import TARGET_ID, Names
from repl.iscsi import chap
from repl.protocol import (
    Frame,
    FrameType,
    applied,
    hello,
    parse_applied,
    parse_hello,
    parse_staged,
    staged,
)
from repl.scsi import spc
from repl.scsi.link import InitiatorLink
from repl.scsi.lun import Lun
from store.records import Op, Record

KEYS = chap.Secrets("alpha", b"initiator-secret", "beta", b"target-secret!")
PRIMARY = Names.of("primary-node")


@asynccontextmanager
async def serving(on_link: Callable[[Lun, str], Awaitable[None]]) -> AsyncIterator[int]:
    """A target on a loopback port (yielded) whose sessions go to *on_link*."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(target.serve, listeners, KEYS, "secondary-node", "serial",
                            on_link)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def linked() -> AsyncIterator[tuple[InitiatorLink, Lun]]:
    """An initiator's link and the target's end of it, past the replfs HELLO."""
    luns_in, luns = trio.open_memory_channel[Lun](1)
    done = trio.Event()

    async def on_link(lun: Lun, peer: str) -> None:
        assert parse_hello(await lun.receive())["role"] == "primary"
        await lun.send(hello(role="secondary", applied=0))
        await luns_in.send(lun)
        await done.wait()

    async with serving(on_link) as port, open_session(
            "127.0.0.1", port, KEYS, PRIMARY) as session, trio.open_nursery() as nursery:
        ours = InitiatorLink(session, nursery)
        await ours.send(hello(role="primary"))
        assert parse_hello(await ours.receive())["role"] == "secondary"
        ours.handshake_done()
        yield ours, await luns.receive()
        done.set()
        nursery.cancel_scope.cancel()


async def idle(lun: Lun, peer: str) -> None:
    """A receiver that reads nothing: the target answers what it answers alone."""
    await trio.sleep_forever()


def record(seq: int, size: int = 10) -> Frame:
    return Frame(FrameType.RECORD, Record(Op.WRITE, 1, seq, path=b"f", offset=seq,
                                          data=bytes([seq % 256]) * size).encode())


async def test_login_ok_fabric_address_and_redirect() -> None:
    """The first connection learns the fabric's WWN from the special frame's echo and
    connects again naming it; the fabric gives each login its own N_Port ID."""
    async with serving(idle) as port:
        async with open_session("127.0.0.1", port, KEYS, PRIMARY) as first:
            assert first.session.remote == TARGET_ID
            assert first.session.fabric == Names.of("secondary-node").fabric
            link, second = await connect("127.0.0.1", port, KEYS, PRIMARY,
                                         first.session.fabric)
            assert second.local != first.session.local
            assert second.port_name == Names.of("secondary-node").port
            await link.aclose()


async def test_login_err_wrong_initiator_secret() -> None:
    async with serving(idle) as port:
        wrong = chap.Secrets("alpha", b"not-the-secret", "beta", KEYS.target_secret)
        with pytest.raises(login.LoginFailed, match="AUTH_Reject"):
            async with open_session("127.0.0.1", port, wrong, PRIMARY):
                pass


async def test_login_err_target_does_not_prove_itself() -> None:
    """Mutual: a target without the target's secret is refused by the initiator."""
    async with serving(idle) as port:
        expects = chap.Secrets("alpha", KEYS.initiator_secret, "beta", b"another-secret")
        with pytest.raises(login.LoginFailed, match="did not prove"):
            async with open_session("127.0.0.1", port, expects, PRIMARY):
                pass


async def test_login_err_prli_before_authentication() -> None:
    """A port that skips DH-CHAP gets LS_RJT for its PRLI, and nothing further."""
    async with serving(idle) as port:
        link, learned = await connect("127.0.0.1", port, KEYS, PRIMARY)  # the fabric's WWN
        await link.aclose()
        link = FcipStream(await trio.open_tcp_stream("127.0.0.1", port))
        await link.send_special(SpecialFrame(PRIMARY.fabric, 0, 1, learned.fabric))
        await link.receive_special()
        conv = login.Els(link, 0, 0xFFFFFE)
        flogi = await conv.request(els.Login(els.Command.FLOGI, PRIMARY.port,
                                             PRIMARY.node).encode())
        conv.local, conv.remote = flogi.d_id, TARGET_ID
        await conv.request(els.Login(els.Command.PLOGI, PRIMARY.port, PRIMARY.node).encode())
        with pytest.raises(login.LoginFailed, match=r"PRLI refused: LS_RJT reason 0x09"):
            await conv.request(els.Prli(False, els.INITIATOR_FUNCTION).encode())
        with pytest.raises((trio.EndOfChannel, trio.BrokenResourceError)):
            await link.receive()
        await link.aclose()


async def test_link_records_ok_complete_out_of_order() -> None:
    """Many exchanges open at once; FCP_RSP GOOD comes back in the order the receiver
    staged them (here: reversed), and each is the STAGED acknowledgement of its record."""
    async with linked() as (ours, theirs):
        for seq in range(20):
            await ours.send(record(seq))
        got = [await theirs.receive() for _ in range(20)]
        assert [Record.decode(f.payload).seq for f in got] == list(range(20))
        acked: list[tuple[int, int]] = []
        for seq in reversed(range(20)):
            await theirs.send(staged([(1, seq)]))
            while len(acked) < 20 - seq:
                frame = await ours.receive()
                assert frame.type == FrameType.STAGED
                acked += parse_staged(frame)
        assert acked == [(1, seq) for seq in reversed(range(20))]


async def test_link_exchanges_ok_bounded() -> None:
    """At most MAX_EXCHANGES are open (two are the link's own reads): the rest wait for
    an FCP_RSP to free one."""
    total = login.MAX_EXCHANGES + 30
    async with linked() as (ours, theirs), trio.open_nursery() as nursery:
        async def send_all() -> None:
            for seq in range(total):
                await ours.send(record(seq))

        nursery.start_soon(send_all)
        first = [await theirs.receive() for _ in range(login.MAX_EXCHANGES - 1)]
        await trio.testing.wait_all_tasks_blocked(0.2)  # the initiator stopped sending
        with pytest.raises(trio.WouldBlock):
            theirs._frames.receive_nowait()
        await theirs.send(staged([(1, Record.decode(f.payload).seq) for f in first]))
        rest = [await theirs.receive() for _ in range(total - len(first))]
        assert len({Record.decode(f.payload).seq for f in first + rest}) == total


async def test_link_record_ok_large_through_xfer_rdy() -> None:
    """A record of 3 MiB: one FCP_XFER_RDY, 1,500-odd FCP_DATA frames in one sequence."""
    async with linked() as (ours, theirs):
        big = record(1, size=3 << 20)
        await ours.send(big)
        assert (await theirs.receive()).payload == big.payload


async def test_link_record_err_check_condition() -> None:
    """A block that is not a record is refused with CHECK CONDITION and its sense: the
    initiator's link ends, and the receiver never sees it."""
    async with linked() as (ours, theirs):
        raw = bytearray(record(1).payload)
        raw[-1] ^= 0xFF  # its checksum
        await ours.send(Frame(FrameType.RECORD, bytes(raw)))
        with pytest.raises(ProtocolError, match=r"CHECK CONDITION.*ASC/ASCQ 26/00"):
            await ours.receive()
        with pytest.raises(trio.WouldBlock):
            theirs._frames.receive_nowait()


async def test_target_commands_ok_and_err() -> None:
    """INQUIRY claims FCP-4; records before the HELLO, writes outside CONTROL and RECORDS,
    and unknown opcodes are refused with their sense."""
    async with serving(idle) as port, open_session("127.0.0.1", port, KEYS,
                                                   PRIMARY) as session:
        inquiry = (await session.command(spc.inquiry_cdb(), read=96)).check("INQUIRY")
        assert inquiry.data[8:16] == spc.VENDOR and inquiry.data[60:62] == b"\x0a\x40"
        data = spc.envelope(record(0).payload)
        blocks = spc.blocks_for(len(data))
        result = await session.command(spc.cdb16(spc.Op.WRITE_16, spc.RECORDS_LBA, blocks),
                                       data_out=data)
        assert result.sense == spc.NOT_SERVED
        result = await session.command(spc.cdb16(spc.Op.WRITE_16, spc.STATUS_LBA, blocks),
                                       data_out=data)
        assert result.sense == spc.WRITE_PROTECTED
        result = await session.command(spc.cdb16(spc.Op.READ_16, spc.BLOCKS, 1), read=512)
        assert result.sense == spc.LBA_OUT_OF_RANGE
        result = await session.command(bytes([0xC5]) + bytes(15))
        assert result.sense == spc.INVALID_OPCODE
        capacity = await session.command(spc.read_capacity16_cdb(), read=32)
        assert spc.parse_read_capacity16(capacity.check("READ CAPACITY").data) == (
            spc.BLOCKS, spc.BLOCK)


async def test_link_applied_ok_read_back() -> None:
    """APPLIED reaches the initiator through the status block it keeps reading."""
    async with linked() as (ours, theirs):
        await theirs.send(applied(41))
        frame = await ours.receive()
        assert frame.type == FrameType.APPLIED and parse_applied(frame) == 41


async def test_session_logout_ok_ends_receiver() -> None:
    """Leaving the session sends LOGO: the receiver's link ends cleanly."""
    ended = trio.Event()

    async def on_link(lun: Lun, peer: str) -> None:
        with pytest.raises(trio.EndOfChannel):
            await lun.receive()
        ended.set()

    async with serving(on_link) as port:
        async with open_session("127.0.0.1", port, KEYS, PRIMARY) as session:
            pass
        assert session.error is not None and isinstance(session.error, trio.EndOfChannel)
        await ended.wait()
