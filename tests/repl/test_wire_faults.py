"""Bad links and bad peers, end to end: real daemons, real sockets, a seeded fault proxy.

A corrupted or cut link costs a reconnect and a resend, never a byte of the
replica, over TLS (the TLS layer refuses the corrupt record) and over plain
TCP (the frame checksum does); a peer that is not replfs, belongs to
another cluster or sends a path that leaves the replica is refused with one
clear log line, and the replica does not change. Peers without the
cluster's certificate are in test_gate.py.
"""

from __future__ import annotations

import os
import random
import socket
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from repl.errors import ProtocolError
from repl.protocol import (
    MAGIC,
    ZSTD,
    Frame,
    FrameReader,
    FrameType,
    hello,
    parse_hello,
    parse_keys,
)
from store.records import Op, Record
from tests.faultproxy import DOWN, UP, FaultProxy
from tests.repl.peers import (
    acknowledged,
    assert_one_line_error,
    drain,
    forged,
    garbage_server,
    open_raw,
    primary_hello,
    record_frame,
    same_length_relative,
    wait_for_log,
)
from tests.support import (
    PRIMARY,
    SECONDARY,
    Daemon,
    checkpoint,
    diff,
    primary,
    replfs,
    secondary,
    snapshot,
    status,
    tls_args,
    until,
    wait_applied,
)

BIG = 2 << 20  # bytes of one file: most of what crosses the link is its data
# Offsets, on the first stream to carry that much, that fall inside the big
# file's data: past the handshake and the small records before it, inside a
# WRITE record (the writeback cache flushes up to 1 MiB per record). So a
# corrupted byte there fails a checksum; a corrupted frame length is another
# fault (see the stall test).
IN_DATA = (4_000, 200_000)


def workload(m: Path, seed: int) -> bytes:
    """A tree whose stream is mostly one big file's data; returns that data."""
    rng = random.Random(seed)
    data = rng.randbytes(BIG)
    (m / "dir").mkdir()
    (m / "dir" / "big").write_bytes(data)
    for i in range(20):
        (m / "dir" / f"small{i}").write_bytes(rng.randbytes(100 + i))
    os.rename(m / "dir" / "small0", m / "renamed")
    os.chmod(m / "renamed", 0o640)
    return data


# --- the link ----------------------------------------------------------------------------


@pytest.mark.parametrize("link", ["tls", "insecure"])
@pytest.mark.parametrize("direction", [UP, DOWN])
def test_link_corrupt_byte_is_refused_and_resent(tmp_path: Path, direction: str,
                                                 link: str) -> None:
    """One flipped byte: that stream is dropped, the session restarts, the replica is exact.

    UP flips a byte of the records the primary sends; DOWN one of the
    secondary's handshake reply (its HELLO, or over TLS its ServerHello).
    """
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    insecure = ("--insecure",) if link == "insecure" else ()
    with secondary(replica, *insecure) as sec, FaultProxy(sec.port, seed=11) as proxy:
        # DOWN: inside the JSON of the secondary's HELLO on the first stream
        # (after 8 bytes of magic, 4 of length, 1 of type); over TLS, inside
        # the ServerHello's random.
        within = IN_DATA if direction == UP else (13, 60)
        fault = proxy.corrupt(within, direction, conn=None if direction == UP else 0)
        with primary(backing, mount, "--secondary", f"127.0.0.1:{proxy.port}",
                     "--set-interval", "3600", *insecure):
            if direction == UP:  # records of the open set, staged before the fault
                checkpoint(mount)  # the initial sync is behind us
                (mount / "before").write_bytes(b"staged before the fault")
                until(lambda: (status(mount), status(replica)),
                      lambda st: st[0]["last_shipped"][0] == st[0]["open_set"]
                      and st[1]["last_staged"] == st[0]["last_shipped"],
                      what="the first records staged")
            data = workload(mount, seed=5)
            checkpoint(mount)
            assert fault.struck.is_set(), f"seed {proxy.seed}: {fault} never struck"
            assert proxy.accepted > 4, "the primary reconnected"
            assert diff(snapshot(backing), snapshot(replica)) == []
            assert (replica / "dir" / "big").read_bytes() == data
            if direction == UP:
                st = status(replica)
                assert st["bad_frames"] >= 1
                assert st["duplicates"] >= 1, "the primary sent the open set again, whole"
                wait_for_log(sec, "frame checksum mismatch" if insecure else
                             "TLS record refused")
            elif insecure:
                assert "frame checksum mismatch" in str(status(mount)["errors"])
            else:
                assert "refused by" in str(status(mount)["errors"])
                assert "TLS" in str(status(mount)["errors"])


def test_link_cut_primary_reconnects_and_resends(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec, FaultProxy(sec.port, seed=12) as proxy:
        fault = proxy.cut(IN_DATA)
        with primary(backing, mount, "--secondary", f"127.0.0.1:{proxy.port}",
                     "--set-interval", "3600"):
            data = workload(mount, seed=6)
            checkpoint(mount)
            assert fault.struck.is_set(), f"seed {proxy.seed}: {fault} never struck"
            assert fault.conn is not None and proxy.counts[(fault.conn, UP)] == fault.at
            assert proxy.accepted > 4, "the primary reconnected"
            assert diff(snapshot(backing), snapshot(replica)) == []
            assert (replica / "dir" / "big").read_bytes() == data
            st = status(replica)
            assert st["bad_frames"] == 0, "a cut frame is not a bad one"
            assert st["duplicates"] >= 1, "the primary sent the unapplied set again"
            assert any("lost" in e for e in status(mount)["errors"])


# The first record frame on a stream starts after the magic and the primary's HELLO,
# which offers compression, progress and RECORDS frames.
FIRST_FRAME = len(MAGIC) + len(
    hello(**parse_hello(primary_hello("0" * 16)), progress=True, batch=True,
          compress=[ZSTD]).encode())


@pytest.mark.parametrize("case", ["black-hole", "length"])
def test_link_stall_primary_reconnects_and_resends(tmp_path: Path, case: str) -> None:
    """Records that stop being acknowledged, with the link still up, are sent again.

    black-hole (over TLS): one stream stops forwarding mid-data. length (over
    plain TCP: TLS would refuse the record at once): the second byte of a
    frame's length is flipped, so the secondary waits for a frame up to 16
    MiB longer than what was sent.
    """
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    insecure = ("--insecure",) if case == "length" else ()
    with secondary(replica, *insecure) as sec, FaultProxy(sec.port, seed=13) as proxy:
        if case == "black-hole":
            fault = proxy.stall(IN_DATA)
        else:
            fault = proxy.corrupt((FIRST_FRAME + 1, FIRST_FRAME + 2), conn=0)
        with primary(backing, mount, "--secondary", f"127.0.0.1:{proxy.port}",
                     "--set-interval", "3600", "--stall-seconds", "1", *insecure) as prim:
            data = workload(mount, seed=7)
            checkpoint(mount)
            assert fault.struck.is_set(), f"seed {proxy.seed}: {fault} never struck"
            assert proxy.accepted > 4, "the primary reconnected"
            assert diff(snapshot(backing), snapshot(replica)) == []
            assert (replica / "dir" / "big").read_bytes() == data
            assert "refused" not in sec.log(), "the fault hit past the handshake"
            if case == "black-hole":  # the link stayed up: only the deadline ended it
                wait_for_log(prim, "lost: TooSlowError(")


# --- peers that are not replfs -----------------------------------------------------------


def _http(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        return _read_to_eof(sock)


def _reset(port: int) -> bytes:
    """Garbage, then a TCP reset just as the secondary reads the last byte it waits for."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / H")
        got = _read_exactly(sock, len(MAGIC))  # the secondary is in its handshake
        sock.sendall(b"T")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return got


def _wire_version(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(MAGIC[:6] + (2).to_bytes(2, "big") + primary_hello("c1").encode())
        return _read_to_eof(sock)


def _deep_hello(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(MAGIC + Frame(FrameType.HELLO, b"[" * 100_000).encode())
        return _read_to_eof(sock)


def _hello(**fields: object) -> Callable[[int], bytes]:
    """A peer that sends a primary's HELLO with *fields* changed (None: left out)."""
    def peer(port: int) -> bytes:
        frame = primary_hello("c1")
        sent = {k: v for k, v in {**parse_hello(frame), **fields}.items() if v is not None}
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(MAGIC + hello(**sent).encode())
            return _read_to_eof(sock)
    return peer


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, got
        got += chunk
    return got


def _read_to_eof(sock: socket.socket) -> bytes:
    """What the peer sent before it closed (it resets when it left our bytes unread)."""
    sock.settimeout(20)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


# peer -> why it is refused, as the log line ends and as the ERROR frame says
BAD_PEERS = {
    "http": (_http, "peer is not replfs (it sent b'GET / HT')"),
    "reset": (_reset, "peer is not replfs (it sent b'GET / HT')"),
    "wire-version": (_wire_version, "peer speaks replfs wire version 2, we speak 1"),
    "deep-hello": (_deep_hello, "HELLO is not JSON"),
    "bad-generation": (_hello(generation="one"), "HELLO with generation 'one'"),
    "no-session": (_hello(session=None), "HELLO without session"),
}


@pytest.mark.parametrize("case", sorted(BAD_PEERS))
def test_secondary_err_bad_peer(tmp_path: Path, case: str) -> None:
    """Refused with one log line, told why (after our magic), the secondary unharmed.

    Nothing of it stays: not even the cluster id a malformed HELLO carried.
    Over plain TCP (--insecure), where the peers reach the replfs handshake;
    over TLS, a peer that got that far holds the cluster's certificate.
    """
    peer, why = BAD_PEERS[case]
    replica = tmp_path / "r"
    replica.mkdir()
    (replica / "kept").write_bytes(b"already here")
    before = snapshot(replica)
    with secondary(replica, "--insecure") as sec:
        got = peer(sec.port)
        lines = wait_for_log(sec, "refused connection")
        assert len(lines) == 1 and lines[0].endswith(f": {why}"), sec.log()
        st = status(replica)
        assert (st["refused"], st["received"], st["cluster"]) == (1, 0, None)
        assert st["refused_by"] == {"protocol": 1}
        assert sec.proc is not None and sec.proc.poll() is None
    assert diff(before, snapshot(replica)) == []
    assert got.startswith(MAGIC), got
    if case != "reset":  # the peer is told why, in a frame any replfs can read
        reader = FrameReader()
        reader.feed(got[len(MAGIC) :])
        assert reader.next() == Frame(FrameType.ERROR, why.encode())
        assert reader.next() is None


# --- peers that are replfs, but must not be served -------------------------------------


@contextmanager
def joined(tmp_path: Path) -> Iterator[tuple[Daemon, Path, str, Daemon, Path]]:
    """A secondary that joined a real primary's cluster and holds its tree.

    Yields the secondary, its replica, its cluster id, and the primary (still
    running) with its mount.
    """
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}") as prim:
        (mount / "a").write_bytes(b"first")
        (mount / "d").mkdir()
        (mount / "d" / "b").write_bytes(b"second")
        checkpoint(mount)
        assert diff(snapshot(backing), snapshot(replica)) == []
        cluster = status(replica)["cluster"]
        assert cluster == status(mount)["cluster"]
        yield sec, replica, cluster, prim, mount


def test_secondary_err_other_cluster(tmp_path: Path) -> None:
    other = "0123456789abcdef"
    with joined(tmp_path) as (sec, replica, cluster, _, mount):
        before = snapshot(replica)
        streams = status(replica)["connected_streams"]

        async def knock() -> None:
            with pytest.raises(ProtocolError, match=f"peer refused us: .*cluster {other}"):
                await open_raw(sec.port, other)

        trio.run(knock)
        lines = wait_for_log(sec, "refused connection")
        assert len(lines) == 1 and other in lines[0] and cluster in lines[0], lines
        st = status(replica)
        assert (st["cluster"], st["refused"], st["refused_by"]) == (cluster, 1,
                                                                    {"not-served": 1})
        assert st["connected_streams"] == streams, "the primary's session is undisturbed"
        assert diff(before, snapshot(replica)) == []
        (mount / "a").write_bytes(b"after")  # and replication goes on
        checkpoint(mount)
        assert (replica / "a").read_bytes() == b"after"


def test_secondary_err_path_escapes_replica(tmp_path: Path) -> None:
    outside = tmp_path / "escape"  # where "../escape" from the replica lands
    absolute = os.fsencode(tmp_path / "absolute")
    with joined(tmp_path) as (sec, replica, cluster, prim, _):
        prim.stop()  # the raw sessions below would otherwise replace its session
        before = snapshot(replica)
        set_id = status(replica)["last_applied"] + 1
        sync = Record(Op.SYNC, set_id, 1, count=1)
        create = Record(Op.CREATE, set_id, 0, path=b"xx/escape", mode=0o100644)
        bad = {
            "'..' component": forged(create, b"../escape"),
            "absolute path": forged(Record(Op.CREATE, set_id, 0, mode=0o100644,
                                           path=same_length_relative(absolute)), absolute),
        }

        async def send(frame: Frame) -> list[Frame]:
            """A good record, acknowledged; then *frame*. Returns what came after it."""
            conn, reply = await open_raw(sec.port, cluster)
            assert reply["applied"] == set_id - 1
            await conn.send(record_frame(sync))
            assert await acknowledged(conn, 1) == [(set_id, 1)]
            await conn.send(frame)
            return await drain(conn)

        for why, frame in bad.items():
            then = trio.run(send, frame)
            assert [f for f in then if f.type == FrameType.STAGED] == [], "never acknowledged"
            line = wait_for_log(sec, why)
            assert len(line) == 1 and "dropped stream from 127.0.0.1:" in line[0], line
        st = status(replica)
        assert st["bad_frames"] == 2
        assert st["last_applied"] == st["applicable_through"] == set_id - 1
        assert not outside.exists() and not os.path.lexists(absolute)
        assert diff(before, snapshot(replica)) == []

        # The same bytes with a path inside the replica are staged and applied:
        # only the path was refused.
        inside = forged(create, b"xx_escape")
        trio.run(send_and_close, sec.port, cluster, [record_frame(sync), inside])
        assert wait_applied(replica, set_id) == set_id
        after = snapshot(replica)
        assert sorted(after.keys() - before.keys()) == ["xx_escape"]
        assert not outside.exists() and not os.path.lexists(absolute)


async def send_and_close(port: int, cluster: str, frames: list[Frame]) -> None:
    """Send *frames* on a raw session and wait until each is acknowledged as staged."""
    conn, _ = await open_raw(port, cluster)
    await conn.send(*frames)
    acked: list[tuple[int, int]] = []
    with trio.fail_after(20):
        while len(acked) < len(frames):
            frame = await conn.receive()
            if frame.type == FrameType.STAGED:
                acked += parse_keys(frame)
    await conn.aclose()


# --- the command line ----------------------------------------------------------------------


def test_secondary_cli_err_insecure_not_loopback(tmp_path: Path) -> None:
    replica = tmp_path / "r"
    result = replfs("secondary", replica, "--listen", "0.0.0.0:0", "--insecure", timeout=30)
    assert_one_line_error(result, "--insecure is for loopback only", "0.0.0.0", "--tls")
    assert not replica.exists()


def test_secondary_cli_ok_listen_any_address_with_tls(tmp_path: Path) -> None:
    replica = tmp_path / "r"
    daemon = Daemon(["secondary", str(replica), "--listen", "0.0.0.0:0",
                     *tls_args(SECONDARY, PRIMARY)], tmp_path / "r.log", "listening on")
    daemon.start()
    try:
        assert "listening on 0.0.0.0:" in daemon.log()
        st = status(replica)
        assert st["listen"].startswith("0.0.0.0:")
        assert (st["insecure"], st["tls_name"], st["tls_peer"]) == (False, SECONDARY, PRIMARY)
        assert "INSECURE" not in daemon.log()
    finally:
        daemon.stop()


@pytest.mark.parametrize("mount", [False, True], ids=["alone", "mount"])
def test_secondary_cli_err_port_busy(tmp_path: Path, mount: bool) -> None:
    """One line, and with --mount nothing mounted first (it was, and logged so)."""
    view = tmp_path / "v"
    view.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = replfs("secondary", tmp_path / "r", "--listen", f"127.0.0.1:{port}",
                        *tls_args(SECONDARY, PRIMARY), *(["--mount", str(view)] if mount else []),
                        timeout=30)
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}")
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:", "127.0.0.1:99999", ":x"])
def test_primary_cli_err_secondary_address(tmp_path: Path, address: str) -> None:
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    mount.mkdir()
    result = replfs("primary", backing, mount, "--secondary", address, "--insecure",
                    timeout=30)
    assert_one_line_error(result, repr(address), "is not HOST:PORT")
    assert not os.path.ismount(mount)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "m"], "nothing created"


# --- a primary whose secondary is not replfs -------------------------------------------------


HTTP_400 = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
# case -> (the server's answer, the link, what the primary says)
GARBAGE = {
    "http": (HTTP_400, "--insecure", "replication to {address} failed", "not replfs"),
    "bad-hello": (MAGIC + hello(role="secondary", node="x").encode(), "--insecure",
                  "replication to {address} failed",
                  "the secondary's HELLO has no valid applied set: None"),
    "http-tls": (HTTP_400, "--tls", "refused by {address}",
                 "TLS: the secondary does not speak TLS (is it running with --insecure?)"),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_primary_err_secondary_not_replfs(tmp_path: Path, case: str) -> None:
    """The mount keeps serving; the log and ``status`` say what is wrong with the peer."""
    answer, link, what, why = GARBAGE[case]
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    insecure = ("--insecure",) if link == "--insecure" else ()
    with garbage_server(answer) as port, primary(backing, mount, "--secondary",
                                                 f"127.0.0.1:{port}", *insecure) as daemon:
        lines = wait_for_log(daemon, what.format(address=f"127.0.0.1:{port}"))
        assert why in lines[0], lines
        (mount / "f").write_bytes(b"still served")
        os.rename(mount / "f", mount / "g")
        assert (mount / "g").read_bytes() == (backing / "g").read_bytes() == b"still served"
        checkpoint(mount, wait=0)
        st = status(mount)
        assert st["connected"] is False
        assert st["secondary"] == f"127.0.0.1:{port}"
        assert any(why in error for error in st["errors"]), st["errors"]
        assert daemon.proc is not None and daemon.proc.poll() is None
