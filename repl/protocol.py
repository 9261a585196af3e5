"""Frames on the replication streams: length-prefixed, typed, checksummed.

A connection opens with MAGIC (so a peer that is not replfs is told apart
from one speaking garbage), then carries frames::

    u32 length            of type + payload
    u8  type              FrameType
    ... payload
    u64 checksum          xxh3_64 of type + payload

A frame whose checksum does not match is never used: the stream can no
longer be trusted, so the receiver counts it and drops the connection, and
everything not acknowledged is sent again on the next one.

Compression is negotiated in the HELLOs, within protocol version 1: the
primary offers ``"compress": ["zstd"]``, and a secondary that takes it
answers ``"compress": "zstd"``. Only then may the primary send RECORDS_ZSTD
frames (each a run of records, compressed together); a peer from before
compression ignores the offer, answers without it, and gets plain RECORD
frames; a primary that offers nothing is served plainly.

Progress is offered the same way: a primary that sends ``"progress": true``
gets APPLYING frames while the secondary applies a set, each naming the
record it has reached, so a long apply is not taken for a stall. A
transport that polls the secondary's state (iSCSI, FCIP) carries none.

Runs of plain records the same way: a primary that offers ``"batch": true``
and a secondary that answers ``"batch": true`` carry small records not
compressed as RECORDS frames, many a frame, where a peer that does not
takes one RECORD frame a record.

And receipts: a primary whose fsyncs wait for a secondary's receipt
(``--fsync received``) sends ``"receipts": true``; a secondary that takes it
answers ``"receipts": true`` and sends, for each frame of records, a RECEIVED
frame as soon as it has read and checked them (in its memory, not yet
staged), before the STAGED frame of any of them. A primary answered without
it waits for STAGED instead.

Only format modules pack bytes: this one and the record's (``store/records.py``).
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

import trio
import xxhash
import zstandard

from repl.errors import ProtocolError
from store.records import decode_key, decode_set, encode_key, encode_set

MAGIC = b"REPLFS\x00\x01"
PROTOCOL_VERSION = 1
ZSTD = "zstd"  # the one compression offered in a HELLO
BATCH_RECORD = 64 << 10  # plain records this large go in a RECORD frame of their own
BATCH_FRAME = 1 << 20  # a RECORDS frame's payload stops growing past this
MAX_FRAME = 80 << 20
MAX_HELLO_FRAME = 1 << 20  # before a peer is known, it may not make us buffer more
MAX_STREAMS = 8  # streams of one primary's session a secondary accepts
CLOSE_SECONDS = 1.0  # a TLS close says close_notify first: a peer reading nothing gets this long

_LENGTH = struct.Struct(">I")
_HEAD = struct.Struct(">IB")  # length, type
_CHECKSUM = struct.Struct(">Q")
_KEY_SIZE = 12
_DECOMPRESSOR = zstandard.ZstdDecompressor()


class FrameType(enum.IntEnum):
    HELLO = 1  # JSON: who I am (both ways); the secondary's answer says where to start
    RECORD = 2  # one encoded store.records.Record
    STAGED = 3  # (set, seq) keys now durable in the secondary's staging store
    APPLIED = 4  # u64 set id: the replica now equals the primary at that set's close
    ERROR = 5  # UTF-8 text: why the peer is refused; the connection closes after it
    RESET_TO = 6  # u64 set id: an initial sync begins there; older sets are moot
    RECORDS_ZSTD = 7  # zstd of (u32 length, encoded record)*: only once negotiated
    APPLYING = 8  # (set, seq) key: the applier is at that record; only if offered
    RECEIVED = 9  # (set, seq) keys read and checked, not yet staged; only if asked for
    RECORDS = 10  # (u32 length, encoded record)*, plain: only once negotiated


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    payload: bytes

    def encode(self) -> bytes:
        return b"".join(self.parts())

    @property
    def wire_size(self) -> int:
        """Bytes the frame takes on the wire."""
        return _HEAD.size + len(self.payload) + _CHECKSUM.size

    def parts(self) -> tuple[bytes, bytes, bytes]:
        """The encoded frame in three pieces, so a payload is copied only once, by the
        join that puts a batch of frames on the wire."""
        head = _HEAD.pack(1 + len(self.payload), self.type)
        checksum = xxhash.xxh3_64(head[_LENGTH.size :])
        checksum.update(self.payload)
        return head, self.payload, _CHECKSUM.pack(checksum.intdigest())


def hello(**fields: Any) -> Frame:
    return Frame(FrameType.HELLO, json.dumps(fields, sort_keys=True).encode())


def parse_hello(frame: Frame) -> dict[str, Any]:
    if frame.type == FrameType.ERROR:
        raise ProtocolError(f"peer refused us: {frame.payload.decode(errors='replace')}")
    if frame.type != FrameType.HELLO:
        raise ProtocolError(f"expected HELLO, got {frame.type.name}")
    try:
        fields = json.loads(frame.payload)
    except (ValueError, RecursionError):  # RecursionError: arrays nested too deep
        raise ProtocolError("HELLO is not JSON") from None
    if not isinstance(fields, dict):
        raise ProtocolError("HELLO is not a JSON object")
    return fields


def record_frames(raws: list[bytes], compressor: zstandard.ZstdCompressor | None,
                  batch: bool = False) -> list[Frame]:
    """Frames that carry the encoded records *raws*, in order: one RECORDS_ZSTD frame if
    a *compressor* is given and makes them smaller, else plain frames: with *batch*,
    runs of records under BATCH_RECORD bytes as RECORDS frames of up to BATCH_FRAME
    bytes, else (and for larger records) a RECORD frame each."""
    if compressor is not None and raws:
        plain = _joined(raws)
        packed = compressor.compress(plain)
        if len(packed) < len(plain) and len(plain) <= MAX_FRAME:
            return [Frame(FrameType.RECORDS_ZSTD, packed)]
    if not batch:
        return [Frame(FrameType.RECORD, raw) for raw in raws]
    frames: list[Frame] = []
    run: list[bytes] = []
    size = 0
    for raw in raws:
        if run and (len(raw) >= BATCH_RECORD or size + len(raw) > BATCH_FRAME):
            frames.append(_plain(run))
            run, size = [], 0
        if len(raw) >= BATCH_RECORD:
            frames.append(Frame(FrameType.RECORD, raw))
        else:
            run.append(raw)
            size += _LENGTH.size + len(raw)
    if run:
        frames.append(_plain(run))
    return frames


def _joined(raws: list[bytes]) -> bytes:
    return b"".join(part for raw in raws for part in (_LENGTH.pack(len(raw)), raw))


def _plain(run: list[bytes]) -> Frame:
    return (Frame(FrameType.RECORD, run[0]) if len(run) == 1 else
            Frame(FrameType.RECORDS, _joined(run)))


class Packer:
    """``record_frames`` for one stream of batches, trying zstd only where it pays.

    A batch *compressor* could not make smaller goes plain, and so do the next
    SKIP_BYTES without a try: media, encrypted or already compressed data cost the
    primary a second of CPU a GiB in the attempt (here). Then it tries again.
    """

    SKIP_BYTES = 16 << 20

    def __init__(self, compressor: zstandard.ZstdCompressor | None, batch: bool = False
                 ) -> None:
        self.compressor = compressor
        self.batch = batch  # plain records may go as RECORDS frames
        self.skip = 0  # bytes still to send plain without trying

    def frames(self, raws: list[bytes]) -> list[Frame]:
        if self.compressor is None or self.skip > 0:
            self.skip -= sum(map(len, raws))
            return record_frames(raws, None, self.batch)
        frames = record_frames(raws, self.compressor, self.batch)
        if frames[0].type != FrameType.RECORDS_ZSTD:
            self.skip = self.SKIP_BYTES
        return frames


def parse_records(frame: Frame) -> list[bytes]:
    """The encoded records a RECORDS_ZSTD frame carries. Raises ProtocolError if it does
    not decompress to whole records within MAX_FRAME bytes."""
    try:
        size = zstandard.frame_content_size(frame.payload)
    except zstandard.ZstdError:
        size = -1  # not a zstd frame
    if not 0 < size <= MAX_FRAME:
        raise ProtocolError(f"RECORDS_ZSTD frame of {size} bytes uncompressed")
    try:
        plain = _DECOMPRESSOR.decompress(frame.payload)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"RECORDS_ZSTD frame does not decompress: {exc}") from None
    return _split(plain, "RECORDS_ZSTD")


def parse_plain_records(frame: Frame) -> list[bytes]:
    """The encoded records a RECORDS frame carries. Raises ProtocolError if it does not
    hold whole records, at least one."""
    raws = _split(frame.payload, "RECORDS")
    if not raws:
        raise ProtocolError("RECORDS frame of no records")
    return raws


def _split(plain: bytes, kind: str) -> list[bytes]:
    raws, pos = [], 0
    while pos < len(plain):
        if pos + _LENGTH.size > len(plain):
            raise ProtocolError(f"{kind} frame ends inside a length")
        (length,) = _LENGTH.unpack_from(plain, pos)
        pos += _LENGTH.size
        if pos + length > len(plain):
            raise ProtocolError(f"{kind} frame ends inside a record")
        raws.append(plain[pos : pos + length])
        pos += length
    return raws


def staged(keys: list[tuple[int, int]]) -> Frame:
    """The frame saying the records *keys* are staged, durably."""
    return Frame(FrameType.STAGED, _keys(keys))


def received(keys: list[tuple[int, int]]) -> Frame:
    """The frame saying the records *keys* were read and checked, not yet staged."""
    return Frame(FrameType.RECEIVED, _keys(keys))


def _keys(keys: list[tuple[int, int]]) -> bytes:
    return b"".join(encode_key(s, q) for s, q in keys)


def parse_keys(frame: Frame) -> list[tuple[int, int]]:
    """The keys of a STAGED or RECEIVED frame."""
    p = frame.payload
    if len(p) % _KEY_SIZE:
        raise ProtocolError(f"{frame.type.name} payload of {len(p)} bytes")
    return [decode_key(p[i : i + _KEY_SIZE]) for i in range(0, len(p), _KEY_SIZE)]


def reset_to(set_id: int) -> Frame:
    return Frame(FrameType.RESET_TO, encode_set(set_id))


def applied(set_id: int) -> Frame:
    return Frame(FrameType.APPLIED, encode_set(set_id))


def applying(set_id: int, seq: int) -> Frame:
    return Frame(FrameType.APPLYING, encode_key(set_id, seq))


def parse_applying(frame: Frame) -> tuple[int, int]:
    if len(frame.payload) != _KEY_SIZE:
        raise ProtocolError(f"APPLYING payload of {len(frame.payload)} bytes")
    return decode_key(frame.payload)


def parse_applied(frame: Frame) -> int:
    """The set id an APPLIED or RESET_TO frame carries."""
    if len(frame.payload) != 8:
        raise ProtocolError(f"{frame.type.name} payload of {len(frame.payload)} bytes")
    return decode_set(frame.payload)


class FrameReader:
    """Decode frames from a byte stream: length -> body -> checksum, then hand out.

    Feed it bytes with ``feed()``; ``next()`` returns a whole, verified frame
    or None when more bytes are needed. Raises ProtocolError on a bad length,
    an unknown type or a checksum mismatch; the stream is then unusable.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0  # frames before it are consumed; compacted on feed

    def feed(self, data: bytes | bytearray) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next(self) -> Frame | None:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(buf, pos)
        if not 1 <= length <= self.max_frame:
            raise ProtocolError(f"bad frame length {length}")
        start = pos + _LENGTH.size
        if len(buf) < start + length + _CHECKSUM.size:
            return None
        body = memoryview(buf)[start : start + length]
        try:
            (want,) = _CHECKSUM.unpack_from(buf, start + length)
            self._pos = start + length + _CHECKSUM.size
            if xxhash.xxh3_64_intdigest(body) != want:
                raise ProtocolError("frame checksum mismatch")
            try:
                kind = FrameType(body[0])
            except ValueError:
                raise ProtocolError(f"unknown frame type {body[0]}") from None
            return Frame(kind, bytes(body[1:]))
        finally:
            body.release()  # the buffer must not stay exported: feed() resizes it


class Connection:
    """One replication stream: MAGIC, then frames both ways."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._reader = FrameReader(MAX_HELLO_FRAME)  # raised once the handshake is done


    async def send_magic(self) -> None:
        await self.stream.send_all(MAGIC)

    async def expect_magic(self) -> None:
        got = b""
        while len(got) < len(MAGIC):
            chunk = await self.stream.receive_some(len(MAGIC) - len(got))
            if not chunk:
                raise ProtocolError("peer closed before saying who it is")
            got += chunk
        if got[:6] != MAGIC[:6]:
            raise ProtocolError(f"peer is not replfs (it sent {got!r})")
        if got != MAGIC:
            theirs, ours = int.from_bytes(got[6:], "big"), int.from_bytes(MAGIC[6:], "big")
            raise ProtocolError(f"peer speaks replfs wire version {theirs}, we speak {ours}")

    def handshake_done(self) -> None:
        """The peer is known now: accept frames of any valid size."""
        self._reader.max_frame = MAX_FRAME

    async def send(self, *frames: Frame) -> None:
        await self.stream.send_all(b"".join([part for f in frames for part in f.parts()]))

    async def receive(self) -> Frame:
        """The next frame. Raises trio.EndOfChannel when the peer closed cleanly."""
        while True:
            frame = self._reader.next()
            if frame is not None:
                return frame
            data = await self.stream.receive_some(1 << 20)
            if not data:
                raise trio.EndOfChannel
            self._reader.feed(data)

    async def aclose(self) -> None:
        """Close the stream; over TLS, after a close_notify if it leaves within
        CLOSE_SECONDS (then the socket is closed regardless)."""
        with trio.move_on_after(CLOSE_SECONDS):
            await self.stream.aclose()
