"""The primary's FCP initiator over FCIP: SCSI commands, many exchanges open at once.

``Initiator`` opens an exchange for each command (a fresh OX_ID, its FCP_CMND
the exchange's first sequence), waits only while MAX_EXCHANGES are open,
and completes it when its FCP_RSP arrives, in whatever order the target
answers. A write's data goes when the target asks for it (FCP_XFER_RDY),
as one sequence of FCP_DATA frames; a read's data comes the same way.

``open_session`` connects, logs in (login.py) and runs the frame reader;
the replication link (repl/scsi/link.py) is built on it, as on iSCSI's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from repl.errors import ProtocolError, first_error
from repl.fc import els, fcp, frame, login
from repl.fc.fcip import FcipStream
from repl.fc.frame import FcFrame, RCtl, Type
from repl.fc.login import MAX_EXCHANGES
from repl.fc.names import Names
from repl.iscsi.chap import Secrets
from repl.scsi import spc
from repl.scsi.link import Result, run_command

LOGIN_SECONDS = 10.0  # a secondary that has not let us in by then is given up
LOGOUT_SECONDS = 1.0
# What ends a session: the link broke or closed, or the target broke the protocol.
ENDS = (ProtocolError, OSError, trio.BrokenResourceError, trio.EndOfChannel,
        trio.ClosedResourceError)
_CMND_F_CTL = frame.FIRST_SEQUENCE | frame.END_SEQUENCE | frame.SEQUENCE_INITIATIVE


@dataclass
class _Exchange:
    ox_id: int
    data_out: bytes
    read: bytearray
    done: Callable[[Result | Exception], None]
    rx_id: int = frame.NO_XID


class Initiator:
    """One N_Port login over one FCIP connection, past its logins."""

    def __init__(self, link: FcipStream, session: login.Session) -> None:
        self.link = link
        self.session = session
        self._exchanges: dict[int, _Exchange] = {}
        self._slots = trio.Semaphore(MAX_EXCHANGES)
        self._next_ox_id = session.next_ox_id
        self._seq_id = session.next_seq_id
        self._bursts_in, self._bursts = trio.open_memory_channel[
            tuple[_Exchange, fcp.XferRdy]](MAX_EXCHANGES)
        self._logout: int | None = None  # the OX_ID of our LOGO
        self.error: Exception | None = None
        self.ended = trio.Event()

    @property
    def outstanding(self) -> int:
        return len(self._exchanges)

    async def submit(self, cdb: bytes, done: Callable[[Result | Exception], None], *,
                     data_out: bytes = b"", read: int = 0, lun: int = 0) -> None:
        """Send a command; *done* is called with its Result, or the error that ended the
        session. Returns once it is on the wire: it waits only for a free exchange."""
        await self._slots.acquire()
        if self.error is not None:
            self._slots.release()  # wake the next waiter, to see the error too
            raise self.error
        exchange = _Exchange(self._ox_id(), data_out, bytearray(), done)
        self._exchanges[exchange.ox_id] = exchange
        cmnd = fcp.Cmnd(fcp.lun_field(lun), cdb, len(data_out) or read,
                        write=bool(data_out), read=bool(read))
        await self.link.send(self._frame(RCtl.FCP_CMND, exchange, _CMND_F_CTL, cmnd.encode()))

    async def command(self, cdb: bytes, *, data_out: bytes = b"", read: int = 0,
                      lun: int = 0) -> Result:
        """Send a command and wait for its result. Raises what ended the session."""
        return await run_command(self, cdb, data_out=data_out, read=read, lun=lun)

    def _ox_id(self) -> int:
        while True:
            ox_id, self._next_ox_id = self._next_ox_id, self._next_ox_id % 0xFFFE + 1
            if ox_id not in self._exchanges and ox_id != self._logout:
                return ox_id

    def _seq(self) -> int:
        self._seq_id = (self._seq_id + 1) & 0xFF
        return self._seq_id

    def _frame(self, r_ctl: RCtl, exchange: _Exchange, f_ctl: int, payload: bytes = b"",
               offset: int = 0) -> FcFrame:
        return FcFrame(r_ctl, self.session.remote, self.session.local, Type.FCP, f_ctl,
                       exchange.ox_id, exchange.rx_id, self._seq(), parameter=offset,
                       payload=payload)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Read frames and complete commands until the link ends; then every command
        still outstanding, and every later submit, gets the error. Never raises it."""
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._data_outs)
                while True:
                    await self._handle(await self.link.receive())
        except* ENDS as group:
            leaf = first_error(group)
            assert isinstance(leaf, Exception)
            self._fail(leaf)

    def _fail(self, exc: Exception) -> None:
        self.error = exc
        self.ended.set()
        exchanges, self._exchanges = list(self._exchanges.values()), {}
        for exchange in exchanges:
            exchange.done(exc)
        self._slots.release()  # whoever waits for a slot wakes, sees the error, passes it on

    async def _handle(self, got: FcFrame) -> None:
        if got.d_id != self.session.local or got.s_id != self.session.remote:
            raise ProtocolError(f"a frame from {got.s_id:06x} to {got.d_id:06x}")
        if got.type == Type.ELS:
            return await self._link_service(got)
        exchange = self._exchanges.get(got.ox_id)
        if got.type != Type.FCP or not got.responder or exchange is None:
            raise ProtocolError(f"R_CTL {got.r_ctl:#04x} for no command (OX_ID {got.ox_id:#x})")
        exchange.rx_id = got.rx_id
        if got.r_ctl == RCtl.FCP_XFER_RDY:
            await self._bursts_in.send((exchange, fcp.XferRdy.decode(got.payload)))
        elif got.r_ctl == RCtl.FCP_DATA:
            if got.parameter != len(exchange.read):
                raise ProtocolError(f"FCP_DATA at offset {got.parameter}, expected "
                                    f"{len(exchange.read)}")
            exchange.read += got.payload
        elif got.r_ctl == RCtl.FCP_RSP:
            del self._exchanges[got.ox_id]
            self._slots.release()
            rsp = fcp.Rsp.decode(got.payload)
            if rsp.response_code:
                exchange.done(ProtocolError(f"the target could not run the command (FCP "
                                            f"response code {rsp.response_code:#x})"))
                return
            sense = spc.Sense.decode(rsp.sense) if rsp.sense else None
            exchange.done(Result(rsp.status, sense, bytes(exchange.read)))
        else:
            raise ProtocolError(f"R_CTL {got.r_ctl:#04x} from a target")

    async def _link_service(self, got: FcFrame) -> None:
        """Our LOGO's answer ends the session; the target's LOGO too (it is answered)."""
        if got.r_ctl == RCtl.ELS_REPLY and got.ox_id == self._logout:
            raise trio.EndOfChannel
        if got.r_ctl == RCtl.ELS_REQUEST:
            logout = els.command(got.payload) == els.Command.LOGO
            await self.link.send(FcFrame(
                RCtl.ELS_REPLY, got.s_id, got.d_id, Type.ELS,
                frame.EXCHANGE_RESPONDER | frame.LAST_SEQUENCE | frame.END_SEQUENCE,
                got.ox_id, got.ox_id, self._seq(),
                payload=els.ACCEPT if logout else els.Reject(els.UNABLE).encode()))
            if logout:
                raise trio.EndOfChannel
            return
        raise ProtocolError(f"an ELS frame out of place (R_CTL {got.r_ctl:#04x})")

    async def _data_outs(self) -> None:
        """Answer each FCP_XFER_RDY with the data it asks for, in one sequence."""
        async for exchange, burst in self._bursts:
            if exchange.ox_id not in self._exchanges:
                continue  # ended meanwhile
            end = burst.offset + burst.length
            if burst.length == 0 or end > len(exchange.data_out):
                raise ProtocolError(f"FCP_XFER_RDY for bytes {burst.offset}+{burst.length} "
                                    f"of a {len(exchange.data_out)}-byte write")
            first = self._frame(RCtl.FCP_DATA, exchange, frame.RELATIVE_OFFSET,
                                offset=burst.offset)
            await self.link.send(*frame.sequence(
                first, exchange.data_out[burst.offset : end],
                last_f_ctl=frame.END_SEQUENCE | frame.SEQUENCE_INITIATIVE))

    async def logout(self) -> None:
        """LOGO, if the target answers within LOGOUT_SECONDS."""
        with trio.move_on_after(LOGOUT_SECONDS):
            self._logout = self._ox_id()
            await self.link.send(FcFrame(
                RCtl.ELS_REQUEST, self.session.remote, self.session.local, Type.ELS,
                _CMND_F_CTL, self._logout, seq_id=self._seq(),
                payload=els.logo(self.session.local, self.session.port_name)))
            await self.ended.wait()

    async def aclose(self) -> None:
        await self.link.aclose()


@asynccontextmanager
async def open_session(host: str, port: int, keys: Secrets, ours: Names,
                       known_wwn: int = 0) -> AsyncIterator[Initiator]:
    """A logged-in FCP session to the target at *host*:*port*, its reader running;
    logged out and closed when the context exits. If the secondary names a fabric
    other than *known_wwn* in its special frame, connects once more with that
    (``Initiator.session.fabric``). Raises trio.TooSlowError if the connect or the
    logins take over LOGIN_SECONDS each."""
    link, session = await connect(host, port, keys, ours, known_wwn)
    try:
        initiator = Initiator(link, session)
        async with trio.open_nursery() as nursery:
            await nursery.start(initiator.run)
            try:
                yield initiator
            finally:
                if initiator.error is None:
                    await initiator.logout()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await link.aclose()


async def connect(host: str, port: int, keys: Secrets, ours: Names, known_wwn: int = 0
                  ) -> tuple[FcipStream, login.Session]:
    """A connection to *host*:*port*, logged in; reconnects once if the secondary's
    special frame named another fabric than *known_wwn*."""
    for attempt in range(2):
        with trio.fail_after(LOGIN_SECONDS):
            link = FcipStream(await trio.open_tcp_stream(host, port))
        try:
            with trio.fail_after(LOGIN_SECONDS):
                return link, await login.initiate(link, keys, ours, known_wwn)
        except login.Redirected as redirect:
            if attempt:
                raise
            known_wwn = redirect.wwn
            await link.aclose()
        except BaseException:
            with trio.CancelScope(shield=True):
                await link.aclose()
            raise
    raise AssertionError("unreachable")
