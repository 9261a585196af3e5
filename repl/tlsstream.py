"""TLS on a socket, as a trio stream: OpenSSL reads and writes the socket itself.

``trio.SSLStream`` runs TLS through memory buffers in Python: one TLS record
(16 KiB at most) per ``receive_some``, each a round through its locks and the
scheduler. Between two processes on two cores that moves about 350 MB/s and
bounds a catch-up. ``TLSStream`` gives the socket to OpenSSL (a non-blocking
``ssl.SSLSocket``) and waits through trio only when the socket has nothing to
give or take: one ``receive_some`` gathers every record already arrived, up to
*max_bytes*, and one ``send_all`` hands OpenSSL the whole buffer.

The contract is trio's ``Stream``'s, and what replfs used of ``SSLStream``:
``do_handshake``, ``getpeercert``; a TLS or socket failure raises
``trio.BrokenResourceError`` *from* the ``ssl``/``OSError`` that caused it (so
``repl.tls`` can say why in words); a peer that closes without a close_notify
is a broken link, not an end of stream; a ``send_all`` cut short by
cancellation leaves the stream broken (part of a record may have gone).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import trio

T = TypeVar("T")

RECORD = 16384  # the most plaintext one TLS record carries: what one SSL_read gives
DEFAULT_RECEIVE = 1 << 16


class TLSStream(trio.abc.Stream):
    """TLS over the TCP connection of *stream*, which it takes over (the
    ``SocketStream`` must not be used again). Call ``do_handshake`` first."""

    def __init__(self, stream: trio.SocketStream, context: ssl.SSLContext, *,
                 server_side: bool = False, server_hostname: str | None = None) -> None:
        sock = socket.socket(fileno=stream.socket.detach())
        sock.setblocking(False)
        self._ssl = context.wrap_socket(
            sock, server_side=server_side, server_hostname=server_hostname,
            do_handshake_on_connect=False, suppress_ragged_eofs=False)
        self._in_use: set[str] = set()
        self._closed = False
        self._failure: BaseException | None = None  # what broke the stream, both ways
        self._read_wait = trio.Lock()  # a send may need to read, a receive to write
        self._write_wait = trio.Lock()

    async def do_handshake(self) -> None:
        """The TLS handshake. Raises BrokenResourceError from the ssl error if it failed."""
        await trio.lowlevel.checkpoint_if_cancelled()
        await self._io(self._ssl.do_handshake)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def getpeercert(self) -> dict[str, Any] | None:
        """The peer's verified certificate, as ``ssl.SSLSocket.getpeercert()`` gives it."""
        return self._ssl.getpeercert()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """What arrived, up to *max_bytes*, waiting for at least a byte; b"" once the
        peer sent its close_notify."""
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        with self._busy("receive_some"):
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_usable()
            data = await self._io(self._ssl.recv, min(RECORD, max_bytes))
            chunks = [data]
            got = len(data)
            while data and got < max_bytes:  # the records already here, without waiting
                try:
                    data = self._ssl.recv(min(RECORD, max_bytes - got))
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break
                except (ssl.SSLError, OSError) as exc:
                    self._fail(exc)  # raised by the next call, after what came before it
                    break
                chunks.append(data)
                got += len(data)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of *data*. Cut short (cancelled, or the link broke), the stream
        is broken for good: part of a record may have gone."""
        with self._busy("send_all"):
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_usable()
            view = memoryview(data)
            try:
                while view:
                    view = view[await self._io(self._ssl.send, view):]
            except BaseException as exc:
                self._fail(exc)
                raise
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        with self._busy("send_all"):
            self._check_open()
            await self._wait(self._write_wait, trio.lowlevel.wait_writable)

    async def aclose(self) -> None:
        """Send a close_notify (for as long as the caller lets it wait) and close the
        socket, even if cancelled."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            if self._failure is None:
                await self._io(self._close_notify)
        except trio.BrokenResourceError:
            pass  # the peer is gone: nothing to tell it
        finally:
            self._closed = True
            trio.lowlevel.notify_closing(self._ssl)
            self._ssl.close()
        await trio.lowlevel.checkpoint()

    def _close_notify(self) -> None:
        """Ours sent; the peer's is not waited for (nothing more is read)."""
        try:
            self._ssl.unwrap()
        except ssl.SSLWantReadError:
            pass

    async def _io(self, call: Callable[..., T], *args: Any) -> T:
        """call(*args), made again with the same arguments (as OpenSSL asks) each
        time the socket made it wait."""
        while True:
            self._check_open()
            try:
                return call(*args)
            except ssl.SSLWantReadError:
                await self._wait(self._read_wait, trio.lowlevel.wait_readable)
            except ssl.SSLWantWriteError:
                await self._wait(self._write_wait, trio.lowlevel.wait_writable)
            except (ssl.SSLError, OSError) as exc:
                err = self._fail(exc)
                raise err from err.__cause__  # what broke the stream first

    async def _wait(self, lock: trio.Lock, wait: Callable[[socket.socket], Any]) -> None:
        """One task at a time waits on each direction: a receive can need to write
        (a key update's answer) while a send waits to."""
        async with lock:
            await wait(self._ssl)

    @contextmanager
    def _busy(self, what: str) -> Iterator[None]:
        if what in self._in_use:
            raise trio.BusyResourceError(f"another task is already in {what}")
        self._in_use.add(what)
        try:
            yield
        finally:
            self._in_use.discard(what)

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this TLS stream was closed")

    def _check_usable(self) -> None:
        self._check_open()
        if self._failure is not None:
            raise _broken(self._failure)

    def _fail(self, exc: BaseException) -> trio.BrokenResourceError:
        """The stream is broken for good, both ways: every later call raises
        BrokenResourceError from what broke it first (a TLS alert, a send cut short)."""
        if self._failure is None:
            self._failure = exc
        return _broken(self._failure)


def _broken(exc: BaseException) -> trio.BrokenResourceError:
    err = trio.BrokenResourceError(f"the TLS link broke: {exc}")
    err.__cause__ = exc
    return err
