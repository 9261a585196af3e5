"""The wire decoders, fuzzed: frames, payloads and both sides' handshakes.

Everything here parses bytes a peer chose. Valid frames round-trip however
the stream is cut; any other bytes give frames that encode back to exactly
what was read, or ProtocolError; never another error, and never a buffer
larger than what arrived. A HELLO of any shape is accepted or refused
(ProtocolError, Refused) by the side that reads it, and a refused one
changes nothing the secondary keeps.
"""

from __future__ import annotations

import functools
import itertools
import json
import tempfile
from pathlib import Path
from typing import Any

import trio
import trio.testing
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from repl.diverge import Divergence
from repl.errors import ProtocolError, Refused
from repl.link import tcp_dialer
from repl.primary.sender import Sender
from repl.protocol import (
    MAGIC,
    MAX_FRAME,
    MAX_HELLO_FRAME,
    PROTOCOL_VERSION,
    Connection,
    Frame,
    FrameReader,
    FrameType,
    parse_applied,
    parse_hello,
    parse_keys,
    parse_records,
    record_frames,
)
from repl.secondary.gate import Gate, Rejected
from repl.secondary.receiver import Receiver
from repl.secondary.rejoin import fork_point
from store.journal import Journal
from store.records import Op, Record
from store.staging import Staging
from tests.fuzz import bounded, mutated
from tests.repl.test_protocol import GOLDEN, SPECS
from tests.store.strategies import records

frames = st.builds(Frame, st.sampled_from(FrameType), st.binary(max_size=300)) | st.sampled_from(
    sorted(SPECS.values(), key=lambda f: f.type)) | records().map(
    lambda r: Frame(FrameType.RECORD, r.encode()))
# The checked-in corpus, good and corrupt frames alike (tests/testdata/frames).
corpus = st.sampled_from(sorted(GOLDEN.glob("*.bin"))).map(Path.read_bytes)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)

histories = st.lists(st.fixed_dictionaries({}, optional={
    "generation": st.integers(-1, 6) | json_values, "first_set": st.integers(-1, 1 << 65)
    | json_values, "node": json_values}), max_size=3) | json_values
# What a rejoining secondary says diverged, as JSON: hex paths and [start, end] ranges,
# some of it replaced by anything.
divergences = json_values | st.fixed_dictionaries({}, optional={
    "content": st.lists(st.binary(max_size=8).map(bytes.hex) | json_values, max_size=3),
    "ranges": st.dictionaries(st.binary(max_size=8).map(bytes.hex), st.lists(
        st.lists(st.integers(-1, 1 << 64) | json_values, max_size=3), max_size=3)
        | json_values, max_size=3)})


@st.composite
def cuts(draw: st.DrawFn, raw: bytes) -> list[bytes]:
    """*raw* cut into chunks at arbitrary places, as a stream may deliver it."""
    points = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    edges = [0, *points, len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(edges)]


def read_all(chunks: list[bytes], max_frame: int = MAX_FRAME) -> tuple[list[Frame], bool]:
    """Feed *chunks* to a FrameReader, taking frames as they are whole. Returns the
    frames, and whether it refused the stream (ProtocolError). The reader's buffer
    never holds more than what was fed."""
    reader = FrameReader(max_frame)
    out: list[Frame] = []
    fed = 0
    for chunk in chunks:
        reader.feed(chunk)
        fed += len(chunk)
        try:
            while (frame := bounded(lambda _: reader.next(), chunk)) is not None:
                out.append(frame)
        except ProtocolError:
            return out, True
        assert len(reader._buf) <= fed
    return out, False


# --- frames -----------------------------------------------------------------------------


@given(st.lists(frames, max_size=6).flatmap(
    lambda fs: st.tuples(st.just(fs), cuts(b"".join(f.encode() for f in fs)))))
def test_frame_reader_ok_round_trip(case: tuple[list[Frame], list[bytes]]) -> None:
    sent, chunks = case
    assert read_all(chunks) == (sent, False)


def _canonical(chunks: list[bytes], max_frame: int = MAX_FRAME) -> None:
    """Whatever the reader hands out is exactly a prefix of what it was fed."""
    got, _ = read_all(chunks, max_frame)
    raw = b"".join(chunks)
    again = b"".join(f.encode() for f in got)
    assert raw.startswith(again)
    assert all(len(f.payload) + 1 <= max_frame for f in got)


@given(st.binary(max_size=512).flatmap(cuts))
def test_frame_reader_fuzz_random_bytes(chunks: list[bytes]) -> None:
    _canonical(chunks)


@given((corpus | st.lists(frames, min_size=1, max_size=4).map(
    lambda fs: b"".join(f.encode() for f in fs))).flatmap(mutated).flatmap(cuts))
def test_frame_reader_fuzz_mutated(chunks: list[bytes]) -> None:
    _canonical(chunks)


@given(st.lists(frames, min_size=1, max_size=4).map(
    lambda fs: b"".join(f.encode() for f in fs)).flatmap(mutated).flatmap(cuts))
def test_frame_reader_fuzz_mutated_before_handshake(chunks: list[bytes]) -> None:
    _canonical(chunks, MAX_HELLO_FRAME)


@given(st.integers(MAX_FRAME + 1, (1 << 32) - 1), st.binary(max_size=64))
def test_frame_reader_fuzz_oversized(length: int, rest: bytes) -> None:
    """A length past the bound is refused from its four bytes, whatever follows."""
    got, refused = read_all([length.to_bytes(4, "big") + rest])
    assert (got, refused) == ([], True)


# --- payloads ----------------------------------------------------------------------------


@given(st.sampled_from(FrameType), st.binary(max_size=128) | json_values.map(
    lambda v: json.dumps(v).encode()))
def test_frame_payloads_fuzz(kind: FrameType, payload: bytes) -> None:
    """Each payload parser returns a well-formed value or raises ProtocolError."""
    frame = Frame(kind, payload)
    try:
        info = parse_hello(frame)
        assert isinstance(info, dict) and kind == FrameType.HELLO
    except ProtocolError:
        pass
    try:
        keys = parse_keys(frame)
        assert all(0 <= s < 1 << 64 and 0 <= q < 1 << 32 for s, q in keys)
    except ProtocolError:
        pass
    try:
        assert 0 <= parse_applied(frame) < 1 << 64
    except ProtocolError:
        pass


_zstd = zstandard.ZstdCompressor()
compressed_runs = st.lists(records().map(Record.encode), min_size=1, max_size=4).map(
    lambda raws: record_frames(raws, _zstd)[0].payload)


@given(compressed_runs | compressed_runs.flatmap(mutated) | st.binary(max_size=64))
def test_parse_records_fuzz(payload: bytes) -> None:
    """A RECORDS_ZSTD payload, as sent or damaged: the records it holds, never more than
    MAX_FRAME bytes of them, or ProtocolError."""
    try:
        raws = parse_records(Frame(FrameType.RECORDS_ZSTD, payload))
    except ProtocolError:
        return
    assert sum(len(raw) for raw in raws) <= MAX_FRAME


@given(st.lists(records(), min_size=1, max_size=4))
def test_parse_records_ok_round_trip(sent: list[Record]) -> None:
    frames = record_frames([r.encode() for r in sent], _zstd)
    got = [Record.decode(raw) for f in frames for raw in (
        parse_records(f) if f.type == FrameType.RECORDS_ZSTD else [f.payload])]
    assert got == sent


@given(st.binary(max_size=16))
def test_connection_expect_magic_fuzz(raw: bytes) -> None:
    async def check() -> None:
        a, b = trio.testing.memory_stream_pair()
        await a.send_all(raw)
        await a.send_eof()
        try:
            await Connection(b).expect_magic()
        except ProtocolError:
            assert not raw.startswith(MAGIC)
        else:
            assert raw.startswith(MAGIC)

    trio.run(check)


# --- handshakes ---------------------------------------------------------------------------

CLUSTER = "c1c1c1c1c1c1c1c1"


@st.composite
def primary_hellos(draw: st.DrawFn) -> dict[str, Any]:
    """A primary's HELLO as a peer might send it: the real fields, some of them
    replaced by any JSON value or left out, and extra ones."""
    fields: dict[str, Any] = {
        "role": "primary", "version": PROTOCOL_VERSION, "cluster": CLUSTER,
        "node": "a0a0a0a0a0a0a0a0", "generation": draw(st.integers(-2, 3)),
        "session": "5e5e5e5e5e5e5e5e", "boot": "b0b0b0b0b0b0b0b0", "stream": 0,
        "streams": 4, "history": []}
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3)):
        if draw(st.booleans()):
            fields[name] = draw(json_values)
        else:
            fields.pop(name, None)
    fields.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
    return fields


def _keeps(staging: Staging) -> tuple[object, ...]:
    ident = staging.identity
    return ident.cluster, ident.generation, ident.node, sorted(staging.sets())


@given(primary_hellos(), st.sampled_from([None, CLUSTER, "0123456789abcdef"]))
def test_receiver_handshake_fuzz(info: dict[str, Any], joined: str | None) -> None:
    """A secondary (fresh, or of a cluster) reading any HELLO: it answers, or refuses
    it with ProtocolError or Refused, and then holds what it held."""
    async def check(staging: Staging) -> None:
        receiver = Receiver(staging, Gate(None), lambda: None, lambda _: None)
        ours, theirs = trio.testing.memory_stream_pair()
        await ours.send_all(MAGIC + Frame(FrameType.HELLO, json.dumps(info).encode()).encode())
        before = _keeps(staging)
        try:
            conn, got = await receiver._greet(theirs)
            assert json.dumps(got) == json.dumps(info)  # NaN != NaN
            await receiver._accept(conn, got)
        except (ProtocolError, Refused, Rejected):
            assert _keeps(staging) == before
            return
        assert staging.identity.cluster == info["cluster"]
        reply = Connection(ours)
        await reply.expect_magic()
        assert parse_hello(await reply.receive())["generation"] == info["generation"]

    with tempfile.TemporaryDirectory() as where:
        staging = Staging(Path(where) / "staging")
        try:
            staging.identity.cluster, staging.identity.generation = joined, 2
            staging.save_identity()
            staging.stage([Record.decode(SPECS["record"].payload)])
            trio.run(check, staging)
        finally:
            staging.close()


@functools.cache
def _journal() -> Journal:
    """One primary's journal for every case: the sender only reads its identity."""
    return Journal(Path(tempfile.mkdtemp(prefix="replfs-fuzz-")) / "journal")


@st.composite
def secondary_hellos(draw: st.DrawFn) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "role": "secondary", "version": PROTOCOL_VERSION, "node": "b0b0b0b0b0b0b0b0",
        "cluster": CLUSTER, "generation": 1, "applied": draw(st.integers(-1, 1 << 65)),
        "syncing": draw(st.none() | st.integers(-1, 5)),
        "rejoin": draw(st.none() | divergences)}
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3)):
        if draw(st.booleans()):
            fields[name] = draw(json_values)
        else:
            fields.pop(name, None)
    return fields


@given(secondary_hellos())
def test_sender_handshake_fuzz(info: dict[str, Any]) -> None:
    """A primary reading any answer to its HELLO: it takes the applied set, or ends the
    session with ProtocolError or Refused."""
    async def check() -> None:
        sender = Sender(_journal(), tcp_dialer("127.0.0.1", 1, None))
        ours, theirs = trio.testing.memory_stream_pair()
        await ours.send_all(Frame(FrameType.HELLO, json.dumps(info).encode()).encode())
        try:
            applied, zstd = await sender._handshake(Connection(theirs), "5e5e", 0)
        except (ProtocolError, Refused):
            return
        assert applied == info["applied"] and 0 <= applied < 1 << 64
        assert zstd is (info.get("compress") == "zstd")

    trio.run(check)


@given(histories, st.integers(0, 5))
def test_fork_point_fuzz(history: Any, generation: int) -> None:
    """The new primary's history, as a rejoining secondary reads it: a set to fork at,
    or ProtocolError or Refused."""
    try:
        fork = fork_point(history, generation)
    except (ProtocolError, Refused):
        return
    assert 1 <= fork < 1 << 64


@given(divergences)
def test_divergence_from_json_fuzz(data: Any) -> None:
    """What a rejoining secondary says diverged: paths inside the tree and sane ranges,
    or ProtocolError."""
    try:
        div = Divergence.from_json(data)
    except ProtocolError:
        return
    for path in [*div.content, *div.ranges]:
        Record(Op.CHMOD, 1, 0, path=path).validate()
    for spans in div.ranges.values():
        assert all(0 <= start <= end for start, end in spans)
