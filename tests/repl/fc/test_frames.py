"""FCIP, FC-2, ELS, FC-SP and FCP formats against bytes laid out by hand.

Each golden case pins one encapsulated frame as it goes on the wire; the
files in tests/testdata/fcip are checked in (rewrite them with
REPLFS_REGENERATE=1 after a deliberate change, and review the diff), and
``test_frame_encode_ok_layout`` checks each against RFC 3643's, FC-FS's,
FC-LS's, FC-SP's and FCP-4's layouts written out field by field,
independently of the encoders.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import trio
import trio.testing

from repl.errors import ProtocolError
from repl.fc import els, fcip, fcp, frame
from repl.fc.els import Auth, AuthMessage, Command, Login, Prli, Reject
from repl.fc.fcip import FcipStream, SpecialFrame, decapsulate, encapsulate
from repl.fc.frame import Eof, FcFrame, RCtl, Sof, Type
from repl.scsi import spc
from tests.support import golden_bytes

GOLDEN = Path(__file__).resolve().parent.parent.parent / "testdata" / "fcip"
INI, TGT = 0x010201, 0x010100  # an initiator's and the target's N_Port IDs
PORT, NODE = 0x3300_0000_0000_00AA, 0x3200_0000_0000_00AA
CDB = spc.cdb16(spc.Op.WRITE_16, spc.RECORDS_LBA, 2)

FRAMES: dict[str, FcFrame] = {
    "flogi": FcFrame(RCtl.ELS_REQUEST, frame.FABRIC, 0, Type.ELS, 0x290000, 0x0001,
                     payload=Login(Command.FLOGI, PORT, NODE).encode()),
    "prli-accept": FcFrame(RCtl.ELS_REPLY, INI, TGT, Type.ELS, 0x980000, 0x0004, 0x0004, 3,
                           payload=Prli(True, els.TARGET_FUNCTION | els.READ_XFER_RDY_DISABLED,
                                        els.REQUEST_EXECUTED).encode()),
    "auth-negotiate": FcFrame(RCtl.ELS_REQUEST, TGT, INI, Type.ELS, 0x290000, 0x0003, seq_id=2,
                              payload=Auth(AuthMessage.AUTH_NEGOTIATE, 0xA1B2C3D4, PORT,
                                           hashes=(els.SHA1, els.MD5),
                                           groups=(els.NULL_DH,)).encode()),
    "dhchap-reply": FcFrame(RCtl.ELS_REQUEST, TGT, INI, Type.ELS, 0x290000, 0x0005, seq_id=4,
                            payload=Auth(AuthMessage.DHCHAP_REPLY, 0xA1B2C3D4,
                                         response=bytes(range(20)),
                                         challenge=bytes(range(16, 32))).encode()),
    "fcp-cmnd": FcFrame(RCtl.FCP_CMND, TGT, INI, Type.FCP, 0x290000, 0x0010, seq_id=7,
                        payload=fcp.Cmnd(fcp.lun_field(0), CDB, 1024, write=True).encode()),
    "fcp-xfer-rdy": FcFrame(RCtl.FCP_XFER_RDY, INI, TGT, Type.FCP, 0x890000, 0x0010, 0x0022, 8,
                            payload=fcp.XferRdy(0, 1024).encode()),
    # Five bytes of data: three fill bytes, counted in F_CTL's low bits.
    "fcp-data-fill": FcFrame(RCtl.FCP_DATA, TGT, INI, Type.FCP, 0x090008, 0x0010, 0x0022, 9,
                             seq_cnt=1, parameter=2048, payload=b"hello", sof=Sof.SOFn3),
    "fcp-rsp-sense": FcFrame(RCtl.FCP_RSP, INI, TGT, Type.FCP, 0x990000, 0x0010, 0x0022, 10,
                             payload=fcp.Rsp(spc.CHECK_CONDITION,
                                             spc.INVALID_FIELD_IN_DATA.encode()).encode()),
}
SPECIAL = SpecialFrame(0x3100_0000_0000_0001, 0, 0x0123_4567_89AB_CDEF, 0x3100_0000_0000_0002)


def w(value: int, size: int = 4) -> bytes:
    return value.to_bytes(size, "big")


def encapsulated(words: int, pflags: int = 0) -> bytes:
    """RFC 3643 figure 1 with FCIP's words 1 and 2 (RFC 3821 figure 4)."""
    return (bytes([1, 1, 0xFE, 0xFE]) * 2 + bytes([pflags, 0, 0xFF - pflags, 0xFF])
            + w(words, 2) + w(0xFFFF - words, 2) + bytes(12))


def fc_layout(r_ctl: int, d_id: int, s_id: int, kind: int, f_ctl: int, seq_id: int,
              seq_cnt: int, ox_id: int, rx_id: int, parameter: int, payload: bytes,
              sof: int = 0x2E, eof: int = 0x42) -> bytes:
    """FC-FS-3 figure 20 (the header), the payload padded, the CRC (Ethernet's
    polynomial, least significant byte first), inside SOF and EOF words."""
    fill = -len(payload) % 4
    body = (bytes([r_ctl]) + w(d_id, 3) + bytes([0]) + w(s_id, 3) + bytes([kind])
            + w(f_ctl | fill, 3) + bytes([seq_id, 0]) + w(seq_cnt, 2) + w(ox_id, 2)
            + w(rx_id, 2) + w(parameter) + payload + bytes(fill))
    body += zlib.crc32(body).to_bytes(4, "little")
    words = 7 + 1 + len(body) // 4 + 1
    return (encapsulated(words) + bytes([sof, sof, 0xFF - sof, 0xFF - sof]) + body
            + bytes([eof, eof, 0xFF - eof, 0xFF - eof]))


def login_layout(code: int, port: int, node: int, fabric: bool = False) -> bytes:
    """FC-LS-3 table 139: FLOGI, PLOGI and their LS_ACC."""
    common = (bytes([0x20, 0x20]) + w(16, 2) + w(0x8000 | (0x1000 if fabric else 0), 2)
              + w(2048, 2) + w(255, 2) + w(0xFE, 2) + w(2000))
    class3 = w(0x8800, 2) + bytes(4) + w(2048, 2) + w(255, 2) + bytes(2) + w(1, 2) + bytes(2)
    return (bytes([code, 0, 0, 0]) + common + w(port, 8) + w(node, 8) + bytes(32) + class3
            + bytes(32))


def layout(case: str) -> bytes:
    """The bytes of each case, written out from the standards' figures."""
    if case == "flogi":
        return fc_layout(0x22, 0xFFFFFE, 0, 0x01, 0x290000, 0, 0, 1, 0xFFFF, 0,
                         login_layout(0x04, PORT, NODE))
    if case == "prli-accept":
        page = bytes([0x08, 0, 0x21, 0]) + bytes(8) + w(0x12)  # FCP, image pair, executed
        return fc_layout(0x23, INI, TGT, 0x01, 0x980000, 3, 0, 4, 4, 0,
                         bytes([0x02, 16]) + w(20, 2) + page)
    if case == "auth-negotiate":
        message = (w(1, 2) + w(8, 2) + w(PORT, 8) + w(1)       # name: WWN; one protocol
                   + w(4 + 4 + 8 + 4 + 4) + w(1)                # parameter length, DH-CHAP
                   + w(1, 2) + w(2, 2) + w(6) + w(5)            # HashList: SHA-1, MD5
                   + w(2, 2) + w(1, 2) + w(0))                  # DHgIDList: NULL
        return fc_layout(0x22, TGT, INI, 0x01, 0x290000, 2, 0, 3, 0xFFFF, 0,
                         bytes([0x90, 0, 0x0B, 1]) + w(len(message)) + w(0xA1B2C3D4)
                         + message)
    if case == "dhchap-reply":
        message = w(20) + bytes(range(20)) + w(0) + w(16) + bytes(range(16, 32))
        return fc_layout(0x22, TGT, INI, 0x01, 0x290000, 4, 0, 5, 0xFFFF, 0,
                         bytes([0x90, 0, 0x11, 1]) + w(len(message)) + w(0xA1B2C3D4)
                         + message)
    if case == "fcp-cmnd":
        iu = bytes(8) + bytes([0, 0, 0, 0x01]) + CDB + w(1024)  # LUN 0, simple, WRDATA
        return fc_layout(0x06, TGT, INI, 0x08, 0x290000, 7, 0, 0x10, 0xFFFF, 0, iu)
    if case == "fcp-xfer-rdy":
        return fc_layout(0x05, INI, TGT, 0x08, 0x890000, 8, 0, 0x10, 0x22, 0,
                         w(0) + w(1024) + bytes(4))
    if case == "fcp-data-fill":
        return fc_layout(0x01, TGT, INI, 0x08, 0x090008, 9, 1, 0x10, 0x22, 2048, b"hello",
                         sof=0x36)
    assert case == "fcp-rsp-sense"
    sense = spc.INVALID_FIELD_IN_DATA.encode()
    iu = bytes(10) + bytes([0x02, 0x02]) + w(0) + w(len(sense)) + w(0) + sense
    return fc_layout(0x07, INI, TGT, 0x08, 0x990000, 10, 0, 0x10, 0x22, 0, iu)


def special_layout() -> bytes:
    """RFC 3821 figure 13: the FCIP Special Frame, 19 words."""
    return (encapsulated(19, 0x01) + w(0x0000FFFF) + w(SPECIAL.source_wwn, 8) + bytes(8)
            + w(SPECIAL.nonce, 8) + bytes([0x20, 0]) + w(0, 2)
            + w(SPECIAL.destination_wwn, 8) + w(0) + w(0x0000FFFF))


def golden(case: str, raw: bytes) -> bytes:
    return golden_bytes(GOLDEN / f"{case}.bin", raw)


@pytest.mark.parametrize("case", sorted(FRAMES))
def test_frame_encode_ok_golden(case: str) -> None:
    raw = encapsulate(FRAMES[case])
    assert raw == golden(case, raw)


@pytest.mark.parametrize("case", sorted(FRAMES))
def test_frame_encode_ok_layout(case: str) -> None:
    assert encapsulate(FRAMES[case]) == layout(case)


@pytest.mark.parametrize("case", sorted(FRAMES))
def test_frame_decode_ok_round_trip(case: str) -> None:
    assert decapsulate(encapsulate(FRAMES[case])) == FRAMES[case]


def test_special_frame_encode_ok_golden_and_layout() -> None:
    raw = SPECIAL.encode()
    assert raw == golden("special-frame", raw) == special_layout()
    assert SpecialFrame.decode(raw) == SPECIAL


def test_special_frame_echo_ok_changed() -> None:
    """The acceptor echoes a frame that names it unchanged; else with Ch and its WWN."""
    assert SPECIAL.echo(SPECIAL.destination_wwn) == SPECIAL
    echo = SpecialFrame.decode(SPECIAL.echo(0x3100_0000_0000_0009).encode())
    assert echo.changed and echo.destination_wwn == 0x3100_0000_0000_0009
    assert echo.nonce == SPECIAL.nonce


def test_special_frame_decode_err_reserved() -> None:
    raw = bytearray(SPECIAL.encode())
    raw[28 + 3] = 0  # the first reserved word's complement
    with pytest.raises(ProtocolError, match="reserved words"):
        SpecialFrame.decode(bytes(raw))


@pytest.mark.parametrize(("at", "value", "error"), [
    (2, 0xFF, "not an FCIP encapsulation"),     # -Protocol# wrong
    (5, 2, "not an FCIP encapsulation"),        # word 1 is not word 0
    (10, 0x00, "pFlags and their complement"),
    (8, 0x01, "pFlags and their complement"),   # SF set, -pFlags still 0xFF
    (15, 0x00, "frame length and its complement"),
    (24, 0x01, "CRC is not zero"),
])
def test_encapsulation_decode_err_complements(at: int, value: int, error: str) -> None:
    raw = bytearray(encapsulate(FRAMES["fcp-cmnd"]))
    raw[at] = value
    with pytest.raises(ProtocolError, match=error):
        decapsulate(bytes(raw))


def test_encapsulation_decode_err_flags() -> None:
    raw = bytearray(encapsulate(FRAMES["fcp-cmnd"]))
    raw[12] |= 0x04  # CRCV: FCIP has none
    raw[14] &= ~0x04 & 0xFF
    with pytest.raises(ProtocolError, match="flags"):
        decapsulate(bytes(raw))


def test_encapsulation_decode_err_delimiters() -> None:
    raw = bytearray(encapsulate(FRAMES["fcp-cmnd"]))
    raw[29] = 0x36  # SOF and its copy differ
    with pytest.raises(ProtocolError, match="SOF word"):
        decapsulate(bytes(raw))
    raw = bytearray(encapsulate(FRAMES["fcp-cmnd"]))
    raw[-1] = 0  # -EOF wrong
    with pytest.raises(ProtocolError, match="EOF word"):
        decapsulate(bytes(raw))


def test_frame_decode_err_crc() -> None:
    raw = bytearray(encapsulate(FRAMES["fcp-cmnd"]))
    raw[40] ^= 0x01  # a header bit
    with pytest.raises(ProtocolError, match="CRC mismatch"):
        decapsulate(bytes(raw))


def test_frame_decode_err_unknown_delimiter() -> None:
    body = FRAMES["fcp-cmnd"].encode()
    with pytest.raises(ProtocolError, match="unknown delimiter"):
        frame.decode(body, 0x2F, 0x42)


def test_frame_decode_err_short() -> None:
    with pytest.raises(ProtocolError, match="an FC frame of 20 bytes"):
        frame.decode(bytes(20), Sof.SOFi3, Eof.EOFt)


def test_encapsulation_decode_err_length() -> None:
    with pytest.raises(ProtocolError, match="frame of 15 words"):
        fcip.check_header(encapsulated(15))


@pytest.mark.parametrize(("change", "error"), [
    ({"payload": bytes(2113)}, "payload of 2113"),
    ({"d_id": 1 << 24}, "address out of range"),
    ({"f_ctl": 0x000100}, "F_CTL bits"),
    ({"f_ctl": 0x000001}, "F_CTL bits"),  # fill bytes are the encoder's to set
    ({"ox_id": 1 << 16}, "exchange id"),
    ({"seq_id": 256}, "sequence id"),
    ({"r_ctl": 256}, "R_CTL or TYPE"),
])
def test_frame_validate_err(change: dict[str, object], error: str) -> None:
    fields = {"r_ctl": RCtl.FCP_DATA, "d_id": TGT, "s_id": INI, "type": Type.FCP, "f_ctl": 0,
              "ox_id": 1} | change
    with pytest.raises(ProtocolError, match=error):
        FcFrame(**fields).encode()  # type: ignore[arg-type]


def test_sequence_ok_counts_offsets_delimiters() -> None:
    first = FcFrame(RCtl.FCP_DATA, TGT, INI, Type.FCP, frame.RELATIVE_OFFSET, 5, 9, 3,
                    parameter=4096)
    frames = frame.sequence(first, bytes(5000), last_f_ctl=frame.END_SEQUENCE)
    assert [f.seq_cnt for f in frames] == [0, 1, 2]
    assert [f.parameter for f in frames] == [4096, 6144, 8192]
    assert [len(f.payload) for f in frames] == [2048, 2048, 904]
    assert [(f.sof, f.eof) for f in frames] == [(Sof.SOFi3, Eof.EOFn), (Sof.SOFn3, Eof.EOFn),
                                                (Sof.SOFn3, Eof.EOFt)]
    assert [f.end_sequence for f in frames] == [False, False, True]


def test_login_decode_ok_round_trip_and_err() -> None:
    accept = Login(Command.LS_ACC, PORT, NODE, fabric=True)
    assert Login.decode(accept.encode()) == accept
    with pytest.raises(ProtocolError, match="login parameters of 100"):
        Login.decode(accept.encode()[:100])
    no_class3 = bytearray(accept.encode())
    no_class3[68] = 0
    with pytest.raises(ProtocolError, match="class 3"):
        Login.decode(bytes(no_class3))


def test_prli_decode_err_not_fcp() -> None:
    raw = bytearray(Prli(False, els.INITIATOR_FUNCTION).encode())
    raw[4] = 0x05
    with pytest.raises(ProtocolError, match="not FCP"):
        Prli.decode(bytes(raw))


def test_els_command_err_unknown() -> None:
    with pytest.raises(ProtocolError, match="ELS command 0x52"):
        els.command(bytes([0x52, 0, 0, 0]))


def test_reject_decode_ok() -> None:
    assert Reject.decode(Reject(els.UNABLE, els.LOGIN_REQUIRED).encode()) == \
        Reject(els.UNABLE, els.LOGIN_REQUIRED)


@pytest.mark.parametrize("message", [
    Auth(AuthMessage.AUTH_NEGOTIATE, 7, PORT, hashes=(els.MD5,), groups=(0,)),
    Auth(AuthMessage.DHCHAP_CHALLENGE, 7, PORT, hash=els.SHA1, group=0, challenge=b"c" * 16),
    Auth(AuthMessage.DHCHAP_REPLY, 7, response=b"r" * 16, challenge=b"c" * 16),
    Auth(AuthMessage.DHCHAP_SUCCESS, 7, response=b"r" * 20),
    Auth(AuthMessage.DHCHAP_SUCCESS, 7),
    Auth(AuthMessage.AUTH_REJECT, 7, reason=els.AUTH_FAILURE,
         explanation=els.AUTHENTICATION_FAILED),
])
def test_auth_decode_ok_round_trip(message: Auth) -> None:
    assert Auth.decode(message.encode()) == message


def test_auth_decode_err_truncated_and_length() -> None:
    raw = Auth(AuthMessage.DHCHAP_REPLY, 7, response=b"r" * 16, challenge=b"c" * 16).encode()
    with pytest.raises(ProtocolError, match="message length"):
        Auth.decode(raw[:-1])
    cut = bytearray(raw[:-17])
    cut[4:8] = (len(cut) - 12).to_bytes(4, "big")
    with pytest.raises(ProtocolError, match="ends early"):
        Auth.decode(bytes(cut))


def test_auth_decode_err_unknown_message() -> None:
    raw = bytearray(Auth(AuthMessage.DHCHAP_SUCCESS, 7).encode())
    raw[2] = 0x13  # FCAP_Request
    with pytest.raises(ProtocolError, match="0x13 not supported"):
        Auth.decode(bytes(raw))


def test_fcp_decode_ok_round_trips() -> None:
    cmnd = fcp.Cmnd(fcp.lun_field(3), CDB, 512, read=True)
    assert fcp.Cmnd.decode(cmnd.encode()) == cmnd and fcp.lun_of(cmnd.lun) == 3
    rsp = fcp.Rsp(spc.GOOD, residual_under=100)
    assert fcp.Rsp.decode(rsp.encode()) == rsp
    tmf = fcp.Rsp(spc.GOOD, response_code=fcp.TMF_NOT_SUPPORTED)
    assert fcp.Rsp.decode(tmf.encode()) == tmf


def test_fcp_decode_err() -> None:
    raw = bytearray(fcp.Cmnd(0, CDB, 0).encode())
    raw[11] = 0x04  # one additional CDB word
    with pytest.raises(ProtocolError, match="additional CDB"):
        fcp.Cmnd.decode(bytes(raw))
    rsp = bytearray(fcp.Rsp(spc.CHECK_CONDITION, bytes(18)).encode())
    with pytest.raises(ProtocolError, match="run past its end"):
        fcp.Rsp.decode(bytes(rsp[:-1]))


async def test_fcip_stream_receive_ok_byte_by_byte() -> None:
    """Frames arrive whole however the bytes are cut; a clean close is EndOfChannel, a
    close inside a frame a broken link."""
    ours, theirs = trio.testing.memory_stream_pair()
    stream = FcipStream(theirs)
    raw = SPECIAL.encode() + b"".join(encapsulate(FRAMES[c]) for c in sorted(FRAMES))
    for i in range(len(raw)):
        await ours.send_all(raw[i : i + 1])
    assert await stream.receive_special() == SPECIAL
    assert [await stream.receive() for _ in FRAMES] == [FRAMES[c] for c in sorted(FRAMES)]
    await ours.send_all(raw[:40])
    await ours.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await stream.receive()


async def test_fcip_stream_receive_err_special_frame_out_of_place() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    await ours.send_all(SPECIAL.encode())
    with pytest.raises(ProtocolError, match="not an encapsulated FC frame"):
        await FcipStream(theirs).receive()
