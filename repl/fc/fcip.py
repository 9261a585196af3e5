"""FCIP (RFC 3821): FC frames over a TCP connection, in RFC 3643's encapsulation.

Each FC frame on the connection is one encapsulated frame::

    word 0    Protocol# 1 (FCIP) | Version 1 | -Protocol# | -Version
    word 1    the same again (FCIP's protocol-specific word: a copy of word 0)
    word 2    pFlags | 0 | -pFlags | -0      pFlags: Ch 0x80 (changed), SF 0x01
    word 3    Flags (6 bits) | Frame Length (10 bits, in words, all of it) | ones'
              complement of both (Flags is 0: FCIP has no CRCV)
    word 4-5  time stamp (seconds, fraction): 0, the time is not kept
    word 6    CRC: 0 (reserved in FCIP)
    word 7    SOF | SOF | -SOF | -SOF
    ...       the FC frame: header, payload, CRC (frame.py)
    last      EOF | EOF | -EOF | -EOF

("-X" is X's ones' complement.) The receiver checks every copy and
complement, and that SOF and EOF are delimiters; an encapsulation that
fails one is an error that ends the connection (RFC 3821 section 5.6.2.2
lets an entity resynchronise instead; replfs starts a new connection).

The FCIP Special Frame (section 7) opens each connection, 19 words: the
header with SF set, a reserved word (0 | -0), then the source fabric's
WWN, the source FC/FCIP entity identifier, a nonce, the connection usage
flags and code, the destination fabric's WWN, K_A_TOV, and a reserved
word. The side that connected sends it; the other echoes it unchanged, or
with Ch set and its own WWN as the destination if the sender named
another (then the connection is closed, and may be opened again with the
right WWN).
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

import trio

from repl.errors import ProtocolError
from repl.fc.frame import HEADER_SIZE as FC_HEADER_SIZE
from repl.fc.frame import MAX_PAYLOAD, Eof, FcFrame, Sof, decode

PROTOCOL, VERSION = 1, 1
PORT = 3225  # FCIP's registered port
ENCAPSULATION = 28  # bytes of the encapsulation header
PF_CHANGED, PF_SPECIAL = 0x80, 0x01
USAGE_CLASS3 = 0x20  # connection usage flags: carries SOFi3/SOFn3 frames
FSF_WORDS = 19
MIN_WORDS = (ENCAPSULATION + 4 + FC_HEADER_SIZE + 4 + 4) // 4  # a frame with no payload
MAX_WORDS = MIN_WORDS + MAX_PAYLOAD // 4
_HEAD = struct.Struct(">I I BBBB HH II I")
_FSF = struct.Struct(">I QQQ BBH Q I I")
_RESERVED = 0x0000FFFF  # 0 | -0


def _complemented(a: int, b: int) -> int:
    """The word a | b | -a | -b."""
    return a << 24 | b << 16 | (~a & 0xFF) << 8 | (~b & 0xFF)


_PROTOCOL_WORD = _complemented(PROTOCOL, VERSION)


def _header(words: int, pflags: int = 0) -> bytes:
    return _HEAD.pack(_PROTOCOL_WORD, _PROTOCOL_WORD, pflags, 0, ~pflags & 0xFF, 0xFF,
                      words, ~words & 0xFFFF, 0, 0, 0)


_WORDS = {code: _complemented(code, code).to_bytes(4, "big") for code in (*Sof, *Eof)}


def encapsulate(frame: FcFrame) -> bytes:
    """*frame* as FCIP carries it: header, SOF, frame, EOF."""
    body = frame.encode()
    words = (ENCAPSULATION + 4 + len(body) + 4) // 4
    return b"".join((_header(words), _WORDS[frame.sof], body, _WORDS[frame.eof]))


def check_header(head: bytes) -> tuple[int, int]:
    """(pFlags, frame length in bytes) of a 28-byte encapsulation header. Raises
    ProtocolError on a copy or complement that does not match."""
    (w0, w1, pflags, reserved, npflags, nreserved, length, nlength, _, _, crc) = \
        _HEAD.unpack(head)
    if w0 != _PROTOCOL_WORD or w1 != w0:
        raise ProtocolError(f"not an FCIP encapsulation (protocol word {w0:#010x})")
    if pflags != ~npflags & 0xFF or reserved != 0 or nreserved != 0xFF:
        raise ProtocolError("FCIP pFlags and their complement differ")
    if pflags & ~(PF_CHANGED | PF_SPECIAL):
        raise ProtocolError(f"FCIP pFlags {pflags:#04x} not known")
    if length != ~nlength & 0xFFFF:
        raise ProtocolError("FCIP frame length and its complement differ")
    if length >> 10:
        raise ProtocolError(f"FCIP flags {length >> 10:#x} set (FCIP has none)")
    if crc != 0:
        raise ProtocolError("FCIP encapsulation CRC is not zero")
    if not pflags & PF_SPECIAL and not MIN_WORDS <= length <= MAX_WORDS:
        raise ProtocolError(f"FCIP frame of {length} words")
    if pflags & PF_SPECIAL and length != FSF_WORDS:
        raise ProtocolError(f"FCIP special frame of {length} words")
    return pflags, length * 4


def _delimiter(word: bytes, what: str) -> int:
    code = word[0]
    if word[1] != code or word[2] != ~code & 0xFF or word[3] != ~code & 0xFF:
        raise ProtocolError(f"FCIP {what} word {word.hex()} is not a delimiter and its "
                            "complement")
    return code


def decapsulate(data: bytes) -> FcFrame:
    """The FC frame in one whole encapsulated frame *data*. Raises ProtocolError."""
    pflags, size = check_header(data[:ENCAPSULATION])
    if len(data) != size:
        raise ProtocolError("not one whole encapsulated frame")
    return _frame(data, pflags)


def _frame(data: bytes, pflags: int) -> FcFrame:
    """The FC frame in *data*, whose header was checked."""
    if pflags & PF_SPECIAL:
        raise ProtocolError("not an encapsulated FC frame")
    sof = _delimiter(data[ENCAPSULATION : ENCAPSULATION + 4], "SOF")
    eof = _delimiter(data[-4:], "EOF")
    return decode(memoryview(data)[ENCAPSULATION + 4 : -4], sof, eof)


@dataclass(frozen=True, slots=True)
class SpecialFrame:
    """The FCIP Special Frame (RFC 3821 section 7)."""

    source_wwn: int
    entity_id: int
    nonce: int
    destination_wwn: int
    usage_flags: int = USAGE_CLASS3
    usage_code: int = 0
    ka_tov: int = 0  # ms; 0: this end sends no keep-alives
    changed: bool = False

    def encode(self) -> bytes:
        return _header(FSF_WORDS, PF_SPECIAL | (PF_CHANGED if self.changed else 0)) + \
            _FSF.pack(_RESERVED, self.source_wwn, self.entity_id, self.nonce,
                      self.usage_flags, 0, self.usage_code, self.destination_wwn,
                      self.ka_tov, _RESERVED)

    @classmethod
    def decode(cls, data: bytes) -> SpecialFrame:
        """Raises ProtocolError if *data* is not exactly one special frame."""
        pflags, size = check_header(data[:ENCAPSULATION])
        if not pflags & PF_SPECIAL or len(data) != size:
            raise ProtocolError("not an FCIP special frame")
        (first, source, entity, nonce, flags, _, code, destination, ka_tov, last) = \
            _FSF.unpack_from(data, ENCAPSULATION)
        if first != _RESERVED or last != _RESERVED:
            raise ProtocolError("FCIP special frame's reserved words are not 0 | -0")
        return cls(source, entity, nonce, destination, flags, code, ka_tov,
                   bool(pflags & PF_CHANGED))

    def echo(self, own_wwn: int) -> SpecialFrame:
        """The acceptor's answer: the same frame, or Ch set and *own_wwn* as the
        destination if the sender named another fabric."""
        if self.destination_wwn == own_wwn:
            return self
        return SpecialFrame(self.source_wwn, self.entity_id, self.nonce, own_wwn,
                            self.usage_flags, self.usage_code, self.ka_tov, changed=True)


class FcipStream:
    """FCIP frames over a byte stream. ``receive`` is cancel-safe: bytes read are kept.

    Over TCP each encapsulated frame is a TCP segment of its own (sent with
    MSG_EOR, so the kernel never adds the next one to it): tools that decode
    FCIP, Wireshark's dissector among them, read one frame from a segment.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()
        self._start = 0  # where the next frame begins in _buf
        self._send_lock = trio.Lock()
        self._sock: socket.socket | None = None
        if isinstance(stream, trio.SocketStream):
            self._sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
            self._sock.setblocking(False)

    async def send(self, *frames: FcFrame) -> None:
        """Send *frames* in order, none between them; writers take turns. Raises
        trio.BrokenResourceError if the connection broke."""
        async with self._send_lock:
            await self._write([encapsulate(frame) for frame in frames])

    async def send_special(self, frame: SpecialFrame) -> None:
        async with self._send_lock:
            await self._write([frame.encode()])

    async def _write(self, segments: list[bytes]) -> None:
        if self._sock is None:
            return await self.stream.send_all(b"".join(segments))
        await trio.lowlevel.checkpoint_if_cancelled()
        for segment in segments:
            view = memoryview(segment)
            while view:
                try:
                    sent = self._sock.send(view, socket.MSG_EOR)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self._sock)
                    continue
                except OSError as exc:
                    if self._sock.fileno() < 0:
                        raise trio.ClosedResourceError from None
                    raise trio.BrokenResourceError(exc) from exc
                view = view[sent:]
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive(self) -> FcFrame:
        """The next FC frame. Raises trio.EndOfChannel at a clean close between frames,
        ProtocolError for a malformed one or a special frame."""
        data, pflags = await self._next()
        return _frame(data, pflags)

    async def receive_special(self) -> SpecialFrame:
        """The special frame that opens a connection. Raises as ``receive`` does."""
        return SpecialFrame.decode((await self._next())[0])

    async def _next(self) -> tuple[bytes, int]:
        """The next encapsulated frame, whole, and its pFlags."""
        await self._fill(ENCAPSULATION)
        start = self._start
        pflags, size = check_header(bytes(self._buf[start : start + ENCAPSULATION]))
        await self._fill(size)
        start = self._start
        self._start += size
        return bytes(self._buf[start : start + size]), pflags

    async def _fill(self, size: int) -> None:
        """At least *size* bytes from ``_start`` on; what was read before is dropped."""
        while len(self._buf) - self._start < size:
            del self._buf[: self._start]
            self._start = 0
            chunk = await self.stream.receive_some(max(size - len(self._buf), 1 << 16))
            if not chunk:
                if self._buf:
                    raise trio.BrokenResourceError("the peer closed inside an FCIP frame")
                raise trio.EndOfChannel
            self._buf += chunk

    async def aclose(self) -> None:
        if self._sock is not None:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await self.stream.aclose()
