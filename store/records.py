"""The journal record: one encoding for every replicated operation.

A record is what the primary journals, ships and the secondary stages and
applies. It names one operation on the replicated tree *by path, as of the
moment it happened*, plus its place in the stream: the data set it belongs
to and its sequence number inside that set (dense from 0; the set's SYNC
record takes the sequence number after the last op and carries the op count).

Layout (big-endian)::

    u8  version            FORMAT_VERSION
    u8  op                 Op
    u64 set                data-set id
    u32 seq                sequence number inside the set
    ...                    the op's fields, in the order of FIELDS[op]
    u64 checksum           xxh3_64 of every byte before it

Field kinds: a path is u16 length + bytes (relative to the tree root, "" is
the root itself), a blob is u32 length + bytes, integers are u32, u64 or i64.

FILE is a new regular file with its mode, owner, times and every byte of
it: a sync's snapshot (repl/primary/snapshot.py) sends a small file as one record,
not a CREATE, a WRITE and a UTIMES.

FALLOCATE carries fallocate(2)'s mode in ``flags``, its range in ``offset``
and ``length``: the same call is made again where it is applied.

Only format modules pack bytes: this one, the activity log's notes
(``store/notes.py``), a set's arrival (``store/setstate.py``), the frames
(``repl/protocol.py``) and the transports' own (``repl/iscsi``, ``repl/fc``, ``repl/scsi``).
"""

from __future__ import annotations

import enum
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from operator import attrgetter
from typing import Any, NamedTuple

import xxhash

from store.errors import RecordError

FORMAT_VERSION = 1
MAX_PATH = 0xFFFF
NAME_MAX = 255
MAX_BLOB = 64 << 20
# Far more records than any set holds; it bounds the set's bitmap a peer can make
# the secondary keep (32 MiB).
MAX_SEQ = 1 << 28
MAX_OFFSET = (1 << 63) - 1  # off_t: no file reaches further


class Op(enum.IntEnum):
    WRITE = 1
    TRUNCATE = 2
    CREATE = 3
    MKDIR = 4
    MKNOD = 5
    SYMLINK = 6
    LINK = 7
    UNLINK = 8
    RMDIR = 9
    RENAME = 10
    CHMOD = 11
    CHOWN = 12
    UTIMES = 13
    SETXATTR = 14
    REMOVEXATTR = 15
    SYNC = 16
    VOID = 17
    RESET = 18  # empty the tree: the first record of an initial sync's data set
    PRUNE = 19  # remove a path and all under it, if there: a rejoin's divergence undone
    FALLOCATE = 20  # fallocate(2) on a range: preallocate, punch a hole, zero a range
    FILE = 21  # a whole regular file made at once (a sync's snapshot): see below


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_FLAGS = RENAME_NOREPLACE | RENAME_EXCHANGE
# fallocate(2) modes (linux/falloc.h); the others change offsets (collapse, insert) or
# sharing, which the mount does not pass through.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FLAGS = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_HEADER = struct.Struct(">BBQI")
_CHECKSUM = struct.Struct(">Q")

# Field name -> kind. Kinds: "path" (u16 + bytes), "blob" (u32 + bytes),
# "u32", "u64", "i64".
KINDS = {
    "path": "path",
    "path2": "path",
    "name": "blob",
    "data": "blob",
    "offset": "u64",
    "size": "u64",
    "length": "u64",
    "mode": "u32",
    "uid": "u32",
    "gid": "u32",
    "rdev": "u64",
    "flags": "u32",
    "atime_ns": "i64",
    "mtime_ns": "i64",
    "count": "u32",
}

FIELDS: dict[Op, tuple[str, ...]] = {
    Op.WRITE: ("path", "offset", "data"),
    Op.TRUNCATE: ("path", "size"),
    Op.CREATE: ("path", "mode", "uid", "gid"),
    Op.MKDIR: ("path", "mode", "uid", "gid"),
    Op.MKNOD: ("path", "mode", "rdev", "uid", "gid"),
    Op.SYMLINK: ("path", "data", "uid", "gid"),
    Op.LINK: ("path", "path2"),
    Op.UNLINK: ("path",),
    Op.RMDIR: ("path",),
    Op.RENAME: ("path", "path2", "flags"),
    Op.CHMOD: ("path", "mode"),
    Op.CHOWN: ("path", "uid", "gid"),
    Op.UTIMES: ("path", "atime_ns", "mtime_ns"),
    Op.SETXATTR: ("path", "name", "data"),
    Op.REMOVEXATTR: ("path", "name"),
    Op.SYNC: ("count",),
    Op.VOID: (),
    Op.RESET: (),
    Op.PRUNE: ("path",),
    Op.FALLOCATE: ("path", "flags", "offset", "length"),
    Op.FILE: ("path", "mode", "uid", "gid", "atime_ns", "mtime_ns", "data"),
}

# Ops that change which names exist. They are not idempotent, so the
# applier writes a marker before each one (see repl/apply.py).
NAMESPACE_OPS = frozenset(
    {Op.CREATE, Op.MKDIR, Op.MKNOD, Op.SYMLINK, Op.LINK, Op.UNLINK, Op.RMDIR, Op.RENAME,
     Op.RESET, Op.PRUNE, Op.FILE}
)
# Ops whose target may be the root itself (path "").
ROOT_OPS = frozenset({Op.CHMOD, Op.CHOWN, Op.UTIMES, Op.SETXATTR, Op.REMOVEXATTR})
_NODE_TYPES = frozenset({stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK})

@dataclass(frozen=True, slots=True)
class Record:
    """One operation at its place (set, seq) in the stream.

    Only the fields listed in ``FIELDS[op]`` are meaningful; the others stay
    at their defaults and ``validate()`` insists on it.
    """

    op: Op
    set: int
    seq: int
    path: bytes = b""
    path2: bytes = b""
    name: bytes = b""
    data: bytes | memoryview = b""
    offset: int = 0
    size: int = 0
    length: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    flags: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    count: int = 0

    @property
    def key(self) -> bytes:
        """The record's LMDB key: (set, seq), sorting in stream order."""
        return encode_key(self.set, self.seq)

    def encode(self) -> bytes:
        return b"".join(self.encode_parts())

    def encode_parts(self) -> list[bytes]:
        """The record's encoding in pieces, to be written out as they are: a write's
        data is one of them, never copied (``encode`` joins them)."""
        self.validate()
        parts = [_HEADER.pack(FORMAT_VERSION, self.op, self.set, self.seq)]
        for names, fmt, sized, get in _PLAN[self.op]:
            value = get(self)  # a tuple if a run of several integers
            if sized:  # a length, then the bytes
                parts += (fmt.pack(len(value)), value)
            else:
                parts.append(fmt.pack(*value) if len(names) > 1 else fmt.pack(value))
        checksum = xxhash.xxh3_64()
        for part in parts:
            checksum.update(part)
        parts.append(_CHECKSUM.pack(checksum.intdigest()))
        return parts

    @classmethod
    def decode(cls, buf: bytes | memoryview, *, data: bool = True,
               view: bool = False) -> Record:
        """Decode one record that fills *buf* exactly.

        With *data* False the record comes without its data (b""): its bytes were
        checked where they lie in *buf*, for a caller that keeps *buf* anyway. With
        *view*, a WRITE's, SETXATTR's or FILE's data is a view of *buf*, not a copy:
        for a caller that uses the record while *buf*, which must not change, lives.

        Raises:
            RecordError: truncated input, trailing bytes, an unknown version or
                op, a checksum mismatch, or a record that fails ``validate()``.
        """
        buf = memoryview(buf)
        if len(buf) < _HEADER.size + _CHECKSUM.size:
            raise RecordError(f"record too short ({len(buf)} bytes)")
        body, (want,) = buf[: -_CHECKSUM.size], _CHECKSUM.unpack(buf[-_CHECKSUM.size :])
        if xxhash.xxh3_64_intdigest(body) != want:
            raise RecordError("record checksum mismatch")
        version, op_value, set_id, seq = _HEADER.unpack_from(body)
        if version != FORMAT_VERSION:
            raise RecordError(f"unknown record version {version}")
        op = _OPS.get(op_value)
        if op is None:
            raise RecordError(f"unknown op {op_value}")
        values: dict[str, Any] = {}
        pos, end = _HEADER.size, len(body)
        try:
            for names, fmt, sized, _ in _PLAN[op]:
                if sized:  # a length, then that many bytes
                    (size,) = fmt.unpack_from(body, pos)
                    pos += fmt.size
                    if pos + size > end:
                        raise RecordError(f"truncated {names[0]} in {op.name} record")
                    piece = body[pos : pos + size]
                    # Without *data*, or with *view*, the data is a view, never copied.
                    values[names[0]] = (piece if names[0] == "data" and (view or not data)
                                        and op in _VIEWED else bytes(piece))
                    pos += size
                else:
                    values.update(zip(names, fmt.unpack_from(body, pos), strict=True))
                    pos += fmt.size
        except struct.error:
            raise RecordError(f"truncated {op.name} record") from None
        if pos != end:
            raise RecordError(f"{end - pos} trailing bytes in {op.name} record")
        record = cls(op, set_id, seq, **values)
        record._check()  # the fields' widths keep the integers in range, the rest at defaults
        if not data:
            object.__setattr__(record, "data", b"")  # still ours alone: made just above
        return record

    def validate(self) -> None:
        """Check the rules a record must keep; raise RecordError on the first broken."""
        if not 0 <= self.set < 1 << 64:
            raise RecordError(f"set {self.set} out of range")
        get_strays, defaults = _STRAY_VALUES[self.op]
        if get_strays(self) != defaults:  # one C call in the common case; then which
            for name, default in _STRAYS[self.op]:
                if getattr(self, name) != default:
                    raise RecordError(f"{self.op.name} record has a stray {name}")
        for name, low, high in _RANGES[self.op]:
            value = getattr(self, name)
            if not low <= value < high:
                raise RecordError(f"{name} {value} out of range")
        self._check()

    def _check(self) -> None:
        """The rules that a decoded record's field widths do not already keep."""
        if not 0 <= self.seq < MAX_SEQ:
            raise RecordError(f"seq {self.seq} out of range")
        if self.op in _PATH_OPS:
            check_path(self.path, root_ok=self.op in ROOT_OPS)
        if self.op in _PATH2_OPS:
            check_path(self.path2, root_ok=False)
        if len(self.data) > MAX_BLOB or len(self.name) > MAX_BLOB:
            raise RecordError(f"{self.op.name} record blob too large")
        if (self.offset + len(self.data) + self.length > MAX_OFFSET
                or self.size > MAX_OFFSET):
            raise RecordError(f"{self.op.name} record reaches past the largest file offset")
        rule = _RULES.get(self.op)
        if rule is not None:
            rule(self)

    def voided(self) -> Record:
        """The VOID record that takes this record's place when its op failed."""
        return Record(Op.VOID, self.set, self.seq)

    def moved(self, set_id: int, seq: int) -> Record:
        return replace(self, set=set_id, seq=seq)


# Per op, for validate(): the fields it must leave at their defaults, and the
# bounds of its integer fields.
_STRAYS: dict[Op, tuple[tuple[str, object], ...]] = {
    op: tuple((f.name, f.default) for f in fields(Record)
              if f.name not in ("op", "set", "seq", *wanted))
    for op, wanted in FIELDS.items()
}
_STRAY_VALUES: dict[Op, tuple[Callable[[Record], tuple[object, ...]], tuple[object, ...]]] = {
    op: (attrgetter(*(name for name, _ in strays)), tuple(default for _, default in strays))
    for op, strays in _STRAYS.items()
}
# Per op, for encode() and decode(): its fields as steps, each one path or blob (its
# length's struct, then the bytes) or a run of integers packed as one struct.
_STRUCTS = {"path": _U16, "blob": _U32}
_INTS = {"u32": "I", "u64": "Q", "i64": "q"}


class _Step(NamedTuple):
    names: tuple[str, ...]  # the path or blob, or the run of integers
    fmt: struct.Struct  # the length's, or the run's
    sized: bool  # a path or blob
    get: Callable[[Record], Any]  # the field's value, or the run's, for encode()


def _plan(wanted: tuple[str, ...]) -> tuple[_Step, ...]:
    steps: list[_Step] = []
    run: list[str] = []
    for name in (*wanted, None):
        if name is not None and KINDS[name] in _INTS:
            run.append(name)
            continue
        if run:
            fmt = struct.Struct(">" + "".join(_INTS[KINDS[n]] for n in run))
            get = attrgetter(*run)
            steps.append(_Step(tuple(run), fmt, False, get))
            run = []
        if name is not None:
            steps.append(_Step((name,), _STRUCTS[KINDS[name]], True, attrgetter(name)))
    return tuple(steps)


_PLAN = {op: _plan(wanted) for op, wanted in FIELDS.items()}
_OPS = {int(op): op for op in Op}
_PATH_OPS = frozenset(op for op, wanted in FIELDS.items() if "path" in wanted)
_PATH2_OPS = frozenset(op for op, wanted in FIELDS.items() if "path2" in wanted)
# Ops whose data has no rule but its length: decode(data=False) checks it as a view.
_VIEWED = frozenset({Op.WRITE, Op.SETXATTR, Op.FILE})


# --- the rules of ops with rules of their own (a name, flags, a mode, a count) ---------

def _rename(record: Record) -> None:
    if record.flags & ~RENAME_FLAGS:
        raise RecordError(f"unknown rename flags {record.flags:#x}")
    if record.flags == RENAME_FLAGS:
        raise RecordError("rename cannot both exchange and not replace")


def _mknod(record: Record) -> None:
    if stat.S_IFMT(record.mode) not in _NODE_TYPES:
        raise RecordError(f"mknod of unsupported file type {record.mode:#o}")


def _xattr(record: Record) -> None:
    if not record.name:
        raise RecordError("xattr record without a name")
    if b"\0" in record.name:
        raise RecordError(f"xattr name {record.name!r} contains NUL")


def _symlink(record: Record) -> None:
    if b"\0" in record.data:
        raise RecordError(f"symlink target {record.data!r} contains NUL")


def _fallocate(record: Record) -> None:
    flags = record.flags
    if flags & ~FALLOC_FLAGS:
        raise RecordError(f"unknown fallocate mode {flags:#x}")
    if flags & FALLOC_FL_PUNCH_HOLE and (flags & FALLOC_FL_ZERO_RANGE
                                         or not flags & FALLOC_FL_KEEP_SIZE):
        raise RecordError(f"fallocate mode {flags:#x} punches a hole but not alone with "
                          "KEEP_SIZE")
    if not record.length:
        raise RecordError("fallocate of no bytes")


def _file(record: Record) -> None:
    if stat.S_IFMT(record.mode) != stat.S_IFREG:
        raise RecordError(f"file record of another file type {record.mode:#o}")


def _sync(record: Record) -> None:
    if record.count != record.seq:
        raise RecordError(f"sync at seq {record.seq} carries op count {record.count}")


_RULES: dict[Op, Callable[[Record], None]] = {
    Op.RENAME: _rename, Op.MKNOD: _mknod, Op.SETXATTR: _xattr, Op.REMOVEXATTR: _xattr,
    Op.SYMLINK: _symlink, Op.FALLOCATE: _fallocate, Op.FILE: _file, Op.SYNC: _sync,
}
_BOUNDS = {"u32": (0, 1 << 32), "u64": (0, 1 << 64), "i64": (-(1 << 63), 1 << 63)}
_RANGES: dict[Op, tuple[tuple[str, int, int], ...]] = {
    op: tuple((name, *_BOUNDS[KINDS[name]]) for name in wanted if KINDS[name] in _BOUNDS)
    for op, wanted in FIELDS.items()
}


def check_path(path: bytes, *, root_ok: bool) -> None:
    """Refuse any path that could leave the tree: absolute, '.', '..', empty parts, NUL."""
    if not path:
        if root_ok:
            return
        raise RecordError("empty path")
    if len(path) > MAX_PATH:
        raise RecordError(f"path of {len(path)} bytes is too long")
    if b"\0" in path:
        raise RecordError(f"path {path!r} contains NUL")
    if path.startswith(b"/"):
        raise RecordError(f"absolute path {path!r}")
    for part in path.split(b"/"):
        if part in (b"", b".", b".."):
            raise RecordError(f"path {path!r} has a {part.decode() or 'empty'!r} component")
        if len(part) > NAME_MAX:
            raise RecordError(f"path {path!r} has a component over {NAME_MAX} bytes")


def is_under(path: bytes, top: bytes) -> bool:
    """Whether *path* is *top* or inside it (b"" is the root, which holds everything)."""
    return not top or path == top or path.startswith(top + b"/")


_KEY = struct.Struct(">QI")
KEY_SIZE = _KEY.size  # a record's key: set, seq


def encode_key(set_id: int, seq: int) -> bytes:
    return _KEY.pack(set_id, seq)


def decode_key(key: bytes) -> tuple[int, int]:
    if len(key) != _KEY.size:
        raise RecordError(f"bad record key of {len(key)} bytes")
    set_id, seq = _KEY.unpack(key)
    return set_id, seq


def peek_key(buf: bytes | memoryview) -> tuple[int, int]:
    """(set, seq) of an encoded record, read from its header without decoding it."""
    if len(buf) < _HEADER.size:
        raise RecordError(f"record too short ({len(buf)} bytes)")
    _, _, set_id, seq = _HEADER.unpack_from(buf)
    if seq >= MAX_SEQ:
        raise RecordError(f"seq {seq} out of range")
    return set_id, seq


def is_sync(buf: bytes | memoryview) -> bool:
    """True if the encoded record is a SYNC, the last of its set (read from its header)."""
    return peek_op(buf) == Op.SYNC


def peek_op(buf: bytes | memoryview) -> int:
    """The op of an encoded record, read from its header without decoding it (0 if too
    short to have one)."""
    return buf[1] if len(buf) > 1 else 0


def encode_set(set_id: int) -> bytes:
    return _U64.pack(set_id)


def decode_set(buf: bytes) -> int:
    if len(buf) != _U64.size:
        raise RecordError(f"bad set id of {len(buf)} bytes")
    (value,) = _U64.unpack(buf)
    return int(value)


_INTENT = struct.Struct(">QQ")


def encode_intent(ino: int, ino2: int) -> bytes:
    """The identities an exchange expects to swap (see repl/apply.py)."""
    return _INTENT.pack(ino, ino2)


def decode_intent(buf: bytes) -> tuple[int, int]:
    if len(buf) != _INTENT.size:
        raise RecordError(f"bad exchange intent of {len(buf)} bytes")
    a, b = _INTENT.unpack(buf)
    return a, b


_RANGE = struct.Struct(">QQ")


def encode_ranges(ranges: list[tuple[int, int]]) -> bytes:
    """Byte ranges [start, end) of the dirty map (store/dirty.py)."""
    return b"".join(_RANGE.pack(start, end) for start, end in ranges)


def decode_ranges(buf: bytes) -> list[tuple[int, int]]:
    if len(buf) % _RANGE.size:
        raise RecordError(f"dirty ranges of {len(buf)} bytes")
    return [(s, e) for s, e in _RANGE.iter_unpack(buf)]
