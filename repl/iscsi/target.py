"""The secondary's iSCSI target: one LUN, the staging store, over TCP (RFC 7143).

Each connection logs in with mutual CHAP (login.py) and is one session. A
discovery session answers SendTargets and logs out. A normal session is a
link (repl/link.py) the receiver serves like any stream of replfs frames:

- WRITE(16) (or (10)) to RECORDS carries one record, taken as immediate
  data and, past FirstBurstLength, through R2T and Data-Out. It becomes a
  RECORD frame for the receiver, and is answered GOOD when the receiver
  says STAGED: once the record is durable in staging (claims 5 and 10),
  in whatever order the stager commits (out of order across commands);
- WRITE to CONTROL carries a HELLO (answered GOOD once the receiver
  replied; the reply is READ from REPLY) or RESET_TO;
- READ of STATUS or STATUS_WAIT gives the set the replica applied, which
  the receiver tells as APPLIED;
- TEST UNIT READY, INQUIRY (standard, VPD 0x00, 0x80, 0x83, 0xB0, 0xB1),
  REPORT LUNS, READ CAPACITY(10/16), MODE SENSE(6/10), REQUEST SENSE and
  SYNCHRONIZE CACHE answer per SPC-4/SBC-3 (scsi.py), for any initiator.

A block that is not a record, a write elsewhere, an unknown opcode or a
LUN other than 0 gets CHECK CONDITION with sense data saying which.

The command window: ExpCmdSN moves as commands arrive, and MaxCmdSN
leaves room for CMD_WINDOW commands not yet answered, so an initiator
keeps that many in flight and they complete in any order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypedDict

import trio

from repl.errors import ProtocolError
from repl.iscsi import login, scsi, text
from repl.iscsi.chap import Secrets
from repl.iscsi.pdu import F_FINAL, NO_TAG, Opcode, Pdu, PduStream, sn_lt, words
from repl.protocol import Frame, FrameReader, FrameType, parse_applied, parse_staged
from store.errors import RecordError
from store.records import Record, peek_key

log = logging.getLogger("replfs.iscsi")

LOGIN_SECONDS = 5.0  # a login not done by then is dropped, as the gate drops strangers
MAX_READ = 4 << 20  # the most one READ may ask for
FRAMES_WAITING = 64  # frames read and not yet taken by the receiver: then we stop reading
_R, _W = 0x40, 0x20
_DATA_S, _DATA_U, _DATA_O = 0x01, 0x02, 0x04


class _Sns(TypedDict):
    """The sequence numbers of a PDU to the initiator (Pdu's keyword arguments)."""

    sn: int
    exp_sn: int


@dataclass
class _Write:
    itt: int
    lba: int
    lun: int
    total: int
    data: bytearray
    ttt: int = NO_TAG
    r2ts: int = 0


@dataclass
class _Wait:
    itt: int
    length: int
    deadline: float


@dataclass
class _State:
    applied: int = 0
    applied_seen: int = 0  # what the last STATUS_WAIT read returned
    reply: bytes = b""  # the encoded frame answering the HELLO
    reply_read: trio.Event = field(default_factory=trio.Event)
    hello_itt: int | None = None
    serving: bool = False  # the receiver took the HELLO: records are welcome


class TargetLink:
    """One normal (or discovery) session's connection, full-feature phase."""

    def __init__(self, pdus: PduStream, session: login.Session, iqn: str, address: str,
                 serial: str) -> None:
        self.pdus = pdus
        self.session = session
        self.iqn = iqn
        self.address = address  # ours, for SendTargets
        self.peer = ""
        self._exp_cmd_sn = session.cmd_sn
        self._max_cmd_sn = session.max_cmd_sn
        self._stat_sn = session.stat_sn
        self._outstanding = 0
        self._writes: dict[int, _Write] = {}
        self._records: dict[tuple[int, int], list[int]] = {}
        self._waits: list[_Wait] = []
        self._state = _State()
        self._next_ttt = 1
        self._frames_in, self._frames = trio.open_memory_channel[Frame | Exception](
            FRAMES_WAITING)
        self._serial = serial.encode()  # the LUN's, the same in every session

    # --- the link, as the receiver sees it --------------------------------------------------

    async def send(self, *frames: Frame) -> None:
        for frame in frames:
            if frame.type == FrameType.STAGED:
                for key in parse_staged(frame):
                    for itt in self._records.pop(key, []):
                        await self._respond(itt, scsi.GOOD)
            elif frame.type == FrameType.APPLIED:
                self._state.applied = parse_applied(frame)
                for wait in self._waits[:]:
                    await self._answer_wait(wait)
            elif frame.type in (FrameType.HELLO, FrameType.ERROR):
                self._state.reply = frame.encode()
                self._state.serving = frame.type == FrameType.HELLO
                if self._state.hello_itt is not None:
                    itt, self._state.hello_itt = self._state.hello_itt, None
                    await self._respond(itt, scsi.GOOD)
            else:
                raise ProtocolError(f"a {frame.type.name} frame has no place on iSCSI")

    async def receive(self) -> Frame:
        item = await self._frames.receive()
        if isinstance(item, Exception):
            raise item
        return item

    def handshake_done(self) -> None:
        pass  # the login bounded PDUs already

    async def aclose(self) -> None:
        """Close, after giving the initiator a second to read a reply it was given (a
        refusal, mostly)."""
        if self._state.reply and not self._state.serving:
            with trio.move_on_after(1.0):
                await self._state.reply_read.wait()
        with trio.CancelScope(shield=True):
            await self.pdus.aclose()

    # --- the PDU loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Read and answer PDUs until the initiator logs out or the link ends; then the
        receiver reads EndOfChannel (or the error that ended it). Never raises."""
        try:
            while True:
                deadline = min((w.deadline for w in self._waits), default=math.inf)
                pdu = None
                with trio.move_on_at(deadline):
                    pdu = await self.pdus.receive()
                if pdu is None:
                    now = trio.current_time()
                    for wait in [w for w in self._waits if w.deadline <= now]:
                        await self._answer_wait(wait, force=True)
                    continue
                if await self._handle(pdu):
                    return
        except (ProtocolError, RecordError, OSError, trio.BrokenResourceError) as exc:
            with trio.move_on_after(1.0):
                await self._frames_in.send(exc)
        except trio.EndOfChannel:
            pass
        except trio.ClosedResourceError:
            pass  # closed by aclose
        finally:
            self._frames_in.close()

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
            await self._command(pdu)
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
            if function == 1:  # ABORT TASK: forget it; its record may be staged already
                self._forget(pdu.ttt)
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

    def _forget(self, itt: int) -> None:
        if self._writes.pop(itt, None) is not None:
            self._outstanding -= 1
        for key, itts in list(self._records.items()):
            if itt in itts:
                itts.remove(itt)
                self._outstanding -= 1
                if not itts:
                    del self._records[key]

    # --- SCSI commands ---------------------------------------------------------------------

    async def _command(self, pdu: Pdu) -> None:
        itt, edtl, cdb_bytes = pdu.itt, pdu.ttt, pdu.tail
        lun = pdu.lun >> 48 & 0x3FFF
        try:
            cdb = scsi.parse_cdb(cdb_bytes)
        except ProtocolError:
            return await self._respond(itt, scsi.CHECK_CONDITION, scsi.INVALID_OPCODE, edtl)
        if cdb.op == scsi.Op.REPORT_LUNS:
            return await self._data_in(itt, scsi.report_luns([0]), min(edtl, cdb.alloc))
        if cdb.op == scsi.Op.INQUIRY and lun != 0 and not cdb.evpd:
            return await self._data_in(itt, scsi.standard_inquiry(False), min(edtl, cdb.alloc))
        if lun != 0:
            return await self._respond(itt, scsi.CHECK_CONDITION, scsi.LUN_NOT_SUPPORTED, edtl)
        if cdb.op in (scsi.Op.WRITE_16, scsi.Op.WRITE_10, scsi.Op.READ_16, scsi.Op.READ_10):
            if cdb.lba >= scsi.BLOCKS or cdb.lba + cdb.blocks > scsi.BLOCKS:
                return await self._respond(itt, scsi.CHECK_CONDITION, scsi.LBA_OUT_OF_RANGE,
                                           edtl)
            if cdb.flags & scsi.PROTECT_DPO_FUA:
                return await self._respond(itt, scsi.CHECK_CONDITION,
                                           scsi.INVALID_FIELD_IN_CDB, edtl)
        if cdb.op in (scsi.Op.WRITE_16, scsi.Op.WRITE_10):
            return await self._write(pdu, cdb)
        data: bytes | None = None
        if cdb.op in (scsi.Op.READ_16, scsi.Op.READ_10):
            return await self._read(itt, cdb, edtl)
        if cdb.op == scsi.Op.INQUIRY:
            data = (scsi.vpd_page(cdb.page, self._serial, self.iqn) if cdb.evpd
                    else scsi.standard_inquiry() if cdb.page == 0 else None)
        elif cdb.op == scsi.Op.SERVICE_ACTION_IN_16:
            data = scsi.read_capacity16() if cdb.service_action == scsi.READ_CAPACITY_16 \
                else None
        elif cdb.op == scsi.Op.READ_CAPACITY_10:
            data = scsi.read_capacity10()
        elif cdb.op in (scsi.Op.MODE_SENSE_6, scsi.Op.MODE_SENSE_10):
            data = scsi.mode_sense(cdb)
        elif cdb.op == scsi.Op.REQUEST_SENSE:
            data = scsi.Sense(0, 0).encode()
        else:  # TEST UNIT READY, SYNCHRONIZE CACHE: staged records are durable already
            return await self._respond(itt, scsi.GOOD, expected=edtl)
        if data is None:
            return await self._respond(itt, scsi.CHECK_CONDITION, scsi.INVALID_FIELD_IN_CDB,
                                       edtl)
        alloc = len(data) if cdb.op == scsi.Op.READ_CAPACITY_10 else cdb.alloc
        await self._data_in(itt, data[:alloc], edtl)

    async def _write(self, pdu: Pdu, cdb: scsi.Cdb) -> None:
        itt, size = pdu.itt, cdb.blocks * scsi.BLOCK
        sense = None
        if cdb.lba != scsi.CONTROL_LBA and cdb.lba < scsi.RECORDS_LBA:
            sense = scsi.WRITE_PROTECTED
        elif size != pdu.ttt or not 0 < size <= text.MAX_BURST * 80 or len(pdu.data) > size:
            sense = scsi.INVALID_FIELD_IN_CDB
        if sense is not None:
            return await self._respond(itt, scsi.CHECK_CONDITION, sense, pdu.ttt)
        write = _Write(itt, cdb.lba, 0, size, bytearray(pdu.data))
        self._writes[itt] = write
        await self._next_burst(write)

    async def _next_burst(self, write: _Write) -> None:
        if len(write.data) >= write.total:
            del self._writes[write.itt]
            return await self._written(write)
        write.ttt, self._next_ttt = self._next_ttt, (self._next_ttt + 1) % NO_TAG or 1
        length = min(write.total - len(write.data), self.session.params.max_burst)
        await self.pdus.send(Pdu(Opcode.R2T, F_FINAL, lun=0, itt=write.itt, ttt=write.ttt,
                                 **self._sns(advance=False),
                                 tail=words(self._max_cmd_sn, write.r2ts, len(write.data),
                                            length)))
        write.r2ts += 1

    async def _data_out(self, pdu: Pdu) -> None:
        write = self._writes.get(pdu.itt)
        if write is None or pdu.ttt != write.ttt:
            raise ProtocolError(f"Data-Out for no transfer (ITT {pdu.itt:#x})")
        offset = pdu.words[2]
        if offset != len(write.data) or offset + len(pdu.data) > write.total:
            raise ProtocolError(f"Data-Out at offset {offset}, expected {len(write.data)}")
        write.data += pdu.data
        if pdu.final:
            await self._next_burst(write)

    async def _written(self, write: _Write) -> None:
        """All of a write's data is in: hand it to the receiver, or refuse it."""
        try:
            payload = scsi.open_envelope(bytes(write.data))
            if write.lba == scsi.CONTROL_LBA:
                reader = FrameReader()
                reader.feed(payload)
                frame = reader.next()
                if frame is None or frame.type not in (FrameType.HELLO, FrameType.RESET_TO):
                    raise ProtocolError("CONTROL takes a HELLO or a RESET_TO")
            else:
                if not self._state.serving:
                    return await self._respond(write.itt, scsi.CHECK_CONDITION,
                                               scsi.NOT_SERVED)
                Record.decode(payload)  # refused here, with sense, if it is not a record
                frame = Frame(FrameType.RECORD, payload)
        except (ProtocolError, RecordError) as exc:
            log.warning("refused a write from %s: %s", self.peer, exc)
            return await self._respond(write.itt, scsi.CHECK_CONDITION,
                                       scsi.INVALID_FIELD_IN_DATA)
        if frame.type == FrameType.HELLO:
            self._state.hello_itt = write.itt
        elif frame.type == FrameType.RESET_TO:
            await self._respond(write.itt, scsi.GOOD)
        else:
            self._records.setdefault(peek_key(payload), []).append(write.itt)
        await self._frames_in.send(frame)

    async def _read(self, itt: int, cdb: scsi.Cdb, edtl: int) -> None:
        size = cdb.blocks * scsi.BLOCK
        if size > MAX_READ:
            return await self._respond(itt, scsi.CHECK_CONDITION, scsi.INVALID_FIELD_IN_CDB,
                                       edtl)
        state = self._state
        if cdb.lba == scsi.STATUS_WAIT_LBA:
            wait = _Wait(itt, size, trio.current_time() + scsi.WAIT_SECONDS)
            self._waits.append(wait)
            return await self._answer_wait(wait)
        data = bytes(size)
        if cdb.lba == scsi.STATUS_LBA:
            data = scsi.status_block(state.applied, len(state.reply)).ljust(size, b"\0")
        elif scsi.REPLY_LBA <= cdb.lba < scsi.RECORDS_LBA and state.reply:
            start = (cdb.lba - scsi.REPLY_LBA) * scsi.BLOCK
            data = scsi.envelope(state.reply)[start : start + size].ljust(size, b"\0")
            state.reply_read.set()
        await self._data_in(itt, data[:size], edtl)

    async def _answer_wait(self, wait: _Wait, force: bool = False) -> None:
        state = self._state
        if not force and state.applied == state.applied_seen:
            return
        self._waits.remove(wait)
        state.applied_seen = state.applied
        block = scsi.status_block(state.applied, len(state.reply)).ljust(wait.length, b"\0")
        await self._data_in(wait.itt, block[: wait.length], wait.length)

    # --- answers ---------------------------------------------------------------------------

    async def _data_in(self, itt: int, data: bytes, expected: int) -> None:
        """*data* in Data-In PDUs, the last with GOOD status (phase collapse)."""
        sent = data[:expected]
        flags, residual = _residual(len(data), expected)
        chunk = self.session.params.send_data
        pdus = []
        for sn, offset in enumerate(range(0, len(sent), chunk)):
            last = offset + chunk >= len(sent)
            pdus.append(Pdu(Opcode.DATA_IN, (F_FINAL | _DATA_S | flags) if last else 0,
                            b3=scsi.GOOD, itt=itt, ttt=NO_TAG,
                            **(self._done() if last else self._sns(advance=False) | {"sn": 0}),
                            data=sent[offset : offset + chunk],
                            tail=words(self._max_cmd_sn, sn, offset, residual if last else 0)))
        if not pdus:
            return await self._respond(itt, scsi.GOOD, expected=expected, length=len(data))
        await self.pdus.send(*pdus)

    def _done(self) -> _Sns:
        """The SNs of a command's final answer: one command fewer outstanding."""
        self._outstanding = max(0, self._outstanding - 1)
        return self._sns()

    async def _respond(self, itt: int, status: int, sense: scsi.Sense | None = None,
                       expected: int = 0, length: int = 0) -> None:
        flags, residual = _residual(length, expected)
        data = b""
        if sense is not None:
            raw = sense.encode()
            data = len(raw).to_bytes(2, "big") + raw
        await self.pdus.send(Pdu(Opcode.SCSI_RESPONSE, F_FINAL | flags, 0, status, itt=itt,
                                 **self._done(), data=data,
                                 tail=words(self._max_cmd_sn, 0, 0, residual)))


def _residual(length: int, expected: int) -> tuple[int, int]:
    """(the U or O flag, the residual count) of *length* bytes where *expected* were."""
    if length < expected:
        return _DATA_U, expected - length
    if length > expected:
        return _DATA_O, length - expected
    return 0, 0


async def serve(listeners: list[trio.SocketListener], secrets: Secrets, iqn: str,
                serial: str, on_link: Callable[[TargetLink, str], Awaitable[None]], *,
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
        link.peer = f"{session.initiator} at {peer}"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.run)
            if not session.discovery:
                await on_link(link, link.peer)
                nursery.cancel_scope.cancel()
        await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, listeners, task_status=task_status)
