"""Compression of shipped records: negotiated in the handshake, on by default, off on
request, and never sent to (or expected from) a peer that did not agree to it."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import trio
import zstandard

from repl.protocol import (
    MAGIC,
    Connection,
    FrameReader,
    FrameType,
    hello,
    parse_hello,
    record_frames,
    staged,
)
from store.records import Op, Record
from tests.repl.peers import acknowledged, drain, primary_hello, record_frame
from tests.support import (
    checkpoint,
    diff,
    primary,
    secondary,
    snapshot,
    status,
    until,
)

TEXT = b"".join(b"line %d of a log that repeats itself, as logs do\n" % n for n in range(20000))


def test_compression_ok_negotiated_on_by_default(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}") as pri:
        (mount / "log").write_bytes(TEXT)
        checkpoint(mount)
        st, rs = status(mount), status(replica)
        assert st["compressing"] is True
        assert "zstd-compressed" in pri.log()
        assert st["sent_wire_bytes"] * 5 < st["sent_bytes"], st
        assert rs["received_bytes"] >= len(TEXT)
        assert rs["received_wire_bytes"] * 5 < rs["received_bytes"], rs
        assert diff(snapshot(backing), snapshot(replica)) == []


def test_compression_ok_off(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}", "--compress-level", "0"):
        (mount / "log").write_bytes(TEXT)
        checkpoint(mount)
        st = status(mount)
        assert st["compressing"] is False
        assert st["sent_wire_bytes"] > st["sent_bytes"] >= len(TEXT)
        assert diff(snapshot(backing), snapshot(replica)) == []


async def test_compression_ok_old_primary_served_plainly(tmp_path: Path) -> None:
    """A primary that offers no compression gets none, and its plain records are staged."""
    with secondary(tmp_path / "r", "--insecure") as sec:
        records = [Record(Op.WRITE, 1, n, path=b"f", offset=n, data=b"x") for n in range(3)]
        conn, reply = await raw_primary(sec.port)
        assert "compress" not in reply
        await conn.send(*map(record_frame, records))
        assert sorted(await acknowledged(conn, 3)) == [(1, 0), (1, 1), (1, 2)]

        # Compressed records it never agreed to are a bad frame: the stream is dropped.
        await conn.send(*record_frames([r.encode() for r in records * 20],
                                       zstandard.ZstdCompressor()))
        assert await drain(conn) == []
        until(lambda: status(tmp_path / "r"), lambda st: st["bad_frames"] == 1,
              what="the frame counted as bad")
        until(sec.log, lambda text: "unexpected RECORDS_ZSTD frame" in text,
              what="the bad frame logged")


async def test_compression_ok_agreed_with_a_raw_primary(tmp_path: Path) -> None:
    with secondary(tmp_path / "r", "--insecure") as sec:
        conn, reply = await raw_primary(sec.port, compress=["lz4", "zstd"])
        assert reply["compress"] == "zstd"
        records = [Record(Op.WRITE, 1, n, path=b"f", offset=n, data=b"y" * 100)
                   for n in range(30)]
        (frame,) = record_frames([r.encode() for r in records], zstandard.ZstdCompressor())
        await conn.send(frame)
        assert len(await acknowledged(conn, 30)) == 30
        await conn.aclose()


async def raw_primary(port: int, **extra: object) -> tuple[Connection, dict[str, Any]]:
    """A primary over plain TCP whose HELLO adds *extra*; returns the connection, past
    its handshake, and the secondary's HELLO."""
    conn = Connection(await trio.open_tcp_stream("127.0.0.1", port))
    await conn.send_magic()
    await conn.send(hello(**parse_hello(primary_hello("d" * 16)), **extra))
    await conn.expect_magic()
    reply = parse_hello(await conn.receive())
    conn.handshake_done()
    return conn, reply


@contextmanager
def old_secondary() -> Iterator[tuple[int, list[FrameType]]]:
    """A secondary from before compression, on loopback: it answers the HELLO without a
    word on compression and acknowledges plain records. Yields its port and the types of
    the frames it received."""
    seen: list[FrameType] = []
    server = socket.create_server(("127.0.0.1", 0))

    def serve(sock: socket.socket) -> None:
        reader = FrameReader()
        # The primary hanging up (at the test's end) ends the conversation.
        with sock, suppress(ConnectionError):
            sock.sendall(MAGIC)
            got = b""
            while len(got) < len(MAGIC):
                got += sock.recv(len(MAGIC) - len(got))
            offer = None
            while True:
                frame = reader.next()
                if frame is None:
                    data = sock.recv(1 << 20)
                    if not data:
                        return
                    reader.feed(data)
                    continue
                if offer is None:
                    offer = parse_hello(frame)
                    sock.sendall(hello(role="secondary", version=1, node="old" * 4,
                                       cluster=offer["cluster"], generation=1, applied=0,
                                       syncing=None).encode())
                    continue
                seen.append(frame.type)
                if frame.type == FrameType.RECORD:
                    record = Record.decode(frame.payload)
                    sock.sendall(staged([(record.set, record.seq)]).encode())

    def accept() -> None:
        while True:
            try:
                sock, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(sock,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1], seen
    finally:
        server.close()


def test_compression_ok_old_secondary_sent_plain_records(tmp_path: Path) -> None:
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    with old_secondary() as (port, seen), primary(
            backing, mount, "--secondary", f"127.0.0.1:{port}", "--insecure",
            "--streams", "1"):
        (mount / "log").write_bytes(TEXT)
        with open(mount / "log", "rb+") as f:
            os.fsync(f.fileno())
        until(lambda: list(seen), lambda types: types.count(FrameType.RECORD) >= 3,
              what="records at the old secondary")
        assert status(mount)["compressing"] is False
    assert FrameType.RECORDS_ZSTD not in seen, seen
