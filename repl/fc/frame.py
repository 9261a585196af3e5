"""Fibre Channel frames (FC-FS-3, FC-2): the 24-byte header, the payload, the CRC.

A frame as the link carries it, once an FC port has framed it::

    SOF          the start-of-frame delimiter (an ordered set on a real link;
                 here one code byte, RFC 3643 table 2)
    header       24 bytes:
                   R_CTL (1) D_ID (3)        routing, information category; destination
                   CS_CTL (1) S_ID (3)       class specific control; source
                   TYPE (1) F_CTL (3)        0x01 extended link services, 0x08 FCP;
                                             frame control (FC_* below)
                   SEQ_ID (1) DF_CTL (1) SEQ_CNT (2)
                   OX_ID (2) RX_ID (2)       the exchange: originator's and responder's
                   PARAMETER (4)             the relative offset of FCP_DATA
    payload      a multiple of 4 bytes: F_CTL's two low bits count the fill bytes
                 that pad the last word (at most MAX_PAYLOAD bytes)
    CRC          CRC-32 of header and payload, as Ethernet's FCS (and FCoE's copy of
                 the FC CRC) lays it out: least significant byte first
    EOF          the end-of-frame delimiter

Class 3 is the only class: the first frame of a sequence starts SOFi3 and
the others SOFn3; the last ends EOFt and the others EOFn. ``encode`` gives
header, payload and CRC; SOF and EOF travel in the FCIP encapsulation
(fcip.py). This module, fcip.py, els.py and fcp.py are the only places in
repl/fc that pack bytes.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

from repl.errors import ProtocolError

HEADER_SIZE = 24
MAX_PAYLOAD = 2112  # FC-FS: the largest data field
DATA_FIELD = 2048  # the receive data field size our ports offer: FCP_DATA frames carry this
_HEADER = struct.Struct(">I I I BBH HH I")
_CRC = struct.Struct("<I")


class Sof(enum.IntEnum):
    """Start-of-frame delimiters, as RFC 3643 encodes them."""

    SOFf = 0x28
    SOFi4 = 0x29
    SOFi2 = 0x2D
    SOFi3 = 0x2E
    SOFn4 = 0x31
    SOFn2 = 0x35
    SOFn3 = 0x36
    SOFc4 = 0x39


class Eof(enum.IntEnum):
    """End-of-frame delimiters, as RFC 3643 encodes them."""

    EOFn = 0x41
    EOFt = 0x42
    EOFrt = 0x44
    EOFdt = 0x46
    EOFni = 0x49
    EOFdti = 0x4E
    EOFrti = 0x4F
    EOFa = 0x50


class RCtl(enum.IntEnum):
    """R_CTL: routing (high nibble) and information category (low nibble)."""

    FCP_DATA = 0x01  # FC-4 device data, solicited data
    FCP_XFER_RDY = 0x05  # data descriptor
    FCP_CMND = 0x06  # unsolicited command
    FCP_RSP = 0x07  # command status
    ELS_REQUEST = 0x22  # extended link services, request
    ELS_REPLY = 0x23  # and its reply


class Type(enum.IntEnum):
    ELS = 0x01
    FCP = 0x08


# F_CTL bits (FC-FS-3 table 38)
EXCHANGE_RESPONDER = 0x800000  # sent by the exchange's responder (else its originator)
SEQUENCE_RECIPIENT = 0x400000
FIRST_SEQUENCE = 0x200000  # of the exchange
LAST_SEQUENCE = 0x100000  # of the exchange
END_SEQUENCE = 0x080000  # the sequence's last frame
SEQUENCE_INITIATIVE = 0x010000  # the other end sends the next sequence
RELATIVE_OFFSET = 0x000008  # PARAMETER is the payload's offset in the information unit
FILL_BYTES = 0x000003
_F_CTL_KNOWN = (EXCHANGE_RESPONDER | SEQUENCE_RECIPIENT | FIRST_SEQUENCE | LAST_SEQUENCE
                | END_SEQUENCE | SEQUENCE_INITIATIVE | RELATIVE_OFFSET)

# Well-known addresses (FC-FS-3 table 36) and the ones the replfs fabric gives out.
FABRIC = 0xFFFFFE  # the F_Port a FLOGI goes to
UNIDENTIFIED = 0x000000  # an N_Port's S_ID before the fabric gave it one
NO_XID = 0xFFFF  # an RX_ID not yet assigned


@dataclass(frozen=True, slots=True)
class FcFrame:
    """One FC frame; *f_ctl* without the fill-byte count, which ``encode`` sets."""

    r_ctl: int
    d_id: int
    s_id: int
    type: int
    f_ctl: int
    ox_id: int
    rx_id: int = NO_XID
    seq_id: int = 0
    seq_cnt: int = 0
    parameter: int = 0
    payload: bytes = b""
    sof: Sof = Sof.SOFi3
    eof: Eof = Eof.EOFt
    cs_ctl: int = 0
    df_ctl: int = 0

    def validate(self) -> None:
        """One rule a line; raises ProtocolError on the first broken."""
        if len(self.payload) > MAX_PAYLOAD:
            raise ProtocolError(f"FC payload of {len(self.payload)} bytes, over {MAX_PAYLOAD}")
        if not 0 <= self.d_id < 1 << 24 or not 0 <= self.s_id < 1 << 24:
            raise ProtocolError(f"FC address out of range: {self.d_id:#x}, {self.s_id:#x}")
        if self.f_ctl & ~_F_CTL_KNOWN:
            raise ProtocolError(f"F_CTL bits {self.f_ctl & ~_F_CTL_KNOWN:#08x} not supported")
        if not 0 <= self.ox_id < 1 << 16 or not 0 <= self.rx_id < 1 << 16:
            raise ProtocolError("exchange id out of range")
        if not 0 <= self.seq_id < 256 or not 0 <= self.seq_cnt < 1 << 16:
            raise ProtocolError("sequence id or count out of range")
        if not 0 <= self.r_ctl < 256 or not 0 <= self.type < 256:
            raise ProtocolError("R_CTL or TYPE out of range")

    def encode(self) -> bytes:
        """Header, payload with its fill bytes, and CRC."""
        self.validate()
        fill = -len(self.payload) % 4
        head = _HEADER.pack(self.r_ctl << 24 | self.d_id, self.cs_ctl << 24 | self.s_id,
                            self.type << 24 | self.f_ctl | fill, self.seq_id, self.df_ctl,
                            self.seq_cnt, self.ox_id, self.rx_id, self.parameter)
        crc = zlib.crc32(self.payload, zlib.crc32(head))
        if fill:
            crc = zlib.crc32(bytes(fill), crc)
        return b"".join((head, self.payload, bytes(fill), _CRC.pack(crc)))

    @property
    def responder(self) -> bool:
        return bool(self.f_ctl & EXCHANGE_RESPONDER)

    @property
    def end_sequence(self) -> bool:
        return bool(self.f_ctl & END_SEQUENCE)


_SOFS = {code.value: code for code in Sof}
_EOFS = {code.value: code for code in Eof}


def decode(data: bytes | memoryview, sof: int, eof: int) -> FcFrame:
    """The frame of *data* (header, payload, CRC) between *sof* and *eof*. Raises
    ProtocolError if it is short, its CRC is wrong, or a delimiter is unknown."""
    view = memoryview(data)
    if len(view) < HEADER_SIZE + _CRC.size or len(view) % 4:
        raise ProtocolError(f"an FC frame of {len(view)} bytes")
    end = len(view) - _CRC.size
    (crc,) = _CRC.unpack_from(view, end)
    if crc != zlib.crc32(view[:end]):
        raise ProtocolError("FC frame CRC mismatch")
    start, stop = _SOFS.get(sof), _EOFS.get(eof)
    if start is None or stop is None:
        raise ProtocolError(f"unknown delimiter: SOF {sof:#x}, EOF {eof:#x}")
    (w0, w1, w2, seq_id, df_ctl, seq_cnt, ox_id, rx_id, parameter) = _HEADER.unpack_from(view)
    fill = w2 & FILL_BYTES
    if fill and any(view[end - fill : end]):
        raise ProtocolError("FC fill bytes are not zero")
    if w2 & ~_F_CTL_KNOWN & 0xFFFFFC:  # the other fields cannot be out of range
        raise ProtocolError(f"F_CTL bits {w2 & ~_F_CTL_KNOWN & 0xFFFFFC:#08x} not supported")
    return FcFrame(w0 >> 24, w0 & 0xFFFFFF, w1 & 0xFFFFFF, w2 >> 24, w2 & 0xFFFFFF & ~fill,
                   ox_id, rx_id, seq_id, seq_cnt, parameter,
                   bytes(view[HEADER_SIZE : end - fill]), start, stop, w1 >> 24, df_ctl)


def sequence(first: FcFrame, payload: bytes, *, last_f_ctl: int,
             size: int = DATA_FIELD) -> list[FcFrame]:
    """*payload* as one sequence of frames like *first* (whose payload is ignored), at
    most *size* bytes each: SEQ_CNT from 0, relative offsets from *first*'s PARAMETER
    if it has RELATIVE_OFFSET, SOFi3/EOFt at the ends, and *last_f_ctl* added to the
    last frame's F_CTL (END_SEQUENCE, SEQUENCE_INITIATIVE...)."""
    chunks = [payload[at : at + size] for at in range(0, len(payload), size)] or [b""]
    offset = first.f_ctl & RELATIVE_OFFSET
    frames = []
    for count, chunk in enumerate(chunks):
        last = count == len(chunks) - 1
        frames.append(FcFrame(
            first.r_ctl, first.d_id, first.s_id, first.type,
            first.f_ctl | (last_f_ctl if last else 0), first.ox_id, first.rx_id,
            first.seq_id, count, first.parameter + count * size if offset else first.parameter,
            chunk, Sof.SOFi3 if count == 0 else Sof.SOFn3, Eof.EOFt if last else Eof.EOFn))
    return frames
