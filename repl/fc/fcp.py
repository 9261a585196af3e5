"""FCP information units (FCP-4): SCSI commands, data and status in FC sequences.

    FCP_CMND      32 bytes: FCP_LUN (8), command reference number, task
                  attribute (0: SIMPLE), task management flags, additional
                  CDB length and RDDATA/WRDATA bits, FCP_CDB (16), FCP_DL
                  (the bytes the initiator expects to move)
    FCP_XFER_RDY  12 bytes: FCP_DATA_RO (where the data to send starts),
                  FCP_BURST_LEN (how much to send), reserved
    FCP_DATA      the data itself, its offset in the frame's PARAMETER
    FCP_RSP       24 bytes and more: reserved (8), retry delay timer (2),
                  flags (FCP_RESID_UNDER/OVER, FCP_SNS_LEN_VALID,
                  FCP_RSP_LEN_VALID), SCSI status, FCP_RESID, FCP_SNS_LEN,
                  FCP_RSP_LEN, then FCP_RSP_INFO and the sense data

Each IU is one sequence of one exchange: the initiator's FCP_CMND opens it
(its OX_ID), the target answers in the same exchange (its RX_ID). This
module, frame.py, fcip.py and els.py are the only places in repl/fc that
pack bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from repl.errors import ProtocolError

_CMND = struct.Struct(">Q BBBB 16s I")
_XFER_RDY = struct.Struct(">II4x")
_RSP = struct.Struct(">8x H BB I I I")
WRDATA, RDDATA = 0x01, 0x02
SIMPLE = 0
RESID_UNDER, RESID_OVER, SNS_LEN_VALID, RSP_LEN_VALID = 0x08, 0x04, 0x02, 0x01
TMF_NOT_SUPPORTED = 0x04  # FCP_RSP_INFO response code


def lun_field(lun: int) -> int:
    """*lun* as the 8-byte FCP_LUN (SAM's single-level peripheral addressing)."""
    return lun << 48


def lun_of(field: int) -> int:
    return field >> 48 & 0x3FFF


@dataclass(frozen=True, slots=True)
class Cmnd:
    lun: int  # the 8-byte FCP_LUN field
    cdb: bytes
    data_length: int  # FCP_DL
    write: bool = False
    read: bool = False
    task_management: int = 0
    reference: int = 0  # CRN
    attribute: int = SIMPLE

    def encode(self) -> bytes:
        if len(self.cdb) > 16:
            raise ProtocolError(f"a CDB of {len(self.cdb)} bytes (no additional CDB here)")
        bits = (WRDATA if self.write else 0) | (RDDATA if self.read else 0)
        return _CMND.pack(self.lun, self.reference, self.attribute, self.task_management, bits,
                          self.cdb.ljust(16, b"\0"), self.data_length)

    @classmethod
    def decode(cls, payload: bytes) -> Cmnd:
        """Raises ProtocolError if *payload* is not a 32-byte FCP_CMND."""
        if len(payload) != _CMND.size:
            raise ProtocolError(f"an FCP_CMND of {len(payload)} bytes (additional CDBs are "
                                "not supported)")
        lun, reference, attribute, tmf, bits, cdb, length = _CMND.unpack(payload)
        if bits >> 2:
            raise ProtocolError("an FCP_CMND with an additional CDB")
        return cls(lun, cdb, length, bool(bits & WRDATA), bool(bits & RDDATA), tmf,
                   reference, attribute & 0x07)


@dataclass(frozen=True, slots=True)
class XferRdy:
    offset: int
    length: int

    def encode(self) -> bytes:
        return _XFER_RDY.pack(self.offset, self.length)

    @classmethod
    def decode(cls, payload: bytes) -> XferRdy:
        if len(payload) != _XFER_RDY.size:
            raise ProtocolError(f"an FCP_XFER_RDY of {len(payload)} bytes")
        return cls(*_XFER_RDY.unpack(payload))


@dataclass(frozen=True, slots=True)
class Rsp:
    status: int
    sense: bytes = b""
    residual_under: int = 0  # bytes the target moved short of FCP_DL
    residual_over: int = 0  # bytes it had past FCP_DL
    response_code: int | None = None  # FCP_RSP_INFO: a task management function's answer

    def encode(self) -> bytes:
        flags = ((RESID_UNDER if self.residual_under else 0)
                 | (RESID_OVER if self.residual_over else 0)
                 | (SNS_LEN_VALID if self.sense else 0)
                 | (RSP_LEN_VALID if self.response_code is not None else 0))
        info = b"" if self.response_code is None else bytes([0, 0, 0, self.response_code]) \
            + bytes(4)
        return _RSP.pack(0, flags, self.status, self.residual_under or self.residual_over,
                         len(self.sense), len(info)) + info + self.sense

    @classmethod
    def decode(cls, payload: bytes) -> Rsp:
        """Raises ProtocolError if *payload* is not an FCP_RSP whose lengths add up."""
        if len(payload) < _RSP.size:
            raise ProtocolError(f"an FCP_RSP of {len(payload)} bytes")
        _, flags, status, residual, sense_len, info_len = _RSP.unpack_from(payload)
        info_len = info_len if flags & RSP_LEN_VALID else 0
        sense_len = sense_len if flags & SNS_LEN_VALID else 0
        if _RSP.size + info_len + sense_len > len(payload):
            raise ProtocolError("FCP_RSP lengths run past its end")
        info = payload[_RSP.size : _RSP.size + info_len]
        sense = payload[_RSP.size + info_len : _RSP.size + info_len + sense_len]
        return cls(status, bytes(sense), residual if flags & RESID_UNDER else 0,
                   residual if flags & RESID_OVER else 0,
                   info[3] if len(info) >= 4 else None)
