"""The secondary's gate: only a peer with the cluster's certificate, naming the primary
the secondary accepts, gets to speak replfs.

Every peer below is refused during the TLS handshake, in one log line with
its address and the reason, counted by reason in ``replfs status``, and
changes nothing in staging or the replica. Each of them also tries the two
attacks an unauthenticated link let through: a HELLO copied from the real
primary's but claiming generation 2^40 (the secondary erased what it had
staged and refused the real primary as stale), and, on a fresh secondary,
a HELLO of a cluster of its own (the secondary joined it, and refused the
real primary). Over ``--insecure`` both attacks still work, which is why
``--insecure`` is for loopback only: the tests show that too, so they show
the attacks are real.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import re
import secrets
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from repl import tls, tlsca
from repl.protocol import (
    MAGIC,
    PROTOCOL_VERSION,
    Connection,
    Frame,
    FrameReader,
    FrameType,
    hello,
    parse_hello,
)
from repl.secondary.gate import (
    HANDSHAKE_SECONDS,
    MAX_HANDSHAKES,
    TLS_HANDSHAKE_RECORD,
    Gate,
    Rejected,
)
from repl.secondary.run import default_state_dir, pause, resume
from tests.repl.peers import LOG_TIMEOUT, client_context, connect, wait_for_log
from tests.support import (
    PRIMARY,
    SECONDARY,
    Daemon,
    checkpoint,
    cluster_ca,
    diff,
    primary,
    secondary,
    snapshot,
    status,
    wait_applied,
)

ATTACK_GENERATION = 1 << 40
ATTACK_CLUSTER = "0123456789abcdef"

# --- peers without a valid certificate ---------------------------------------------------


def _context(ca_file: Path, cert: Path | None = None, key: Path | None = None,
             newest: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED) -> ssl.SSLContext:
    """A TLS client that trusts *ca_file*, with *cert* if given, built by hand: so it
    may hold what ``tls.credentials`` refuses (an expired certificate)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=ca_file)
    ctx.maximum_version = newest
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


@functools.cache
def _scratch() -> Path:
    """A directory for this module's extra CAs and certificates, made once."""
    return Path(tempfile.mkdtemp(prefix="replfs-test-gate-"))


@functools.cache
def other_ca() -> Path:
    """Another CA, with a certificate that names PRIMARY."""
    ca = _scratch() / "other"
    tlsca.init_ca(ca)
    tlsca.issue(ca, PRIMARY)
    return ca


@functools.cache
def session_ca_copy() -> Path:
    """The session's CA in another directory, to issue certificates PRIMARY must not get
    (an expired one named PRIMARY, and one named mallory)."""
    ca = _scratch() / "copy"
    ca.mkdir(mode=0o700)
    for name in ("ca.pem", "ca.key"):
        shutil.copy2(cluster_ca() / name, ca / name)
    tlsca.issue(ca, PRIMARY, days=1,
              valid_from=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30))
    tlsca.issue(ca, "mallory")
    return ca


def _no_certificate() -> ssl.SSLContext:
    return _context(cluster_ca() / "ca.pem")


def _other_ca() -> ssl.SSLContext:
    ca = other_ca()
    return _context(cluster_ca() / "ca.pem", ca / f"{PRIMARY}.pem", ca / f"{PRIMARY}.key")


def _expired() -> ssl.SSLContext:
    ca = session_ca_copy()
    return _context(ca / "ca.pem", ca / f"{PRIMARY}.pem", ca / f"{PRIMARY}.key")


def _mallory() -> ssl.SSLContext:
    ca = session_ca_copy()
    return _context(ca / "ca.pem", ca / "mallory.pem", ca / "mallory.key")


def _tls12() -> ssl.SSLContext:
    ca = cluster_ca()
    return _context(ca / "ca.pem", ca / f"{PRIMARY}.pem", ca / f"{PRIMARY}.key",
                    newest=ssl.TLSVersion.TLSv1_2)


async def _read_to_close(stream: trio.abc.Stream) -> bytes:
    got = b""
    with trio.fail_after(LOG_TIMEOUT):
        try:
            while chunk := await stream.receive_some(65536):
                got += chunk
        except trio.BrokenResourceError:
            pass  # a reset, or TLS cut short: what came before is what it said
    await trio.aclose_forcefully(stream)
    return got


def attacker(context: Callable[[], ssl.SSLContext] | None
             ) -> Callable[[int, Frame], Awaitable[bytes]]:
    """A peer that connects (over TLS with *context*, or plain TCP if None), then sends
    MAGIC and *attack* as a primary would. Returns what it got before the close."""
    async def attack(port: int, frame: Frame) -> bytes:
        if context is None:
            stream = await connect(port, None)
        else:
            try:
                stream = await connect(port, context())
            except trio.BrokenResourceError:
                return b""  # its own handshake failed: the secondary said nothing
        try:
            await stream.send_all(MAGIC + frame.encode())
        except trio.BrokenResourceError:
            pass  # refused already: read what it was told
        return await _read_to_close(stream)
    return attack


TLS_ONLY = ("this secondary accepts TLS only: start the primary with --tls DIR/NAME "
            "--peer NAME (see 'replfs tls --help')")
WRONG_NAME = f"the certificate names mallory, and this secondary accepts only {PRIMARY} (--peer)"
# case -> (the peer, the reason counted, the end of its log line, what it is told)
BAD_PEERS: dict[str, tuple[Callable[[int, Frame], Awaitable[bytes]], str, str, str | None]] = {
    "plain-tcp": (attacker(None), "not-tls", "plain TCP, not TLS (it sent b'REPLFS\\x00\\x01')",
                  TLS_ONLY),
    "no-certificate": (attacker(_no_certificate), "no-certificate",
                       "it sent no client certificate", None),
    "other-ca": (attacker(_other_ca), "unknown-ca", "its certificate is not signed by this "
                 "cluster's CA (unable to get local issuer certificate)", None),
    "expired": (attacker(_expired), "expired", "its certificate has expired", None),
    "wrong-name": (attacker(_mallory), "wrong-name", WRONG_NAME, WRONG_NAME),
    "tls-1.2": (attacker(_tls12), "tls-error",
                "it does not speak TLS 1.3 (UNSUPPORTED_PROTOCOL)", None),
}


def assert_told(got: bytes, told: str | None) -> None:
    """The peer got our magic and an ERROR frame saying *told*, or (None) nothing at all."""
    if told is None:
        assert got == b"", got
        return
    assert got.startswith(MAGIC), got
    reader = FrameReader()
    reader.feed(got[len(MAGIC) :])
    assert reader.next() == Frame(FrameType.ERROR, told.encode())
    assert reader.next() is None


def assert_one_refusal(sec: Daemon, reason: str, why: str) -> None:
    lines = wait_for_log(sec, "refused connection")
    assert len(lines) == 1, lines
    pattern = rf"refused connection from 127\.0\.0\.1:\d+ \({reason}\): "
    assert re.search(pattern + re.escape(why) + "$", lines[0]), lines[0]


# --- what must not change -----------------------------------------------------------------


def staging_files(replica: Path) -> dict[str, str]:
    """The staging store's files by name, as digests (LMDB's reader table and the
    daemons' lock files aside: reading changes those)."""
    where = default_state_dir(replica) / "staging"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in where.iterdir()
            if p.name not in ("lock.mdb", "LOCK", "APPLY.lock")}


KEPT = ("cluster", "generation", "last_staged", "last_complete", "last_applied",
        "sets_in_flight", "complete_waiting", "received", "bad_frames", "connected_streams")


def state(replica: Path) -> tuple[object, ...]:
    st = status(replica)
    return snapshot(replica), staging_files(replica), {k: st[k] for k in KEPT}


def wait_until(what: str, ready: Callable[[], bool], timeout: float = LOG_TIMEOUT) -> None:
    """Poll *ready* until true: for a state the daemons announce no event for."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.05)


@contextmanager
def staged_and_held(tmp_path: Path, *link: str) -> Iterator[tuple[Daemon, Path, Daemon, Path,
                                                                  int]]:
    """A secondary following a real primary, with one set applied and the next staged
    whole but held (``replfs pause``). Yields the secondary, its replica, the primary,
    its mount, and the held set."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica, *link) as sec, primary(
            backing, mount, "--secondary", f"127.0.0.1:{sec.port}", "--set-interval", "3600",
            *link) as prim:
        (mount / "applied").write_bytes(b"in the replica")
        checkpoint(mount)
        pause(replica, None)
        (mount / "held").write_bytes(b"staged, not applied yet")
        held = checkpoint(mount, wait=0)
        wait_until("staged", lambda: status(replica)["last_complete"] >= held)
        assert not (replica / "held").exists()
        yield sec, replica, prim, mount, held


def primary_hello(cluster: str, node: str, generation: int) -> Frame:
    """A primary's first HELLO on a session of its own."""
    return hello(role="primary", version=PROTOCOL_VERSION, cluster=cluster, node=node,
                 generation=generation, session=secrets.token_hex(8), stream=0, streams=1,
                 history=[])


def copied_hello(mount: Path, generation: int) -> Frame:
    """The real primary's HELLO, as a peer that saw it would copy it, but for *generation*."""
    real = status(mount)
    return primary_hello(real["cluster"], real["node"], generation)


# A HELLO of another cluster, for a fresh secondary to join.
OWN_CLUSTER = primary_hello(ATTACK_CLUSTER, "6666666666666666", 1)


async def obeyed(port: int, frame: Frame) -> dict[str, object]:
    """Over plain TCP, send MAGIC and *frame* as a primary; return the secondary's HELLO."""
    conn = Connection(await connect(port, None))
    await conn.send_magic()
    await conn.send(frame)
    await conn.expect_magic()
    reply = parse_hello(await conn.receive())
    await conn.aclose()
    return reply


# --- the generation attack ----------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(BAD_PEERS))
def test_gate_admit_err_generation_attack(tmp_path: Path, case: str) -> None:
    """Refused at the handshake: nothing staged is erased, the generation stays, and the
    real primary goes on (its held set applies on resume, its next set follows)."""
    peer, reason, why, told = BAD_PEERS[case]
    with staged_and_held(tmp_path) as (sec, replica, prim, mount, held):
        before = state(replica)
        got = trio.run(peer, sec.port, copied_hello(mount, ATTACK_GENERATION))
        assert_one_refusal(sec, reason, why)
        assert_told(got, told)
        st = status(replica)
        assert (st["refused"], st["refused_by"]) == (1, {reason: 1})
        assert state(replica) == before
        assert status(mount)["connected"] is True

        resume(replica, None)
        assert wait_applied(replica, held) >= held
        (mount / "after").write_bytes(b"still replicating")
        checkpoint(mount)
        assert (replica / "after").read_bytes() == b"still replicating"
        assert status(replica)["generation"] == status(mount)["generation"] == 1
        assert "stale" not in prim.log()


def test_gate_admit_ok_insecure_lets_the_generation_attack_in(tmp_path: Path) -> None:
    """Over --insecure the same HELLO is obeyed: what was staged is erased and the real
    primary is refused as stale. Nothing but TLS stands in the way."""
    with staged_and_held(tmp_path, "--insecure") as (sec, replica, prim, mount, _):
        reply = trio.run(obeyed, sec.port, copied_hello(mount, ATTACK_GENERATION))
        assert reply["generation"] == ATTACK_GENERATION
        wait_for_log(sec, f"following a new primary of generation {ATTACK_GENERATION}")
        wait_for_log(sec, "erased sets")
        assert status(replica)["generation"] == ATTACK_GENERATION
        wait_for_log(prim, "which is stale")
        assert "INSECURE" in sec.log() and "INSECURE" in prim.log()
        assert status(replica)["insecure"] is status(mount)["insecure"] is True


# --- the cluster attack -------------------------------------------------------------------


@pytest.mark.parametrize("case", ["plain-tcp", "other-ca", "wrong-name"])
def test_gate_admit_err_cluster_attack(tmp_path: Path, case: str) -> None:
    """A fresh secondary reached first by a stranger stays in no cluster, then joins the
    real primary's."""
    peer, reason, why, told = BAD_PEERS[case]
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    replica.mkdir()
    (replica / "kept").write_bytes(b"already here")
    with secondary(replica) as sec:
        before = state(replica)
        got = trio.run(peer, sec.port, OWN_CLUSTER)
        assert_one_refusal(sec, reason, why)
        assert_told(got, told)
        assert state(replica) == before
        assert status(replica)["cluster"] is None

        with primary(backing, mount, "--secondary", f"127.0.0.1:{sec.port}"):
            (mount / "f").write_bytes(b"from the real primary")
            checkpoint(mount)
            assert status(replica)["cluster"] == status(mount)["cluster"] != ATTACK_CLUSTER
            assert diff(snapshot(backing), snapshot(replica)) == []


def test_gate_admit_ok_insecure_lets_the_cluster_attack_in(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica, "--insecure") as sec:
        assert trio.run(obeyed, sec.port, OWN_CLUSTER)["cluster"] == ATTACK_CLUSTER
        wait_for_log(sec, f"joined cluster {ATTACK_CLUSTER}")
        with primary(backing, mount, "--secondary", f"127.0.0.1:{sec.port}",
                     "--insecure") as prim:
            wait_for_log(prim, f"this replica to {ATTACK_CLUSTER}")


# --- strangers that say nothing, and floods of them ----------------------------------------


def test_gate_admit_err_silent_peer(tmp_path: Path) -> None:
    """A peer that connects and says nothing is dropped after HANDSHAKE_SECONDS."""
    replica = tmp_path / "r"
    with secondary(replica) as sec:
        before = state(replica)
        with socket.create_connection(("127.0.0.1", sec.port)) as sock:
            start = time.monotonic()
            sock.settimeout(HANDSHAKE_SECONDS * 4)
            assert sock.recv(1) == b""  # the secondary closed it
            took = time.monotonic() - start
        assert HANDSHAKE_SECONDS - 0.5 < took < HANDSHAKE_SECONDS * 3, took
        assert_one_refusal(sec, "no-handshake", f"no handshake within {HANDSHAKE_SECONDS:g}s")
        assert status(replica)["refused_by"] == {"no-handshake": 1}
        assert state(replica) == before


class Flood:
    """Silent connections opened one after the other until stopped, by default from
    127.0.0.2 and in turn from 100 more loopback addresses: other hosts than the
    primary's; or from *host* alone."""

    def __init__(self, port: int, host: str | None = None, pace: float = 0.001) -> None:
        self.port = port
        self.host = host
        self.pace = pace
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        held: list[socket.socket] = []
        while not self._stop.is_set():
            host = self.host or ("127.0.0.2" if self.opened % 2
                                 else f"127.0.1.{1 + self.opened // 2 % 100}")
            sock = socket.socket()
            sock.bind((host, 0))
            sock.connect(("127.0.0.1", self.port))
            held.append(sock)
            self.opened += 1
            if len(held) > 300:
                held.pop(0).close()
            time.sleep(self.pace)  # by default about a thousand a second, leaving the cores room
        for sock in held:
            sock.close()


def test_gate_admit_ok_flood_of_silent_peers(tmp_path: Path) -> None:
    """Strangers connecting a thousand times a second keep neither the real primary out
    nor more than MAX_HANDSHAKES handshakes open, and are logged in bounded lines."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec:
        with Flood(sec.port) as flood:
            wait_until("flooded", lambda: status(replica)["refused_by"].get("busy", 0) > 100)
            with primary(backing, mount, "--secondary", f"127.0.0.1:{sec.port}"):
                (mount / "f").write_bytes(b"through the flood")
                checkpoint(mount)
                assert (replica / "f").read_bytes() == b"through the flood"
                st = status(replica)
                assert st["handshakes"] <= MAX_HANDSHAKES
                assert st["connected_streams"] == 4
            assert flood.opened > MAX_HANDSHAKES * 2
        # The count of those not logged is logged once their second is over.
        wait_until("the count logged", lambda: "not logged one by one" in sec.log())
        st = status(replica)
        logged = [line for line in sec.log().splitlines() if "refused connection" in line]
        assert len(logged) < st["refused"] / 2, (len(logged), st["refused"])


# --- the bounds, in process --------------------------------------------------------------


async def _flood_in_process(hosts: list[str], speaker: str | None = None
                            ) -> tuple[list[str], int, set[str]]:
    """Silent connections from *hosts* (one each, in order) to a gate; then a real
    primary's. With *speaker*, a connection from that host that sends the first byte
    of a TLS handshake and no more comes before them all. Returns the outcomes in
    order ("speaker: ..." for the speaker's), how many were in progress before the
    primary came, and the hosts of those pushed out."""
    gate = Gate(tls.credentials(cluster_ca() / SECONDARY, PRIMARY))
    outcomes: list[str] = []
    pushed_from: set[str] = set()
    speaker_port = -1

    async def greet(link: trio.abc.Stream) -> trio.abc.Stream:
        return link  # no HELLO: admitted once its TLS handshake is done

    async def handle(stream: trio.SocketStream) -> None:
        host, port = stream.socket.getpeername()[:2]
        who = "speaker: " if port == speaker_port else ""
        try:
            admitted = await gate.admit(stream, host, greet)
        except Rejected as exc:
            outcomes.append(who + exc.reason)
            pushed_from.add(host)
            return
        outcomes.append(who + "admitted")
        await trio.aclose_forcefully(admitted)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    socks = []
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        for host in [speaker] * (speaker is not None) + hosts:
            sock = trio.socket.socket()
            await sock.bind((host, 0))
            await sock.connect(("127.0.0.1", port))
            if speaker_port == -1 and speaker is not None:
                speaker_port = sock.getsockname()[1]
                await sock.send(bytes([TLS_HANDSHAKE_RECORD]))
            socks.append(sock)
            await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(10):
            while gate.in_progress + len(outcomes) < len(socks):
                await trio.testing.wait_all_tasks_blocked()
        waiting = gate.in_progress
        link = await connect(port, client_context())
        with trio.fail_after(10):
            while "admitted" not in outcomes:
                await trio.testing.wait_all_tasks_blocked()
        await trio.aclose_forcefully(link)
        nursery.cancel_scope.cancel()
    for sock in socks:
        sock.close()
    return outcomes, waiting, pushed_from


async def test_gate_admit_err_busy_host_holding_most() -> None:
    """Past MAX_HANDSHAKES, the host holding the most is the one pushed out from, its
    oldest first: a flood from one address never pushes out another's."""
    others = [f"127.0.2.{i}" for i in range(1, 11)]
    outcomes, waiting, pushed_from = await _flood_in_process(
        others + ["127.0.0.2"] * MAX_HANDSHAKES)
    assert waiting == MAX_HANDSHAKES
    assert outcomes == ["busy"] * 11 + ["admitted"], "the primary's pushed out one more"
    assert pushed_from == {"127.0.0.2"}


async def test_gate_admit_err_busy_in_all() -> None:
    """Past MAX_HANDSHAKES from as many hosts, the oldest are pushed out."""
    hosts = [f"127.0.2.{i}" for i in range(1, MAX_HANDSHAKES + 6)]
    outcomes, waiting, pushed_from = await _flood_in_process(hosts)
    assert waiting == MAX_HANDSHAKES
    assert outcomes == ["busy"] * 6 + ["admitted"], "the primary's pushed out one more"
    assert pushed_from == set(hosts[:6])


async def test_gate_admit_ok_silent_pushed_out_first() -> None:
    """A connection that began a TLS handshake outlives silent ones of its host, older
    or newer: over the bound, the oldest silent one makes room."""
    outcomes, waiting, _ = await _flood_in_process(["127.0.0.2"] * (MAX_HANDSHAKES + 2),
                                                   "127.0.0.2")
    assert waiting == MAX_HANDSHAKES
    assert outcomes == ["busy"] * 4 + ["admitted"], "the speaker was pushed out"


async def test_gate_admit_ok_silent_pushed_out_first_in_all() -> None:
    hosts = [f"127.0.2.{i}" for i in range(1, MAX_HANDSHAKES + 6)]
    outcomes, waiting, _ = await _flood_in_process(hosts, "127.0.3.1")
    assert waiting == MAX_HANDSHAKES
    assert outcomes == ["busy"] * 7 + ["admitted"], "the speaker was pushed out"


async def test_gate_admit_err_refused_after_tls_closes_the_connection() -> None:
    """A peer refused once its TLS handshake is done (here: its HELLO is refused)
    has its connection closed at once, not when the refusal is collected: the TLS
    layer owns the socket, and the gate closes that."""
    gate = Gate(tls.credentials(cluster_ca() / SECONDARY, PRIMARY))
    refusals: list[Rejected] = []  # held, as a log or a caller may hold them

    async def greet(link: trio.abc.Stream) -> None:
        raise Rejected("protocol", "no HELLO for this test")

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await gate.admit(stream, "127.0.0.1", greet)
        except Rejected as exc:
            refusals.append(exc)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        link = await connect(listeners[0].socket.getsockname()[1], client_context())
        with trio.fail_after(10):
            assert await link.receive_some() == b""  # closed by the secondary
        await trio.testing.wait_all_tasks_blocked()
        assert [exc.reason for exc in refusals] == ["protocol"]
        await link.aclose()
        nursery.cancel_scope.cancel()
