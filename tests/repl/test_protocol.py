"""The wire format: frames, the frame reader, the magic handshake, the payload parsers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing
import xxhash
import zstandard

from repl.errors import ProtocolError
from repl.protocol import (
    BATCH_FRAME,
    BATCH_RECORD,
    MAGIC,
    MAX_FRAME,
    MAX_HELLO_FRAME,
    Connection,
    Frame,
    FrameReader,
    FrameType,
    Packer,
    applied,
    applying,
    hello,
    parse_applied,
    parse_applying,
    parse_hello,
    parse_keys,
    parse_plain_records,
    parse_records,
    received,
    record_frames,
    reset_to,
    staged,
)
from store.records import Op, Record
from tests.support import golden_bytes

# Every frame type, with a payload its parser accepts. They pin the format:
# if an ok case's bytes change, the wire format changed (bump the wire
# version in MAGIC). To rewrite the files after a deliberate change, run the
# tests once with REPLFS_REGENERATE=1 and review the diff.
SPECS: dict[str, Frame] = {
    "hello": hello(role="primary", version=1, cluster="c1c1c1c1c1c1c1c1",
                   node="a0a0a0a0a0a0a0a0", generation=3, session="5e5e5e5e5e5e5e5e",
                   stream=1, streams=4),
    "record": Frame(FrameType.RECORD,
                    Record(Op.WRITE, 7, 2, path=b"dir/f", offset=5, data=b"hi").encode()),
    "staged": staged([(7, 2), ((1 << 40) + 1, 0xFFFF_FFFE)]),
    "received": received([(7, 3), ((1 << 40) + 1, 0xFFFF_FFFD)]),
    "records": record_frames([Record(Op.MKDIR, 7, 3, path=b"d", mode=0o40755).encode(),
                              Record(Op.SYNC, 7, 4, count=4).encode()], None, batch=True)[0],
    "applied": applied((1 << 33) + 9),
    "applying": applying((1 << 33) + 10, 0xFFFF_FFFE),
    "error": Frame(FrameType.ERROR, b"peer belongs to cluster x, this replica to y"),
    "reset-to": reset_to((1 << 35) + 3),
    # Three records zstd-compressed together, as made once by record_frames (kept as
    # bytes: another libzstd may compress the same records to other bytes).
    "records-zstd": Frame(FrameType.RECORDS_ZSTD, bytes.fromhex(
        "28b52ffd20cc5502005403000000400101000700056469722f6600050000001768656c6c6f20cf"
        "dc516b53fafd24013edbc268fe12bdcb02e202d0339dd3519208000124c0cc0162479863ca9c00"
        "37b0780046")),
}
ZSTD_RECORDS = [Record(Op.WRITE, 7, n, path=b"dir/f", offset=5,
                       data=b"hello hello hello hello") for n in range(3)]
# Bytes that must not decode, each from an ok case.
CORRUPT = {"corrupt-checksum": ("applied", -1)}  # case -> (from case, index of the flipped byte)

GOLDEN = Path(__file__).resolve().parent.parent / "testdata" / "frames"


def raw_frame(kind: int, payload: bytes, *, length: int | None = None) -> bytes:
    """A frame laid out by hand: u32 length, u8 type, payload, u64 xxh3 of type + payload."""
    body = bytes([kind]) + payload
    size = len(body) if length is None else length
    return size.to_bytes(4, "big") + body + xxhash.xxh3_64_intdigest(body).to_bytes(8, "big")


def flipped(raw: bytes, at: int) -> bytes:
    at %= len(raw)
    return raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :]


def golden(case: str, raw: bytes) -> bytes:
    return golden_bytes(GOLDEN / f"{case}.bin", raw)


def decode_all(*chunks: bytes) -> list[Frame]:
    """Feed *chunks* one by one, taking every frame as soon as it is whole."""
    reader = FrameReader()
    out = []
    for chunk in chunks:
        reader.feed(chunk)
        while (frame := reader.next()) is not None:
            out.append(frame)
    return out


# --- frames ----------------------------------------------------------------------


def test_specs_cover_every_frame_type() -> None:
    assert {f.type for f in SPECS.values()} == set(FrameType)


@pytest.mark.parametrize("case", sorted(SPECS))
def test_frame_encode_ok(case: str) -> None:
    frame = SPECS[case]
    assert decode_all(frame.encode()) == [frame]


@pytest.mark.parametrize("case", sorted(SPECS))
def test_frame_encode_ok_layout(case: str) -> None:
    frame = SPECS[case]
    assert frame.encode() == raw_frame(frame.type, frame.payload)


@pytest.mark.parametrize("case", sorted(SPECS))
def test_frame_golden_ok(case: str) -> None:
    frame = SPECS[case]
    raw = golden(case, frame.encode())
    assert frame.encode() == raw
    assert decode_all(raw) == [frame]


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_frame_golden_err(case: str) -> None:
    source, at = CORRUPT[case]
    raw = golden(case, flipped(SPECS[source].encode(), at))
    reader = FrameReader()
    reader.feed(raw)
    with pytest.raises(ProtocolError, match="checksum mismatch"):
        reader.next()


def test_frame_golden_ok_no_strays() -> None:
    assert {p.stem for p in GOLDEN.glob("*.bin")} == set(SPECS) | set(CORRUPT)


def test_frame_parsers_ok() -> None:
    assert parse_hello(SPECS["hello"]) == {
        "role": "primary", "version": 1, "cluster": "c1c1c1c1c1c1c1c1",
        "node": "a0a0a0a0a0a0a0a0", "generation": 3, "session": "5e5e5e5e5e5e5e5e",
        "stream": 1, "streams": 4}
    assert Record.decode(SPECS["record"].payload) == Record(Op.WRITE, 7, 2, path=b"dir/f",
                                                            offset=5, data=b"hi")
    assert parse_keys(SPECS["staged"]) == [(7, 2), ((1 << 40) + 1, 0xFFFF_FFFE)]
    assert parse_applied(SPECS["applied"]) == (1 << 33) + 9
    assert parse_applied(SPECS["reset-to"]) == (1 << 35) + 3
    assert parse_applying(SPECS["applying"]) == ((1 << 33) + 10, 0xFFFF_FFFE)


# --- the frame reader --------------------------------------------------------------


def test_frame_reader_next_ok_empty() -> None:
    reader = FrameReader()
    assert reader.next() is None
    reader.feed(b"")
    assert reader.next() is None


def test_frame_reader_next_ok_type_only() -> None:
    """A frame with an empty payload: length 1, the type byte, the checksum."""
    assert decode_all(raw_frame(FrameType.ERROR, b"")) == [Frame(FrameType.ERROR, b"")]


def test_frame_reader_next_ok_split_at_every_byte() -> None:
    frames = [SPECS[case] for case in sorted(SPECS)]
    stream = b"".join(f.encode() for f in frames)
    for cut in range(len(stream) + 1):
        assert decode_all(stream[:cut], stream[cut:]) == frames, f"cut at {cut}"


def test_frame_reader_next_ok_byte_by_byte() -> None:
    frames = [SPECS[case] for case in sorted(SPECS)]
    stream = b"".join(f.encode() for f in frames)
    assert decode_all(*(stream[i : i + 1] for i in range(len(stream)))) == frames


def test_frame_reader_next_ok_many_in_one_feed() -> None:
    frames = [applied(n) for n in range(1000)] + [SPECS[case] for case in sorted(SPECS)]
    assert decode_all(b"".join(f.encode() for f in frames)) == frames


def test_frame_reader_next_ok_truncated_waits() -> None:
    """A frame cut anywhere is not an error yet: the reader waits for the rest."""
    raw = SPECS["record"].encode()
    for cut in range(len(raw)):
        reader = FrameReader()
        reader.feed(raw[:cut])
        assert reader.next() is None


@pytest.mark.parametrize("value", [0, max(FrameType) + 1, 0x7F, 0xFF])
def test_frame_reader_next_err_unknown_type(value: int) -> None:
    reader = FrameReader()
    reader.feed(raw_frame(value, b"payload"))
    with pytest.raises(ProtocolError, match=f"unknown frame type {value}$"):
        reader.next()


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1, 0xFFFF_FFFF])
def test_frame_reader_next_err_length(length: int) -> None:
    """A bad length is refused from the 4 length bytes alone, before any body arrives."""
    reader = FrameReader()
    reader.feed(length.to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match=f"bad frame length {length}$"):
        reader.next()


def test_frame_reader_next_ok_max_length_waits() -> None:
    reader = FrameReader()
    reader.feed(MAX_FRAME.to_bytes(4, "big") + bytes([FrameType.RECORD]))
    assert reader.next() is None


@pytest.mark.parametrize("at", [4, 5, 10, -8, -1])
def test_frame_reader_next_err_checksum(at: int) -> None:
    """A flipped byte of the type, the payload or the checksum fails the checksum."""
    reader = FrameReader()
    reader.feed(flipped(SPECS["record"].encode(), at))
    with pytest.raises(ProtocolError, match="frame checksum mismatch"):
        reader.next()


def test_frame_reader_next_err_checksum_after_good_frames() -> None:
    """The frames before a corrupt one are handed out; the corrupt one never is."""
    good = [SPECS["applied"], SPECS["staged"]]
    reader = FrameReader()
    reader.feed(b"".join(f.encode() for f in good) + flipped(SPECS["error"].encode(), 6))
    assert [reader.next(), reader.next()] == good
    with pytest.raises(ProtocolError, match="checksum"):
        reader.next()


# --- connections ---------------------------------------------------------------------


def pair() -> tuple[Connection, Connection]:
    a, b = trio.testing.memory_stream_pair()
    return Connection(a), Connection(b)


async def test_connection_expect_magic_ok() -> None:
    a, b = pair()
    await a.send_magic()
    await b.expect_magic()
    await a.send(SPECS["hello"], SPECS["record"])
    assert [await b.receive(), await b.receive()] == [SPECS["hello"], SPECS["record"]]
    await b.send(SPECS["staged"])
    assert await a.receive() == SPECS["staged"]


async def test_connection_expect_magic_ok_byte_by_byte() -> None:
    a, b = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.expect_magic)
        for i in range(len(MAGIC)):
            await a.stream.send_all(MAGIC[i : i + 1])
            await trio.testing.wait_all_tasks_blocked()


async def test_connection_expect_magic_ok_frame_in_same_chunk() -> None:
    """Bytes after the magic are not eaten by it: they are the first frame."""
    a, b = pair()
    await a.stream.send_all(MAGIC + SPECS["hello"].encode())
    await b.expect_magic()
    assert await b.receive() == SPECS["hello"]


async def test_connection_expect_magic_err_not_replfs() -> None:
    a, b = pair()
    await a.stream.send_all(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ProtocolError, match=r"not replfs \(it sent b'GET / HT'\)"):
        await b.expect_magic()


async def test_connection_expect_magic_err_wire_version() -> None:
    a, b = pair()
    await a.stream.send_all(MAGIC[:6] + (2).to_bytes(2, "big"))
    with pytest.raises(ProtocolError, match="peer speaks replfs wire version 2, we speak 1"):
        await b.expect_magic()


async def test_connection_expect_magic_err_closed() -> None:
    a, b = pair()
    await a.stream.send_all(MAGIC[:3])
    await a.aclose()
    with pytest.raises(ProtocolError, match="closed before saying who it is"):
        await b.expect_magic()


async def test_connection_expect_magic_err_silent_peer(autojump_clock: trio.abc.Clock) -> None:
    """A peer that says nothing is cut by the caller's deadline (no wall time spent)."""
    _a, b = pair()
    start = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(10):
            await b.expect_magic()
    assert trio.current_time() - start == pytest.approx(10)


async def test_connection_receive_ok_end_of_channel() -> None:
    a, b = pair()
    await a.send(SPECS["applied"])
    await a.aclose()
    assert await b.receive() == SPECS["applied"]
    with pytest.raises(trio.EndOfChannel):
        await b.receive()


async def test_connection_receive_err_checksum() -> None:
    a, b = pair()
    await a.stream.send_all(SPECS["applied"].encode() + flipped(SPECS["record"].encode(), 20))
    assert await b.receive() == SPECS["applied"]
    with pytest.raises(ProtocolError, match="checksum"):
        await b.receive()


# --- payload parsers -------------------------------------------------------------------


def test_parse_hello_err_refused() -> None:
    with pytest.raises(ProtocolError, match=r"^peer refused us: go away \ufffd$"):
        parse_hello(Frame(FrameType.ERROR, b"go away \xff"))


def test_parse_hello_err_other_type() -> None:
    with pytest.raises(ProtocolError, match="expected HELLO, got STAGED"):
        parse_hello(SPECS["staged"])


@pytest.mark.parametrize("payload", [b"", b"{", b"\xff\xfe", b"{'a': 1}", b"[" * 100_000],
                         ids=["empty", "unclosed", "not-utf8", "single-quotes", "deep"])
def test_parse_hello_err_not_json(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="HELLO is not JSON"):
        parse_hello(Frame(FrameType.HELLO, payload))


@pytest.mark.parametrize("payload", [b"[]", b"1", b'"primary"', b"null"])
def test_parse_hello_err_not_object(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="HELLO is not a JSON object"):
        parse_hello(Frame(FrameType.HELLO, payload))


def test_parse_staged_ok_empty() -> None:
    assert parse_keys(staged([])) == []


@pytest.mark.parametrize("size", [1, 11, 13, 25])
def test_parse_staged_err_length(size: int) -> None:
    with pytest.raises(ProtocolError, match=f"STAGED payload of {size} bytes"):
        parse_keys(Frame(FrameType.STAGED, bytes(size)))


@pytest.mark.parametrize("size", [0, 8, 11, 13])
def test_parse_applying_err_length(size: int) -> None:
    with pytest.raises(ProtocolError, match=f"APPLYING payload of {size} bytes"):
        parse_applying(Frame(FrameType.APPLYING, bytes(size)))


@pytest.mark.parametrize("kind", [FrameType.APPLIED, FrameType.RESET_TO])
@pytest.mark.parametrize("size", [0, 7, 9, 16])
def test_parse_applied_err_length(kind: FrameType, size: int) -> None:
    with pytest.raises(ProtocolError, match=f"{kind.name} payload of {size} bytes"):
        parse_applied(Frame(kind, bytes(size)))


async def test_connection_receive_err_frame_too_big_before_handshake() -> None:
    """Before the handshake a peer cannot make us wait for (and buffer) a huge frame."""
    a, b = trio.testing.memory_stream_pair()
    big = Frame(FrameType.HELLO, b"x" * (MAX_HELLO_FRAME + 1)).encode()
    await a.send_all(big[:64])
    with pytest.raises(ProtocolError, match="bad frame length"):
        await Connection(b).receive()


async def test_connection_receive_ok_big_frame_after_handshake() -> None:
    a, b = trio.testing.memory_stream_pair()
    big = Frame(FrameType.RECORD, b"x" * (MAX_HELLO_FRAME + 1))
    conn = Connection(b)
    conn.handshake_done()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send_all, big.encode())
        assert await conn.receive() == big


# --- compressed records ----------------------------------------------------------------


def test_parse_records_ok_golden() -> None:
    raws = parse_records(SPECS["records-zstd"])
    assert [Record.decode(raw) for raw in raws] == ZSTD_RECORDS


def test_record_frames_ok_round_trip() -> None:
    raws = [r.encode() for r in ZSTD_RECORDS * 50]
    (frame,) = record_frames(raws, zstandard.ZstdCompressor(level=3))
    assert frame.type == FrameType.RECORDS_ZSTD
    assert frame.wire_size < sum(map(len, raws)) / 10
    assert parse_records(frame) == raws


def test_record_frames_ok_batch_runs_of_small_records_large_ones_alone() -> None:
    """With batch, runs of records under BATCH_RECORD go as RECORDS frames of up to
    BATCH_FRAME bytes, in order; a larger one goes alone, as a lone small one does."""
    def write(n: int, size: int) -> bytes:
        return Record(Op.WRITE, 1, n, path=b"f", offset=0, data=bytes(size)).encode()

    small, big = [write(n, 100) for n in range(3)], write(3, BATCH_RECORD)
    frames = record_frames([*small[:2], big, small[2]], None, batch=True)
    assert [f.type for f in frames] == [FrameType.RECORDS, FrameType.RECORD, FrameType.RECORD]
    assert parse_plain_records(frames[0]) == small[:2]
    assert [frames[1].payload, frames[2].payload] == [big, small[2]]
    many = [write(n, 60 << 10) for n in range(40)]  # 2.4 MiB: three frames
    frames = record_frames(many, None, batch=True)
    assert len(frames) == 3 and all(f.type == FrameType.RECORDS for f in frames)
    assert all(len(f.payload) <= BATCH_FRAME for f in frames)
    assert [raw for f in frames for raw in parse_plain_records(f)] == many


@pytest.mark.parametrize(("payload", "match"), [
    (b"", "no records"),
    (b"\x00\x00", "inside a length"),
    (b"\x00\x00\x00\x09abc", "inside a record"),
])
def test_parse_plain_records_err(payload: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        parse_plain_records(Frame(FrameType.RECORDS, payload))


def test_record_frames_ok_plain_when_not_smaller_or_off() -> None:
    raws = [Record(Op.WRITE, 1, n, path=b"f", offset=0, data=os.urandom(4096)).encode()
            for n in range(3)]
    for compressor in (zstandard.ZstdCompressor(level=3), None):
        frames = record_frames(raws, compressor)
        assert frames == [Frame(FrameType.RECORD, raw) for raw in raws]


def test_packer_ok_after_a_batch_zstd_could_not_shrink_tries_again_past_skip_bytes(
        ) -> None:
    """Past a batch zstd could not make smaller, the next SKIP_BYTES go plain without
    a try, even ones it could shrink; after them it tries again."""
    def batch(*data: bytes) -> list[bytes]:
        return [Record(Op.WRITE, 1, n, path=b"f", offset=0, data=d).encode()
                for n, d in enumerate(data)]

    noise = batch(*(os.urandom(64 << 10) for _ in range(4)))
    text = batch(*[b"a log line\n" * 6000] * 4)
    packer = Packer(zstandard.ZstdCompressor(level=3))
    assert packer.frames(text)[0].type == FrameType.RECORDS_ZSTD
    assert packer.frames(noise) == [Frame(FrameType.RECORD, raw) for raw in noise]
    plain = 0
    while plain < Packer.SKIP_BYTES:
        assert packer.frames(text)[0].type == FrameType.RECORD, "not tried"
        plain += sum(map(len, text))
    (frame,) = packer.frames(text)
    assert frame.type == FrameType.RECORDS_ZSTD and parse_records(frame) == text
    assert Packer(None).frames(text) == [Frame(FrameType.RECORD, raw) for raw in text]


def zstd_frame(plain: bytes, **kw: bool) -> Frame:
    return Frame(FrameType.RECORDS_ZSTD, zstandard.ZstdCompressor(**kw).compress(plain))


@pytest.mark.parametrize(("frame", "match"), [
    (Frame(FrameType.RECORDS_ZSTD, b"not zstd at all"), "uncompressed"),
    (zstd_frame(b"x" * 100, write_content_size=False), "uncompressed"),
    (zstd_frame(b""), "uncompressed"),
    (zstd_frame(b"\x00\x00"), "inside a length"),
    (zstd_frame(b"\x00\x00\x00\x09abc"), "inside a record"),
    (Frame(FrameType.RECORDS_ZSTD, SPECS["records-zstd"].payload[:-6]), "decompress"),
])
def test_parse_records_err(frame: Frame, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        parse_records(frame)


def test_parse_records_err_bomb() -> None:
    """A frame that claims more than MAX_FRAME bytes is refused before any is made."""
    big = zstandard.ZstdCompressor().compress(bytes(MAX_FRAME + 1))
    with pytest.raises(ProtocolError, match="uncompressed"):
        parse_records(Frame(FrameType.RECORDS_ZSTD, big))
