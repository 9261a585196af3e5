"""The SCSI target and initiator against each other, over iSCSI and over FCIP, in one
process on loopback.

The secondary's receiver is stood in for by the test, which drives the
LUN's link by hand: so it can acknowledge records in the order it likes,
hold them back, or refuse them, and watch what the initiator makes of it.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from repl.errors import ProtocolError
from repl.iscsi import chap
from repl.protocol import Frame, FrameType, applied, parse_applied, parse_keys, staged
from repl.scsi import spc
from store.records import Record
from tests.repl.scsi.transports import KEYS, Transport, idle, record


async def test_login_err_wrong_initiator_secret(transport: Transport) -> None:
    async with transport.serving(idle) as port:
        wrong = chap.Secrets("alpha", b"not-the-secret", "beta", KEYS.target_secret)
        with pytest.raises(transport.login_failed, match=transport.wrong_secret):
            async with transport.session(port, wrong):
                pass


async def test_login_err_target_does_not_prove_itself(transport: Transport) -> None:
    """Mutual: a target without the target's secret is refused by the initiator."""
    async with transport.serving(idle) as port:
        expects = chap.Secrets("alpha", KEYS.initiator_secret, "beta", b"another-secret")
        with pytest.raises(transport.login_failed, match="did not prove"):
            async with transport.session(port, expects):
                pass


async def test_link_records_ok_complete_out_of_order(transport: Transport) -> None:
    """Many WRITEs (FCP exchanges) open at once; GOOD comes back in the order the
    receiver staged them (here: reversed), and each is the STAGED acknowledgement of
    its record."""
    async with transport.linked() as (ours, theirs):
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
                acked += parse_keys(frame)
        assert acked == [(1, seq) for seq in reversed(range(20))]


async def test_link_window_ok_bounds_outstanding(transport: Transport) -> None:
    """At most the window's commands are open (iSCSI's CMD_WINDOW; FCP's MAX_EXCHANGES,
    two of which are the link's own reads): the rest wait for GOOD to free room."""
    total = transport.window + 30
    async with transport.linked() as (ours, theirs), trio.open_nursery() as nursery:
        async def send_all() -> None:
            for seq in range(total):
                await ours.send(record(seq))

        nursery.start_soon(send_all)
        first = [await theirs.receive() for _ in range(transport.window - 1)]
        await trio.testing.wait_all_tasks_blocked(0.2)  # the initiator stopped sending
        with pytest.raises(trio.WouldBlock):
            theirs._frames.receive_nowait()
        await theirs.send(staged([(1, Record.decode(f.payload).seq) for f in first]))
        rest = [await theirs.receive() for _ in range(total - len(first))]
        assert len({Record.decode(f.payload).seq for f in first + rest}) == total


async def test_link_record_ok_large(transport: Transport) -> None:
    """A record of 3 MiB: past iSCSI's FirstBurstLength (immediate data, then R2T and
    Data-Out); over FCP one FCP_XFER_RDY, 1,500-odd FCP_DATA frames in one sequence."""
    async with transport.linked() as (ours, theirs):
        big = record(1, size=3 << 20)
        await ours.send(big)
        assert (await theirs.receive()).payload == big.payload


async def test_link_record_err_check_condition(transport: Transport) -> None:
    """A block that is not a record is refused with CHECK CONDITION and its sense: the
    initiator's link ends, and the receiver never sees it."""
    async with transport.linked() as (ours, theirs):
        raw = bytearray(record(1).payload)
        raw[-1] ^= 0xFF  # its checksum
        await ours.send(Frame(FrameType.RECORD, bytes(raw)))
        with pytest.raises(ProtocolError, match=r"CHECK CONDITION.*ASC/ASCQ 26/00"):
            await ours.receive()
        with pytest.raises(trio.WouldBlock):
            theirs._frames.receive_nowait()


async def test_target_write_err_before_hello_and_elsewhere(transport: Transport) -> None:
    """Records before the HELLO, writes outside CONTROL and RECORDS, reads past the end
    and unknown opcodes are refused with their sense."""
    async with transport.serving(idle) as port, transport.session(port, KEYS) as session:
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


async def test_link_applied_ok_read_back(transport: Transport) -> None:
    """APPLIED reaches the initiator through the status block it keeps reading."""
    async with transport.linked() as (ours, theirs):
        await theirs.send(applied(41))
        frame = await ours.receive()
        assert frame.type == FrameType.APPLIED and parse_applied(frame) == 41
