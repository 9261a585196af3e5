"""The replfs LUN at the secondary, whatever carries its commands (iSCSI, FCP).

A transport's target (repl/iscsi/target.py, repl/fc/target.py) hands the
LUN each SCSI command with its tag, then the data of a write as it
arrives; the LUN answers through the transport's ``Port``: data then
status, status alone, or a request for more of a write's data (an R2T, an
FCP_XFER_RDY). To the receiver the LUN is a link (repl/link.py):

- WRITE(16) (or (10)) to RECORDS carries one record. It becomes a RECORD
  frame, and is answered GOOD when the receiver says STAGED: once the
  record is durable in staging (claims 5 and 10), in whatever order the
  stager commits (out of order across commands);
- WRITE to CONTROL carries a HELLO (answered GOOD once the receiver
  replied; the reply is READ from REPLY) or RESET_TO;
- READ of STATUS or STATUS_WAIT gives the set the replica applied, which
  the receiver tells as APPLIED; a READ of STATUS_WAIT waits until that
  changed, or WAIT_SECONDS (the transport's loop calls ``expire``);
- TEST UNIT READY, INQUIRY (standard, VPD 0x00, 0x80, 0x83, 0xB0, 0xB1),
  REPORT LUNS, READ CAPACITY(10/16), MODE SENSE(6/10), REQUEST SENSE and
  SYNCHRONIZE CACHE answer per SPC-4/SBC-3 (spc.py), for any initiator.

A block that is not a record, a write elsewhere, an unknown opcode or a
LUN other than 0 gets CHECK CONDITION with sense data saying which.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Protocol

import trio

from repl.errors import ProtocolError
from repl.protocol import (
    MAX_FRAME,
    Frame,
    FrameReader,
    FrameType,
    parse_applied,
    parse_keys,
)
from repl.scsi import spc
from store.errors import RecordError
from store.records import Record, peek_key

log = logging.getLogger("replfs.scsi")

MAX_READ = 4 << 20  # the most one READ may ask for
FRAMES_WAITING = 64  # frames read and not yet taken by the receiver: then we stop reading


class Port(Protocol):
    """How the LUN answers the initiator: the transport's half of a command."""

    async def data_in(self, tag: int, data: bytes, expected: int) -> None:
        """Send the first *expected* bytes of *data*, then GOOD status with the
        residual (*data* may be longer or shorter than *expected*)."""

    async def respond(self, tag: int, status: int, sense: spc.Sense | None = None,
                      expected: int = 0, length: int = 0) -> None:
        """End the command *tag* with *status* (and *sense*): *length* bytes moved of
        the *expected*."""

    async def want_data(self, tag: int, offset: int, length: int) -> None:
        """Ask for up to *length* bytes of a write's data from *offset*; the initiator
        sends them, and the transport hands them to ``Lun.data_out``, the last of the
        burst with *final*."""

    async def aclose(self) -> None: ...


@dataclass
class _Write:
    tag: int
    lba: int
    total: int
    data: bytearray


@dataclass
class _Wait:
    tag: int
    length: int
    deadline: float


@dataclass
class _State:
    applied: int = 0
    applied_seen: int = 0  # what the last STATUS_WAIT read returned
    reply: bytes = b""  # the encoded frame answering the HELLO
    reply_read: trio.Event = field(default_factory=trio.Event)
    hello_tag: int | None = None
    serving: bool = False  # the receiver took the HELLO: records are welcome


class Lun:
    """LUN 0 of one session (one connection): a link for the receiver.

    *name* is the target's SCSI name (VPD page 0x83), *serial* the LUN's unit
    serial number (the same in every session), *transport* the version
    descriptor INQUIRY claims for the transport.
    """

    def __init__(self, port: Port, name: str, serial: str, transport: int) -> None:
        self.port = port
        self.peer = ""  # who the initiator is, for logs
        self.name = name
        self.transport = transport
        self._serial = serial.encode()
        self._writes: dict[int, _Write] = {}
        self._records: dict[tuple[int, int], list[int]] = {}
        self._waits: list[_Wait] = []
        self._state = _State()
        self._frames_in, self._frames = trio.open_memory_channel[Frame | Exception](
            FRAMES_WAITING)

    # --- the link, as the receiver sees it --------------------------------------------------

    async def send(self, *frames: Frame) -> None:
        for frame in frames:
            if frame.type == FrameType.STAGED:
                for key in parse_keys(frame):
                    for tag in self._records.pop(key, []):
                        await self.port.respond(tag, spc.GOOD)
            elif frame.type == FrameType.APPLIED:
                self._state.applied = parse_applied(frame)
                for wait in self._waits[:]:
                    await self._answer_wait(wait)
            elif frame.type in (FrameType.APPLYING, FrameType.RECEIVED):
                continue  # the initiator polls the applied set; a record is GOOD once staged
            elif frame.type in (FrameType.HELLO, FrameType.ERROR):
                self._state.reply = frame.encode()
                self._state.serving = frame.type == FrameType.HELLO
                if self._state.hello_tag is not None:
                    tag, self._state.hello_tag = self._state.hello_tag, None
                    await self.port.respond(tag, spc.GOOD)
            else:
                raise ProtocolError(f"a {frame.type.name} frame has no place on a LUN")

    async def receive(self) -> Frame:
        item = await self._frames.receive()
        if isinstance(item, Exception):
            raise item
        return item

    def handshake_done(self) -> None:
        pass  # the transport's login bounded its PDUs or frames already

    async def aclose(self) -> None:
        """Close, after giving the initiator a second to read a reply it was given (a
        refusal, mostly)."""
        if self._state.reply and not self._state.serving:
            with trio.move_on_after(1.0):
                await self._state.reply_read.wait()
        with trio.CancelScope(shield=True):
            await self.port.aclose()

    # --- from the transport ---------------------------------------------------------------

    async def ended(self, error: Exception | None = None) -> None:
        """The session is over: the receiver reads EndOfChannel, or *error* first."""
        if error is not None:
            with trio.move_on_after(1.0):
                await self._frames_in.send(error)
        self._frames_in.close()

    def deadline(self) -> float:
        """When the oldest STATUS_WAIT read is due (math.inf if none waits)."""
        return min((w.deadline for w in self._waits), default=math.inf)

    async def expire(self) -> None:
        """Answer the STATUS_WAIT reads that are due, changed or not."""
        now = trio.current_time()
        for wait in [w for w in self._waits if w.deadline <= now]:
            await self._answer_wait(wait, force=True)

    def forget(self, tag: int) -> bool:
        """Drop the write or record *tag* (its task was aborted; a record may be staged
        already); True if it was one of those."""
        found = self._writes.pop(tag, None) is not None
        for key, tags in list(self._records.items()):
            if tag in tags:
                tags.remove(tag)
                found = True
                if not tags:
                    del self._records[key]
        return found

    def writing(self, tag: int) -> bool:
        """Whether *tag* is a write still waiting for data."""
        return tag in self._writes

    async def command(self, tag: int, lun: int, cdb_bytes: bytes, expected: int,
                      data: bytes = b"") -> None:
        """Take the command *tag* for *lun*: its CDB, the transfer length the initiator
        expects, and the data it sent with the command (iSCSI's immediate data)."""
        try:
            cdb = spc.parse_cdb(cdb_bytes)
        except ProtocolError:
            return await self.port.respond(tag, spc.CHECK_CONDITION, spc.INVALID_OPCODE,
                                           expected)
        if cdb.op == spc.Op.REPORT_LUNS:
            return await self.port.data_in(tag, spc.report_luns([0]), min(expected, cdb.alloc))
        if cdb.op == spc.Op.INQUIRY and lun != 0 and not cdb.evpd:
            return await self.port.data_in(tag, spc.standard_inquiry(self.transport, False),
                                           min(expected, cdb.alloc))
        if lun != 0:
            return await self.port.respond(tag, spc.CHECK_CONDITION, spc.LUN_NOT_SUPPORTED,
                                           expected)
        if cdb.op in (spc.Op.WRITE_16, spc.Op.WRITE_10, spc.Op.READ_16, spc.Op.READ_10):
            if cdb.lba >= spc.BLOCKS or cdb.lba + cdb.blocks > spc.BLOCKS:
                return await self.port.respond(tag, spc.CHECK_CONDITION, spc.LBA_OUT_OF_RANGE,
                                               expected)
            if cdb.flags & spc.PROTECT_DPO_FUA:
                return await self.port.respond(tag, spc.CHECK_CONDITION,
                                               spc.INVALID_FIELD_IN_CDB, expected)
        if cdb.op in (spc.Op.WRITE_16, spc.Op.WRITE_10):
            return await self._write(tag, cdb, expected, data)
        if cdb.op in (spc.Op.READ_16, spc.Op.READ_10):
            return await self._read(tag, cdb, expected)
        reply: bytes | None = None
        if cdb.op == spc.Op.INQUIRY:
            reply = (spc.vpd_page(cdb.page, self._serial, self.name) if cdb.evpd
                     else spc.standard_inquiry(self.transport) if cdb.page == 0 else None)
        elif cdb.op == spc.Op.SERVICE_ACTION_IN_16:
            reply = spc.read_capacity16() if cdb.service_action == spc.READ_CAPACITY_16 \
                else None
        elif cdb.op == spc.Op.READ_CAPACITY_10:
            reply = spc.read_capacity10()
        elif cdb.op in (spc.Op.MODE_SENSE_6, spc.Op.MODE_SENSE_10):
            reply = spc.mode_sense(cdb)
        elif cdb.op == spc.Op.REQUEST_SENSE:
            reply = spc.Sense(0, 0).encode()
        else:  # TEST UNIT READY, SYNCHRONIZE CACHE: staged records are durable already
            return await self.port.respond(tag, spc.GOOD, expected=expected)
        if reply is None:
            return await self.port.respond(tag, spc.CHECK_CONDITION, spc.INVALID_FIELD_IN_CDB,
                                           expected)
        alloc = len(reply) if cdb.op == spc.Op.READ_CAPACITY_10 else cdb.alloc
        await self.port.data_in(tag, reply[:alloc], expected)

    async def data_out(self, tag: int, offset: int, data: bytes, final: bool) -> None:
        """Data of the write *tag* at *offset*; *final* ends the burst asked for.
        Raises ProtocolError for data no write is waiting for."""
        write = self._writes.get(tag)
        if write is None:
            raise ProtocolError(f"data for no write (tag {tag:#x})")
        if offset != len(write.data) or offset + len(data) > write.total:
            raise ProtocolError(f"data at offset {offset}, expected {len(write.data)}")
        write.data += data
        if final:
            await self._next_burst(write)

    # --- commands -----------------------------------------------------------------------

    async def _write(self, tag: int, cdb: spc.Cdb, expected: int, data: bytes) -> None:
        size = cdb.blocks * spc.BLOCK
        sense = None
        if cdb.lba != spc.CONTROL_LBA and cdb.lba < spc.RECORDS_LBA:
            sense = spc.WRITE_PROTECTED
        elif size != expected or not 0 < size <= MAX_FRAME or len(data) > size:
            sense = spc.INVALID_FIELD_IN_CDB
        if sense is not None:
            return await self.port.respond(tag, spc.CHECK_CONDITION, sense, expected)
        write = _Write(tag, cdb.lba, size, bytearray(data))
        self._writes[tag] = write
        await self._next_burst(write)

    async def _next_burst(self, write: _Write) -> None:
        if len(write.data) >= write.total:
            del self._writes[write.tag]
            return await self._written(write)
        await self.port.want_data(write.tag, len(write.data), write.total - len(write.data))

    async def _written(self, write: _Write) -> None:
        """All of a write's data is in: hand it to the receiver, or refuse it."""
        try:
            payload = spc.open_envelope(bytes(write.data))
            if write.lba == spc.CONTROL_LBA:
                reader = FrameReader()
                reader.feed(payload)
                frame = reader.next()
                if frame is None or frame.type not in (FrameType.HELLO, FrameType.RESET_TO):
                    raise ProtocolError("CONTROL takes a HELLO or a RESET_TO")
            else:
                if not self._state.serving:
                    return await self.port.respond(write.tag, spc.CHECK_CONDITION,
                                                   spc.NOT_SERVED)
                Record.decode(payload)  # refused here, with sense, if it is not a record
                frame = Frame(FrameType.RECORD, payload)
        except (ProtocolError, RecordError) as exc:
            log.warning("refused a write from %s: %s", self.peer, exc)
            return await self.port.respond(write.tag, spc.CHECK_CONDITION,
                                           spc.INVALID_FIELD_IN_DATA)
        if frame.type == FrameType.HELLO:
            self._state.hello_tag = write.tag
        elif frame.type == FrameType.RESET_TO:
            await self.port.respond(write.tag, spc.GOOD)
        else:
            self._records.setdefault(peek_key(payload), []).append(write.tag)
        await self._frames_in.send(frame)

    async def _read(self, tag: int, cdb: spc.Cdb, expected: int) -> None:
        size = cdb.blocks * spc.BLOCK
        if size > MAX_READ:
            return await self.port.respond(tag, spc.CHECK_CONDITION, spc.INVALID_FIELD_IN_CDB,
                                           expected)
        state = self._state
        if cdb.lba == spc.STATUS_WAIT_LBA:
            wait = _Wait(tag, size, trio.current_time() + spc.WAIT_SECONDS)
            self._waits.append(wait)
            return await self._answer_wait(wait)
        data = bytes(size)
        if cdb.lba == spc.STATUS_LBA:
            data = spc.status_block(state.applied, len(state.reply)).ljust(size, b"\0")
        elif spc.REPLY_LBA <= cdb.lba < spc.RECORDS_LBA and state.reply:
            start = (cdb.lba - spc.REPLY_LBA) * spc.BLOCK
            data = spc.envelope(state.reply)[start : start + size].ljust(size, b"\0")
            state.reply_read.set()
        await self.port.data_in(tag, data[:size], expected)

    async def _answer_wait(self, wait: _Wait, force: bool = False) -> None:
        state = self._state
        if not force and state.applied == state.applied_seen:
            return
        self._waits.remove(wait)
        state.applied_seen = state.applied
        block = spc.status_block(state.applied, len(state.reply)).ljust(wait.length, b"\0")
        await self.port.data_in(wait.tag, block[: wait.length], wait.length)
