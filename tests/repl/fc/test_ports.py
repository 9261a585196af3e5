"""The FCP target and initiator against each other over FCIP, in one process on loopback:
what only Fibre Channel has (the fabric's login, PRLI, LOGO, INQUIRY's FCP-4). What the
iSCSI target passes too is in tests/repl/scsi/test_target.py.
"""

from __future__ import annotations

import pytest
import trio

from repl.fc import els, login
from repl.fc.fcip import FcipStream, SpecialFrame
from repl.fc.initiator import connect, open_session
from repl.fc.names import TARGET_ID, Names
from repl.scsi import spc
from repl.scsi.lun import Lun
from tests.repl.scsi.transports import FCIP, KEYS, PRIMARY, idle


async def test_login_ok_fabric_address_and_redirect() -> None:
    """The first connection learns the fabric's WWN from the special frame's echo and
    connects again naming it; the fabric gives each login its own N_Port ID."""
    async with FCIP.serving(idle) as port:
        async with open_session("127.0.0.1", port, KEYS, PRIMARY) as first:
            assert first.session.remote == TARGET_ID
            assert first.session.fabric == Names.of("secondary-node").fabric
            link, second = await connect("127.0.0.1", port, KEYS, PRIMARY,
                                         first.session.fabric)
            assert second.local != first.session.local
            assert second.port_name == Names.of("secondary-node").port
            await link.aclose()


async def test_login_err_prli_before_authentication() -> None:
    """A port that skips DH-CHAP gets LS_RJT for its PRLI, and nothing further."""
    async with FCIP.serving(idle) as port:
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


async def test_target_inquiry_ok_fcp4_and_capacity() -> None:
    """INQUIRY claims FCP-4; READ CAPACITY(16) gives the LUN's blocks."""
    async with FCIP.serving(idle) as port, open_session("127.0.0.1", port, KEYS,
                                                        PRIMARY) as session:
        inquiry = (await session.command(spc.inquiry_cdb(), read=96)).check("INQUIRY")
        assert inquiry.data[8:16] == spc.VENDOR and inquiry.data[60:62] == b"\x0a\x40"
        capacity = await session.command(spc.read_capacity16_cdb(), read=32)
        assert spc.parse_read_capacity16(capacity.check("READ CAPACITY").data) == (
            spc.BLOCKS, spc.BLOCK)


async def test_session_logout_ok_ends_receiver() -> None:
    """Leaving the session sends LOGO: the receiver's link ends cleanly."""
    ended = trio.Event()

    async def on_link(lun: Lun, peer: str) -> None:
        with pytest.raises(trio.EndOfChannel):
            await lun.receive()
        ended.set()

    async with FCIP.serving(on_link) as port:
        async with open_session("127.0.0.1", port, KEYS, PRIMARY) as session:
            pass
        assert session.error is not None and isinstance(session.error, trio.EndOfChannel)
        await ended.wait()
