"""SCSI as the replfs LUN speaks it (SPC-4, SBC-3): CDBs, sense data, the LUN's blocks.

The secondary's LUN is its staging store (the claims' target VLUN), shown
as a direct-access block device of 512-byte blocks. It takes replfs
records, not arbitrary blocks; its layout::

    LBA 0          STATUS: READ gives the status block (the set the replica
                   applied, the length of the reply to the last HELLO)
    LBA 1          STATUS_WAIT: the same, once it changed since this connection
                   last read it, or after WAIT_SECONDS (a long poll)
    LBA 2          CONTROL: WRITE carries one replfs frame (HELLO, RESET_TO)
    LBA 8...       REPLY: READ gives the answer to the HELLO, one replfs frame
    LBA 4096...    RECORDS: each WRITE carries one encoded record

A block written (CONTROL, RECORDS) or read (REPLY) is an envelope: u32
length, then that many bytes, then zeros to the block's end. Every other
block reads as zeros; a WRITE elsewhere is refused (DATA PROTECT).

The same for every transport: iSCSI (repl/iscsi/) and FCP (repl/fc/) carry
these CDBs and this data, each in its own PDUs or frames. This module is the
only place in repl/scsi that packs bytes.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

from repl.errors import ProtocolError

BLOCK = 512
BLOCKS = 1 << 31  # 1 TiB as READ CAPACITY shows it; RECORDS wraps round within it
STATUS_LBA, STATUS_WAIT_LBA, CONTROL_LBA, REPLY_LBA, RECORDS_LBA = 0, 1, 2, 8, 4096
WAIT_SECONDS = 1.0
VENDOR, PRODUCT, REVISION = b"REPLFS  ", b"replfs staging  ", b"0001"
_STATUS = struct.Struct(">8sIQI")
_STATUS_MAGIC = b"REPLFSLU"
_U32 = struct.Struct(">I")

GOOD, CHECK_CONDITION, BUSY, TASK_SET_FULL = 0x00, 0x02, 0x08, 0x28


class Op(enum.IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    INQUIRY = 0x12
    MODE_SENSE_6 = 0x1A
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    SYNCHRONIZE_CACHE_10 = 0x35
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    SYNCHRONIZE_CACHE_16 = 0x91
    SERVICE_ACTION_IN_16 = 0x9E  # READ CAPACITY(16) is its service action 0x10
    REPORT_LUNS = 0xA0


READ_CAPACITY_16 = 0x10
# READ/WRITE byte 1: protection information (the LUN has none), DPO and FUA (MODE
# SENSE does not claim DPOFUA, so SBC-3 wants them refused).
PROTECT_DPO_FUA = 0xE0 | 0x10 | 0x08


@dataclass(frozen=True)
class Sense:
    """Why a command got CHECK CONDITION: sense key, additional sense code and qualifier."""

    key: int
    asc: int
    ascq: int = 0

    def encode(self) -> bytes:
        """Fixed-format sense data (SPC-4 4.5.3), current error."""
        return bytes([0x70, 0, self.key, 0, 0, 0, 0, 10, 0, 0, 0, 0, self.asc, self.ascq,
                      0, 0, 0, 0])

    @classmethod
    def decode(cls, data: bytes) -> Sense:
        if len(data) >= 14 and data[0] & 0x7F in (0x70, 0x71):
            return cls(data[2] & 0x0F, data[12], data[13])
        if len(data) >= 4 and data[0] & 0x7F in (0x72, 0x73):
            return cls(data[1] & 0x0F, data[2], data[3])
        raise ProtocolError(f"sense data not understood: {data[:18].hex()}")

    def __str__(self) -> str:
        return f"sense key {self.key:#x}, ASC/ASCQ {self.asc:02x}/{self.ascq:02x}"


NOT_READY, ILLEGAL_REQUEST, DATA_PROTECT, ABORTED_COMMAND = 0x02, 0x05, 0x07, 0x0B
INVALID_OPCODE = Sense(ILLEGAL_REQUEST, 0x20)
LBA_OUT_OF_RANGE = Sense(ILLEGAL_REQUEST, 0x21)
INVALID_FIELD_IN_CDB = Sense(ILLEGAL_REQUEST, 0x24)
LUN_NOT_SUPPORTED = Sense(ILLEGAL_REQUEST, 0x25)
INVALID_FIELD_IN_DATA = Sense(ILLEGAL_REQUEST, 0x26)  # a block that is not a record
WRITE_PROTECTED = Sense(DATA_PROTECT, 0x27)
NOT_SERVED = Sense(NOT_READY, 0x04, 0x00)  # the replica does not take this session's writes


@dataclass(frozen=True)
class Cdb:
    """The fields of a CDB that the LUN looks at."""

    op: int
    lba: int = 0
    blocks: int = 0
    alloc: int = 0  # allocation length
    evpd: bool = False
    page: int = 0
    service_action: int = 0
    dbd: bool = False  # MODE SENSE: no block descriptors
    page_control: int = 0
    flags: int = 0  # READ/WRITE: RDPROTECT/WRPROTECT, DPO, FUA (byte 1)


def parse_cdb(cdb: bytes) -> Cdb:
    """Decode *cdb*; ProtocolError for an opcode this LUN does not know."""
    op = cdb[0]
    if op in (Op.READ_16, Op.WRITE_16):
        return Cdb(op, int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big"),
                   flags=cdb[1])
    if op in (Op.READ_10, Op.WRITE_10):
        return Cdb(op, int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big"),
                   flags=cdb[1])
    if op == Op.INQUIRY:
        return Cdb(op, alloc=int.from_bytes(cdb[3:5], "big"), evpd=bool(cdb[1] & 1),
                   page=cdb[2])
    if op == Op.SERVICE_ACTION_IN_16:
        return Cdb(op, alloc=int.from_bytes(cdb[10:14], "big"), service_action=cdb[1] & 0x1F)
    if op == Op.REPORT_LUNS:
        return Cdb(op, alloc=int.from_bytes(cdb[6:10], "big"))
    if op in (Op.MODE_SENSE_6, Op.MODE_SENSE_10):
        alloc = cdb[4] if op == Op.MODE_SENSE_6 else int.from_bytes(cdb[7:9], "big")
        return Cdb(op, alloc=alloc, dbd=bool(cdb[1] & 0x08), page=cdb[2] & 0x3F,
                   page_control=cdb[2] >> 6)
    if op == Op.REQUEST_SENSE:
        return Cdb(op, alloc=cdb[4])
    if op in (Op.TEST_UNIT_READY, Op.READ_CAPACITY_10, Op.SYNCHRONIZE_CACHE_10,
              Op.SYNCHRONIZE_CACHE_16):
        return Cdb(op)
    raise ProtocolError(f"SCSI opcode {op:#04x} not supported")


def cdb16(op: int, lba: int = 0, blocks: int = 0) -> bytes:
    """READ(16) or WRITE(16)."""
    return bytes([op, 0]) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + bytes(2)


def inquiry_cdb(alloc: int = 255, page: int | None = None) -> bytes:
    return bytes([Op.INQUIRY, 0 if page is None else 1, page or 0]) + alloc.to_bytes(2, "big") \
        + bytes(1)


def read_capacity16_cdb(alloc: int = 32) -> bytes:
    return bytes([Op.SERVICE_ACTION_IN_16, READ_CAPACITY_16]) + bytes(8) \
        + alloc.to_bytes(4, "big") + bytes(2)


def report_luns_cdb(alloc: int = 4096) -> bytes:
    return bytes([Op.REPORT_LUNS]) + bytes(5) + alloc.to_bytes(4, "big") + bytes(2)


def simple_cdb(op: int) -> bytes:
    return bytes([op]) + bytes(5)


# --- what the LUN answers ----------------------------------------------------------------


ISCSI_VERSION, FCP4_VERSION = 0x0960, 0x0A40  # version descriptors (SPC-4 table 29)


def standard_inquiry(transport: int, lun_present: bool = True) -> bytes:
    """Standard INQUIRY data: a direct-access device, SPC-4, command queuing, and the
    versions it claims: SAM-5, the *transport*'s version descriptor, SPC-4, SBC-3."""
    head = bytes([0x00 if lun_present else 0x7F, 0, 0x06, 0x12, 91, 0, 0, 0x02])
    versions = b"".join(v.to_bytes(2, "big") for v in (0x00A0, transport, 0x0460, 0x04C0))
    return (head + VENDOR + PRODUCT + REVISION + bytes(22) + versions).ljust(96, b"\0")


def vpd_page(page: int, serial: bytes, target: str) -> bytes | None:
    """The VPD page *page* (SPC-4 7.8), or None if the LUN has none of that number."""
    if page == 0x00:
        body = bytes([0x00, 0x80, 0x83, 0xB0, 0xB1])
    elif page == 0x80:
        body = serial
    elif page == 0x83:
        naa = (0x3 << 60 | zlib.crc32(serial) << 28 | zlib.crc32(serial[::-1]) >> 4)
        name = target.encode() + b"\0"
        name += bytes(-len(name) % 4)
        body = (bytes([0x02, 0x01, 0, len(VENDOR + serial)]) + VENDOR + serial
                + bytes([0x01, 0x03, 0, 8]) + naa.to_bytes(8, "big")
                + bytes([0x53, 0xA8, 0, len(name)]) + name)
    elif page == 0xB0:  # block limits: no limit on transfer length
        body = bytes(0x3C)
    elif page == 0xB1:  # block device characteristics: not rotating
        body = bytes([0, 1]) + bytes(0x3A)
    else:
        return None
    return bytes([0x00, page]) + len(body).to_bytes(2, "big") + body


def read_capacity16() -> bytes:
    return (BLOCKS - 1).to_bytes(8, "big") + BLOCK.to_bytes(4, "big") + bytes(20)


def read_capacity10() -> bytes:
    return (BLOCKS - 1).to_bytes(4, "big") + BLOCK.to_bytes(4, "big")


def parse_read_capacity16(data: bytes) -> tuple[int, int]:
    """(blocks, block length) from READ CAPACITY(16) data."""
    if len(data) < 12:
        raise ProtocolError(f"READ CAPACITY(16) data of {len(data)} bytes")
    return int.from_bytes(data[:8], "big") + 1, int.from_bytes(data[8:12], "big")


def report_luns(luns: list[int]) -> bytes:
    return (8 * len(luns)).to_bytes(4, "big") + bytes(4) + b"".join(
        lun.to_bytes(2, "big") + bytes(6) for lun in luns)


_PAGES = {0x08: bytes([0x08, 0x12]) + bytes(0x12),  # caching: write cache off (WCE 0)
          0x0A: bytes([0x0A, 0x0A, 0x02, 0x10]) + bytes(8)}  # control: GLTSD, reordering


def mode_sense(cdb: Cdb) -> bytes | None:
    """MODE SENSE(6) or (10) data for *cdb*, or None for a page the LUN has not."""
    if cdb.page == 0x3F:
        pages = b"".join(_PAGES.values())
    elif cdb.page in _PAGES:
        pages = _PAGES[cdb.page]
    else:
        return None
    if cdb.page_control == 1:  # changeable values: none
        pages = b"".join(p[:2] + bytes(len(p) - 2) for p in
                         (_PAGES.values() if cdb.page == 0x3F else [pages]))
    blocks = b"" if cdb.dbd else (min(BLOCKS, 0xFFFFFFFF).to_bytes(4, "big") + bytes(1)
                                  + BLOCK.to_bytes(3, "big"))
    if cdb.op == Op.MODE_SENSE_6:
        head = bytes([3 + len(blocks) + len(pages), 0, 0, len(blocks)])
    else:
        head = (5 + len(blocks) + len(pages)).to_bytes(2, "big") + bytes(4) \
            + len(blocks).to_bytes(2, "big")
    return head + blocks + pages


# --- the replfs blocks --------------------------------------------------------------------


def envelope(payload: bytes) -> bytes:
    """*payload* as the blocks that carry it: u32 length, payload, zeros to a block."""
    data = _U32.pack(len(payload)) + payload
    return data + bytes(-len(data) % BLOCK)


def open_envelope(data: bytes) -> bytes:
    """The payload of blocks made by ``envelope``. Raises ProtocolError."""
    if len(data) < _U32.size:
        raise ProtocolError(f"{len(data)} bytes: no envelope")
    (length,) = _U32.unpack_from(data)
    if length > len(data) - _U32.size or len(data) - _U32.size - length >= BLOCK:
        raise ProtocolError(f"an envelope of {length} bytes in {len(data)} bytes of blocks")
    return data[_U32.size : _U32.size + length]


def status_block(applied: int, reply_length: int) -> bytes:
    return _STATUS.pack(_STATUS_MAGIC, 1, applied, reply_length).ljust(BLOCK, b"\0")


def parse_status_block(data: bytes) -> tuple[int, int]:
    """(applied set, reply length) from a status block. Raises ProtocolError."""
    if len(data) < _STATUS.size:
        raise ProtocolError(f"status block of {len(data)} bytes")
    magic, version, applied, reply = _STATUS.unpack_from(data)
    if magic != _STATUS_MAGIC or version != 1:
        raise ProtocolError(f"not a replfs status block: {data[:12]!r}")
    return applied, reply


def blocks_for(size: int) -> int:
    return -(-size // BLOCK)
