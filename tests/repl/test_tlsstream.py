"""TLSStream: trio's Stream contract, TLS that trio.SSLStream understands both ways,
records gathered per receive, and a link that broke said as one."""

from __future__ import annotations

import os
import ssl

import pytest
import trio
import trio.testing

from repl import tls
from repl.tlsstream import RECORD, TLSStream
from tests.support import PRIMARY, SECONDARY, cluster_ca


def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The secondary's server context and the primary's client context."""
    server = tls.credentials(cluster_ca() / SECONDARY, PRIMARY).server_context()
    return server, tls.credentials(cluster_ca() / PRIMARY, SECONDARY).client_context()


def socket_streams() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def handshaken(client: trio.abc.Stream, server: trio.abc.Stream) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)  # type: ignore[attr-defined]
        nursery.start_soon(server.do_handshake)  # type: ignore[attr-defined]


async def tls_pair() -> tuple[TLSStream, TLSStream]:
    server_ctx, client_ctx = contexts()
    a, b = socket_streams()
    client = TLSStream(a, client_ctx, server_hostname=SECONDARY)
    server = TLSStream(b, server_ctx, server_side=True)
    await handshaken(client, server)
    return client, server


async def test_tlsstream_ok_keeps_trios_stream_contract() -> None:
    await trio.testing.check_two_way_stream(tls_pair, None)


@pytest.mark.parametrize("ours", ["client", "server"])
async def test_tlsstream_ok_speaks_tls_with_trios_sslstream(ours: str) -> None:
    server_ctx, client_ctx = contexts()
    a, b = socket_streams()
    client: trio.abc.Stream
    server: trio.abc.Stream
    if ours == "client":
        client = TLSStream(a, client_ctx, server_hostname=SECONDARY)
        server = trio.SSLStream(b, server_ctx, server_side=True)
    else:
        client = trio.SSLStream(a, client_ctx, server_hostname=SECONDARY)
        server = TLSStream(b, server_ctx, server_side=True)
    await handshaken(client, server)
    data = os.urandom(3 << 20)

    async def pump(sender: trio.abc.Stream, receiver: trio.abc.Stream,
                   got: bytearray) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.send_all, data)
            while len(got) < len(data):
                got += await receiver.receive_some(1 << 20)

    there, back = bytearray(), bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, client, server, there)
        nursery.start_soon(pump, server, client, back)
    assert there == data and back == data
    assert server.getpeercert() is not None  # type: ignore[attr-defined]
    await client.aclose()
    assert await server.receive_some() == b""  # the close_notify: a clean end
    await server.aclose()


async def test_tlsstream_ok_one_receive_takes_every_record_already_arrived() -> None:
    client, server = await tls_pair()
    data = os.urandom(4 * RECORD)  # four records, within the socket's buffer
    await client.send_all(data)
    got = await server.receive_some(1 << 20)
    assert got == data
    await client.aclose()
    await server.aclose()


async def test_tlsstream_peer_gone_without_close_notify_is_a_broken_link() -> None:
    server_ctx, client_ctx = contexts()
    a, b = socket_streams()
    client = TLSStream(a, client_ctx, server_hostname=SECONDARY)
    server = TLSStream(b, server_ctx, server_side=True)
    await handshaken(client, server)
    await client.send_all(b"last words")
    os.close(client._ssl.detach())  # the TCP connection ends; TLS was never closed
    assert await server.receive_some() == b"last words"
    with pytest.raises(trio.BrokenResourceError) as caught:
        await server.receive_some()
    assert isinstance(caught.value.__cause__, ssl.SSLEOFError)
    await server.aclose()


async def test_tlsstream_handshake_refused_says_why_through_the_cause() -> None:
    server_ctx, _ = contexts()
    stranger = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # trusts no CA of ours
    a, b = socket_streams()
    client = TLSStream(a, stranger, server_hostname=SECONDARY)
    server = TLSStream(b, server_ctx, server_side=True)

    async def serve() -> None:
        with pytest.raises(trio.BrokenResourceError):  # the client's alert
            await server.do_handshake()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        with pytest.raises(trio.BrokenResourceError) as caught:
            await client.do_handshake()
    assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
    for stream in (client, server):
        await stream.aclose()


async def test_tlsstream_corrupt_record_breaks_both_ways_saying_why() -> None:
    """A record that fails its check: what came before it is received, then the
    stream is broken both ways, each call saying it was a refused TLS record (a
    task sending acknowledgements learns it as the one receiving does)."""
    client, server = await tls_pair()
    await client.send_all(b"good")
    forged = bytes([23, 3, 3, 0, 32]) + os.urandom(32)  # application data, not theirs
    os.write(client._ssl.fileno(), forged)
    assert await server.receive_some() == b"good"
    for call in (lambda: server.send_all(b"ack"), server.receive_some):
        with pytest.raises(trio.BrokenResourceError) as caught:
            await call()
        assert tls.broken_record(caught.value) is not None, caught.value
    await client.aclose()
    await server.aclose()
