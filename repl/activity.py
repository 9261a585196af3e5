"""The activity log: what the backing directory may hold that the journal does not.

The problem. The journal is the durable copy and BACKING follows it, but a
power cut does not keep them in step: the page cache writes BACKING's pages
back whenever it likes, and a filesystem commits a rename or a chmod on its
own schedule, so after a cut BACKING can hold a change whose journal entry
was lost (appended, never flushed). Nothing in the journal says so, and the
replica would silently differ. Timestamps cannot tell either: a file's new
bytes can reach the disk before the inode that carries its new ctime does.

The answer, as DRBD's activity log: before an op may touch BACKING, what it
may change there is *noted* in the journal and the note is durable. A note
(store/notes.py ``Note``) names a path and what of it may change:

- NAME: names at or under the path may be made, removed or replaced (every
  name a create, mkdir, mknod, symlink, link, unlink, rmdir or rename makes,
  removes or moves);
- DATA: a byte range of the file (in EXTENT steps; a truncate to the end);
- ATTR: its mode, owner, times; XATTR: one extended attribute.

An op that a note already covers costs nothing; otherwise ``need()`` says
which notes to journal, and capture flushes the journal once before the op
(repl/primary/capture.py). A note covers an op on its own path and kind; a NAME note
also covers what is made or written under it while it is young (a directory
just made holds the names made in it), so untarring into a new directory
or filling one with small files flushes once, not once a file.

Notes stay in force until BACKING is durable past the op they covered:
every BACKING sync ends with ``reset()``, which keeps the notes an op used
after the sync began. It also keeps a file's notes while the file changed
in the last RETAIN_SECONDS if a note of it covered an op again (a file
written twice is likely written again: SQLite's database and WAL keep their
notes and never flush for one; a file written once, as most of a tree being
filled, lets its notes go, so that a reset, which journals every note in
force, stays small), but no NAME note: records under one are not replayed
after a power cut, so an fsync of them syncs BACKING too (repl/primary/capture.py).
A directory made lately whose note went is remembered, and the next name
made in it notes the directory again: one flush each BACKING sync, not one
each name. A clean stop keeps no note, so a journal that holds notes at
start was stopped uncleanly.

After an unclean stop, recovery (repl/primary/recovery.py) skips the records under a
NAME note (the path may name another file now) and resends every noted
path as BACKING holds it, in one set (repl/primary/resync.py ``resend``): NAME paths
whole, the others in place.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from repl import faults
from repl.diverge import END, Divergence
from store.journal import Journal
from store.notes import Note, NoteKind
from store.records import NAMESPACE_OPS, Op, is_under

EXTENT = 4 << 20  # a DATA note's step: one note, and one flush, per 4 MiB first written
# ... but a file written in order gets notes ahead of its writes, as many extents as it
# wrote in a row, up to this many: a long sequential write flushes log2(size) times
AHEAD = 64
BIG = 64 * EXTENT  # a range past this is noted as one span, not extent by extent
NAME_COVER_SECONDS = 60.0  # a NAME note covers what is made under it for this long
RETAIN_SECONDS = 10.0  # a file's notes stay this long after its last change (2 timer syncs)
_ATTR_OPS = frozenset({Op.CHMOD, Op.CHOWN, Op.UTIMES})
_XATTR_OPS = frozenset({Op.SETXATTR, Op.REMOVEXATTR})
_DEEP = 64  # path components past which ancestors are found by scanning the notes


BOOT = b"boot"  # journal meta: the machine's boot id when the daemon last started


def power_lost(journal: Journal) -> bool:
    """Whether the machine rebooted since the journal's daemon last started: the page
    cache went, and with it whatever the notes in force name may differ from the
    journal. (After a crash of the daemon alone nothing was lost.)"""
    boot = faults.boot_id()
    return not boot or journal.get_meta(BOOT) != boot


def note_boot(journal: Journal) -> None:
    """Journal this boot's id, for ``power_lost`` at the next start."""
    journal.put_meta(BOOT, faults.boot_id())


def changed_names(op: Op, fields: Mapping[str, Any]) -> list[bytes]:
    """The names a namespace op makes, removes or moves."""
    if op == Op.RENAME:
        return [fields["path"], fields["path2"]]
    if op == Op.LINK:
        return [fields["path2"]]
    return [fields["path"]]


def data_range(op: Op, fields: Mapping[str, Any]) -> tuple[int, int] | None:
    """The bytes a data op may change: [start, end), end END for "to the end"."""
    if op == Op.WRITE:
        return fields["offset"], fields["offset"] + len(fields["data"])
    if op == Op.TRUNCATE:
        return fields["size"], END
    if op == Op.FALLOCATE:
        return fields["offset"], min(fields["offset"] + fields["length"], END)
    return None


@dataclass
class _Name:
    made: float  # time.monotonic() when noted
    last_use: int  # the journal's end when an op last used it
    last_ns_use: int  # ... a namespace op (made counts as one)


@dataclass
class _Data:
    extents: dict[int, int] = field(default_factory=dict)  # extent index -> last use
    spans: list[list[int]] = field(default_factory=list)  # [start, end, last use]


class ActivityLog:
    """The notes in force, and which of them the ops since the last reset used.

    Uses are the journal's end position at the time (``at``): comparing them
    with where a BACKING sync began tells the notes that sync covered.
    """

    def __init__(self, notes: Iterable[Note] = ()) -> None:
        self.names: dict[bytes, _Name] = {}
        self.data: dict[bytes, _Data] = {}
        self.attrs: dict[bytes, int] = {}
        self.xattrs: dict[tuple[bytes, bytes], int] = {}
        self.dormant: dict[bytes, float] = {}  # young NAME notes a reset dropped -> made
        self.epoch_at = 0  # where the last reset's BACKING sync began
        self._resets: deque[tuple[float, int]] = deque()  # (time.monotonic(), at) of resets
        self._added = False  # a note was added since the last reset
        self.again: set[bytes] = set()  # files whose notes covered an op again: retained
        self.add(notes, -1)

    def __bool__(self) -> bool:
        return bool(self.names or self.data or self.attrs or self.xattrs)

    # --- before an op ---------------------------------------------------------------

    def need(self, op: Op, fields: Mapping[str, Any], at: int) -> list[Note]:
        """The notes *op* needs before it may touch BACKING (journal them, durably,
        then ``add`` them); the notes that already cover it are marked used at *at*."""
        now = time.monotonic()
        path = fields.get("path", b"")
        if op in NAMESPACE_OPS:
            out: list[Note] = []
            for name in changed_names(op, fields):
                entry = self._name_cover(name, now)
                if entry is not None:
                    entry.last_use = entry.last_ns_use = at
                    continue
                tops = [top for top in self._ancestors(name, self.dormant)
                        if now - self.dormant[top] < NAME_COVER_SECONDS]
                note = Note(NoteKind.NAME, tops[-1] if tops else name)  # the highest
                if note not in out:
                    out.append(note)
            return out
        young = self._young_name(path, now)
        if young is not None:  # made (or made in) since the last reset: it covers
            young.last_use = at
            return []
        if op in _ATTR_OPS:
            if path in self.attrs:
                self.attrs[path] = at
                self.again.add(path)
                return []
            return [Note(NoteKind.ATTR, path)]
        if op in _XATTR_OPS:
            key = (path, fields["name"])
            if key in self.xattrs:
                self.xattrs[key] = at
                self.again.add(path)
                return []
            return [Note(NoteKind.XATTR, path, name=fields["name"])]
        span = data_range(op, fields)
        if span is None or span[0] >= span[1]:
            return []
        return self._data_need(path, span[0], span[1], at)

    def _name_cover(self, path: bytes, now: float) -> _Name | None:
        entry = self.names.get(path)
        if entry is not None:
            return entry
        for top in self._ancestors(path):
            entry = self.names[top]
            if now - entry.made < NAME_COVER_SECONDS:
                return entry
        return None

    def _young_name(self, path: bytes, now: float) -> _Name | None:
        """A NAME note at or above *path* that a namespace op used since the last reset,
        and young enough to cover what is made under it."""
        for top in [path, *self._ancestors(path)] if self.names else ():
            entry = self.names.get(top)
            if (entry is not None and entry.last_ns_use >= self.epoch_at
                    and (top == path or now - entry.made < NAME_COVER_SECONDS)):
                return entry
        return None

    def _ancestors(self, path: bytes, names: Mapping[bytes, object] | None = None
                   ) -> list[bytes]:
        """The paths of *names* (the NAME notes in force) strictly above *path*,
        nearest first."""
        names = self.names if names is None else names
        if not names:
            return []
        if path.count(b"/") > _DEEP:
            return sorted((top for top in names if top != path and is_under(path, top)),
                          key=len, reverse=True)
        out, end = [], len(path)
        while (end := path.rfind(b"/", 0, end)) > 0:
            if path[:end] in names:
                out.append(path[:end])
        return out

    def _data_need(self, path: bytes, start: int, end: int, at: int) -> list[Note]:
        data = self.data.get(path)
        big = end == END or end - start > BIG
        spans = data.spans if data is not None else []
        for span in spans:
            if span[0] <= start and end <= span[1]:
                span[2] = at
                self.again.add(path)
                return []
        first, last = start // EXTENT, (end - 1) // EXTENT
        if big:
            return [Note(NoteKind.DATA, path, first * EXTENT, end)]
        missing: list[int] = []
        for index in range(first, last + 1):
            if data is not None and index in data.extents:
                data.extents[index] = at
                self.again.add(path)
                continue
            for span in spans:
                if span[0] <= index * EXTENT and (index + 1) * EXTENT <= span[1]:
                    span[2] = at
                    self.again.add(path)
                    break
            else:
                missing.append(index)
        if missing and missing[-1] == last and data is not None:
            ahead = range(last + 1, last + 1 + _run_behind(data.extents, first))
            missing.extend(index for index in ahead if index not in data.extents)
        return [Note(NoteKind.DATA, path, a * EXTENT, min((b + 1) * EXTENT, END))
                for a, b in _runs(missing)]

    def add(self, notes: Iterable[Note], at: int) -> None:
        """Notes journaled (and durable): in force from now on, used at *at*."""
        now = time.monotonic()
        for note in notes:
            self._added = True
            if note.kind == NoteKind.NAME:
                self.names[note.path] = _Name(self.dormant.pop(note.path, now), at, at)
            elif note.kind == NoteKind.ATTR:
                self.attrs[note.path] = at
            elif note.kind == NoteKind.XATTR:
                self.xattrs[note.path, note.name] = at
            else:
                data = self.data.setdefault(note.path, _Data())
                if note.end == END or note.end - note.start > BIG:
                    data.spans.append([note.start, note.end, at])
                else:
                    for index in range(note.start // EXTENT, (note.end - 1) // EXTENT + 1):
                        data.extents[index] = at

    def under_name(self, path: bytes) -> bool:
        """Whether a NAME note covers *path* (recovery would skip its records)."""
        return path in self.names or bool(self._ancestors(path))

    # --- once BACKING is durable ------------------------------------------------------

    def reset(self, at: int, *, retain: bool = True) -> list[Note] | None:
        """BACKING is durable up to log position *at*: drop the notes no op used after
        it, but (with *retain*) those of files changed in the last RETAIN_SECONDS whose
        notes covered an op again.

        Returns the notes to journal in place of all (``Journal.reset_notes``), or
        None if none was dropped or added since the last reset.
        """
        now = time.monotonic()
        self._resets.append((now, at))
        while len(self._resets) > 1 and now - self._resets[1][0] >= RETAIN_SECONDS:
            self._resets.popleft()
        oldest_time, oldest_at = self._resets[0]
        since = at if not retain else oldest_at if now - oldest_time >= RETAIN_SECONDS else -1
        self.epoch_at = at
        before = len(self.notes())
        for path, entry in list(self.names.items()):
            if entry.last_use < at:
                del self.names[path]
                self.dormant[path] = entry.made
        self.dormant = {p: made for p, made in self.dormant.items()
                        if now - made < NAME_COVER_SECONDS}
        def kept(path: bytes, use: int) -> bool:
            return use >= at or (use >= since and path in self.again)

        self.attrs = {p: use for p, use in self.attrs.items() if kept(p, use)}
        self.xattrs = {k: use for k, use in self.xattrs.items() if kept(k[0], use)}
        for path in list(self.data):
            data = self.data[path]
            data.extents = {i: use for i, use in data.extents.items() if kept(path, use)}
            data.spans = [s for s in data.spans if kept(path, s[2])]
            if not data.extents and not data.spans:
                del self.data[path]
        noted = {*self.data, *self.attrs, *(k[0] for k in self.xattrs)}
        self.again &= noted
        notes = self.notes()
        added, self._added = self._added, False
        return notes if added or len(notes) != before else None

    def notes(self) -> list[Note]:
        """The notes in force, compacted (one DATA note per run of extents)."""
        out = [Note(NoteKind.NAME, p) for p in sorted(self.names)]
        for path in sorted(self.data):
            data = self.data[path]
            out += [Note(NoteKind.DATA, path, a * EXTENT, min((b + 1) * EXTENT, END))
                    for a, b in _runs(sorted(data.extents))]
            out += [Note(NoteKind.DATA, path, s[0], s[1]) for s in data.spans]
        out += [Note(NoteKind.ATTR, p) for p in sorted(self.attrs)]
        out += [Note(NoteKind.XATTR, p, name=n) for p, n in sorted(self.xattrs)]
        return out


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    """Sorted indexes as (first, last) runs of consecutive ones."""
    out: list[tuple[int, int]] = []
    for index in indexes:
        if out and out[-1][1] == index - 1:
            out[-1] = (out[-1][0], index)
        else:
            out.append((index, index))
    return out


def divergence(notes: Iterable[Note]) -> Divergence:
    """What the noted paths may differ in, as a rejoin counts it (repl/diverge.py):
    NAME and XATTR paths whole, the others by range."""
    div = Divergence()
    for note in notes:
        if note.kind in (NoteKind.NAME, NoteKind.XATTR):
            div.content.add(note.path)
        elif note.kind == NoteKind.DATA:
            div.update(Divergence(ranges={note.path: [(note.start, note.end)]}))
        else:
            div.ranges.setdefault(note.path, [])
    return div


def name_roots(notes: Iterable[Note]) -> list[bytes]:
    """The NAME paths with none of their ancestors among them."""
    return Divergence({n.path for n in notes if n.kind == NoteKind.NAME}).roots()


def _run_behind(extents: Mapping[int, int], index: int) -> int:
    """How many extents right before *index* are noted, up to AHEAD."""
    run = 0
    while run < AHEAD and index - 1 - run in extents:
        run += 1
    return run
