"""The secondary's iSCSI target: one LUN, the staging store, over TCP (RFC 7143).

Each connection logs in with mutual CHAP (login.py) and is one session. A
discovery session answers SendTargets and logs out. In a normal session
every SCSI command goes to the replfs LUN (repl/scsi/lun.py), which is the
link the receiver serves like any stream of replfs frames; this module
carries its commands and answers as PDUs: a write's data as immediate data
and, past FirstBurstLength, through R2T and Data-Out; a read's data as
Data-In with the status in the last (phase collapse).

The command window: ExpCmdSN moves as commands arrive, and MaxCmdSN
leaves room for CMD_WINDOW commands not yet answered, so an initiator
keeps that many in flight and they complete in any order.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypedDict

import trio

from repl.errors import ProtocolError
from repl.iscsi import login, text
from repl.iscsi.chap import Secrets
from repl.iscsi.pdu import F_FINAL, NO_TAG, Opcode, Pdu, PduStream, sn_lt, words
from repl.scsi import spc
from repl.scsi.lun import Lun
from store.errors import RecordError

log = logging.getLogger("replfs.iscsi")

LOGIN_SECONDS = 5.0  # a login not done by then is dropped, as the gate drops strangers
_DATA_S, _DATA_U, _DATA_O = 0x01, 0x02, 0x04


class _Sns(TypedDict):
    """The sequence numbers of a PDU to the initiator (Pdu's keyword arguments)."""

    sn: int
    exp_sn: int


class TargetLink:
    """One normal (or discovery) session's connection, full-feature phase: the PDUs
    of the LUN's commands (``lun``, the receiver's link)."""

    def __init__(self, pdus: PduStream, session: login.Session, iqn: str, address: str,
                 serial: str) -> None:
        self.pdus = pdus
        self.session = session
        self.iqn = iqn
        self.address = address  # ours, for SendTargets
        self.lun = Lun(self, iqn, serial, spc.ISCSI_VERSION)
        self._exp_cmd_sn = session.cmd_sn
        self._max_cmd_sn = session.max_cmd_sn
        self._stat_sn = session.stat_sn
        self._outstanding = 0
        self._transfers: dict[int, tuple[int, int]] = {}  # ITT: (TTT, R2Ts sent)
        self._next_ttt = 1

    # --- the PDU loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Read and answer PDUs until the initiator logs out or the link ends; then the
        receiver reads EndOfChannel (or the error that ended it). Never raises."""
        error: Exception | None = None
        try:
            while True:
                pdu = None
                with trio.move_on_at(self.lun.deadline()):
                    pdu = await self.pdus.receive()
                if pdu is None:
                    await self.lun.expire()
                    continue
                if await self._handle(pdu):
                    return
        except (ProtocolError, RecordError, OSError, trio.BrokenResourceError) as exc:
            error = exc
        except trio.EndOfChannel:
            pass
        except trio.ClosedResourceError:
            pass  # closed by aclose
        finally:
            await self.lun.ended(error)

    def _window(self) -> None:
        """Move ExpCmdSN past a command received, and MaxCmdSN with the free slots."""
        free = max(0, login.CMD_WINDOW - self._outstanding)
        new = (self._exp_cmd_sn + free - 1) & 0xFFFFFFFF
        if sn_lt(self._max_cmd_sn, new):
            self._max_cmd_sn = new

    def _sns(self, *, advance: bool = True) -> _Sns:
        """StatSN, ExpCmdSN and MaxCmdSN for a PDU to the initiator."""
        stat_sn = self._stat_sn
        if advance:
            self._stat_sn = (stat_sn + 1) & 0xFFFFFFFF
        self._window()
        return _Sns(sn=stat_sn, exp_sn=self._exp_cmd_sn)

    async def _handle(self, pdu: Pdu) -> bool:
        """Answer one PDU; True once the session is over (a logout)."""
        if pdu.opcode in (Opcode.SCSI_COMMAND, Opcode.NOP_OUT, Opcode.TEXT_REQUEST,
                          Opcode.TASK_REQUEST, Opcode.LOGOUT_REQUEST) and not pdu.immediate:
            if pdu.sn != self._exp_cmd_sn:
                raise ProtocolError(f"CmdSN {pdu.sn}, expected {self._exp_cmd_sn}")
            self._exp_cmd_sn = (self._exp_cmd_sn + 1) & 0xFFFFFFFF
            if pdu.opcode == Opcode.SCSI_COMMAND:
                self._outstanding += 1
        if pdu.opcode == Opcode.SCSI_COMMAND and not self.session.discovery:
            # ITT, expected data transfer length, CDB; the LUN is in bytes 8..9
            await self.lun.command(pdu.itt, pdu.lun >> 48 & 0x3FFF, pdu.tail, pdu.ttt,
                                   pdu.data)
        elif pdu.opcode == Opcode.DATA_OUT:
            await self._data_out(pdu)
        elif pdu.opcode == Opcode.NOP_OUT:
            if pdu.itt != NO_TAG:
                await self.pdus.send(Pdu(Opcode.NOP_IN, F_FINAL, lun=pdu.lun, itt=pdu.itt,
                                         ttt=NO_TAG, data=pdu.data, **self._sns(),
                                         tail=words(self._max_cmd_sn)))
        elif pdu.opcode == Opcode.TEXT_REQUEST:
            pairs = text.decode(pdu.data)
            answer = ({"TargetName": self.iqn,
                       "TargetAddress": f"{self.address},{login.PORTAL_GROUP}"}
                      if pairs.get("SendTargets") in ("All", self.iqn) else {})
            await self.pdus.send(Pdu(Opcode.TEXT_RESPONSE, F_FINAL, lun=pdu.lun, itt=pdu.itt,
                                     ttt=NO_TAG, data=text.encode(answer), **self._sns(),
                                     tail=words(self._max_cmd_sn)))
        elif pdu.opcode == Opcode.TASK_REQUEST:
            function = pdu.flags & 0x7F
            response = 0 if function in (1, 5, 6, 7) else 5  # done, or not supported
            if function == 1 and self.lun.forget(pdu.ttt):  # ABORT TASK (referenced tag)
                self._transfers.pop(pdu.ttt, None)
                self._outstanding -= 1
            await self.pdus.send(Pdu(Opcode.TASK_RESPONSE, F_FINAL, response, itt=pdu.itt,
                                     **self._sns(), tail=words(self._max_cmd_sn)))
        elif pdu.opcode == Opcode.LOGOUT_REQUEST:
            await self.pdus.send(Pdu(Opcode.LOGOUT_RESPONSE, F_FINAL, 0, itt=pdu.itt,
                                     **self._sns(), tail=words(self._max_cmd_sn)))
            return True
        else:
            await self.pdus.send(Pdu(Opcode.REJECT, F_FINAL, 0x05, itt=NO_TAG,
                                     data=pdu.encode()[:48], **self._sns(),
                                     tail=words(self._max_cmd_sn)))
        return False

    async def _data_out(self, pdu: Pdu) -> None:
        ttt, _ = self._transfers.get(pdu.itt, (None, 0))
        if ttt is None or pdu.ttt != ttt or not self.lun.writing(pdu.itt):
            raise ProtocolError(f"Data-Out for no transfer (ITT {pdu.itt:#x})")
        await self.lun.data_out(pdu.itt, pdu.words[2], pdu.data, pdu.final)

    # --- the LUN's answers (its Port) ------------------------------------------------------

    async def want_data(self, tag: int, offset: int, length: int) -> None:
        """An R2T for the next burst, at most MaxBurstLength."""
        _, r2ts = self._transfers.get(tag, (0, 0))
        ttt, self._next_ttt = self._next_ttt, (self._next_ttt + 1) % NO_TAG or 1
        self._transfers[tag] = (ttt, r2ts + 1)
        length = min(length, self.session.params.max_burst)
        await self.pdus.send(Pdu(Opcode.R2T, F_FINAL, lun=0, itt=tag, ttt=ttt,
                                 **self._sns(advance=False),
                                 tail=words(self._max_cmd_sn, r2ts, offset, length)))

    async def data_in(self, tag: int, data: bytes, expected: int) -> None:
        """*data* in Data-In PDUs, the last with GOOD status (phase collapse)."""
        sent = data[:expected]
        flags, residual = _residual(len(data), expected)
        chunk = self.session.params.send_data
        pdus = []
        for sn, offset in enumerate(range(0, len(sent), chunk)):
            last = offset + chunk >= len(sent)
            pdus.append(Pdu(Opcode.DATA_IN, (F_FINAL | _DATA_S | flags) if last else 0,
                            b3=spc.GOOD, itt=tag, ttt=NO_TAG,
                            **(self._done(tag) if last else self._sns(advance=False) | {"sn": 0}),
                            data=sent[offset : offset + chunk],
                            tail=words(self._max_cmd_sn, sn, offset, residual if last else 0)))
        if not pdus:
            return await self.respond(tag, spc.GOOD, expected=expected, length=len(data))
        await self.pdus.send(*pdus)

    def _done(self, tag: int) -> _Sns:
        """The SNs of a command's final answer: one command fewer outstanding."""
        self._transfers.pop(tag, None)
        self._outstanding = max(0, self._outstanding - 1)
        return self._sns()

    async def respond(self, tag: int, status: int, sense: spc.Sense | None = None,
                      expected: int = 0, length: int = 0) -> None:
        flags, residual = _residual(length, expected)
        data = b""
        if sense is not None:
            raw = sense.encode()
            data = len(raw).to_bytes(2, "big") + raw
        await self.pdus.send(Pdu(Opcode.SCSI_RESPONSE, F_FINAL | flags, 0, status, itt=tag,
                                 **self._done(tag), data=data,
                                 tail=words(self._max_cmd_sn, 0, 0, residual)))

    async def aclose(self) -> None:
        await self.pdus.aclose()


def _residual(length: int, expected: int) -> tuple[int, int]:
    """(the U or O flag, the residual count) of *length* bytes where *expected* were."""
    if length < expected:
        return _DATA_U, expected - length
    if length > expected:
        return _DATA_O, length - expected
    return 0, 0


async def serve(listeners: list[trio.SocketListener], secrets: Secrets, iqn: str,
                serial: str, on_link: Callable[[Lun, str], Awaitable[None]], *,
                task_status: trio.TaskStatus[list[trio.SocketListener]]
                = trio.TASK_STATUS_IGNORED) -> None:
    """Accept iSCSI connections on *listeners* for the target *iqn*, whose LUN has the
    unit serial number *serial*; hand each normal session, once logged in, to
    *on_link* (the receiver) with the peer's address."""
    tsih = 0
    bound = listeners[0].socket.getsockname()
    address = f"{bound[0]}:{bound[1]}"

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal tsih
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "?"
        pdus = PduStream(stream, text.MAX_RECV)
        tsih = tsih % 0xFFFF + 1
        try:
            with trio.fail_after(LOGIN_SECONDS):
                session = await login.accept(pdus, secrets, iqn, tsih)
        except (login.LoginFailed, ProtocolError, OSError, trio.BrokenResourceError,
                trio.EndOfChannel, trio.TooSlowError) as exc:
            log.warning("refused iSCSI login from %s: %s", peer, exc)
            await trio.aclose_forcefully(stream)
            return
        link = TargetLink(pdus, session, iqn, address, serial)
        link.lun.peer = f"{session.initiator} at {peer}"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.run)
            if not session.discovery:
                await on_link(link.lun, link.lun.peer)
                nursery.cancel_scope.cancel()
        await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, listeners, task_status=task_status)
