"""The journal's log: append-only segment files of checksummed entries.

A segment is a file named by the log position of its first byte (16 hex
digits, ``.log``); positions grow across segments, so a position names one
byte of the log for as long as its segment lives. Each entry (big-endian)::

    u32 length     of the body
    u8  kind       Kind
    ...            the body
    u64 checksum   xxh3_64 of every byte before it

Entries are only ever appended, so a crash of the process loses nothing
that ``write()`` took, and a power cut loses at most what came after the
last ``sync()``: on open, the log is read from the start and ends at the
first entry that is short or fails its checksum (torn, or never written:
the pages a cut dropped read as zeros or as older bytes), and everything
from there on is cut off. ``sync()`` is one ``fdatasync`` of the segment
being written (and of the directory, after a new segment), shared by every
caller waiting meanwhile.

Small entries are written into space zero-filled ahead of them
(PREPARE_BYTES at a time): overwriting blocks that are already allocated
and written leaves the file's size and extents unchanged, so a
``fdatasync`` writes the data and flushes the disk's cache without a
commit of the filesystem's journal. On ext4 here that halves the flush
(150 against 330 µs for 4 KiB at p50); the zeros' own commit comes once
per PREPARE_BYTES. Zeros after the last entry are the log's clean end, not
a torn entry; a torn tail is cut off at open, zeros and all.

An entry is appended from its pieces (its head, the body as the caller
gives it, its checksum): a large one with one ``pwritev``, so a record's
data is never copied on its way in; below VECTOR_BYTES they are joined.

This module, ``store/records.py`` and ``store/notes.py`` pack the journal's bytes.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import xxhash

from store.private import FILE_MODE
from store.reserve import Reserve, disk_full

SEGMENT_BYTES = 64 << 20
# Zeros written ahead of the end of the segment being written: one flush in
# this many bytes of small entries pays for the filesystem's journal commit.
PREPARE_BYTES = 1 << 20
# An entry at least this large is written from its pieces, not joined first: a copy of
# a 1 MiB write's data cost more than the rest of its journaling.
VECTOR_BYTES = 64 << 10
MAX_ENTRY = (64 << 20) + (1 << 20)  # a record's largest blob, and room for its fields
_HEAD = struct.Struct(">IB")
_SUM = struct.Struct(">Q")
_KEYED = struct.Struct(">H")
OVERHEAD = _HEAD.size + _SUM.size
_READ_CHUNK = 8 << 20
DEAD = ".dead"  # a segment out of the log, to be removed


class Kind(enum.IntEnum):
    RECORD = 1  # an encoded record (store/records.py)
    INTENT = 2  # the intent of the record that follows: u16 key length, key, intent
    META = 3  # u16 key length, key, value
    META_DEL = 4  # the key alone
    DIRTY = 5  # u16 path length, path, encoded ranges (none: the path is clean)
    DIRTY_CLEAR = 6  # empty
    NOTES = 7  # notes added to the activity log (store/notes.py encode_notes)
    NOTES_RESET = 8  # the activity log's notes from here on, in place of all before


def keyed(key: bytes, value: bytes) -> bytes:
    """The body of a META, DIRTY or INTENT entry."""
    return _KEYED.pack(len(key)) + key + value


def unkey(body: bytes) -> tuple[bytes, bytes]:
    """(key, value) of a body made by ``keyed``. Raises ValueError if malformed."""
    if len(body) < _KEYED.size:
        raise ValueError("keyed body too short")
    (length,) = _KEYED.unpack_from(body)
    if _KEYED.size + length > len(body):
        raise ValueError("keyed body shorter than its key")
    return body[_KEYED.size : _KEYED.size + length], body[_KEYED.size + length :]


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    written = os.pwrite(fd, data, offset)
    while written < len(data):
        written += os.pwrite(fd, data[written:], offset + written)


def _pwritev(fd: int, parts: list[bytes], size: int, offset: int) -> None:
    """Write *parts* (*size* bytes in all) one after another from *offset*, all of
    them or raise. Small ones are joined first: one copy of a few KiB costs less
    than the kernel's walk of many pieces."""
    if size < VECTOR_BYTES:
        _pwrite(fd, b"".join(parts), offset)
        return
    written = os.pwritev(fd, parts, offset)
    if written < size:  # short: rare (a full disk on the way); the rest in one piece
        _pwrite(fd, b"".join(parts)[written:], offset + written)


def _zeros(fd: int, offset: int, size: int) -> bool:
    """True if the *fd*'s bytes from *offset* to *size* are all zeros."""
    while offset < size:
        chunk = os.pread(fd, min(_READ_CHUNK, size - offset), offset)
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False
        offset += len(chunk)
    return True


def _entry(kind: Kind, body: list[bytes], length: int) -> list[bytes]:
    """The entry of *body* (given in pieces, *length* bytes in all), in pieces: none
    of them copied."""
    head = _HEAD.pack(length, kind)
    checksum = xxhash.xxh3_64(head)
    for part in body:
        checksum.update(part)
    return [head, *body, _SUM.pack(checksum.intdigest())]


# Called for each entry found on open: (kind, body, log position of the body).
Replay = Callable[[Kind, bytes, int], None]


class Log:
    """The segment files of one directory. Appends and reads come from any
    thread but never two appends at once (the journal's caller serialises them);
    ``sync()`` may run beside them."""

    def __init__(self, path: Path, replay: Replay, *, read_only: bool = False) -> None:
        """Open the log in *path*, calling *replay* for each entry in order.

        A torn tail is cut off and a missing log begun, unless *read_only*.
        """
        self.path = path
        self.read_only = read_only
        self.torn: int | None = None  # where the log ended in a damaged entry, if it did
        self._fds: dict[int, int] = {}  # segment base -> fd (read and write)
        self._prepared = 0  # the size of the segment being written: zeros past its end
        self._sync_lock = threading.Lock()
        self._dir_synced = True
        self.remover: threading.Thread | None = None  # removing dropped segments
        self.reserve: Reserve | None = None  # room for spare entries (store/reserve.py)
        if not read_only:
            _remove(sorted(path.glob("*" + DEAD)))
            self.reserve = Reserve(path)
        bases = sorted(int(p.stem, 16) for p in path.glob("*.log")
                       if len(p.stem) == 16 and all(c in "0123456789abcdef" for c in p.stem))
        self.end = bases[0] if bases else 0
        for index, base in enumerate(bases):
            if base != self.end:  # the segment before ended early: a cut shortened it
                self._drop(bases[index:])
                break
            mode = os.O_RDONLY if read_only else os.O_RDWR
            fd = self._fds[base] = os.open(self._name(base), mode | os.O_CLOEXEC)
            if not self._scan(base, fd, replay):
                self.torn = self.end
            if self.torn is not None and not read_only:
                # A cut tore the log here: nothing after it was ever synced.
                os.ftruncate(fd, self.end - base)
                os.fsync(fd)
                self._drop(bases[index + 1 :])
                break
        if not self._fds and not read_only:
            self._new_segment(self.end)
        self.base = max(self._fds, default=0)
        if not read_only:
            self._prepared = os.fstat(self._fds[self.base]).st_size
        self.durable = self.end if read_only else 0
        self._synced_upto = self.base  # segments before this base are synced
        if not read_only:
            self.sync()

    def _name(self, base: int) -> Path:
        return self.path / f"{base:016x}.log"

    def _scan(self, base: int, fd: int, replay: Replay) -> bool:
        """Replay the entries of one segment; False if it ends in a torn entry (not
        in zeros up to the end of the file, or at it)."""
        size = os.fstat(fd).st_size
        offset, buf, buf_at = 0, memoryview(b""), 0
        while offset < size:
            if offset + _HEAD.size > buf_at + len(buf):
                buf, buf_at = memoryview(os.pread(fd, _READ_CHUNK, offset)), offset
            at = offset - buf_at  # a view into buf: no copy of the rest of the chunk
            if len(buf) - at < _HEAD.size:
                break
            length, kind = _HEAD.unpack_from(buf, at)
            total = _HEAD.size + length + _SUM.size
            if length > MAX_ENTRY or kind not in Kind._value2member_map_:
                break
            if len(buf) - at < total:
                buf, buf_at, at = memoryview(os.pread(fd, max(_READ_CHUNK, total), offset)), \
                    offset, 0
                if len(buf) < total:
                    break
            (want,) = _SUM.unpack_from(buf, at + total - _SUM.size)
            if xxhash.xxh3_64_intdigest(buf[at : at + total - _SUM.size]) != want:
                break
            replay(Kind(kind), bytes(buf[at + _HEAD.size : at + _HEAD.size + length]),
                   base + offset + _HEAD.size)
            offset += total
        self.end = base + offset
        return _zeros(fd, offset, size)

    def _drop(self, bases: list[int]) -> None:
        if self.read_only:
            return
        for base in bases:
            os.unlink(self._name(base))
        self._sync_dir()

    def _new_segment(self, base: int) -> None:
        fd = os.open(self._name(base), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     FILE_MODE)
        self._fds[base] = fd
        self.base = base
        self._prepared = 0
        self._dir_synced = False

    def append(self, kind: Kind, body: bytes | list[bytes], *, spare: bool = False) -> int:
        """Append one entry; returns the log position of its body. A body given as a
        list of pieces is written as they are (a record's data is not copied). A
        *spare* entry (all but those that take new room at the application's own
        call) may use the reserve when the disk is full; any other fails then
        (store/reserve.py).

        Raises OSError (ENOSPC...) with the log unchanged.
        """
        pieces = body if isinstance(body, list) else [body]
        length = sum(map(len, pieces))
        entry, size = _entry(kind, pieces, length), length + OVERHEAD
        assert self.reserve is not None, "a read-only log takes no entries"
        if not spare:
            self.reserve.admit()
        try:
            at = self._append(entry, size)
        except OSError as exc:
            if not (spare and disk_full(exc) and self.reserve.give_up()):
                raise
            at = self._append(entry, size)
        return at

    def _append(self, entry: list[bytes], size: int) -> int:
        if self.end - self.base + size > SEGMENT_BYTES and self.end > self.base:
            self._new_segment(self.end)
        fd, at = self._fds[self.base], self.end - self.base
        if self._prepared < at + size < at + PREPARE_BYTES:
            with contextlib.suppress(OSError):  # no room ahead: the entry alone, then
                self._prepare(fd, at + size + PREPARE_BYTES)
        try:
            _pwritev(fd, entry, size, at)
        except OSError:
            os.ftruncate(fd, at)  # no torn entry stays behind
            self._prepared = at
            raise
        self.end += size
        self._prepared = max(self._prepared, at + size)
        return self.end - size + _HEAD.size

    def _prepare(self, fd: int, size: int) -> None:
        """Zero-fill the segment being written up to *size* bytes (see the module comment)."""
        try:
            _pwrite(fd, bytes(size - self._prepared), self._prepared)
        except OSError:
            os.ftruncate(fd, self._prepared)
            raise
        self._prepared = size

    def sync(self) -> int:
        """Make every entry appended so far durable; returns the position it reached."""
        with self._sync_lock:
            end, base = self.end, self.base
            for segment in list(self._fds):
                if self._synced_upto <= segment <= base:
                    os.fdatasync(self._fds[segment])
            if not self._dir_synced:
                self._dir_synced = True
                self._sync_dir()
            self._synced_upto = base
            self.durable = max(self.durable, end)
            return self.durable

    def _sync_dir(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def is_last(self, pos: int, length: int) -> bool:
        """Whether the entry whose body lies at *pos* (*length* bytes) ends the log."""
        return pos + length + _SUM.size == self.end

    def read(self, pos: int, length: int) -> bytes:
        """*length* bytes at log position *pos* (inside one segment)."""
        base = max(b for b in self._fds if b <= pos)
        return os.pread(self._fds[base], length, pos - base)

    def drop_before(self, pos: int) -> None:
        """Delete the segments that end at or before *pos* (never the one written).

        What the journal keeps of them (its meta values, dirty map and notes) was
        written again at the head of a later segment: that is made durable first.
        Each goes out of the log at once, renamed to ``.dead``, and is removed by a
        thread of its own: freeing a 64 MiB file took 13-31 ms here, which the
        caller (holding the capture's lock, in trio's thread) would wait for. A
        ``.dead`` file a stop left behind is removed at the next open.
        """
        bases = sorted(self._fds)
        doomed = [base for base, following in itertools.pairwise(bases) if following <= pos]
        if not doomed:
            return
        self.sync()
        dead = []
        with self._sync_lock:
            for base in doomed:
                os.close(self._fds.pop(base))
                dead.append(self._name(base).with_suffix(DEAD))
                os.rename(self._name(base), dead[-1])
        self.remover = threading.Thread(target=_remove, args=(dead,), name="log-remove",
                                        daemon=True)
        self.remover.start()

    def close(self) -> None:
        if not self.read_only:
            self.sync()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self.reserve is not None:
            self.reserve.close()


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
