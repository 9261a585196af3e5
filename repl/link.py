"""The transport seam: what carries the replication conversation between two hosts.

Everything above a link (sets, sequence numbers, staging, the bitmap, the
complete flag, in-order apply, retransmission) speaks frames
(repl/protocol.py): HELLO, RECORD, STAGED, APPLIED, RESET_TO, ERROR. A link
carries them; how is its own business:

- replfs's own frames over TCP, TLS 1.3 unless ``--insecure`` (``Connection``,
  dialed by ``FrameDialer``): ``--secondary HOST:PORT``;
- iSCSI (repl/iscsi/): every RECORD is a SCSI WRITE(16) and its GOOD status
  the STAGED acknowledgement, APPLIED is read back from a status block:
  ``--secondary iscsi://HOST:PORT/IQN``;
- Fibre Channel over FCIP (repl/fc/): the same SCSI commands (repl/scsi/) as
  FCP exchanges in FC frames, over TCP: ``--secondary fcip://HOST:PORT``.

The primary opens one link per stream with a ``Dialer``; the secondary's
listeners hand each accepted link to the receiver (``Receiver.serve_link``).
Over replfs frames, the dialer gets its byte streams from a ``Connect``
(TCP and TLS, ``tcp_connect``) and the receiver takes them from its TCP
listeners through the gate; tests hand both sides the two ends of one
in-memory stream instead (``Receiver.serve_stream``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import trio

from repl import tls
from repl.errors import Refused
from repl.fc.names import is_fcip
from repl.iscsi.names import is_iscsi
from repl.protocol import Connection, Frame
from repl.tlsstream import TLSStream

CONNECT_SECONDS = 10.0  # a link not open by then is given up (the session is tried again)


def transport(address: str) -> str:
    """The transport a ``--secondary`` address names: "iscsi", "fcip" or "frames"."""
    return "iscsi" if is_iscsi(address) else "fcip" if is_fcip(address) else "frames"


class Link(Protocol):
    """One stream of a replication session: frames both ways.

    ``send`` may return before the peer has the frames; ``receive`` returns the
    next frame from the peer and raises trio.EndOfChannel once it closed
    cleanly, trio.BrokenResourceError (or OSError) if the link broke, and
    ProtocolError if the peer said something that is not valid here.
    """

    async def send(self, *frames: Frame) -> None: ...

    async def receive(self) -> Frame: ...

    def handshake_done(self) -> None:
        """The peer's HELLO was accepted: it may now send frames of any valid size."""

    async def aclose(self) -> None: ...


class Dialer(Protocol):
    """How a primary opens the streams of a session to its secondary."""

    address: str  # the secondary as --secondary named it, for logs, status and metrics

    def open(self) -> AbstractAsyncContextManager[Link]:
        """A new link, ready for the primary's HELLO; closed when the context exits.

        Gives up with trio.TooSlowError after CONNECT_SECONDS. Raises Refused if
        the secondary turned us away before any HELLO (a certificate, a CHAP
        secret), or what ``Link.receive`` raises.
        """
        ...


class Connect(Protocol):
    """Opens one byte stream to the secondary, for replfs frames to go over.

    Raises Refused if the secondary turned us away before any byte of replfs (a
    TLS certificate), OSError or trio.BrokenResourceError if it cannot be reached.
    """

    async def __call__(self) -> trio.abc.Stream: ...


class FrameDialer:
    """replfs frames over the byte streams *connect* opens: TLS with *creds*, or
    plain if None (``--insecure``; in memory, in tests)."""

    def __init__(self, address: str, connect: Connect, creds: tls.Credentials | None
                 ) -> None:
        self.address = address
        self.connect, self.creds = connect, creds

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Link]:
        with trio.fail_after(CONNECT_SECONDS):
            conn = Connection(await self.connect())
        try:
            with trio.fail_after(CONNECT_SECONDS):
                await self._greet(conn)
            yield conn
        finally:
            with trio.CancelScope(shield=True):
                await conn.aclose()

    async def _greet(self, conn: Connection) -> None:
        """Both magics, in the order the secondary expects them."""
        if self.creds is None:
            # The secondary peeks at our first byte before it says anything.
            await conn.send_magic()
            await conn.expect_magic()
            return
        try:
            await conn.expect_magic()
        except trio.BrokenResourceError as exc:
            if tls.broken_record(exc) is not None:
                raise  # a corrupt record: the link's fault, not a refusal
            raise Refused("the secondary closed the link right after the TLS handshake: it "
                          "did not accept our certificate (its log says why)") from None
        await conn.send_magic()


def tcp_dialer(host: str, port: int, creds: tls.Credentials | None) -> FrameDialer:
    """replfs frames to the secondary at *host*:*port*: TLS with *creds*, or plain TCP."""
    return FrameDialer(f"{host}:{port}", tcp_connect(host, port, creds), creds)


def tcp_connect(host: str, port: int, creds: tls.Credentials | None) -> Connect:
    """Opens TCP connections to *host*:*port*, over TLS with *creds* once the
    secondary's certificate checked out (Refused if the TLS handshake failed, on
    its certificate or on ours), plain TCP if None."""
    context = creds.client_context() if creds is not None else None

    async def connect() -> trio.abc.Stream:
        stream = await trio.open_tcp_stream(host, port)
        if context is None or creds is None:
            return stream
        link = TLSStream(stream, context, server_hostname=creds.peer)
        try:
            await link.do_handshake()
        except BaseException as exc:
            await trio.aclose_forcefully(link)
            if isinstance(exc, trio.BrokenResourceError):
                raise Refused(tls.client_refusal(exc.__cause__, creds.peer)) from None
            raise
        return link

    return connect
