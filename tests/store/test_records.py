"""The record format: round trips, decode errors, one test per validate() rule, golden bytes."""

from __future__ import annotations

import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from store.errors import RecordError
from store.notes import Note, NoteKind, decode_notes, encode_notes
from store.records import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    FIELDS,
    MAX_BLOB,
    MAX_OFFSET,
    MAX_PATH,
    MAX_SEQ,
    NAME_MAX,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Op,
    Record,
    check_path,
    decode_intent,
    decode_key,
    decode_set,
    encode_intent,
    encode_key,
    encode_set,
    peek_key,
)
from tests.store.specs import SET, SPECS, body, reseal
from tests.support import golden_bytes

# Header layout: u8 version, u8 op, u64 set, u32 seq; the op's fields follow.
VERSION_AT, OP_AT, FIELDS_AT = 0, 1, 14
CHECKSUM_SIZE = 8
SPECS_BY_OP = {r.op: r for r in SPECS.values()}


def patched(record: Record, at: int, value: bytes) -> bytes:
    """*record* encoded with *value* written over the body at *at*, checksum made valid."""
    raw = bytearray(body(record))
    raw[at : at + len(value)] = value
    return reseal(bytes(raw))


def _as_dict(record: Record) -> dict[str, Any]:
    return {name: getattr(record, name) for name in Record.__dataclass_fields__}


def assert_invalid(record: Record, match: str) -> None:
    """validate() refuses *record*, and so does encode(): nothing invalid is ever written."""
    with pytest.raises(RecordError, match=match):
        record.validate()
    with pytest.raises(RecordError, match=match):
        record.encode()


# --- round trips -----------------------------------------------------------------


def test_specs_cover_every_op() -> None:
    assert {r.op for r in SPECS.values()} == set(Op)


@pytest.mark.parametrize("case", sorted(SPECS))
def test_record_encode_ok(case: str) -> None:
    record = SPECS[case]
    assert Record.decode(record.encode()) == record


@pytest.mark.parametrize("case", sorted(SPECS))
def test_record_decode_ok_memoryview(case: str) -> None:
    record = SPECS[case]
    assert Record.decode(memoryview(record.encode())) == record


@pytest.mark.parametrize("case", sorted(SPECS))
def test_record_decode_ok_without_data(case: str) -> None:
    """The receiver's decode: every field but the data, which the raw bytes it stages
    hold (a view of them is checked, no copy kept)."""
    record = SPECS[case]
    got = Record.decode(record.encode(), data=False)
    assert got == replace(record, data=b"")
    assert type(got.data) is bytes


@pytest.mark.parametrize("case", sorted(SPECS))
def test_record_decode_ok_data_as_a_view(case: str) -> None:
    """The applier's decode: a WRITE's, SETXATTR's or FILE's data is a view of the
    staged bytes it reads, never a copy; every other field as decoded."""
    record = SPECS[case]
    raw = record.encode()
    got = Record.decode(raw, view=True)
    assert got == record
    if record.op in (Op.WRITE, Op.SETXATTR, Op.FILE):
        assert isinstance(got.data, memoryview) and got.data.obj is raw
    else:
        assert type(got.data) is bytes


def test_record_encode_ok_field_order() -> None:
    """Fields follow the header in FIELDS order; a path is u16 length + bytes."""
    record = SPECS["rename"]
    assert FIELDS[Op.RENAME] == ("path", "path2", "flags")
    fields = body(record)[FIELDS_AT:]
    assert fields == b"\x00\x03a/b" + b"\x00\x03c/d" + b"\x00\x00\x00\x00"


# --- decode errors ---------------------------------------------------------------


def test_record_decode_err_empty() -> None:
    with pytest.raises(RecordError, match=r"too short \(0 bytes\)"):
        Record.decode(b"")


def test_record_decode_err_header_only() -> None:
    header = body(SPECS["void"])
    assert len(header) == FIELDS_AT
    with pytest.raises(RecordError, match="too short"):
        Record.decode(header)


def test_record_decode_err_header_only_sealed() -> None:
    """A WRITE header with a valid checksum but none of its fields."""
    with pytest.raises(RecordError, match="truncated WRITE record"):
        Record.decode(reseal(body(SPECS["write"])[:FIELDS_AT]))


@pytest.mark.parametrize("version", [0, 2, 255])
def test_record_decode_err_unknown_version(version: int) -> None:
    raw = patched(SPECS["write"], VERSION_AT, bytes([version]))
    with pytest.raises(RecordError, match=f"unknown record version {version}$"):
        Record.decode(raw)


@pytest.mark.parametrize("value", [0, max(Op) + 1, 255])
def test_record_decode_err_unknown_op(value: int) -> None:
    raw = patched(SPECS["void"], OP_AT, bytes([value]))
    with pytest.raises(RecordError, match=f"unknown op {value}$"):
        Record.decode(raw)


@pytest.mark.parametrize("case", sorted(c for c in SPECS if FIELDS[SPECS[c].op]))
def test_record_decode_err_truncated(case: str) -> None:
    """Every proper prefix of the fields is refused, even with a valid checksum."""
    full = body(SPECS[case])
    for cut in range(FIELDS_AT, len(full)):
        with pytest.raises(RecordError, match="truncated"):
            Record.decode(reseal(full[:cut]))


def test_record_decode_err_truncated_unsealed() -> None:
    raw = SPECS["write"].encode()
    for cut in range(len(raw)):
        with pytest.raises(RecordError):
            Record.decode(raw[:cut])


def test_record_decode_err_blob_length_past_end() -> None:
    """A length prefix pointing past the end names the field."""
    record = SPECS["write"]
    data_len_at = FIELDS_AT + 2 + len(record.path) + 8
    raw = patched(record, data_len_at, (len(record.data) + 1).to_bytes(4, "big"))
    with pytest.raises(RecordError, match="truncated data in WRITE record"):
        Record.decode(raw)


@pytest.mark.parametrize("extra", [b"\x00", b"junk"])
def test_record_decode_err_trailing_bytes(extra: bytes) -> None:
    with pytest.raises(RecordError, match=f"{len(extra)} trailing bytes in SYNC record"):
        Record.decode(reseal(body(SPECS["sync"]) + extra))


@pytest.mark.parametrize("case", ["write", "void", "sync"])
def test_record_decode_err_checksum(case: str) -> None:
    """Flipping any single bit anywhere, checksum included, is caught."""
    raw = SPECS[case].encode()
    for at in range(len(raw)):
        for bit in (0x01, 0x80):
            bad = bytearray(raw)
            bad[at] ^= bit
            with pytest.raises(RecordError):
                Record.decode(bytes(bad))


@pytest.mark.parametrize("at", range(-CHECKSUM_SIZE, 0))
def test_record_decode_err_flipped_checksum_byte(at: int) -> None:
    bad = bytearray(SPECS["write"].encode())
    bad[at] ^= 0xFF
    with pytest.raises(RecordError, match="checksum mismatch"):
        Record.decode(bytes(bad))


@pytest.mark.parametrize("data", [True, False])
def test_record_decode_err_invalid_content(data: bool) -> None:
    """Bytes with a valid checksum that name a path outside the tree are refused."""
    record = Record(Op.UNLINK, 1, 0, path=b"ab/passwd")
    raw = patched(record, FIELDS_AT + 2, b"..")
    with pytest.raises(RecordError, match=r"'\.\.' component"):
        Record.decode(raw, data=data)


@pytest.mark.parametrize("data", [True, False])
def test_record_decode_err_sync_count(data: bool) -> None:
    record = SPECS["sync"]
    raw = patched(record, FIELDS_AT, (record.count + 1).to_bytes(4, "big"))
    with pytest.raises(RecordError, match="carries op count"):
        Record.decode(raw, data=data)


@pytest.mark.parametrize("data", [True, False])
def test_record_decode_err_data_past_max_offset(data: bool) -> None:
    """A write whose data would reach past the largest offset is refused, without its
    data kept as well: the data's length counts."""
    record = Record(Op.WRITE, 1, 0, path=b"f", offset=MAX_OFFSET - 1, data=b"x")
    raw = patched(record, FIELDS_AT + 3, (MAX_OFFSET).to_bytes(8, "big"))
    with pytest.raises(RecordError, match="past the largest file offset"):
        Record.decode(raw, data=data)


@pytest.mark.parametrize("data", [True, False])
def test_record_decode_err_symlink_nul(data: bool) -> None:
    record = Record(Op.SYMLINK, 1, 0, path=b"l", data=b"ab")
    raw = patched(record, FIELDS_AT + 3 + 4 + 1, b"\0")
    with pytest.raises(RecordError, match="contains NUL"):
        Record.decode(raw, data=data)


# --- validate(): one test per rule -----------------------------------------------


@pytest.mark.parametrize("case", sorted(SPECS))
def test_record_validate_ok(case: str) -> None:
    SPECS[case].validate()


def test_record_validate_ok_limits() -> None:
    Record(Op.UNLINK, (1 << 64) - 1, MAX_SEQ - 1, path=b"n" * NAME_MAX).validate()
    head = b"/".join([b"d" * 254] * 256)
    long_path = head + b"/" + b"x" * (MAX_PATH - len(head) - 1)
    assert len(long_path) == MAX_PATH
    Record(Op.RMDIR, 0, 0, path=long_path).validate()
    Record(Op.WRITE, 1, 0, path=b"f", offset=(1 << 63) - 2, data=b"x").validate()
    Record(Op.UTIMES, 1, 0, path=b"f", atime_ns=-(1 << 63), mtime_ns=(1 << 63) - 1).validate()
    Record(Op.FALLOCATE, 1, 0, path=b"f", offset=MAX_OFFSET - 1, length=1).validate()


@pytest.mark.parametrize("set_id", [-1, 1 << 64])
def test_record_validate_err_set_range(set_id: int) -> None:
    assert_invalid(Record(Op.VOID, set_id, 0), f"set {set_id} out of range")


@pytest.mark.parametrize("seq", [-1, MAX_SEQ, 1 << 32])
def test_record_validate_err_seq_range(seq: int) -> None:
    assert_invalid(Record(Op.VOID, 1, seq), f"seq {seq} out of range")


@pytest.mark.parametrize(
    ("record", "stray"),
    [
        (Record(Op.WRITE, 1, 0, path=b"f", data=b"x", mode=0o644), "mode"),
        (Record(Op.UNLINK, 1, 0, path=b"f", path2=b"g"), "path2"),
        (Record(Op.SYNC, 1, 0, count=0, path=b"f"), "path"),
        (Record(Op.VOID, 1, 0, atime_ns=-1), "atime_ns"),
        (Record(Op.CHMOD, 1, 0, path=b"f", mode=0o644, uid=5), "uid"),
        (Record(Op.WRITE, 1, 0, path=b"f", data=b"x", length=1), "length"),
    ],
)
def test_record_validate_err_stray_field(record: Record, stray: str) -> None:
    assert_invalid(record, f"{record.op.name} record has a stray {stray}$")


@pytest.mark.parametrize("op", [Op.WRITE, Op.CREATE, Op.UNLINK, Op.RMDIR, Op.RENAME, Op.LINK,
                                Op.FALLOCATE])
def test_record_validate_err_root_path(op: Op) -> None:
    """Only attribute ops may name the root itself."""
    assert_invalid(Record(**{**_as_dict(SPECS_BY_OP[op]), "path": b""}), "empty path")


def test_record_validate_err_path_too_long() -> None:
    path = b"/".join([b"d" * 200] * 400)
    assert len(path) > MAX_PATH
    assert_invalid(Record(Op.UNLINK, 1, 0, path=path), f"path of {len(path)} bytes is too long")


def test_record_validate_err_path_nul() -> None:
    assert_invalid(Record(Op.UNLINK, 1, 0, path=b"a\0b"), "contains NUL")


@pytest.mark.parametrize("path", [b"/etc/passwd", b"/", b"//x"])
def test_record_validate_err_absolute_path(path: bytes) -> None:
    assert_invalid(Record(Op.UNLINK, 1, 0, path=path), "absolute path")


@pytest.mark.parametrize("path", [b"..", b"../x", b"a/../../x", b"a/.."])
def test_record_validate_err_dotdot(path: bytes) -> None:
    assert_invalid(Record(Op.UNLINK, 1, 0, path=path), r"'\.\.' component")


@pytest.mark.parametrize("path", [b".", b"./x", b"a/./b", b"a/."])
def test_record_validate_err_dot(path: bytes) -> None:
    assert_invalid(Record(Op.UNLINK, 1, 0, path=path), r"'\.' component")


@pytest.mark.parametrize("path", [b"a//b", b"a/"])
def test_record_validate_err_empty_component(path: bytes) -> None:
    assert_invalid(Record(Op.UNLINK, 1, 0, path=path), "'empty' component")


def test_record_validate_err_component_too_long() -> None:
    path = b"d/" + b"n" * (NAME_MAX + 1)
    assert_invalid(Record(Op.UNLINK, 1, 0, path=path), f"component over {NAME_MAX} bytes")


@pytest.mark.parametrize(("path2", "match"), [(b"", "empty path"), (b"../x", r"'\.\.' component"),
                                              (b"/x", "absolute path")])
def test_record_validate_err_path2(path2: bytes, match: str) -> None:
    assert_invalid(Record(Op.RENAME, 1, 0, path=b"a", path2=path2), match)
    assert_invalid(Record(Op.LINK, 1, 0, path=b"a", path2=path2), match)


@pytest.mark.parametrize("field", ["data", "name"])
def test_record_validate_err_blob_too_large(field: str) -> None:
    record = Record(Op.SETXATTR, 1, 0, path=b"f", name=b"user.k", data=b"")
    big = {field: bytes(MAX_BLOB + 1)}
    assert_invalid(Record(**{**_as_dict(record), **big}), "blob too large")


@pytest.mark.parametrize(
    ("op", "field", "value"),
    [
        (Op.CHMOD, "mode", 1 << 32),
        (Op.CHOWN, "uid", -1),
        (Op.CHOWN, "gid", 1 << 32),
        (Op.TRUNCATE, "size", 1 << 64),
        (Op.WRITE, "offset", -1),
        (Op.MKNOD, "rdev", 1 << 64),
        (Op.UTIMES, "atime_ns", 1 << 63),
        (Op.UTIMES, "mtime_ns", -(1 << 63) - 1),
        (Op.FALLOCATE, "length", 1 << 64),
        (Op.FALLOCATE, "flags", -1),
    ],
)
def test_record_validate_err_int_range(op: Op, field: str, value: int) -> None:
    fields = {**_as_dict(SPECS_BY_OP[op]), field: value}
    assert_invalid(Record(**fields), f"{field} {value} out of range")


@pytest.mark.parametrize(
    "record",
    [
        Record(Op.WRITE, 1, 0, path=b"f", offset=1 << 63, data=b""),
        Record(Op.WRITE, 1, 0, path=b"f", offset=(1 << 63) - 1, data=b"x"),
        Record(Op.TRUNCATE, 1, 0, path=b"f", size=1 << 63),
        Record(Op.FALLOCATE, 1, 0, path=b"f", offset=MAX_OFFSET - 1, length=2),
    ],
)
def test_record_validate_err_past_max_offset(record: Record) -> None:
    assert_invalid(record, "past the largest file offset")


@pytest.mark.parametrize("flags", [4, 8, 1 << 31, RENAME_NOREPLACE | 4])
def test_record_validate_err_rename_unknown_flags(flags: int) -> None:
    assert_invalid(Record(Op.RENAME, 1, 0, path=b"a", path2=b"b", flags=flags),
                   f"unknown rename flags {flags:#x}")


def test_record_validate_err_rename_exchange_noreplace() -> None:
    record = Record(Op.RENAME, 1, 0, path=b"a", path2=b"b",
                    flags=RENAME_EXCHANGE | RENAME_NOREPLACE)
    assert_invalid(record, "cannot both exchange and not replace")


@pytest.mark.parametrize("flags", [0x04, 0x08, 0x20, 0x40, 1 << 31,
                                   FALLOC_FL_ZERO_RANGE | 0x08])
def test_record_validate_err_fallocate_unknown_mode(flags: int) -> None:
    assert_invalid(Record(Op.FALLOCATE, 1, 0, path=b"f", flags=flags, length=1),
                   f"unknown fallocate mode {flags:#x}")


@pytest.mark.parametrize("flags", [FALLOC_FL_PUNCH_HOLE,
                                   FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE,
                                   FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
                                   | FALLOC_FL_KEEP_SIZE])
def test_record_validate_err_fallocate_punch_hole(flags: int) -> None:
    """fallocate(2) punches a hole only with KEEP_SIZE and no other mode."""
    assert_invalid(Record(Op.FALLOCATE, 1, 0, path=b"f", flags=flags, length=1),
                   f"fallocate mode {flags:#x} punches a hole but not alone with KEEP_SIZE")


@pytest.mark.parametrize("flags", [0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
                                   FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                                   FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE])
def test_record_validate_ok_fallocate_mode(flags: int) -> None:
    Record(Op.FALLOCATE, 1, 0, path=b"f", flags=flags, offset=0, length=1).validate()


def test_record_validate_err_fallocate_no_bytes() -> None:
    assert_invalid(Record(Op.FALLOCATE, 1, 0, path=b"f", offset=5), "fallocate of no bytes")


@pytest.mark.parametrize("kind", [0, stat.S_IFDIR, stat.S_IFLNK, 0o170000])
def test_record_validate_err_mknod_type(kind: int) -> None:
    record = Record(Op.MKNOD, 1, 0, path=b"n", mode=kind | 0o644, uid=0, gid=0)
    assert_invalid(record, "mknod of unsupported file type")


@pytest.mark.parametrize("kind", [stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, 0])
def test_record_validate_err_file_type(kind: int) -> None:
    assert_invalid(Record(Op.FILE, 1, 0, path=b"f", mode=kind | 0o644),
                   "file record of another file type")


@pytest.mark.parametrize("kind", [stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
                                  stat.S_IFSOCK])
def test_record_validate_ok_mknod_type(kind: int) -> None:
    Record(Op.MKNOD, 1, 0, path=b"n", mode=kind | 0o644).validate()


@pytest.mark.parametrize("op", [Op.SETXATTR, Op.REMOVEXATTR])
def test_record_validate_err_xattr_without_name(op: Op) -> None:
    assert_invalid(Record(op, 1, 0, path=b"f"), "xattr record without a name")


@pytest.mark.parametrize("op", [Op.SETXATTR, Op.REMOVEXATTR])
def test_record_validate_err_xattr_name_nul(op: Op) -> None:
    assert_invalid(Record(op, 1, 0, path=b"f", name=b"user.a\0b"), "xattr name .* contains NUL")


def test_record_validate_err_symlink_target_nul() -> None:
    record = Record(Op.SYMLINK, 1, 0, path=b"s", data=b"target\0/etc")
    assert_invalid(record, "symlink target .* contains NUL")


@pytest.mark.parametrize(("seq", "count"), [(5, 4), (5, 6), (0, 1)])
def test_record_validate_err_sync_count(seq: int, count: int) -> None:
    assert_invalid(Record(Op.SYNC, 1, seq, count=count),
                   f"sync at seq {seq} carries op count {count}")


def test_check_path_ok() -> None:
    check_path(b"", root_ok=True)
    check_path(b"a/b/.hidden/..x/x..", root_ok=False)
    check_path(b"\xff\xfe/\x01", root_ok=False)


# --- keys, intents, helpers ----------------------------------------------------------


def test_record_key_ok_sorts_in_stream_order() -> None:
    positions = [(1, 0), (1, 1), (1, 255), (1, 256), (2, 0), (1 << 40, 3), ((1 << 64) - 1, 0)]
    keys = [encode_key(s, q) for s, q in positions]
    assert sorted(keys) == keys
    assert [decode_key(k) for k in keys] == positions
    assert SPECS["write"].key == encode_key(SET, 0)


@pytest.mark.parametrize("size", [0, 11, 13])
def test_record_decode_key_err_length(size: int) -> None:
    with pytest.raises(RecordError, match=f"bad record key of {size} bytes"):
        decode_key(bytes(size))


def test_record_set_and_intent_ok() -> None:
    assert decode_set(encode_set(SET)) == SET
    assert decode_intent(encode_intent(12, (1 << 64) - 1)) == (12, (1 << 64) - 1)


def test_record_voided_ok() -> None:
    record = SPECS["write"]
    assert record.voided() == Record(Op.VOID, record.set, record.seq)
    assert Record.decode(record.voided().encode()).op == Op.VOID


def test_record_moved_ok() -> None:
    moved = SPECS["rename"].moved(9, 4)
    assert (moved.set, moved.seq) == (9, 4)
    assert moved.path2 == SPECS["rename"].path2


# --- golden bytes ------------------------------------------------------------------
#
# One file per case under tests/testdata/records/. They pin the format: if an
# ok case's bytes change, the format changed (bump FORMAT_VERSION and decode
# the old one explicitly). To rewrite them after a deliberate change, run
# the tests once with REPLFS_REGENERATE=1 and review the diff.

GOLDEN = Path(__file__).resolve().parent.parent / "testdata" / "records"


def _flip(at: int) -> Callable[[bytes], bytes]:
    return lambda raw: raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1 :]


def _seal(edit: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    return lambda raw: reseal(edit(raw[:-CHECKSUM_SIZE]))


# case -> (spec it starts from, how it is damaged, the error it must give)
CORRUPT: dict[str, tuple[str, Callable[[bytes], bytes], str]] = {
    "bad-checksum": ("write", _flip(-1), "checksum mismatch"),
    "bad-body": ("write", _flip(FIELDS_AT + 4), "checksum mismatch"),
    "truncated": ("write", _seal(lambda b: b[:-1]), "truncated data in WRITE record"),
    "trailing": ("unlink", _seal(lambda b: b + b"\x00"), "1 trailing bytes in UNLINK record"),
    "unknown-op": ("void", _seal(lambda b: b[:1] + b"\xc8" + b[2:]), "unknown op 200"),
    "unknown-version": ("void", _seal(lambda b: b"\x02" + b[1:]), "unknown record version 2"),
    "escape": ("rename", _seal(lambda b: b.replace(b"\x00\x03c/d", b"\x00\x02..")),
               r"'\.\.' component"),
    "header-only": ("write", lambda raw: raw[:FIELDS_AT], "too short"),
}


def _golden(case: str, raw: bytes) -> bytes:
    return golden_bytes(GOLDEN / f"{case}.bin", raw)


@pytest.mark.parametrize("case", sorted(SPECS))
def test_record_golden_ok(case: str) -> None:
    record = SPECS[case]
    golden = _golden(case, record.encode())
    assert record.encode() == golden, "the record format changed"
    assert Record.decode(golden) == record


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_record_golden_err(case: str) -> None:
    base, damage, message = CORRUPT[case]
    golden = _golden(case, damage(SPECS[base].encode()))
    assert golden == damage(SPECS[base].encode())
    with pytest.raises(RecordError, match=message):
        Record.decode(golden)
    with pytest.raises(RecordError, match=message):
        Record.decode(golden, data=False)


def test_record_golden_ok_no_strays() -> None:
    """Every golden file belongs to a case, so none silently stops being checked."""
    assert {p.stem for p in GOLDEN.glob("*.bin")} == set(SPECS) | set(CORRUPT)


def test_record_peek_key_ok() -> None:
    assert peek_key(SPECS["write"].encode()) == (SET, 0)


def test_record_peek_key_err_seq_range() -> None:
    """A seq no record may have is refused before anything is sized by it (the
    journal's index of a set grows to the seq it reads)."""
    with pytest.raises(RecordError, match=f"seq {MAX_SEQ} out of range"):
        peek_key(patched(SPECS["void"], FIELDS_AT - 4, MAX_SEQ.to_bytes(4, "big")))


# --- the activity log's notes --------------------------------------------------------

NOTES = {
    "notes": [Note(NoteKind.NAME, b"dir/caf\xc3\xa9"),
              Note(NoteKind.DATA, b"f", 4 << 20, MAX_OFFSET),
              Note(NoteKind.ATTR, b""),
              Note(NoteKind.XATTR, b"dir/file", name=b"user.key")],
    "notes-empty": [],
}
NOTES_GOLDEN = GOLDEN.parent / "notes"


@pytest.mark.parametrize("case", sorted(NOTES))
def test_notes_golden_ok(case: str) -> None:
    golden = golden_bytes(NOTES_GOLDEN / f"{case}.bin", encode_notes(NOTES[case]))
    assert encode_notes(NOTES[case]) == golden, "the notes format changed"
    assert decode_notes(golden) == NOTES[case]


def test_notes_golden_ok_no_strays() -> None:
    assert {p.stem for p in NOTES_GOLDEN.glob("*.bin")} == set(NOTES)


@pytest.mark.parametrize("note, match", [
    (Note(NoteKind.NAME, b""), "empty path"),
    (Note(NoteKind.DATA, b"../f", 0, 1), r"'\.\.' component"),
    (Note(NoteKind.DATA, b"f", 5, 5), r"range \[5, 5\) out of order"),
    (Note(NoteKind.DATA, b"f", 0, MAX_OFFSET + 1), "out of order or range"),
    (Note(NoteKind.ATTR, b"f", 0, 1), "ATTR note with a range"),
    (Note(NoteKind.XATTR, b"f"), "xattr note without a name"),
    (Note(NoteKind.NAME, b"f", name=b"user.k"), "NAME note with a name"),
    (Note(NoteKind.XATTR, b"f", name=b"u" * 256), "too long or contains NUL"),
    (Note(NoteKind.XATTR, b"f", name=b"user.\0"), "too long or contains NUL"),
])
def test_notes_validate_err(note: Note, match: str) -> None:
    with pytest.raises(RecordError, match=match):
        note.validate()
    with pytest.raises(RecordError, match=match):
        encode_notes([note])


@pytest.mark.parametrize("damage, match", [
    (lambda raw: raw[:-1], "truncated note"),
    (lambda raw: raw[:3], "truncated notes"),
    (lambda raw: raw + b"\0", "1 trailing bytes"),
    (lambda raw: b"\xff\xff\xff\xff" + raw[4:], "notes cannot fit"),
    (lambda raw: raw[:4] + b"\x09" + raw[5:], "unknown note kind 9"),
])
def test_notes_decode_err(damage: Callable[[bytes], bytes], match: str) -> None:
    raw = encode_notes(NOTES["notes"])
    with pytest.raises(RecordError, match=match):
        decode_notes(damage(raw))
