"""The primary's journal: every replicated op, in stream order, in a log.

The journal is the primary's durable copy of every change: records are
appended to a log of segment files (store/wal.py) before the op touches
the backing directory, so a killed daemon loses nothing that reached the
page cache; ``sync()`` makes everything appended so far durable with one
flush, shared by every fsync waiting meanwhile (group commit). Only
durable records are handed out for shipping (``read_raw``): a secondary
never holds a record that a power cut of the primary could take back.

An index in memory maps (set, seq) to where each record lies; it is rebuilt
by reading the log at open, and so is the dirty map's, which lives in a file
beside the log (``DIRTY_INDEX``, store/dirty.py) rather than in memory.
The journal's small meta values (identity, base, the budget's state), the
dirty map and the notes of the activity log (repl/activity.py) are entries
of the same log, written again at the head of each new segment, so dropping
old segments loses none of them.

Records stay until ``trim()``: the secondary reports a set applied, or the
journal runs over its budget with nobody to send to.
"""

from __future__ import annotations

import bisect
import logging
import os
import sqlite3
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from store import identity
from store.dirty import DirtyIndex, Ranges
from store.errors import RecordError, StoreError
from store.lmdbdir import lock_dir
from store.notes import Note, decode_notes, encode_notes
from store.private import private_dir
from store.records import (
    FALLOC_FL_PUNCH_HOLE,
    Op,
    Record,
    decode_ranges,
    decode_set,
    encode_ranges,
    encode_set,
    peek_key,
)
from store.reserve import disk_free
from store.wal import Kind, Log, keyed, unkey

log = logging.getLogger("replfs.journal")

_NEXT_SET = b"next_set"
_BASE = b"base"
_IDENTITY = b"identity"
_TRIMMED = b"trimmed"
DIRTY_INDEX = "dirty.index"  # the dirty map's index (store/dirty.py): made anew at open
# Ops that take new room at the application's own call: on a full disk they fail with
# ENOSPC, where the others may use the log's reserve (store/reserve.py). Not a write
# through the mount: the kernel took it already (a resync's copy of BACKING's data is
# journaled as not spare: see ``append``).
_TAKES_SPACE = frozenset({Op.FILE, Op.SETXATTR, Op.SYMLINK, Op.FALLOCATE, Op.CREATE,
                          Op.MKDIR, Op.MKNOD, Op.LINK})


class _Set:
    """Where the records of one set lie in the log, by seq."""

    __slots__ = ("pos", "size")

    def __init__(self) -> None:
        self.pos = array("Q")
        self.size = array("I")


def takes_space(record: Record) -> bool:
    """Whether *record*'s op takes new room at the application's call (a punched hole
    frees it)."""
    return record.op in _TAKES_SPACE and not (record.op == Op.FALLOCATE
                                              and record.flags & FALLOC_FL_PUNCH_HOLE)


def exists(path: os.PathLike[str] | str) -> bool:
    """True if *path* holds a journal."""
    return any(os.path.basename(p).endswith(".log") for p in _listdir(path))


def _listdir(path: os.PathLike[str] | str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


class Journal:
    """A journal directory, held exclusively by one daemon."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        """Open (or make) the journal at *path*.

        With *read_only*, only look: no lock taken, nothing written or cut off
        (``replfs dump`` of a live journal).
        """
        self.path = Path(path) if read_only else private_dir(path)
        if (self.path / "data.mdb").exists():
            raise StoreError(f"journal {self.path} was written by an older replfs (LMDB); "
                             "stop replication, move it aside and start again (the secondary "
                             "then gets an initial sync)")
        self._lock_fd = -1 if read_only else lock_dir(self.path / "LOCK")
        self._sets: dict[int, _Set] = {}
        self._order: list[int] = []  # the ids of self._sets, ascending
        self._meta: dict[bytes, bytes] = {}
        self.notes: list[Note] = []  # the activity log's notes in force (repl/activity.py)
        self._intent: tuple[bytes, bytes] | None = None
        self.bytes = 0  # of the records indexed, for the budget
        self._snapshotting = False
        self._snapshot_base = 0  # the segment whose head holds the last snapshot
        self._gaps: set[int] | None = set()  # sets whose first records lie in deleted segments
        self._note_bodies: list[bytes] = []  # the notes' entries in force, at open
        try:
            self.dirty = DirtyIndex(None if read_only else self.path / DIRTY_INDEX)
        except (OSError, sqlite3.Error) as exc:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
            raise StoreError(f"open journal {self.path}: dirty map index: {exc}") from exc
        try:
            self.log = Log(self.path, self._replay, read_only=read_only)
            self.notes = [n for body in self._note_bodies for n in decode_notes(body)]
            trimmed = decode_set(self._meta.get(_TRIMMED, encode_set(0)))
            torn = {s for s in self._gaps or () if s > trimmed}
            if torn:
                raise ValueError(f"the records of set {min(torn)} begin in a segment that "
                                 "is gone")
        except (OSError, RecordError, ValueError) as exc:
            self.dirty.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
            raise StoreError(f"open journal {self.path}: {exc}") from exc
        self._gaps, self._note_bodies = None, []
        self._snapshot_base = self.log.base
        self.identity = identity.parse(self._meta.get(_IDENTITY), make_cluster=True)
        if _IDENTITY not in self._meta and not read_only:
            self.put_meta(_IDENTITY, identity.dumps(self.identity))
            self.sync()
        self.set, self.seq = self._position()
        open_set = self._sets.get(self.set)
        self.set_bytes = sum(open_set.size) if open_set else 0
        if self.log.torn is not None and not read_only:
            log.warning("the journal's log ended in a damaged or unfinished entry at position "
                        "%d and was cut off there, in set %d: after a power cut, that is what "
                        "was never made durable; otherwise the disk damaged it",
                        self.log.torn, self.set)

    # --- reading the log at open ----------------------------------------------

    def _replay(self, kind: Kind, body: bytes, pos: int) -> None:
        if kind == Kind.RECORD:
            set_id, seq = peek_key(body)
            if set_id <= decode_set(self._meta.get(_TRIMMED, encode_set(0))):
                return
            self._index(set_id, seq, pos, len(body))
        elif kind == Kind.INTENT:
            self._intent = unkey(body)
        elif kind == Kind.META:
            key, value = unkey(body)
            self._meta[key] = value
            if key == _TRIMMED:
                self._drop_through(decode_set(value))
        elif kind == Kind.META_DEL:
            self._meta.pop(body, None)
        elif kind == Kind.DIRTY:
            path, raw = unkey(body)
            self.dirty.put(path, decode_ranges(raw))
        elif kind == Kind.DIRTY_CLEAR:
            self.dirty.clear()
        elif kind == Kind.NOTES:
            self._note_bodies.append(body)
        elif kind == Kind.NOTES_RESET:  # decoded once at the end: each one replaces all
            self._note_bodies = [body]

    def _index(self, set_id: int, seq: int, pos: int, size: int) -> None:
        if self._gaps is not None and (set_id in self._gaps or (
                seq > 0 and not (set_id in self._sets and self._sets[set_id].pos))):
            # At open: the set's start was in a segment dropped once a later trim
            # (further on in the log) took the whole set; that trim must come.
            self._gaps.add(set_id)
            return
        where = self._sets.get(set_id)
        if where is None:
            if self._order and set_id < self._order[-1]:
                raise StoreError(f"journal {self.path}: set {set_id} after set "
                                 f"{self._order[-1]}")
            where = self._sets[set_id] = _Set()
            self._order.append(set_id)
        if seq < len(where.pos):  # a record put again (voided, shortened)
            self.bytes += size - where.size[seq]
            where.pos[seq], where.size[seq] = pos, size
        elif seq == len(where.pos):
            where.pos.append(pos)
            where.size.append(size)
            self.bytes += size
        else:
            raise StoreError(f"journal {self.path}: record {set_id}/{seq} after "
                             f"{set_id}/{len(where.pos) - 1}")

    def _position(self) -> tuple[int, int]:
        """Where the next record goes: after the last one, or after the last trim."""
        raw = self._meta.get(_NEXT_SET)
        next_set = decode_set(raw) if raw else 1
        last = self.last()
        if last is None:
            return next_set, 0
        if last.op == Op.SYNC:
            return max(next_set, last.set + 1), 0
        return last.set, last.seq + 1

    # --- writing ----------------------------------------------------------------

    def _write(self, kind: Kind, body: bytes | list[bytes], *, spare: bool = True) -> int:
        """Append one entry; a *spare* one may use the log's reserve on a full disk
        (store/reserve.py): every entry but the records ``append`` says are not."""
        pos = self.log.append(kind, body, spare=spare)
        if self.log.base != self._snapshot_base and not self._snapshotting:
            self._snapshot()
        return pos

    def _snapshot(self) -> None:
        """Write the meta values, the dirty map and the notes again at a new segment's
        head, so the segments before it can go. If the disk has no room for them, the
        next entry tries again, and the segments before stay meanwhile (``trim``)."""
        self._snapshotting = True
        try:
            for key, value in self._meta.items():
                self.log.append(Kind.META, keyed(key, value), spare=True)
            self.log.append(Kind.DIRTY_CLEAR, b"", spare=True)
            for path, ranges in self.dirty.items():
                self.log.append(Kind.DIRTY, keyed(path, encode_ranges(ranges)), spare=True)
            self.log.append(Kind.NOTES_RESET, encode_notes(self.notes), spare=True)
            self._snapshot_base = self.log.base
        except OSError:
            pass  # the entry that began the segment is written: its caller goes on
        finally:
            self._snapshotting = False

    def append(self, op: Op, intent: bytes | None = None, spare: bool | None = None,
               **fields: Any) -> Record:
        """Journal one op at the next (set, seq), in the page cache (no flush).

        Args:
            intent: what an exchange expects to swap, kept beside the record so
                recovery can tell whether it happened.
            spare: whether it may use the log's reserve on a full disk (by default,
                unless ``takes_space``).
        """
        record = Record(op, self.set, self.seq, **fields)
        parts = record.encode_parts()
        size = sum(map(len, parts))
        if spare is None:
            spare = not takes_space(record)
        if intent is not None:
            self._write(Kind.INTENT, keyed(record.key, intent), spare=spare)
            self._intent = (record.key, intent)
        pos = self._write(Kind.RECORD, parts, spare=spare)
        self._index(record.set, record.seq, pos, size)
        self.seq += 1
        self.set_bytes += size
        return record

    def put(self, record: Record) -> None:
        """Journal *record* again in place of the one with its key (a void, or a
        short write). Only the last record of the open set may be put again."""
        value = record.encode()
        pos = self._write(Kind.RECORD, value)
        self.set_bytes += len(value) - self._sets[record.set].size[record.seq]
        self._index(record.set, record.seq, pos, len(value))

    def room(self) -> bool:
        """Whether the log's disk has room: its reserve held, or allocated again now
        (store/reserve.py)."""
        return self.log.reserve is None or self.log.reserve.room()

    @property
    def reserve_in_use(self) -> bool:
        """True while the log's reserve is given up: its disk is full (store/reserve.py)."""
        return self.log.reserve is not None and not self.log.reserve.held

    def disk_free(self) -> int:
        """Bytes free on the journal's disk, for users (status, metrics)."""
        return disk_free(self.path)

    def give_up_reserve(self) -> bool:
        """Free the log's reserve for BACKING's side of a spare op that found the disk
        full. False if it was given up already."""
        return self.log.reserve is not None and self.log.reserve.give_up()

    def close_set(self) -> int:
        """Append the current set's SYNC record and start the next set. Returns the closed id."""
        closed = self.set
        self.append(Op.SYNC, count=self.seq)
        self.set, self.seq, self.set_bytes = closed + 1, 0, 0
        return closed

    @property
    def set_is_empty(self) -> bool:
        return self.seq == 0

    @property
    def end(self) -> int:
        """The log position after the last entry: what ``sync()`` must reach."""
        return self.log.end

    @property
    def durable(self) -> int:
        """The log position up to which everything is on disk."""
        return self.log.durable

    def sync(self) -> int:
        """Make everything appended so far durable (one flush). Blocking; call it
        from a thread. Returns the position reached."""
        return self.log.sync()

    # --- reading ----------------------------------------------------------------

    def _sets_from(self, start_set: int) -> list[int]:
        return self._order[bisect.bisect_left(self._order, start_set):]

    def _read(self, set_id: int, seq: int) -> bytes:
        where = self._sets[set_id]
        return self.log.read(where.pos[seq], where.size[seq])

    def last(self) -> Record | None:
        for set_id in reversed(self._order):
            if self._sets[set_id].pos:
                return Record.decode(self._read(set_id, len(self._sets[set_id].pos) - 1))
        return None

    def is_last_entry(self, record: Record) -> bool:
        """Whether *record* (as the journal holds it now) is the last entry of the log:
        nothing at all was journaled after it."""
        where = self._sets.get(record.set)
        if where is None or record.seq >= len(where.pos):
            return False
        return self.log.is_last(where.pos[record.seq], where.size[record.seq])

    def intent(self, record: Record) -> bytes | None:
        """The intent stored with *record*, if it was the last one given one."""
        if self._intent is not None and self._intent[0] == record.key:
            return self._intent[1]
        return None

    def iter_raw(self, start_set: int = 0, start_seq: int = 0
                 ) -> Iterator[tuple[int, int, bytes, int]]:
        """(set, seq, encoded record, log position after it) from (start_set, start_seq) on."""
        for set_id in self._sets_from(start_set):
            where = self._sets.get(set_id)
            seq = start_seq if set_id == start_set else 0
            while where is not None and seq < len(where.pos):
                pos, size = where.pos[seq], where.size[seq]
                yield set_id, seq, self.log.read(pos, size), pos + size
                seq += 1

    def records(self, start_set: int = 0, start_seq: int = 0) -> Iterator[Record]:
        """Every record from (start_set, start_seq) on, in stream order, durable or not."""
        for _, _, raw, _ in self.iter_raw(start_set, start_seq):
            yield Record.decode(raw)

    def read_raw(self, start_set: int, start_seq: int, max_bytes: int
                 ) -> list[tuple[int, int, bytes]]:
        """Up to about *max_bytes* of encoded durable records from (start_set, start_seq) on.

        Returns (set, seq, encoded record) tuples, for shipping without decoding.
        """
        out: list[tuple[int, int, bytes]] = []
        total, limit = 0, self.log.durable
        for set_id, seq, raw, end in self.iter_raw(start_set, start_seq):
            if end > limit:
                break
            out.append((set_id, seq, raw))
            total += len(raw)
            if total >= max_bytes:
                break
        return out

    def sets_before(self, pos: int) -> int:
        """The last set whose records all lie before log position *pos* (or the one
        before the first set journaled)."""
        last = (self._order[0] - 1) if self._order else self.set - 1
        for set_id in self._order:
            where = self._sets[set_id]
            if not where.pos or max(where.pos) >= pos or set_id >= self.set:
                break
            last = set_id
        return last

    def set_of(self, pos: int) -> int:
        """The first set with a record at or past log position *pos* (the open set if
        none has)."""
        for set_id in self._order:
            if self._sets[set_id].pos and max(self._sets[set_id].pos) >= pos:
                return set_id
        return self.set

    def bytes_after(self, set_id: int) -> int:
        """Bytes of the records of the sets after *set_id*."""
        return sum(sum(self._sets[s].size) for s in self._sets_from(set_id + 1))

    def first_set(self) -> int | None:
        """The oldest set still journaled."""
        return self._order[0] if self._order else None

    def size(self) -> int:
        """Bytes of the records journaled."""
        return self.bytes

    # --- trimming ---------------------------------------------------------------

    def _drop_through(self, upto_set: int) -> int:
        dropped = 0
        while self._order and self._order[0] <= upto_set:
            where = self._sets.pop(self._order.pop(0))
            dropped += len(where.pos)
            self.bytes -= sum(where.size)
        return dropped

    def trim(self, upto_set: int) -> int:
        """Drop every record of sets up to *upto_set*. Returns how many were dropped."""
        dropped = self._drop_through(upto_set)
        self.put_meta(_TRIMMED, encode_set(upto_set))
        raw = self._meta.get(_NEXT_SET)
        if not raw or decode_set(raw) <= upto_set:
            self.put_meta(_NEXT_SET, encode_set(upto_set + 1))
        raw = self._meta.get(_BASE)
        if raw and decode_set(raw) < upto_set:  # older replicas now need a full sync
            self.put_meta(_BASE, encode_set(upto_set))
        # A record put again lies later than the next one: the set's least position.
        first = min(self._sets[self._order[0]].pos, default=self.log.end) if self._order \
            else self.log.end
        self.log.drop_before(min(first, self._snapshot_base))  # never the last snapshot
        return dropped

    # --- meta values and the dirty map --------------------------------------------

    def start_generation(self, ident: identity.Identity, next_set: int,
                         before: Iterable[Record] = ()) -> None:
        """Make this journal a new primary's: its identity, sets from *next_set* on.

        *before*: the records of whole sets just before *next_set* (every set from the
        first one given), as the previous primary journaled them; they are kept, so a
        secondary that has applied fewer sets than this node can follow from them.
        """
        if self.last() is not None:
            raise StoreError(f"journal {self.path} is not empty; a promoted node needs a "
                             "fresh one")
        self.identity = ident
        self.put_meta(_IDENTITY, identity.dumps(ident))
        first = next_set
        for record in before:
            if record.set >= next_set or (self._order and record.set < self._order[-1]):
                raise StoreError(f"set {record.set} out of order before set {next_set}")
            value = record.encode()
            self._index(record.set, record.seq, self._write(Kind.RECORD, value), len(value))
            first = min(first, record.set)
        self.put_meta(_NEXT_SET, encode_set(next_set))
        self.base = first - 1
        self.set, self.seq = next_set, 0
        self.sync()

    def lead(self, generation: int, cluster: str) -> None:
        """This journal's primary leads (again) as *generation* of *cluster*, from the
        open set on (a cluster of nodes elected it: repl/cluster/node.py)."""
        if generation <= self.identity.generation and self.identity.history:
            raise StoreError(f"generation {generation} is not newer than the journal's "
                             f"({self.identity.generation})")
        if self.identity.history and self.identity.cluster != cluster:
            raise StoreError(f"journal {self.path} belongs to cluster "
                             f"{self.identity.cluster}, not {cluster}")
        self.identity.cluster = cluster
        self.identity.generation = generation
        self.identity.history.append({"generation": generation, "node": self.identity.node,
                                      "first_set": self.set})
        self.put_meta(_IDENTITY, identity.dumps(self.identity))
        self.sync()

    @property
    def base(self) -> int | None:
        """The oldest applied set a replica may have and still follow this journal.

        None: no replica can (the journal began on a tree that was not empty),
        so a secondary needs an initial sync first.
        """
        raw = self._meta.get(_BASE)
        return decode_set(raw) if raw else None

    @base.setter
    def base(self, set_id: int | None) -> None:
        self.put_meta(_BASE, b"" if set_id is None else encode_set(set_id))

    def get_meta(self, key: bytes) -> bytes | None:
        return self._meta.get(key)

    def meta_items(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Every meta value whose key starts with *prefix*, as (key, value)."""
        return [(k, v) for k, v in self._meta.items() if k.startswith(prefix)]

    def put_meta(self, key: bytes, value: bytes | None) -> None:
        """Set (or with None, delete) a small meta value, durable with the next sync."""
        if value is None:
            if self._meta.pop(key, None) is not None:
                self._write(Kind.META_DEL, key)
        else:
            self._meta[key] = value
            self._write(Kind.META, keyed(key, value))

    def put_dirty(self, path: bytes, ranges: Ranges) -> None:
        """Journal the dirty ranges of *path* (none: it is clean)."""
        self.dirty.put(path, ranges)
        self._write(Kind.DIRTY, keyed(path, encode_ranges(ranges) if ranges else b""))

    def clear_dirty(self) -> None:
        self.dirty.clear()
        self._write(Kind.DIRTY_CLEAR, b"")

    def add_notes(self, notes: list[Note]) -> None:
        """Journal notes added to the activity log (durable with the next sync)."""
        body = encode_notes(notes)
        self.notes.extend(notes)
        try:
            self._write(Kind.NOTES, body)
        except OSError:
            del self.notes[len(self.notes) - len(notes) :]
            raise

    def reset_notes(self, notes: list[Note]) -> None:
        """Journal the activity log's notes, in place of all before (one entry, so a
        power cut leaves either the old notes or these)."""
        body = encode_notes(notes)
        old, self.notes = self.notes, list(notes)
        try:
            self._write(Kind.NOTES_RESET, body)
        except OSError:
            self.notes = old
            raise

    def close(self) -> None:
        self.log.close()
        self.dirty.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)

    def count(self) -> int:
        """Records in the journal."""
        return sum(len(where.pos) for where in self._sets.values())
