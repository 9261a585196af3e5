"""The replication's traffic as an implementation no one here wrote decodes it: tshark.

``capture`` runs tshark (Debian's package; bin/test installs it) on the
loopback interface for one TCP port while a block runs; it returns only
once tshark says it is capturing, since a capture started after the
traffic holds nothing, and stops it with SIGINT, so it writes out what it
has, once a marker connection made after the block shows it has read
everything before. ``decode`` reads the capture back as PDML, the full tree of every
packet, with the port decoded as the transport a test names.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_SECONDS = 30.0
# Expert severities (epan/proto.h): chat and note are how a decoder comments on
# what it sees; warning and error are what it found wrong.
WARNING = 0x00600000


def tshark() -> str:
    path = shutil.which("tshark")
    if path is None:
        pytest.skip("tshark is not installed (bin/test installs it)")
    return path


@contextmanager
def capture(port: int, path: Path) -> Iterator[None]:
    """tshark capturing TCP port *port* on ``lo`` into *path* while the block runs.

    Stopping tshark drops what the kernel captured but tshark has not read yet,
    so the capture ends with a marker: a connection to the port, made after the
    block, whose first packet tshark is seen to print before it is stopped; every
    packet of the block came before it."""
    started, seen = threading.Event(), threading.Event()
    marker: list[str] = []
    proc = subprocess.Popen([tshark(), "-i", "lo", "-f", f"tcp port {port}", "-w", str(path),
                             "-P", "-l", "-T", "fields", "-e", "tcp.srcport"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    said: list[bytes] = []

    def watch() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            said.append(line)
            if b"Capture started" in line:
                started.set()
        started.set()

    def printed() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if marker and line.decode().strip() == marker[0]:
                seen.set()
        seen.set()

    threading.Thread(target=watch, daemon=True).start()
    threading.Thread(target=printed, daemon=True).start()
    try:
        assert started.wait(START_SECONDS) and proc.poll() is None, b"".join(said)
        yield
        with socket.socket() as conn:
            conn.bind(("127.0.0.1", 0))
            marker.append(str(conn.getsockname()[1]))
            conn.connect(("127.0.0.1", port))
        assert seen.wait(START_SECONDS) and proc.poll() is None, b"".join(said)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


@dataclass
class Packet:
    """One packet's decode: its protocols in order, and every field under each."""

    number: int
    protos: list[str] = field(default_factory=list)
    fields: dict[str, list[str]] = field(default_factory=dict)  # name: values ("show")
    experts: list[tuple[str, int, str]] = field(default_factory=list)  # proto, severity, text

    def has(self, name: str) -> bool:
        return name in self.fields

    def values(self, name: str) -> list[str]:
        return self.fields.get(name, [])


def decode(path: Path, port: int, transport: str) -> list[Packet]:
    """*path* decoded by tshark (two passes), TCP *port* as *transport*."""
    result = subprocess.run([tshark(), "-2", "-r", str(path), "-d", f"tcp.port=={port},"
                             f"{transport}", "-T", "pdml"], capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    packets = []
    for element in ET.fromstring(result.stdout).iter("packet"):
        packet = Packet(len(packets) + 1)
        for proto in element.findall("proto"):
            _walk(packet, proto, proto.get("name", ""))
        packets.append(packet)
    return packets


def _walk(packet: Packet, element: ET.Element, proto: str) -> None:
    """Record *element*'s fields under *proto*; a proto inside it is one of its own."""
    if element.tag == "proto":
        proto = element.get("name", "")
        packet.protos.append(proto)
    for child in element:
        if child.tag == "field":
            name = child.get("name", "")
            packet.fields.setdefault(name, []).append(child.get("show", ""))
            if name == "_ws.expert":
                sub = {f.get("name"): f.get("show", "") for f in child}
                packet.experts.append((proto, int(sub.get("_ws.expert.severity") or 0),
                                       sub.get("_ws.expert.message") or ""))
        _walk(packet, child, proto)


def carrying(packets: list[Packet]) -> list[Packet]:
    """The packets that carry TCP payload, in order, for the first time.

    A loaded machine's loopback retransmits now and then, and the capture may
    see a connection's segments out of order (two CPUs sending for it, one for
    the process and one acknowledging); TCP does not hand such a segment to the
    transport's decoder.
    """
    return [p for p in packets if int((p.values("tcp.len") or ["0"])[0]) > 0
            and not p.has("tcp.analysis.retransmission")
            and not p.has("tcp.analysis.out_of_order")]


def problems(packets: list[Packet], ours: set[str]) -> list[str]:
    """What the decoders found wrong: malformed packets anywhere, and warnings or errors
    from the protocols in *ours* (TCP's own remarks on windows and the like are not
    ours)."""
    found = []
    for packet in packets:
        if "_ws.malformed" in packet.protos or packet.has("_ws.malformed"):
            found.append(f"packet {packet.number}: malformed")
        for proto, severity, text in packet.experts:
            if proto in ours and severity >= WARNING:
                found.append(f"packet {packet.number}: {proto}: {text}")
    return found
