"""``replfs dump``: print a journal's records, one line each, for debugging."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

import lmdb

from store.errors import StoreError
from store.records import FIELDS, Op, Record, RecordError, decode_key


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
    if record.op == Op.FALLOCATE:
        parts.append(f"offset={record.offset} length={record.length}")
    for name in ("size", "mode", "uid", "gid", "rdev", "flags", "count"):
        if name in wanted:
            value = getattr(record, name)
            parts.append(f"{name}={value:#o}" if name == "mode" else f"{name}={value}")
    if record.op == Op.UTIMES:
        parts.append(f"atime_ns={record.atime_ns} mtime_ns={record.mtime_ns}")
    if record.op in (Op.SETXATTR, Op.REMOVEXATTR):
        parts.append(f"name={record.name.decode(errors='backslashreplace')}")
    if record.op in (Op.SETXATTR, Op.SYMLINK):
        parts.append(f"data={record.data[:64]!r}")
    parts.append(f"checksum={raw[-8:].hex()}")
    return " ".join(parts)


def dump(path: Path, out: TextIO) -> None:
    """Print every record of the journal at *path*; a bad record prints as such."""
    if not (path / "data.mdb").exists():
        raise StoreError(f"{path} holds no journal (no data.mdb); give a journal directory")
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=4)
    except lmdb.Error as exc:
        raise StoreError(f"{path} holds no readable journal ({exc})") from exc
    try:
        with env.begin() as txn:
            try:
                db = env.open_db(b"records", txn=txn, create=False)
            except lmdb.NotFoundError:
                raise StoreError(f"{path} holds an LMDB store but no journal records") from None
            count = 0
            for key, value in txn.cursor(db=db):
                try:
                    out.write(describe(Record.decode(value), bytes(value)) + "\n")
                except RecordError as exc:
                    set_id, seq = decode_key(key)
                    out.write(f"{set_id:>8}/{seq:<6} BAD         {exc}\n")
                count += 1
        out.write(f"# {count} records\n")
    finally:
        env.close()
