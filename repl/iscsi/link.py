"""Replication frames as SCSI commands: the primary's end of an iSCSI link.

The sender speaks frames (repl/link.py); here each becomes what a storage
array's replication would send to its target VLUN (the LUN's layout is in
scsi.py):

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
compression over iSCSI.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from repl.errors import ProtocolError
from repl.iscsi import chap, scsi
from repl.iscsi.initiator import Initiator, Result, open_session
from repl.iscsi.names import parse_url
from repl.link import Link
from repl.protocol import Frame, FrameReader, FrameType, applied, staged
from store.records import peek_key


class InitiatorLink:
    """A replication stream over one iSCSI session (see the module comment)."""

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
                raise ProtocolError(f"a {frame.type.name} frame has no place on iSCSI")

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
        await self.initiator.pdus.aclose()

    async def _record(self, raw: bytes) -> None:
        key = peek_key(raw)
        data = scsi.envelope(raw)
        blocks = scsi.blocks_for(len(data))
        span = scsi.BLOCKS - scsi.RECORDS_LBA
        if self._next_lba + blocks > span:
            self._next_lba = 0
        lba = scsi.RECORDS_LBA + self._next_lba
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

        await self.initiator.submit(scsi.cdb16(scsi.Op.WRITE_16, lba, blocks), done,
                                    data_out=data)

    async def _control(self, frame: Frame) -> None:
        data = scsi.envelope(frame.encode())
        result = await self.initiator.command(
            scsi.cdb16(scsi.Op.WRITE_16, scsi.CONTROL_LBA, scsi.blocks_for(len(data))),
            data_out=data)
        result.check(f"WRITE of {frame.type.name}")

    async def _read_reply(self) -> None:
        """The secondary's answer to our HELLO, into the inbox."""
        _, length = scsi.parse_status_block((await self._read(scsi.STATUS_LBA, 1)).data)
        if not 0 < length <= 1 << 20:
            raise ProtocolError(f"the secondary's reply is {length} bytes")
        result = await self._read(scsi.REPLY_LBA, scsi.blocks_for(length + 4))
        reader = FrameReader()
        reader.feed(scsi.open_envelope(result.data))
        frame = reader.next()
        if frame is None:
            raise ProtocolError("the secondary's reply is not a whole frame")
        self._inbox_in.send_nowait(frame)

    async def _read(self, lba: int, blocks: int) -> Result:
        result = await self.initiator.command(scsi.cdb16(scsi.Op.READ_16, lba, blocks),
                                              read=blocks * scsi.BLOCK)
        return result.check(f"READ of block {lba}")

    async def _poll_applied(self) -> None:
        """Keep a READ of STATUS_WAIT outstanding; a newer applied set becomes APPLIED."""
        last = 0
        try:
            while True:
                result = await self._read(scsi.STATUS_WAIT_LBA, 1)
                set_id, _ = scsi.parse_status_block(result.data)
                if set_id > last:
                    last = set_id
                    self._inbox_in.send_nowait(applied(set_id))
        except (ProtocolError, trio.BrokenResourceError, trio.EndOfChannel, OSError,
                trio.ClosedResourceError) as exc:
            self._inbox_in.send_nowait(exc)


class IscsiDialer:
    """Opens iSCSI sessions to ``iscsi://HOST:PORT/IQN`` with mutual CHAP."""

    def __init__(self, url: str, secrets_: chap.Secrets, node: str) -> None:
        self.host, self.port, self.iqn = parse_url(url)
        self.address = url
        self.secrets = secrets_
        self.initiator_iqn = f"iqn.2025-01.io.replfs:primary.{node}"

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Link]:
        async with open_session(self.host, self.port, self.secrets, self.initiator_iqn,
                                self.iqn) as initiator, trio.open_nursery() as nursery:
            yield InitiatorLink(initiator, nursery)
            nursery.cancel_scope.cancel()
