"""What two trees changed since the set they last shared: the heart of a rejoin.

When an old primary comes back after a failover, it and the new primary
both went on from the last set they shared. Neither has that set's state
any more, but each knows, from its journal, which paths it touched since.
Every other path is still as it was in the shared set on both sides. So
the new primary sends, as one data set, its current state of just the
paths either side touched:

- ``content``: paths a namespace op touched (created, removed, renamed,
  linked) or whose xattrs changed. Each is removed on the rejoining node
  and sent again whole, subtree and all.
- ``ranges``: files only written, truncated, fallocated, chmod-ed or chown-ed. They are
  the same file on both sides, so only the byte ranges either side wrote
  are sent, with the size, mode and owner.

A file with other hard links takes all its names into ``content``, found by
one walk of the tree, so that no name keeps stale data or a broken link.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from repl.errors import ProtocolError
from repl.protocol import MAX_HELLO_FRAME
from store.dirty import merge
from store.errors import RecordError
from store.records import NAMESPACE_OPS, Op, Record, check_path, is_under

END = (1 << 63) - 1  # "to the end of the file", for truncates
_RANGE_OPS = frozenset({Op.WRITE, Op.TRUNCATE, Op.FALLOCATE, Op.CHMOD, Op.CHOWN, Op.UTIMES})



@dataclass
class Divergence:
    content: set[bytes] = field(default_factory=set)
    ranges: dict[bytes, list[tuple[int, int]]] = field(default_factory=dict)

    def add(self, records: Iterable[Record]) -> Divergence:
        for r in records:
            if r.op in NAMESPACE_OPS or r.op in (Op.SETXATTR, Op.REMOVEXATTR):
                self.content.add(r.path)
                if r.op in (Op.LINK, Op.RENAME):
                    self.content.add(r.path2)
            elif r.op == Op.RESET:
                self.content.add(b"")
            elif r.op in _RANGE_OPS:
                spans = self.ranges.setdefault(r.path, [])
                if r.op == Op.WRITE and r.data:
                    self.ranges[r.path] = merge(spans, r.offset, r.offset + len(r.data))
                elif r.op == Op.TRUNCATE:
                    self.ranges[r.path] = merge(spans, r.size, END)
                elif r.op == Op.FALLOCATE:
                    self.ranges[r.path] = merge(spans, r.offset, r.offset + r.length)
        return self

    def update(self, other: Divergence) -> Divergence:
        """Add *other*'s paths to these: a file in its ranges stays there even with no
        range (its mode, owner or times changed), so that it is sent."""
        self.content |= other.content
        for path, spans in other.ranges.items():
            merged = self.ranges.get(path, [])
            for start, end in spans:
                merged = merge(merged, start, end)
            self.ranges[path] = merged
        return self

    def roots(self) -> list[bytes]:
        """The content paths with none of their ancestors among them, sorted."""
        out: list[bytes] = []
        for path in sorted(self.content, key=lambda p: p.split(b"/")):
            if not any(is_under(path, top) for top in out):
                out.append(path)
        return out

    def only_ranges(self) -> dict[bytes, list[tuple[int, int]]]:
        """The range paths that no content path covers."""
        roots = self.roots()
        return {p: r for p, r in self.ranges.items()
                if not any(is_under(p, top) for top in roots)}

    def with_links(self, root: str | os.PathLike[str]) -> Divergence:
        """A copy of these paths with every name of each file, symlink or node that has
        more than one in the tree at *root* (one walk): what a node whose tree is not
        at a set offers the primary. The primary may have removed the name a change
        of such a file went through (its records name only that one), and then cannot
        tell that the file lives on here under another name; sent whole, each name
        gets the primary's copy."""
        out = Divergence().update(self)
        if out.whole_tree:
            return out
        base = os.fsencode(root)
        out.content.update(os.path.relpath(full, base) for full, st in _entries(base)
                           if _linked(st))
        return out

    def follow_links(self, root: str | os.PathLike[str]) -> Divergence:
        """Add every name of each file, symlink or node with more than one that is at
        or under a touched path, so that it is sent as one inode (two walks: the
        touched directories, then the tree)."""
        base = os.fsencode(root)
        linked: set[int] = set()
        for path in [*self.content, *self.ranges]:
            full = os.path.join(base, path) if path else base
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                if st.st_nlink > 1:
                    linked.add(st.st_ino)
                continue
            linked.update(st.st_ino for _, st in _entries(full) if _linked(st))
        if not linked:
            return self
        self.content.update(os.path.relpath(full, base) for full, st in _entries(base)
                            if st.st_ino in linked)
        return self

    @property
    def whole_tree(self) -> bool:
        """Whether this stands for the whole tree (b"", the root, is in content)."""
        return b"" in self.content

    def offer(self) -> tuple[bytes, Divergence]:
        """What a rejoining secondary offers in its HELLO answer (JSON), and what that
        asks for: this, or the whole tree if this would not fit the bound the primary
        reads the answer under (MAX_HELLO_FRAME). An answer past it is refused, and
        the secondary could never connect."""
        raw = json.dumps(self.to_json()).encode()
        if len(raw) <= MAX_HELLO_FRAME // 2:
            return raw, self
        whole = Divergence({b""})
        return json.dumps(whole.to_json()).encode(), whole

    def to_json(self) -> dict[str, object]:
        return {"content": sorted(p.hex() for p in self.content),
                "ranges": {p.hex(): r for p, r in sorted(self.ranges.items())}}

    @classmethod
    def from_json(cls, data: object) -> Divergence:
        """Read what a rejoining secondary sent (the shape ``to_json`` makes).

        Raises:
            ProtocolError: another shape, a path that leaves the tree, or a range that
                is not 0 <= start <= end <= END.
        """
        if not isinstance(data, dict):
            raise ProtocolError("the rejoin divergence is not a JSON object")
        content, ranges = data.get("content", []), data.get("ranges", {})
        if not isinstance(content, list) or not isinstance(ranges, dict):
            raise ProtocolError("malformed rejoin divergence")
        div = cls({_path(text) for text in content})
        for text, spans in ranges.items():
            if not isinstance(spans, list):
                raise ProtocolError(f"bad ranges {spans!r:.80} in the rejoin divergence")
            div.ranges[_path(text)] = [_span(span) for span in spans]
        return div


def _path(text: object) -> bytes:
    """A path of the divergence (hex), refused unless it stays inside the tree."""
    try:
        path = bytes.fromhex(text)  # type: ignore[arg-type]
        check_path(path, root_ok=True)
    except (TypeError, ValueError, RecordError):
        raise ProtocolError(f"bad path {text!r:.80} in the rejoin divergence") from None
    return path


def _span(span: object) -> tuple[int, int]:
    if (isinstance(span, list) and len(span) == 2 and all(type(v) is int for v in span)
            and 0 <= span[0] <= span[1] <= END):
        return span[0], span[1]
    raise ProtocolError(f"bad range {span!r:.80} in the rejoin divergence")


def _entries(top: bytes) -> Iterator[tuple[bytes, os.stat_result]]:
    """(path, lstat) of everything under directory *top*, symlinks not followed."""
    for at, dirs, files in os.walk(top):
        for name in (*files, *dirs):  # a symlink to a directory is listed in dirs
            full = os.path.join(at, name)
            yield full, os.lstat(full)


def _linked(st: os.stat_result) -> bool:
    """Whether *st* is of a file, symlink or node with more than one name."""
    return not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1
