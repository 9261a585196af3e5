"""The two SCSI transports as the tests drive them: iSCSI, and Fibre Channel over FCIP.

What both must do is written once, against a ``Transport``, and run over each
(the ``transport`` fixture, tests/repl/scsi/conftest.py); what only one of them
has is tested in tests/repl/iscsi and tests/repl/fc.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from repl.fc import initiator as fc_initiator
from repl.fc import login as fc_login
from repl.fc import target as fc_target
from repl.fc.names import Names
from repl.iscsi import chap
from repl.iscsi import initiator as iscsi_initiator
from repl.iscsi import login as iscsi_login
from repl.iscsi import target as iscsi_target
from repl.protocol import Frame, FrameType, hello, parse_hello
from repl.scsi.link import InitiatorLink
from repl.scsi.lun import Lun
from store.records import Op, Record
from tests.repl.wire import Packet, capture, decode
from tests.support import Daemon, checkpoint, diff, primary, snapshot

IQN = "iqn.2025-01.io.replfs:beta"
INITIATOR_IQN = "iqn.2025-01.io.replfs:primary"
PRIMARY = Names.of("primary-node")
KEYS = chap.Secrets("alpha", b"initiator-secret", "beta", b"target-secret!")

OnLink = Callable[[Lun, str], Awaitable[None]]


@dataclass(frozen=True)
class Transport:
    """One SCSI transport: how a target is served and a session opened over it, in one
    process, and how ``replfs secondary`` serves it and ``replfs primary`` names it."""

    name: str  # "iscsi" or "fcip": the --secondary scheme, the status key and value
    flags: tuple[str, ...]  # replfs secondary's flags for it besides --NAME HOST:PORT
    path: str  # the --secondary URL's path after HOST:PORT
    serve_target: Callable[..., Awaitable[None]]  # (listeners, keys, on_link, *, task_status)
    session: Callable[[int, chap.Secrets], AbstractAsyncContextManager[Any]]
    window: int  # commands the initiator has open at once, at most
    login_failed: type[Exception]
    wrong_secret: str  # what the initiator's refusal says of a wrong initiator secret
    primary_refused: tuple[str, str]  # the primary's log line then, and a detail in it
    secondary_refused: tuple[str, str]  # the secondary's

    def __str__(self) -> str:
        return self.name

    @contextmanager
    def secondary(self, replica: Path, chap_file: Path, port: int = 0) -> Iterator[Daemon]:
        """``replfs secondary REPLICA`` serving this transport only; ``daemon.port``."""
        daemon = Daemon(["secondary", str(replica), f"--{self.name}", f"127.0.0.1:{port}",
                         *self.flags, "--chap", str(chap_file)],
                        replica.parent / f"{replica.name}.log", "listening on")
        daemon.start()
        daemon.port = int(daemon.log().split("listening on 127.0.0.1:")[-1].split()[0])
        try:
            yield daemon
        finally:
            if daemon.proc and daemon.proc.poll() is None:
                daemon.stop()

    def over(self, port: int, chap_file: Path, *extra: str) -> list[str]:
        """replfs primary's flags to replicate to the secondary on *port*."""
        return ["--secondary", f"{self.name}://127.0.0.1:{port}{self.path}", "--chap",
                str(chap_file), *extra]

    @asynccontextmanager
    async def serving(self, on_link: OnLink) -> AsyncIterator[int]:
        """A target on a loopback port (yielded) whose sessions go to *on_link*."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with trio.open_nursery() as nursery:
            await nursery.start(self.serve_target, listeners, KEYS, on_link)
            yield listeners[0].socket.getsockname()[1]
            nursery.cancel_scope.cancel()

    @asynccontextmanager
    async def linked(self) -> AsyncIterator[tuple[InitiatorLink, Lun]]:
        """An initiator's link and the target's end of it, past the replfs HELLO."""
        luns_in, luns = trio.open_memory_channel[Lun](1)
        done = trio.Event()

        async def on_link(lun: Lun, peer: str) -> None:
            assert parse_hello(await lun.receive())["role"] == "primary"
            await lun.send(hello(role="secondary", applied=0))
            await luns_in.send(lun)
            await done.wait()

        async with self.serving(on_link) as port, self.session(
                port, KEYS) as session, trio.open_nursery() as nursery:
            ours = InitiatorLink(session, nursery)
            await ours.send(hello(role="primary"))
            assert parse_hello(await ours.receive())["role"] == "secondary"
            ours.handshake_done()
            yield ours, await luns.receive()
            done.set()
            nursery.cancel_scope.cancel()


async def _serve_iscsi(listeners: list[trio.SocketListener], keys: chap.Secrets,
                       on_link: OnLink, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    await iscsi_target.serve(listeners, keys, IQN, "serial", on_link, task_status=task_status)


async def _serve_fcip(listeners: list[trio.SocketListener], keys: chap.Secrets,
                      on_link: OnLink, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    await fc_target.serve(listeners, keys, "secondary-node", "serial", on_link,
                          task_status=task_status)


ISCSI = Transport(
    "iscsi", ("--iqn", IQN), f"/{IQN}", _serve_iscsi,
    lambda port, keys: iscsi_initiator.open_session("127.0.0.1", port, keys, INITIATOR_IQN,
                                                    IQN),
    iscsi_login.CMD_WINDOW, iscsi_login.LoginFailed, "02/01",
    ("iSCSI login refused", "02/01"), ("refused iSCSI login", "02/01"))
FCIP = Transport(
    "fcip", (), "", _serve_fcip,
    lambda port, keys: fc_initiator.open_session("127.0.0.1", port, keys, PRIMARY),
    fc_login.MAX_EXCHANGES, fc_login.LoginFailed, "AUTH_Reject",
    ("authentication refused (AUTH_Reject", "the secret is not the one the peer has"),
    ("refused FCIP login", "does not know the initiator's CHAP secret"))
TRANSPORTS = [ISCSI, FCIP]


def secrets(where: Path, name: str = "chap.secret") -> Path:
    """A CHAP secrets file in *where* (made once), as ``replfs chap`` makes it."""
    path = where / name
    if not path.exists():
        chap.make(path, "alpha", "beta")
    return path


async def idle(lun: Lun, peer: str) -> None:
    """A receiver that reads nothing: the target answers what it answers alone."""
    await trio.sleep_forever()


def record(seq: int, size: int = 10) -> Frame:
    return Frame(FrameType.RECORD, Record(Op.WRITE, 1, seq, path=b"f", offset=seq,
                                          data=bytes([seq % 256]) * size).encode())


def replicate_captured(transport: Transport, tmp_path: Path) -> list[Packet]:
    """A few files and one of 200 KiB replicated over *transport* (two streams) while
    tshark captures its port: the packets, decoded as the transport."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    keys, pcap = secrets(tmp_path), tmp_path / f"{transport}.pcap"
    with transport.secondary(replica, keys) as sec:
        with capture(sec.port, pcap), primary(
                backing, mount, *transport.over(sec.port, keys, "--streams", "2")):
            for i in range(5):
                (mount / f"f{i}").write_bytes(bytes([i]) * (1000 + 3000 * i))
            # past iSCSI's FirstBurstLength; 100 FC frames of data
            (mount / "big").write_bytes(bytes(range(256)) * 800)
            checkpoint(mount)
            assert diff(snapshot(backing), snapshot(replica)) == []
        return decode(pcap, sec.port, transport.name)
