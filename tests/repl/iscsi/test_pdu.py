"""iSCSI PDUs: the 48-byte BHS, AHS, data padding, against bytes laid out by hand.

Each golden case pins one PDU as RFC 7143 section 11 lays it out; the
files in tests/testdata/iscsi are checked in (rewrite them with
REPLFS_REGENERATE=1 after a deliberate change, and review the diff), and
``test_pdu_encode_ok_layout`` checks each against the RFC's layout written
out field by field, independently of the encoder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from repl.errors import ProtocolError
from repl.iscsi import scsi
from repl.iscsi.pdu import Ahs, Opcode, Pdu, PduStream, decode, sn_lt, words
from tests.support import golden_bytes

GOLDEN = Path(__file__).resolve().parent.parent.parent / "testdata" / "iscsi"

SPECS: dict[str, Pdu] = {
    # WRITE(16) of 2 blocks at LBA 4096 with 5 bytes of immediate data (padded to 8).
    "scsi-command": Pdu(Opcode.SCSI_COMMAND, 0x80 | 0x20 | 0x01, lun=0, itt=0x11223344,
                        ttt=1024, sn=7, exp_sn=9,
                        tail=scsi.cdb16(scsi.Op.WRITE_16, 4096, 2), data=b"hello"),
    "login-request": Pdu(Opcode.LOGIN_REQUEST, 0x80 | 0x01, lun=0x8000_0000_0001 << 16,
                         itt=0, ttt=0, sn=1, exp_sn=0, immediate=True,
                         data=b"AuthMethod=CHAP\0"),
    "r2t": Pdu(Opcode.R2T, 0x80, itt=5, ttt=9, sn=100, exp_sn=8,
               tail=words(263, 0, 65536, 1 << 20)),
    # An extended-CDB AHS (type 1): length 5 (the reserved byte + 4 CDB bytes), padded.
    "with-ahs": Pdu(Opcode.SCSI_COMMAND, 0x80, itt=1, sn=1, ahs=(Ahs(1, b"\0abcd"),)),
}


def layout(case: str) -> bytes:
    """The bytes of each case, written out from RFC 7143's figures."""
    if case == "scsi-command":
        return (bytes([0x01, 0xA1, 0, 0, 0, 0, 0, 5]) + bytes(8)       # opcode, F|W|simple, DSL 5
                + bytes.fromhex("11223344") + (1024).to_bytes(4, "big")  # ITT, EDTL
                + (7).to_bytes(4, "big") + (9).to_bytes(4, "big")        # CmdSN, ExpStatSN
                + bytes([0x8A, 0]) + (4096).to_bytes(8, "big") + (2).to_bytes(4, "big")
                + bytes(2) + b"hello\0\0\0")                              # CDB, data, pad
    if case == "login-request":
        return (bytes([0x43, 0x81, 0, 0, 0, 0, 0, 16])                  # I|login, T, NSG 1
                + bytes.fromhex("800000000001") + bytes(2)               # ISID, TSIH
                + bytes(4) + bytes(4) + (1).to_bytes(4, "big") + bytes(4) + bytes(16)
                + b"AuthMethod=CHAP\0")
    if case == "r2t":
        return (bytes([0x31, 0x80, 0, 0, 0, 0, 0, 0]) + bytes(8) + (5).to_bytes(4, "big")
                + (9).to_bytes(4, "big") + (100).to_bytes(4, "big") + (8).to_bytes(4, "big")
                + (263).to_bytes(4, "big") + bytes(4) + (65536).to_bytes(4, "big")
                + (1 << 20).to_bytes(4, "big"))
    assert case == "with-ahs"
    return (bytes([0x01, 0x80, 0, 0, 2, 0, 0, 0]) + bytes(8) + (1).to_bytes(4, "big")
            + bytes(4) + (1).to_bytes(4, "big") + bytes(20)
            + bytes([0, 5, 1, 0]) + b"abcd")                             # 8 bytes: 2 words


def golden(case: str, raw: bytes) -> bytes:
    return golden_bytes(GOLDEN / f"{case}.bin", raw)


@pytest.mark.parametrize("case", sorted(SPECS))
def test_pdu_encode_ok_golden(case: str) -> None:
    raw = SPECS[case].encode()
    assert raw == golden(case, raw)
    assert len(raw) % 4 == 0 and raw[:48] == golden(case, raw)[:48]


@pytest.mark.parametrize("case", sorted(SPECS))
def test_pdu_encode_ok_layout(case: str) -> None:
    assert SPECS[case].encode() == layout(case)


@pytest.mark.parametrize("case", sorted(SPECS))
def test_pdu_decode_ok_round_trip(case: str) -> None:
    assert decode(SPECS[case].encode()) == SPECS[case]


def test_pdu_decode_err_short() -> None:
    with pytest.raises(ProtocolError, match="shorter than a BHS"):
        decode(bytes(47))


def test_pdu_decode_err_truncated_data() -> None:
    with pytest.raises(ProtocolError, match="header says otherwise"):
        decode(SPECS["scsi-command"].encode()[:-4])


def test_pdu_decode_err_unknown_opcode() -> None:
    raw = bytearray(SPECS["r2t"].encode())
    raw[0] = 0x3A
    with pytest.raises(ProtocolError, match="unknown iSCSI opcode 0x3a"):
        decode(bytes(raw))


def test_pdu_decode_err_ahs_overrun() -> None:
    raw = bytearray(SPECS["with-ahs"].encode())
    raw[49] = 9  # an AHS longer than TotalAHSLength
    with pytest.raises(ProtocolError, match="AHS longer"):
        decode(bytes(raw))


def test_pdu_validate_err_tail() -> None:
    with pytest.raises(ProtocolError, match="tail"):
        Pdu(Opcode.NOP_OUT, tail=b"short").encode()


async def test_pdu_stream_receive_ok_byte_by_byte() -> None:
    """PDUs arrive whole however the bytes are cut; a clean close is EndOfChannel."""
    ours, theirs = trio.testing.memory_stream_pair()
    stream = PduStream(theirs, 1 << 16)
    raw = b"".join(SPECS[c].encode() for c in sorted(SPECS))
    for i in range(len(raw)):
        await ours.send_all(raw[i : i + 1])
    assert [await stream.receive() for _ in SPECS] == [SPECS[c] for c in sorted(SPECS)]
    await ours.aclose()
    with pytest.raises(trio.EndOfChannel):
        await stream.receive()


async def test_pdu_stream_receive_err_over_max_data() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    await ours.send_all(Pdu(Opcode.NOP_OUT, data=bytes(600)).encode())
    with pytest.raises(ProtocolError, match="over the 512 agreed"):
        await PduStream(theirs, 512).receive()


def test_sn_lt_ok_wraps() -> None:
    assert sn_lt(1, 2) and not sn_lt(2, 1) and not sn_lt(5, 5)
    assert sn_lt(0xFFFFFFFF, 0) and not sn_lt(0, 0xFFFFFFFF)
