"""The activity log's notes (repl/activity.py): what an op may change in BACKING.

A batch of notes (big-endian): u32 count, then per note::

    u8  kind       NoteKind
    u16 path length, path
    u64 start, u64 end     DATA: the byte range; 0, 0 for the other kinds
    u16 name length, name  XATTR: the attribute's name; empty for the other kinds

A batch is the body of one entry of the journal's log, which checksums it.
A format module: it packs bytes, as ``store/records.py`` does.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from store.errors import RecordError
from store.records import MAX_OFFSET, check_path

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class NoteKind(enum.IntEnum):
    NAME = 1  # names at or under the path may be made, removed or replaced
    DATA = 2  # bytes [start, end) of the file at the path (end MAX_OFFSET: to its end)
    ATTR = 3  # mode, owner and times of the node at the path
    XATTR = 4  # the extended attribute ``name`` of the node at the path


XATTR_NAME_MAX = 255
_NOTE_HEAD = struct.Struct(">BH")
_NOTE_RANGE = struct.Struct(">QQ")
_NOTE_MIN = _NOTE_HEAD.size + _NOTE_RANGE.size + _U16.size


@dataclass(frozen=True, slots=True)
class Note:
    """What an op may change in the backing directory before its record is durable."""

    kind: NoteKind
    path: bytes
    start: int = 0
    end: int = 0
    name: bytes = b""

    def validate(self) -> None:
        """Check the rules a note must keep; raise RecordError on the first broken."""
        check_path(self.path, root_ok=self.kind != NoteKind.NAME)
        if self.kind == NoteKind.DATA and not 0 <= self.start < self.end <= MAX_OFFSET:
            raise RecordError(f"data note range [{self.start}, {self.end}) out of order "
                              "or range")
        if self.kind != NoteKind.DATA and (self.start or self.end):
            raise RecordError(f"{self.kind.name} note with a range")
        if self.kind == NoteKind.XATTR and not self.name:
            raise RecordError("xattr note without a name")
        if self.kind != NoteKind.XATTR and self.name:
            raise RecordError(f"{self.kind.name} note with a name")
        if len(self.name) > XATTR_NAME_MAX or b"\0" in self.name:
            raise RecordError(f"xattr name {self.name[:64]!r} too long or contains NUL")


def encode_notes(notes: list[Note]) -> bytes:
    parts = [_U32.pack(len(notes))]
    for note in notes:
        note.validate()
        parts += (_NOTE_HEAD.pack(note.kind, len(note.path)), note.path,
                  _NOTE_RANGE.pack(note.start, note.end), _U16.pack(len(note.name)), note.name)
    return b"".join(parts)


def decode_notes(buf: bytes | memoryview) -> list[Note]:
    """Decode a batch of notes that fills *buf* exactly.

    Raises:
        RecordError: truncated input, trailing bytes, more notes than the bytes can
            hold, an unknown kind, or a note that fails ``validate()``.
    """
    buf = memoryview(buf)
    try:
        (count,) = _U32.unpack_from(buf)
        if count * _NOTE_MIN > len(buf) - _U32.size:
            raise RecordError(f"{count} notes cannot fit in {len(buf)} bytes")
        notes, pos = [], _U32.size
        for _ in range(count):
            kind, length = _NOTE_HEAD.unpack_from(buf, pos)
            pos += _NOTE_HEAD.size
            path = bytes(buf[pos : pos + length])
            pos += length
            start, end = _NOTE_RANGE.unpack_from(buf, pos)
            (name_length,) = _U16.unpack_from(buf, pos + _NOTE_RANGE.size)
            pos += _NOTE_RANGE.size + _U16.size
            name = bytes(buf[pos : pos + name_length])
            pos += name_length
            if len(path) != length or len(name) != name_length:
                raise RecordError("truncated note")
            try:
                note = Note(NoteKind(kind), path, start, end, name)
            except ValueError:
                raise RecordError(f"unknown note kind {kind}") from None
            note.validate()
            notes.append(note)
    except struct.error:
        raise RecordError("truncated notes") from None
    if pos != len(buf):
        raise RecordError(f"{len(buf) - pos} trailing bytes after the notes")
    return notes
