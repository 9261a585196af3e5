"""A replication over iSCSI, captured and decoded by tshark: iSCSI -> SCSI.

A real secondary and primary replicate a few files while tshark captures the
iSCSI port; the capture, decoded with the port as iSCSI (``-d
tcp.port==N,iscsi``), shows every TCP segment as iSCSI (or part of a PDU
decoded where it ends), the login with
CHAP, SCSI commands whose CDBs the SCSI dissector reads (WRITE(16) and
READ(16)), R2T and Data-Out for a record past FirstBurstLength, and nothing
malformed or wrong by either decoder.
"""

from __future__ import annotations

from pathlib import Path

from tests.repl.scsi.transports import ISCSI, replicate_captured
from tests.repl.wire import carrying, problems

OURS = {"iscsi", "scsi"}
LOGIN, COMMAND, DATA_OUT, RESPONSE, DATA_IN, R2T = (
    "0x03", "0x01", "0x05", "0x21", "0x25", "0x31")


def test_capture_decodes_as_iscsi_scsi_ok(tmp_path: Path) -> None:
    packets = replicate_captured(ISCSI, tmp_path)
    assert problems(packets, OURS) == []
    segments = carrying(packets)
    # A PDU longer than a segment is decoded in the packet that completes it.
    assert segments and [p.number for p in segments
                         if "iscsi" not in p.protos and not p.has("tcp.reassembled_in")] == []
    opcodes = {code for p in packets for code in p.values("iscsi.opcode")}
    assert opcodes >= {LOGIN, COMMAND, DATA_OUT, RESPONSE, DATA_IN, R2T}, opcodes
    assert any("CHAP_R" in v for p in packets for v in p.values("iscsi.keyvalue"))
    cdbs = [code for p in packets for code in p.values("scsi_sbc.opcode")]
    assert cdbs.count("0x8a") >= 6 and "0x88" in cdbs  # WRITE(16)s and READ(16)s
