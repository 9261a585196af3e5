"""A TCP proxy that breaks links on purpose, for end-to-end fault tests.

``FaultProxy(target_port, seed)`` listens on 127.0.0.1 (a free port) and
forwards every connection it accepts to the target. Connections are
numbered in accept order; each has two directions, ``UP`` (client to
target) and ``DOWN`` (target to client), and each direction counts the bytes
it forwarded. A test arms faults before the traffic they hit:

- ``corrupt``: XOR one byte at an offset with a non-zero mask;
- ``cut``: forward the bytes before an offset, then close both sides;
- ``stall``: forward the bytes before an offset, then nothing more in that
  direction, with both sockets left open (a black hole).

A fault names one connection, or none: then it strikes the first
connection whose direction reaches its offset. Where it strikes (the
offset, and the mask) is drawn from the seed within bounds the test gives,
so one seed always breaks the same byte offsets, and a failure names its
seed. The proxy runs its own ``trio.run`` in a background thread, so
synchronous tests driving real daemon processes use it as a context
manager.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Literal

import trio

UP, DOWN = "up", "down"
Kind = Literal["corrupt", "cut", "stall"]
CHUNK = 64 << 10


@dataclass
class Fault:
    kind: Kind
    direction: str  # UP or DOWN
    at: int  # offset of the byte it strikes, counted in that direction
    conn: int | None = None  # which connection (accept order from 0); None: the first to reach
    mask: int = 0  # corrupt: what the byte is XORed with
    struck: threading.Event = field(default_factory=threading.Event, compare=False)


class FaultProxy:
    def __init__(self, target_port: int, seed: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.seed = seed
        self.rng = random.Random(seed)
        self.port = 0
        self.counts: dict[tuple[int, str], int] = {}  # (conn, direction) -> bytes forwarded
        self.faults: list[Fault] = []
        self.accepted = 0  # connections so far; the next one gets this number
        self._started = threading.Event()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._failure: BaseException | None = None

    # --- arming faults (from the test's thread) ----------------------------------------

    def corrupt(self, within: tuple[int, int], direction: str = UP,
                conn: int | None = None) -> Fault:
        """XOR one byte, at an offset drawn from [within[0], within[1]), with a drawn mask."""
        at = self.rng.randrange(*within)
        return self._arm(Fault("corrupt", direction, at, conn, self.rng.randrange(1, 256)))

    def cut(self, within: tuple[int, int], direction: str = UP,
            conn: int | None = None) -> Fault:
        """Close both sides once the offset drawn from *within* is reached."""
        return self._arm(Fault("cut", direction, self.rng.randrange(*within), conn))

    def stall(self, within: tuple[int, int], direction: str = UP,
              conn: int | None = None) -> Fault:
        """Stop forwarding *direction* at an offset drawn from *within*; keep sockets open."""
        return self._arm(Fault("stall", direction, self.rng.randrange(*within), conn))

    def _arm(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def _claim(self, conn: int, direction: str, start: int, end: int) -> Fault | None:
        """The fault striking *conn*'s *direction* in [start, end), now bound to it.

        At most one fault strikes per chunk forwarded. Called from the proxy's
        trio thread only, with no await between finding a fault and binding
        it, so two connections never take the same one.
        """
        for fault in self.faults:
            if (fault.direction == direction and fault.conn in (None, conn)
                    and start <= fault.at < end and not fault.struck.is_set()):
                fault.conn = conn
                return fault
        return None

    # --- lifetime ------------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name=f"faultproxy-{self.seed}",
                                        daemon=True)
        self._thread.start()
        if not self._started.wait(10) or self._failure is not None:
            raise RuntimeError("fault proxy did not start") from self._failure
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._thread is not None and self._token is not None
        trio.from_thread.run_sync(self._stop, trio_token=self._token)
        self._thread.join(10)

    def _stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._failure = exc
            self._started.set()
            raise

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                self._started.set()

    # --- forwarding ----------------------------------------------------------------------

    async def _handle(self, client: trio.SocketStream) -> None:
        conn, self.accepted = self.accepted, self.accepted + 1
        self.counts[(conn, UP)] = self.counts[(conn, DOWN)] = 0
        try:
            target = await trio.open_tcp_stream(*self.target)
        except OSError:
            await client.aclose()
            return
        async with client, target, trio.open_nursery() as link:
            link.start_soon(self._pump, conn, UP, client, target, link.cancel_scope)
            link.start_soon(self._pump, conn, DOWN, target, client, link.cancel_scope)

    async def _pump(self, conn: int, direction: str, src: trio.SocketStream,
                    dst: trio.SocketStream, link: trio.CancelScope) -> None:
        """Forward one direction until EOF, a broken socket, or a fault that ends it."""
        key = (conn, direction)
        while True:
            try:
                data = await src.receive_some(CHUNK)
            except trio.BrokenResourceError:  # reset: so is the other side
                link.cancel()
                return
            if not data:  # pass the EOF on; the other direction may still flow
                try:
                    await dst.send_eof()
                except trio.BrokenResourceError:
                    link.cancel()
                return
            fault = self._claim(conn, direction, self.counts[key],
                                self.counts[key] + len(data))
            if fault is not None:
                strike = fault.at - self.counts[key]
                if fault.kind == "corrupt":
                    data = data[:strike] + bytes([data[strike] ^ fault.mask]) + data[strike + 1 :]
                else:
                    data = data[:strike]
            # Counted and marked before they go, so whoever sees the bytes sees both.
            self.counts[key] += len(data)
            if fault is not None:
                fault.struck.set()
            try:
                await dst.send_all(data)
            except trio.BrokenResourceError:
                link.cancel()
                return
            if fault is not None and fault.kind == "cut":
                link.cancel()  # closes both sockets: the link is gone
                return
            if fault is not None and fault.kind == "stall":
                await trio.sleep_forever()  # until the proxy stops
