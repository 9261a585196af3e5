"""iSCSI PDUs (RFC 7143, section 11): the 48-byte basic header segment, AHS, data.

Every PDU is::

    BHS   48 bytes
    AHS   TotalAHSLength * 4 bytes (byte 4 of the BHS)
    data  DataSegmentLength bytes (bytes 5..7), then zeros to a multiple of 4

with no digests: HeaderDigest and DataDigest are always negotiated to None
(repl/iscsi/login.py). The BHS is the same 48 bytes for every opcode, with
fields whose meaning depends on the opcode; ``Pdu`` names them after their
most common meaning:

    byte 0        I bit (0x40) and the opcode
    byte 1        flags: F (0x80), R/W/attributes, T/C/CSG/NSG for a login...
    bytes 2, 3    ``b2``, ``b3``: version, response, status, reason...
    bytes 8..15   ``lun`` (for a login: ISID in 8..13, TSIH in 14..15)
    bytes 16..19  ``itt``, the initiator task tag
    bytes 20..23  ``ttt``: target transfer tag, expected data transfer length
                  (SCSI command), CID (login, logout: in 20..21)
    bytes 24..27  ``sn``: CmdSN from the initiator, StatSN from the target
    bytes 28..31  ``exp_sn``: ExpStatSN from the initiator, ExpCmdSN from the target
    bytes 32..47  ``tail``: the CDB of a SCSI command; else four words,
                  MaxCmdSN, DataSN/R2TSN, buffer offset, residual/desired length

This module is the only place in repl/iscsi that packs bytes (the SCSI CDBs and
data it carries are packed by repl/scsi/spc.py).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import trio

from repl.errors import ProtocolError

BHS_SIZE = 48
NO_TAG = 0xFFFFFFFF  # the reserved tag: "no task", "no transfer"
F_FINAL = 0x80
I_IMMEDIATE = 0x40

_BHS = struct.Struct(">BBBBB3sQIII I16s")
_WORDS = struct.Struct(">IIII")
_AHS_HEAD = struct.Struct(">HB")


class Opcode(enum.IntEnum):
    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC = 0x32
    REJECT = 0x3F


@dataclass(frozen=True, slots=True)
class Ahs:
    """One additional header segment: its type and its bytes (after the type byte)."""

    type: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Pdu:
    opcode: Opcode
    flags: int = 0
    b2: int = 0
    b3: int = 0
    lun: int = 0
    itt: int = 0
    ttt: int = 0
    sn: int = 0
    exp_sn: int = 0
    tail: bytes = bytes(16)
    immediate: bool = False
    ahs: tuple[Ahs, ...] = ()
    data: bytes = b""

    def validate(self) -> None:
        """One rule a line; raises ProtocolError on the first broken."""
        if len(self.tail) != 16:
            raise ProtocolError(f"BHS tail of {len(self.tail)} bytes")
        if len(self.data) >= 1 << 24:
            raise ProtocolError(f"data segment of {len(self.data)} bytes")
        if not 0 <= self.flags < 256 or not 0 <= self.b2 < 256 or not 0 <= self.b3 < 256:
            raise ProtocolError("BHS byte out of range")

    def encode(self) -> bytes:
        self.validate()
        ahs = b"".join(_pad(_AHS_HEAD.pack(len(a.body), a.type) + a.body) for a in self.ahs)
        head = _BHS.pack((I_IMMEDIATE if self.immediate else 0) | self.opcode, self.flags,
                         self.b2, self.b3, len(ahs) // 4, len(self.data).to_bytes(3, "big"),
                         self.lun, self.itt, self.ttt, self.sn, self.exp_sn, self.tail)
        return head + ahs + _pad(self.data)

    @property
    def words(self) -> tuple[int, int, int, int]:
        """The tail as four words: MaxCmdSN, DataSN or R2TSN, buffer offset, and the
        residual count or desired transfer length."""
        a, b, c, d = _WORDS.unpack(self.tail)
        return a, b, c, d

    @property
    def final(self) -> bool:
        return bool(self.flags & F_FINAL)


def words(max_cmd_sn: int = 0, data_sn: int = 0, offset: int = 0, count: int = 0) -> bytes:
    """The BHS tail (bytes 32..47) from its four words."""
    return _WORDS.pack(max_cmd_sn & 0xFFFFFFFF, data_sn, offset, count)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def decode_header(head: bytes) -> tuple[int, int]:
    """(AHS bytes, data segment bytes before padding) that follow a 48-byte BHS."""
    return head[4] * 4, int.from_bytes(head[5:8], "big")


def decode(buf: bytes) -> Pdu:
    """One whole PDU, exactly *buf*. Raises ProtocolError if it is not one."""
    if len(buf) < BHS_SIZE:
        raise ProtocolError(f"PDU of {len(buf)} bytes, shorter than a BHS")
    ahs_len, data_len = decode_header(buf)
    if len(buf) != BHS_SIZE + ahs_len + data_len + (-data_len % 4):
        raise ProtocolError(f"PDU of {len(buf)} bytes, its header says otherwise")
    (b0, flags, b2, b3, _, _, lun, itt, ttt, sn, exp_sn, tail) = _BHS.unpack_from(buf)
    try:
        opcode = Opcode(b0 & 0x3F)
    except ValueError:
        raise ProtocolError(f"unknown iSCSI opcode {b0 & 0x3F:#04x}") from None
    ahs, pos = [], BHS_SIZE
    while pos < BHS_SIZE + ahs_len:
        if pos + _AHS_HEAD.size > BHS_SIZE + ahs_len:
            raise ProtocolError("AHS ends inside its header")
        length, kind = _AHS_HEAD.unpack_from(buf, pos)
        end = pos + _AHS_HEAD.size + length
        if end > BHS_SIZE + ahs_len:
            raise ProtocolError("AHS longer than TotalAHSLength")
        ahs.append(Ahs(kind, bytes(buf[pos + _AHS_HEAD.size : end])))
        pos = end + (-(end - pos) % 4)
    start = BHS_SIZE + ahs_len
    return Pdu(opcode, flags, b2, b3, lun, itt, ttt, sn, exp_sn, bytes(tail),
               bool(b0 & I_IMMEDIATE), tuple(ahs), bytes(buf[start : start + data_len]))


class PduStream:
    """PDUs over a byte stream. ``receive`` is cancel-safe: bytes read are kept."""

    def __init__(self, stream: trio.abc.Stream, max_data: int) -> None:
        self.stream = stream
        self.max_data = max_data  # our MaxRecvDataSegmentLength (and the login's bound)
        self._buf = bytearray()
        self._send_lock = trio.Lock()

    async def send(self, *pdus: Pdu) -> None:
        """Send *pdus* in order, in one write; writers take turns."""
        data = b"".join(p.encode() for p in pdus)
        async with self._send_lock:
            await self.stream.send_all(data)

    async def receive(self) -> Pdu:
        """The next PDU. Raises trio.EndOfChannel at a clean close between PDUs,
        ProtocolError on a data segment over ``max_data`` or a malformed PDU."""
        await self._fill(BHS_SIZE)
        ahs_len, data_len = decode_header(bytes(self._buf[:BHS_SIZE]))
        if data_len > self.max_data:
            raise ProtocolError(f"data segment of {data_len} bytes, over the "
                                f"{self.max_data} agreed on")
        size = BHS_SIZE + ahs_len + data_len + (-data_len % 4)
        await self._fill(size)
        pdu = decode(bytes(self._buf[:size]))
        del self._buf[:size]
        return pdu

    async def _fill(self, size: int) -> None:
        while len(self._buf) < size:
            chunk = await self.stream.receive_some(max(size - len(self._buf), 1 << 16))
            if not chunk:
                if self._buf:
                    raise trio.BrokenResourceError("the peer closed inside a PDU")
                raise trio.EndOfChannel
            self._buf += chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


def sn_lt(a: int, b: int) -> bool:
    """a < b in 32-bit serial number arithmetic (RFC 1982), as CmdSN and StatSN compare."""
    return a != b and (b - a) & 0xFFFFFFFF < 1 << 31
