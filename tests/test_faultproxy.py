"""The fault proxy itself, in front of an echo server: each fault does exactly what it says."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.faultproxy import DOWN, UP, FaultProxy

DATA = bytes(range(256)) * 8  # 2048 bytes, each offset recognisable


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@contextmanager
def echo_server() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def exchange(port: int, data: bytes, expect: int, timeout: float = 10.0) -> bytes:
    """Send *data* through the proxy and read until *expect* bytes, EOF or a reset."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(timeout)
        sock.sendall(data)
        got = b""
        try:
            while len(got) < expect and (chunk := sock.recv(65536)):
                got += chunk
        except ConnectionResetError:
            pass
        return got


@pytest.fixture
def echo() -> Iterator[int]:
    with echo_server() as port:
        yield port


def test_faultproxy_forward_ok_counts(echo: int) -> None:
    with FaultProxy(echo, seed=1) as proxy:
        assert exchange(proxy.port, DATA, len(DATA)) == DATA
        assert exchange(proxy.port, DATA[:10], 10) == DATA[:10]
        assert proxy.accepted == 2
        assert proxy.counts[(0, UP)] == proxy.counts[(0, DOWN)] == len(DATA)
        assert proxy.counts[(1, UP)] == proxy.counts[(1, DOWN)] == 10


@pytest.mark.parametrize("direction", [UP, DOWN])
def test_faultproxy_corrupt_ok_one_byte(echo: int, direction: str) -> None:
    with FaultProxy(echo, seed=2) as proxy:
        fault = proxy.corrupt((100, 2000), direction)
        got = exchange(proxy.port, DATA, len(DATA))
        assert fault.struck.is_set() and fault.conn == 0
        assert [i for i in range(len(DATA)) if got[i] != DATA[i]] == [fault.at]
        assert got[fault.at] == DATA[fault.at] ^ fault.mask
        assert exchange(proxy.port, DATA, len(DATA)) == DATA, "it strikes once"


def test_faultproxy_corrupt_ok_chosen_connection(echo: int) -> None:
    with FaultProxy(echo, seed=3) as proxy:
        fault = proxy.corrupt((0, 10), conn=1)
        assert exchange(proxy.port, DATA, len(DATA)) == DATA
        assert exchange(proxy.port, DATA, len(DATA)) != DATA
        assert fault.struck.is_set()


def test_faultproxy_cut_ok(echo: int) -> None:
    with FaultProxy(echo, seed=4) as proxy:
        fault = proxy.cut((100, 2000))
        got = exchange(proxy.port, DATA, len(DATA))
        assert fault.struck.is_set()
        assert proxy.counts[(0, UP)] == fault.at
        assert got == DATA[: len(got)] and len(got) <= fault.at


def test_faultproxy_stall_ok(echo: int) -> None:
    with FaultProxy(echo, seed=5) as proxy:
        fault = proxy.stall((100, 2000))
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(DATA)
            got = b""
            sock.settimeout(10)
            while len(got) < fault.at:
                got += sock.recv(65536)
            assert got == DATA[: fault.at]
            sock.settimeout(0.3)  # nothing more comes, and the link stays open
            with pytest.raises(TimeoutError):
                sock.recv(65536)
        assert proxy.counts[(0, UP)] == fault.at


def test_faultproxy_seed_ok_same_choices(echo: int) -> None:
    def choices(seed: int) -> list[tuple[int, int]]:
        proxy = FaultProxy(echo, seed)
        return [(f.at, f.mask) for f in (proxy.corrupt((0, 1 << 20)), proxy.cut((0, 1 << 20)),
                                          proxy.stall((0, 1 << 20)))]

    assert choices(7) == choices(7)
    assert choices(7) != choices(8)
