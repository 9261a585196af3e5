"""Peers that misbehave on purpose, and ways to watch a daemon refuse them.

A raw replfs client speaks the handshake with ``repl.protocol`` (over TLS
with the session's PRIMARY certificate, or any other TLS context a test
makes) and then sends whatever a test builds, including records that
``Record.encode()`` refuses to produce; a garbage server answers anything
with bytes that are not replfs.
"""

from __future__ import annotations

import secrets
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from repl import tls
from repl.protocol import (
    PROTOCOL_VERSION,
    Connection,
    Frame,
    FrameType,
    hello,
    parse_hello,
    parse_keys,
)
from store.records import Record
from tests.store.specs import body, reseal
from tests.support import PRIMARY, SECONDARY, Daemon, cluster_ca

LOG_TIMEOUT = 20.0
PATH_AT = 16  # a record's first path: after the 14-byte header and its u16 length


def wait_for_log(daemon: Daemon, text: str, timeout: float = LOG_TIMEOUT) -> list[str]:
    """Block until *daemon* logged a line containing *text*; return every such line.

    Fails at once (not after *timeout*) if the daemon exits first.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            daemon.wait_for(text, min(1.0, max(0.0, deadline - time.monotonic())))
            return [line for line in daemon.log().splitlines() if text in line]
        except AssertionError:
            assert daemon.proc is not None
            if daemon.proc.poll() is not None or time.monotonic() >= deadline:
                raise


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """The command failed with exactly one line of its own on stderr, holding *words*."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    ours = [line for line in result.stderr.splitlines() if line.startswith("replfs:")]
    assert len(ours) == 1, result.stderr
    for word in words:
        assert word in ours[0], ours[0]
    return ours[0]


# --- a raw replfs client -------------------------------------------------------------


# One raw client stands for one primary process: its connections share a boot.
BOOT = secrets.token_hex(8)


def primary_hello(cluster: str, session: str | None = None, **extra: Any) -> Frame:
    return hello(role="primary", version=PROTOCOL_VERSION, cluster=cluster,
                 node=secrets.token_hex(8), generation=1, session=session or secrets.token_hex(8),
                 boot=BOOT, stream=0, streams=1, history=[], **extra)


def client_context(ca: Path | None = None, me: str = PRIMARY) -> ssl.SSLContext:
    """A TLS client context as node *me* of the CA in *ca* (default: the session's)."""
    return tls.credentials((ca or cluster_ca()) / me, SECONDARY).client_context()


async def connect(port: int, context: ssl.SSLContext | None) -> trio.abc.Stream:
    """A link to the secondary on *port*: TLS with *context* (after its handshake), or
    plain TCP if None."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    if context is None:
        return stream
    link = trio.SSLStream(stream, context, server_hostname=SECONDARY)
    await link.do_handshake()
    return link


async def open_raw(port: int, cluster: str, context: ssl.SSLContext | None = None,
                   session: str | None = None, **extra: Any
                   ) -> tuple[Connection, dict[str, Any]]:
    """Connect as a primary of *cluster* (on a session of its own unless *session*
    names one), over TLS as PRIMARY unless *context* says otherwise, with the *extra*
    fields in its HELLO. Returns the connection and the secondary's HELLO.

    Raises:
        ProtocolError: the secondary refused us (its ERROR frame's text), or is not replfs.
    """
    conn = Connection(await connect(port, context or client_context()))
    await conn.send_magic()
    await conn.send(primary_hello(cluster, session, **extra))
    await conn.expect_magic()
    return conn, parse_hello(await conn.receive())


async def drain(conn: Connection) -> list[Frame]:
    """Every frame until the peer closes (it must, within a few seconds)."""
    frames = []
    with trio.fail_after(LOG_TIMEOUT):
        try:
            while True:
                frames.append(await conn.receive())
        except (trio.EndOfChannel, trio.BrokenResourceError):
            pass
    await conn.aclose()
    return frames


async def acknowledged(conn: Connection, count: int) -> list[tuple[int, int]]:
    """The next *count* (set, seq) the secondary acknowledges as staged, in order.

    Fails if any other frame comes first, or if they take over LOG_TIMEOUT.
    """
    keys: list[tuple[int, int]] = []
    with trio.fail_after(LOG_TIMEOUT):
        while len(keys) < count:
            frame = await conn.receive()
            assert frame.type == FrameType.STAGED, frame
            keys += parse_keys(frame)
    return keys


def record_frame(record: Record) -> Frame:
    return Frame(FrameType.RECORD, record.encode())


def forged(record: Record, path: bytes) -> Frame:
    """*record* with its path swapped for *path* (same length), checksum made valid.

    The bytes of a record that ``Record.encode()`` refuses to write, such as
    one whose path leaves the tree: only the receiver's checks stand in the way.
    """
    assert len(path) == len(record.path)
    raw = body(record)
    assert raw[PATH_AT : PATH_AT + len(path)] == record.path
    return Frame(FrameType.RECORD,
                 reseal(raw[:PATH_AT] + path + raw[PATH_AT + len(path) :]))


def same_length_relative(path: bytes) -> bytes:
    """A valid relative path as long as the absolute *path*, to forge it from."""
    assert path.startswith(b"/")
    return b"x" + path[1:]


# --- a server that is not replfs ---------------------------------------------------------


class _Garbage(socketserver.BaseRequestHandler):
    answer = b""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.recv(65536)  # whatever the client says first
        sock.sendall(self.answer)
        while sock.recv(65536):  # then wait for the client to hang up
            pass


@contextmanager
def garbage_server(answer: bytes) -> Iterator[int]:
    """A TCP server on loopback that answers every client with *answer*. Yields its port."""
    handler = type("Garbage", (_Garbage,), {"answer": answer})
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
