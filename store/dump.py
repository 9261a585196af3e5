"""``replfs dump``: print a journal's records, one line each, for debugging."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from store.errors import RecordError, StoreError
from store.journal import Journal
from store.journal import exists as journal_exists
from store.records import FIELDS, Op, Record


def describe(record: Record, raw: bytes) -> str:
    """One line: set/seq, op, paths, offset and length, checksum."""
    parts = [f"{record.set:>8}/{record.seq:<6} {record.op.name:<11}"]
    wanted = FIELDS[record.op]
    if "path" in wanted:
        parts.append(repr(record.path.decode(errors="backslashreplace")))
    if "path2" in wanted:
        parts.append("-> " + repr(record.path2.decode(errors="backslashreplace")))
    if record.op == Op.WRITE:
        parts.append(f"offset={record.offset} length={len(record.data)}")
    if record.op == Op.FILE:
        parts.append(f"length={len(record.data)}")
    if record.op == Op.FALLOCATE:
        parts.append(f"offset={record.offset} length={record.length}")
    for name in ("size", "mode", "uid", "gid", "rdev", "flags", "count"):
        if name in wanted:
            value = getattr(record, name)
            parts.append(f"{name}={value:#o}" if name == "mode" else f"{name}={value}")
    if record.op in (Op.UTIMES, Op.FILE):
        parts.append(f"atime_ns={record.atime_ns} mtime_ns={record.mtime_ns}")
    if record.op in (Op.SETXATTR, Op.REMOVEXATTR):
        parts.append(f"name={record.name.decode(errors='backslashreplace')}")
    if record.op in (Op.SETXATTR, Op.SYMLINK):
        parts.append(f"data={record.data[:64]!r}")
    parts.append(f"checksum={raw[-8:].hex()}")
    return " ".join(parts)


def dump(path: Path, out: TextIO) -> None:
    """Print every record of the journal at *path*; a bad record prints as such."""
    if not journal_exists(path):
        raise StoreError(f"{path} holds no journal (no *.log segment); give a journal "
                         "directory")
    journal = Journal(path, read_only=True)
    try:
        count = 0
        for set_id, seq, raw, _ in journal.iter_raw():
            try:
                out.write(describe(Record.decode(raw), raw) + "\n")
            except RecordError as exc:
                out.write(f"{set_id:>8}/{seq:<6} BAD         {exc}\n")
            count += 1
        if count == 0 and journal.log.torn is not None and not journal.get_meta(b"identity"):
            raise StoreError(f"{path} holds no readable journal: its log begins with a "
                             "damaged entry")
        out.write(f"# {count} records\n")
        if journal.log.torn is not None:
            out.write(f"# the log ends in a damaged or unfinished entry at position "
                      f"{journal.log.torn}; the primary cuts it off when it starts\n")
    finally:
        journal.close()
