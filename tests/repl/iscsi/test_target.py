"""The iSCSI target and initiator against each other, in one process over loopback TCP.

The secondary's receiver is stood in for by the test, which drives the
target's link by hand: so it can acknowledge records in the order it
likes, hold them back, or refuse them, and watch what the initiator makes
of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.lowlevel
import trio.testing

from repl.errors import ProtocolError
from repl.iscsi import chap, login, target
from repl.iscsi.initiator import open_session
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

SECRETS = chap.Secrets("alpha", b"initiator-secret", "beta", b"target-secret!")
IQN = "iqn.2025-01.io.replfs:test"


@asynccontextmanager
async def serving(on_link: Callable[[Lun, str], Awaitable[None]]
                  ) -> AsyncIterator[int]:
    """A target on a loopback port (yielded) whose sessions go to *on_link*."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(target.serve, listeners, SECRETS, IQN, "serial", on_link)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def linked() -> AsyncIterator[tuple[InitiatorLink, Lun]]:
    """An initiator's link and the target's end of it, past the replfs HELLO."""
    links_in, links = trio.open_memory_channel[Lun](1)
    done = trio.Event()

    async def on_link(link: Lun, peer: str) -> None:
        assert parse_hello(await link.receive())["role"] == "primary"
        await link.send(hello(role="secondary", applied=0))
        await links_in.send(link)
        await done.wait()

    async with serving(on_link) as port, open_session(
            "127.0.0.1", port, SECRETS, "iqn.2025-01.io.replfs:primary", IQN) as session, \
            trio.open_nursery() as nursery:
        ours = InitiatorLink(session, nursery)
        await ours.send(hello(role="primary"))
        assert parse_hello(await ours.receive())["role"] == "secondary"
        ours.handshake_done()
        yield ours, await links.receive()
        done.set()
        nursery.cancel_scope.cancel()


async def idle(link: Lun, peer: str) -> None:
    """A receiver that reads nothing: the target answers what it answers alone."""
    await trio.sleep_forever()


def record(seq: int, size: int = 10) -> Frame:
    return Frame(FrameType.RECORD, Record(Op.WRITE, 1, seq, path=b"f", offset=seq,
                                          data=bytes([seq % 256]) * size).encode())


async def test_login_err_wrong_initiator_secret() -> None:
    async with serving(idle) as port:
        wrong = chap.Secrets("alpha", b"not-the-secret", "beta", SECRETS.target_secret)
        with pytest.raises(login.LoginFailed, match="02/01"):
            async with open_session("127.0.0.1", port, wrong, "iqn.2025-01.io.x:y", IQN):
                pass


async def test_login_err_target_does_not_prove_itself() -> None:
    """Mutual CHAP: a target without the target's secret is refused by the initiator."""
    async with serving(idle) as port:
        expects = chap.Secrets("alpha", SECRETS.initiator_secret, "beta", b"another-secret")
        with pytest.raises(login.LoginFailed, match="did not prove"):
            async with open_session("127.0.0.1", port, expects, "iqn.2025-01.io.x:y", IQN):
                pass


async def test_login_err_unknown_target() -> None:
    async with serving(idle) as port:
        with pytest.raises(login.LoginFailed, match="02/03"):
            async with open_session("127.0.0.1", port, SECRETS, "iqn.2025-01.io.x:y",
                                    "iqn.2025-01.io.replfs:other"):
                pass


async def test_link_records_ok_complete_out_of_order() -> None:
    """Many WRITEs outstanding at once; GOOD comes back in the order the receiver staged
    them (here: reversed), and each is the STAGED acknowledgement of its record."""
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


async def test_link_window_ok_bounds_outstanding() -> None:
    """At most CMD_WINDOW writes are outstanding: the rest wait for GOOD to free room."""
    total = login.CMD_WINDOW + 30
    async with linked() as (ours, theirs), trio.open_nursery() as nursery:
        async def send_all() -> None:
            for seq in range(total):
                await ours.send(record(seq))

        nursery.start_soon(send_all)
        first = [await theirs.receive() for _ in range(login.CMD_WINDOW - 1)]
        await trio.testing.wait_all_tasks_blocked(0.2)  # the initiator stopped sending
        with pytest.raises(trio.WouldBlock):
            theirs._frames.receive_nowait()
        await theirs.send(staged([(1, Record.decode(f.payload).seq) for f in first]))
        rest = [await theirs.receive() for _ in range(total - len(first))]
        assert len({Record.decode(f.payload).seq for f in first + rest}) == total


async def test_link_record_ok_large_through_r2t() -> None:
    """A record past FirstBurstLength: immediate data, then R2T and Data-Out."""
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


async def test_target_write_err_before_hello_and_elsewhere() -> None:
    """Records before the HELLO, and writes outside CONTROL and RECORDS, are refused."""
    async with serving(idle) as port, open_session(
            "127.0.0.1", port, SECRETS, "iqn.2025-01.io.x:y", IQN) as session:
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


async def test_link_applied_ok_read_back() -> None:
    """APPLIED reaches the initiator through the status block it keeps reading."""
    async with linked() as (ours, theirs):
        await theirs.send(applied(41))
        frame = await ours.receive()
        assert frame.type == FrameType.APPLIED and parse_applied(frame) == 41
