"""The secondary's door: what a connection must show before it may speak replfs.

With TLS, a connection is a stranger until its TLS handshake shows a
certificate of the cluster's CA that names the primary this secondary
accepts (``--peer``), and its HELLO has arrived; until the certificate
checks out it gets no byte of replfs and can change nothing. Strangers cost
little and not for long:

- the first byte tells TLS from plain TCP (a peek, so the TLS layer still
  reads it); a plain-TCP replfs peer is told, in plain replfs, to use TLS;
- a peer that has not finished its TLS handshake and sent its HELLO within
  HANDSHAKE_SECONDS is dropped;
- strangers are bounded. A new connection at the bound pushes out an
  older stranger of the host that holds the most: one that has not sent a
  byte yet if there is one (a real primary speaks at once), else the
  oldest. So a flood of silent connections cannot hold the door shut: from
  other addresses it only ever pushes out its own, and from the primary's
  own address it gives each newcomer the time of MAX_HANDSHAKES newer
  connections to speak, which the real primary's handshake, sent the
  moment its connection is up, takes.

With ``--insecure`` the door only turns away a peer that speaks TLS (a
primary started with ``--tls``), so that mismatch is told apart from garbage.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from repl.errors import ReplError
from repl.protocol import MAGIC, Frame, FrameType
from repl.tls import Credentials, peer_names, refusal
from repl.tlsstream import TLSStream

T = TypeVar("T")

# A TLS 1.3 handshake and a HELLO take a few milliseconds, a few hundred on a loaded
# host; a peer that has not finished them in this long is not a primary worth waiting for.
HANDSHAKE_SECONDS = 5.0
# Strangers (handshakes in progress). A primary opens its streams one after the
# other, so it has one in progress at a time.
MAX_HANDSHAKES = 64
TLS_HANDSHAKE_RECORD = 0x16  # the first byte of every TLS ClientHello
TELL_SECONDS = 1.0  # how long a refused peer may take to read why


class Rejected(ReplError):
    """A connection turned away at the door: *reason* is the key ``status`` counts."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason
        self.text = text


@dataclass(eq=False)
class _Pending:
    host: str
    scope: trio.CancelScope
    spoke: bool = False  # it sent a byte: the silent ones are pushed out first
    pushed_out: str | None = None  # why, once a newer connection took its place
    link: trio.abc.Stream | None = None  # TLS over the stream, which then owns its socket


class Gate:
    """Admit connections: TLS with the right certificate (or plain TCP, for --insecure)."""

    def __init__(self, creds: Credentials | None) -> None:
        self.creds = creds
        self._context = creds.server_context() if creds is not None else None
        self._pending: list[_Pending] = []  # oldest first

    @property
    def in_progress(self) -> int:
        """Connections whose handshake is under way (not those pushed out, still
        winding down)."""
        return sum(1 for p in self._pending if not p.pushed_out)

    async def admit(self, stream: trio.SocketStream, host: str,
                    greet: Callable[[trio.abc.Stream], Awaitable[T]]) -> T:
        """What ``greet(link)`` returns, *link* being the stream to speak replfs on once
        the peer at *host* showed what it must. *greet* reads the peer's HELLO: until
        it returns, the connection is a stranger, under the deadline and the bounds.

        Raises:
            Rejected: the peer may not speak replfs here (or *greet* said so); *stream*
                is closed.
        """
        pending = _Pending(host, trio.CancelScope(
            deadline=trio.current_time() + HANDSHAKE_SECONDS))
        self._make_room()
        self._pending.append(pending)
        try:
            with pending.scope:
                return await greet(await self._admit(stream, pending))
        except BaseException:  # Rejected, or the secondary is stopping
            await trio.aclose_forcefully(pending.link or stream)
            raise
        finally:
            self._pending.remove(pending)
        # Only reached when the scope was cancelled.
        await trio.aclose_forcefully(pending.link or stream)
        if pending.pushed_out:
            raise Rejected("busy", f"pushed out by a newer connection: {pending.pushed_out}")
        raise Rejected("no-handshake", f"no handshake within {HANDSHAKE_SECONDS:g}s")

    def _make_room(self) -> None:
        """At the bound, push out a stranger of the host that holds the most (of those
        hosts, the oldest that said nothing yet, else the oldest), so one more fits."""
        live = [p for p in self._pending if not p.pushed_out]
        if len(live) < MAX_HANDSHAKES:
            return
        held = Counter(p.host for p in live)
        most = max(held.values())
        candidates = [p for p in live if held[p.host] == most]
        pending = next((p for p in candidates if not p.spoke), candidates[0])
        pending.pushed_out = (f"{MAX_HANDSHAKES} handshakes in progress already, "
                              f"{most} from {pending.host}")
        pending.scope.cancel()

    async def _admit(self, stream: trio.SocketStream, pending: _Pending) -> trio.abc.Stream:
        try:
            first = await stream.socket.recv(len(MAGIC), socket.MSG_PEEK)
        except OSError as exc:
            raise Rejected("no-handshake", f"the link broke before a handshake ({exc!r})"
                           ) from None
        pending.spoke = bool(first)
        speaks_tls = first[:1] == bytes([TLS_HANDSHAKE_RECORD])
        if self._context is None or self.creds is None:
            if speaks_tls:
                raise Rejected("tls-to-plain", "it speaks TLS and this secondary plain TCP "
                               "(--insecure): start both with --tls, or both with --insecure")
            return stream
        if not first:
            raise Rejected("no-handshake", "it closed the link before a TLS handshake")
        if not speaks_tls:
            await _tell(stream, "this secondary accepts TLS only: start the primary with "
                        "--tls DIR/NAME --peer NAME (see 'replfs tls --help')")
            raise Rejected("not-tls", f"plain TCP, not TLS (it sent {first!r})")
        tls = pending.link = TLSStream(stream, self._context, server_side=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            raise Rejected(*refusal(exc.__cause__)) from None
        names = peer_names(tls.getpeercert() or {})
        if not set(self.creds.accepted) & {name.lower() for name in names}:
            text = (f"the certificate names {', '.join(names) or 'no node'}, and this "
                    f"secondary accepts only {', '.join(self.creds.accepted)} (--peer)")
            await _tell(tls, text)
            raise Rejected("wrong-name", text)
        return tls


async def _tell(stream: trio.abc.Stream, text: str) -> None:
    """Say why, the way replfs refuses: our magic, then an ERROR frame."""
    with trio.move_on_after(TELL_SECONDS):
        try:
            await stream.send_all(MAGIC + Frame(FrameType.ERROR, text.encode()).encode())
        except (trio.BrokenResourceError, OSError):
            pass  # it is gone already; refused all the same
