"""A replication over FCIP, captured and decoded by tshark: FCIP -> FC -> FCP -> SCSI.

A real secondary and primary replicate a few files while tshark captures the
FCIP port; the capture, decoded with the port as FCIP (``-d tcp.port==N,fcip``),
shows every TCP segment as one FCIP frame, every FC frame decoded, the
logins (FLOGI, PLOGI, FC-SP's DH-CHAP, PRLI), FCP exchanges whose CDBs the
SCSI dissector reads, and nothing malformed or wrong by any of those
decoders.
"""

from __future__ import annotations

from pathlib import Path

from tests.repl.scsi.transports import FCIP, replicate_captured
from tests.repl.wire import Packet, carrying, problems

OURS = {"fcip", "fc", "fcels", "fcsp", "fcp", "scsi"}
FLOGI, PLOGI, PRLI = "0x04", "0x03", "0x20"


def one_frame(packet: Packet) -> bool:
    """The packet's TCP payload is one whole FCIP frame."""
    return [int(n) * 4 for n in packet.values("fcip.framelen")] == [
        int(packet.values("tcp.len")[0])]


def fc_frames(packets: list[Packet]) -> list[Packet]:
    return [p for p in packets if "fc" in p.protos]


def test_capture_decodes_as_fcip_fc_fcp_scsi_ok(tmp_path: Path) -> None:
    packets = replicate_captured(FCIP, tmp_path)
    assert problems(packets, OURS) == []
    segments = carrying(packets)
    assert segments and [p.number for p in segments if not one_frame(p)] == []
    specials = [p for p in segments if p.values("fcip.pflags.sf") == ["1"]]
    assert len(specials) == len(segments) - len(fc_frames(packets)) >= 2
    els = [code for p in fc_frames(packets) for code in p.values("fcels.opcode")]
    for code in (FLOGI, PLOGI, PRLI):
        assert code in els, els
    auth = {m for p in packets for m in p.values("fcsp.opcode")}
    assert auth >= {"0x0b", "0x10", "0x11", "0x12"}  # Negotiate, Challenge, Reply, Success
    fcp = [p for p in fc_frames(packets) if "fcp" in p.protos]
    commands = {int(p.values("fc.ox_id")[0], 16) for p in fcp if p.has("fcp.dl")}
    responses = [p for p in fcp if p.has("fcp.status")]
    assert responses and all(int(p.values("fc.ox_id")[0], 16) in commands for p in responses)
    writes = [p for p in fcp if "0x8a" in p.values("scsi_sbc.opcode")]  # WRITE(16)
    reads = [p for p in fcp if "0x88" in p.values("scsi_sbc.opcode")]  # READ(16)
    assert len(writes) >= 5 and reads
    assert any(p.has("fcp.burstlen") for p in fcp)  # FCP_XFER_RDY
