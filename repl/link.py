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


class FrameDialer:
    """replfs frames over TCP: TLS with *creds*, or plain (``--insecure``) if None."""

    def __init__(self, host: str, port: int, creds: tls.Credentials | None) -> None:
        self.host, self.port, self.creds = host, port, creds
        self.address = f"{host}:{port}"
        self._context = creds.client_context() if creds is not None else None

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Link]:
        with trio.fail_after(CONNECT_SECONDS):
            conn = Connection(await self._connect())
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

    async def _connect(self) -> trio.abc.Stream:
        """A new link to the secondary: over TLS, once its certificate checked out.

        Raises Refused if the TLS handshake failed (its certificate, or ours).
        """
        stream = await trio.open_tcp_stream(self.host, self.port)
        if self._context is None or self.creds is None:
            return stream
        link = trio.SSLStream(stream, self._context, server_hostname=self.creds.peer)
        try:
            await link.do_handshake()
        except BaseException as exc:
            await trio.aclose_forcefully(link)
            if isinstance(exc, trio.BrokenResourceError):
                raise Refused(tls.client_refusal(exc.__cause__, self.creds.peer)) from None
            raise
        return link
