"""The secondary's FCP target over FCIP: one LUN, the staging store.

Each FCIP connection carries one N_Port's logins (login.py), then FCP
(FCP-4). Every command goes to the replfs LUN (repl/scsi/lun.py), which is
the link the receiver serves like any stream of replfs frames; this module
carries its commands and answers in FC exchanges:

- an FCP_CMND opens an exchange (the initiator's OX_ID; the RX_ID is ours)
  and carries the CDB and FCP_DL;
- a write's data is asked for with FCP_XFER_RDY (one burst of at most
  MAX_BURST bytes) and comes as one sequence of FCP_DATA frames, each with
  its relative offset;
- a read's data goes back as one sequence of FCP_DATA frames, then the
  FCP_RSP; every command ends with an FCP_RSP: SCSI status, the residual
  if fewer or more bytes moved than FCP_DL, sense data with CHECK
  CONDITION.

Up to login.MAX_EXCHANGES exchanges are open at once (past that a command gets
TASK SET FULL), and they end in the order the LUN answers them: a record's
GOOD once the receiver staged it. FCP task management functions are
answered "not supported"; a LOGO ends the session.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from repl.errors import ProtocolError
from repl.fc import els, fcp, frame, login
from repl.fc.fcip import FcipStream
from repl.fc.frame import FcFrame, RCtl, Type
from repl.fc.names import INITIATORS, Names, show, show_id
from repl.iscsi.chap import Secrets
from repl.scsi import spc
from repl.scsi.lun import Lun
from store.errors import RecordError

log = logging.getLogger("replfs.fc")

LOGIN_SECONDS = 5.0  # logins not done by then are dropped, as the gate drops strangers
MAX_BURST = 8 << 20  # one FCP_XFER_RDY asks for this much at most: a record in one burst
_XFER_RDY_F_CTL = frame.EXCHANGE_RESPONDER | frame.END_SEQUENCE | frame.SEQUENCE_INITIATIVE
_RSP_F_CTL = (frame.EXCHANGE_RESPONDER | frame.LAST_SEQUENCE | frame.END_SEQUENCE
              | frame.SEQUENCE_INITIATIVE)


class TargetPort:
    """The target's end of one FCIP connection past its logins: the FCP of the LUN's
    commands (``lun``, the receiver's link)."""

    def __init__(self, link: FcipStream, session: login.Session, names: Names,
                 serial: str) -> None:
        self.link = link
        self.session = session
        self.lun = Lun(self, f"naa.{names.port:016X}", serial, spc.FCP4_VERSION)
        self._exchanges: dict[int, int] = {}  # open exchanges: OX_ID to RX_ID
        self._next_rx_id = 0
        self._seq_id = session.next_seq_id

    async def run(self) -> None:
        """Read and answer frames until the initiator logs out or the link ends; then
        the receiver reads EndOfChannel (or the error that ended it). Never raises."""
        error: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._expire)
                try:
                    while not await self._handle(await self.link.receive()):
                        pass
                except (ProtocolError, RecordError, OSError, trio.BrokenResourceError) as exc:
                    error = exc
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()
        finally:
            await self.lun.ended(error)

    async def _expire(self) -> None:
        """Answer the LUN's long-poll reads that are due, a few times a WAIT_SECONDS (a
        timer of their own: a deadline around every frame's read costs more). A link
        that broke is left to the frame loop to find."""
        try:
            while True:
                await trio.sleep(spc.WAIT_SECONDS / 4)
                await self.lun.expire()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _handle(self, got: FcFrame) -> bool:
        """Answer one frame; True once the session is over (a LOGO)."""
        if got.d_id != self.session.local or got.s_id != self.session.remote:
            raise ProtocolError(f"a frame from {show_id(got.s_id)} to {show_id(got.d_id)}")
        if got.type == Type.ELS and got.r_ctl == RCtl.ELS_REQUEST:
            logout = els.command(got.payload) == els.Command.LOGO
            await self.link.send(FcFrame(
                RCtl.ELS_REPLY, got.s_id, got.d_id, Type.ELS,
                frame.EXCHANGE_RESPONDER | frame.LAST_SEQUENCE | frame.END_SEQUENCE,
                got.ox_id, got.ox_id, self._seq(),
                payload=els.ACCEPT if logout else els.Reject(els.UNABLE).encode()))
            return logout
        if got.type != Type.FCP or got.responder:
            raise ProtocolError(f"R_CTL {got.r_ctl:#04x} TYPE {got.type:#04x} from an "
                                "initiator")
        if got.r_ctl == RCtl.FCP_CMND:
            await self._command(got)
        elif got.r_ctl == RCtl.FCP_DATA:
            if self._exchanges.get(got.ox_id) != got.rx_id or not self.lun.writing(got.ox_id) \
                    or not got.f_ctl & frame.RELATIVE_OFFSET:
                raise ProtocolError(f"FCP_DATA for no transfer (OX_ID {got.ox_id:#x})")
            await self.lun.data_out(got.ox_id, got.parameter, got.payload, got.end_sequence)
        else:
            raise ProtocolError(f"R_CTL {got.r_ctl:#04x} from an initiator")
        return False

    async def _command(self, got: FcFrame) -> None:
        if got.ox_id in self._exchanges or got.rx_id != frame.NO_XID:
            raise ProtocolError(f"FCP_CMND in an exchange already open (OX_ID {got.ox_id:#x})")
        cmnd = fcp.Cmnd.decode(got.payload)
        self._exchanges[got.ox_id] = self._next_rx_id
        self._next_rx_id = (self._next_rx_id + 1) % frame.NO_XID
        if cmnd.task_management:
            return await self._rsp(got.ox_id, fcp.Rsp(spc.GOOD,
                                                      response_code=fcp.TMF_NOT_SUPPORTED))
        if len(self._exchanges) > login.MAX_EXCHANGES:
            return await self.respond(got.ox_id, spc.TASK_SET_FULL)
        await self.lun.command(got.ox_id, fcp.lun_of(cmnd.lun), cmnd.cdb, cmnd.data_length)

    def _seq(self) -> int:
        self._seq_id = (self._seq_id + 1) & 0xFF
        return self._seq_id

    def _frame(self, r_ctl: RCtl, tag: int, f_ctl: int, payload: bytes = b"") -> FcFrame:
        return FcFrame(r_ctl, self.session.remote, self.session.local, Type.FCP, f_ctl, tag,
                       self._exchanges.get(tag, frame.NO_XID), self._seq(), payload=payload)

    async def _rsp(self, tag: int, rsp: fcp.Rsp, *before: FcFrame) -> None:
        last = self._frame(RCtl.FCP_RSP, tag, _RSP_F_CTL, rsp.encode())
        self._exchanges.pop(tag, None)
        await self.link.send(*before, last)

    # --- the LUN's answers (its Port) ------------------------------------------------------

    async def want_data(self, tag: int, offset: int, length: int) -> None:
        burst = fcp.XferRdy(offset, min(length, MAX_BURST))
        await self.link.send(self._frame(RCtl.FCP_XFER_RDY, tag, _XFER_RDY_F_CTL,
                                         burst.encode()))

    async def data_in(self, tag: int, data: bytes, expected: int) -> None:
        sent = data[:expected]
        frames = frame.sequence(self._frame(RCtl.FCP_DATA, tag, frame.EXCHANGE_RESPONDER
                                            | frame.RELATIVE_OFFSET), sent,
                                last_f_ctl=frame.END_SEQUENCE) if sent else []
        await self._rsp(tag, _residual(spc.GOOD, b"", len(data), expected), *frames)

    async def respond(self, tag: int, status: int, sense: spc.Sense | None = None,
                      expected: int = 0, length: int = 0) -> None:
        await self._rsp(tag, _residual(status, sense.encode() if sense else b"", length,
                                       expected))

    async def aclose(self) -> None:
        await self.link.aclose()


def _residual(status: int, sense: bytes, length: int, expected: int) -> fcp.Rsp:
    """An FCP_RSP for *length* bytes moved where *expected* were."""
    return fcp.Rsp(status, sense, max(0, expected - length), max(0, length - expected))


async def serve(listeners: list[trio.SocketListener], keys: Secrets, node: str,
                serial: str, on_link: Callable[[Lun, str], Awaitable[None]], *,
                task_status: trio.TaskStatus[list[trio.SocketListener]]
                = trio.TASK_STATUS_IGNORED) -> None:
    """Accept FCIP connections on *listeners* as the fabric and FCP target of the node
    *node*, whose LUN has the unit serial number *serial*; hand each logged-in session
    to *on_link* (the receiver) with the peer's name."""
    names = Names.of(node)
    last_port = 0

    def assign() -> int:
        nonlocal last_port
        last_port = last_port % 254 + 1
        return INITIATORS | last_port

    async def handle(stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "?"
        link = FcipStream(stream)
        try:
            with trio.fail_after(LOGIN_SECONDS):
                session = await login.accept(link, keys, names, assign)
        except login.Redirected:
            log.debug("told %s this fabric's WWN", peer)
            await _close(link)
            return
        except (login.LoginFailed, ProtocolError, OSError, trio.BrokenResourceError,
                trio.EndOfChannel, trio.TooSlowError) as exc:
            log.warning("refused FCIP login from %s: %s", peer, exc)
            await _close(link)
            return
        target = TargetPort(link, session, names, serial)
        target.lun.peer = f"port {show(session.port_name)} ({show_id(session.remote)}) at {peer}"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(target.run)
            await on_link(target.lun, target.lun.peer)
            nursery.cancel_scope.cancel()
        await _close(link)

    await trio.serve_listeners(handle, listeners, task_status=task_status)


async def _close(link: FcipStream) -> None:
    with trio.CancelScope(shield=True):
        try:
            await link.aclose()
        except OSError:
            pass
