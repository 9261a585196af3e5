"""Replication frames as SCSI commands: the primary's end of a SCSI link (iSCSI, FCP).

The sender speaks frames (repl/link.py); here each becomes what a storage
array's replication would send to its target VLUN (the LUN's layout is in
spc.py), through an ``Initiator`` of any transport:

    HELLO      WRITE(16) to CONTROL, then READ of STATUS (the reply's
               length) and of REPLY: the secondary's HELLO, or its ERROR
    RESET_TO   WRITE(16) to CONTROL
    RECORD     WRITE(16) to the next blocks of RECORDS, many outstanding;
               its GOOD status is the record's STAGED acknowledgement, and
               CHECK CONDITION ends the session (the records are sent again)
    APPLIED    read back: once the handshake is done, a READ of STATUS_WAIT
               is always outstanding, and each answer with a newer set
               becomes an APPLIED frame

Records go uncompressed (one record, one WRITE): the primary offers no
compression over SCSI.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from repl.errors import ProtocolError
from repl.protocol import Frame, FrameReader, FrameType, applied, staged
from repl.scsi import spc
from store.records import peek_key


@dataclass
class Result:
    """How a command ended: SCSI status, sense data if any, and what was read."""

    status: int
    sense: spc.Sense | None = None
    data: bytes = b""

    @property
    def good(self) -> bool:
        return self.status == spc.GOOD

    def check(self, what: str) -> Result:
        """Self, if GOOD; else ProtocolError saying *what* failed and why."""
        if not self.good:
            raise ProtocolError(f"{what}: SCSI status {self.status:#04x}"
                                f"{f' ({self.sense})' if self.sense else ''}")
        return self


class Initiator(Protocol):
    """SCSI commands over one logged-in session of some transport, many outstanding."""

    async def submit(self, cdb: bytes, done: Callable[[Result | Exception], None], *,
                     data_out: bytes = b"", read: int = 0, lun: int = 0) -> None:
        """Send a command; *done* is called with its Result, or the error that ended the
        session. Returns once it is on its way: it waits only for room to send it."""

    async def command(self, cdb: bytes, *, data_out: bytes = b"", read: int = 0,
                      lun: int = 0) -> Result:
        """Send a command and wait for its result. Raises what ended the session."""
        ...

    async def aclose(self) -> None:
        """Close the session's connection at once."""


async def run_command(initiator: Initiator, cdb: bytes, *, data_out: bytes = b"",
                      read: int = 0, lun: int = 0) -> Result:
    """``Initiator.command`` for any transport: ``submit``, then wait for the result.
    Raises what ended the session."""
    finished = trio.Event()
    outcome: list[Result | Exception] = []

    def done(result: Result | Exception) -> None:
        outcome.append(result)
        finished.set()

    await initiator.submit(cdb, done, data_out=data_out, read=read, lun=lun)
    await finished.wait()
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


class InitiatorLink:
    """A replication stream over one SCSI session (see the module comment)."""

    def __init__(self, initiator: Initiator, nursery: trio.Nursery) -> None:
        self.initiator = initiator
        self._nursery = nursery
        self._inbox_in, self._inbox = trio.open_memory_channel[Frame | Exception](math.inf)
        self._staged: list[tuple[int, int]] = []  # GOOD records, not yet received
        self._next_lba = 0

    async def send(self, *frames: Frame) -> None:
        for frame in frames:
            if frame.type == FrameType.RECORD:
                await self._record(frame.payload)
            elif frame.type == FrameType.HELLO:
                await self._control(frame)
                await self._read_reply()
            elif frame.type == FrameType.RESET_TO:
                await self._control(frame)
            else:
                raise ProtocolError(f"a {frame.type.name} frame has no place on a SCSI link")

    async def receive(self) -> Frame:
        while True:
            item = await self._inbox.receive()
            if isinstance(item, Exception):
                raise item
            if item.type != FrameType.STAGED:
                return item
            if self._staged:  # every record GOOD so far, in one frame
                keys, self._staged = self._staged, []
                return staged(keys)

    def handshake_done(self) -> None:
        self._nursery.start_soon(self._poll_applied)

    async def aclose(self) -> None:
        await self.initiator.aclose()

    async def _record(self, raw: bytes) -> None:
        key = peek_key(raw)
        data = spc.envelope(raw)
        blocks = spc.blocks_for(len(data))
        span = spc.BLOCKS - spc.RECORDS_LBA
        if self._next_lba + blocks > span:
            self._next_lba = 0
        lba = spc.RECORDS_LBA + self._next_lba
        self._next_lba += blocks

        def done(result: Result | Exception) -> None:
            if isinstance(result, Exception):
                self._inbox_in.send_nowait(result)
            elif not result.good:
                self._inbox_in.send_nowait(ProtocolError(
                    f"the secondary refused record {key}: CHECK CONDITION ({result.sense})"))
            else:
                self._staged.append(key)
                self._inbox_in.send_nowait(Frame(FrameType.STAGED, b""))

        await self.initiator.submit(spc.cdb16(spc.Op.WRITE_16, lba, blocks), done,
                                    data_out=data)

    async def _control(self, frame: Frame) -> None:
        data = spc.envelope(frame.encode())
        result = await self.initiator.command(
            spc.cdb16(spc.Op.WRITE_16, spc.CONTROL_LBA, spc.blocks_for(len(data))),
            data_out=data)
        result.check(f"WRITE of {frame.type.name}")

    async def _read_reply(self) -> None:
        """The secondary's answer to our HELLO, into the inbox."""
        _, length = spc.parse_status_block((await self._read(spc.STATUS_LBA, 1)).data)
        if not 0 < length <= 1 << 20:
            raise ProtocolError(f"the secondary's reply is {length} bytes")
        result = await self._read(spc.REPLY_LBA, spc.blocks_for(length + 4))
        reader = FrameReader()
        reader.feed(spc.open_envelope(result.data))
        frame = reader.next()
        if frame is None:
            raise ProtocolError("the secondary's reply is not a whole frame")
        self._inbox_in.send_nowait(frame)

    async def _read(self, lba: int, blocks: int) -> Result:
        result = await self.initiator.command(spc.cdb16(spc.Op.READ_16, lba, blocks),
                                              read=blocks * spc.BLOCK)
        return result.check(f"READ of block {lba}")

    async def _poll_applied(self) -> None:
        """Keep a READ of STATUS_WAIT outstanding; a newer applied set becomes APPLIED."""
        last = 0
        try:
            while True:
                result = await self._read(spc.STATUS_WAIT_LBA, 1)
                set_id, _ = spc.parse_status_block(result.data)
                if set_id > last:
                    last = set_id
                    self._inbox_in.send_nowait(applied(set_id))
        except (ProtocolError, trio.BrokenResourceError, trio.EndOfChannel, OSError,
                trio.ClosedResourceError) as exc:
            self._inbox_in.send_nowait(exc)
