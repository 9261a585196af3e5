"""`replfs dump`: one readable line per journal record, a clear error for anything else."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest

from store.journal import Journal
from store.records import FIELDS, Op, Record
from tests.store.specs import SPECS
from tests.support import replfs

# What the line of each spec's record must show, besides its position and op.
SHOWS: dict[str, list[str]] = {
    "write": ["'dir/café'", "offset=8589934597 length=11"],
    "write-empty": ["'f'", "offset=0 length=0"],
    "truncate": ["'dir/file'", "size=123456789012"],
    "create": ["'dir/new'", "mode=0o104751", "uid=1000", "gid=1001"],
    "mkdir": ["'dir/sub'", "mode=0o42750", "uid=4294967294", "gid=7"],
    "mknod-fifo": ["'fifo'", "mode=0o10640", "rdev=0"],
    "mknod-chr": ["'dev/null2'", "mode=0o20666", "rdev=4294967299"],
    "symlink": ["'link'", "data=b'../../outside/target'"],
    "link": ["'dir/file' -> 'other/hard'"],
    "unlink": ["'dir/gone'"],
    "rmdir": ["'dir/sub'"],
    "rename": ["'a/b' -> 'c/d'", "flags=0"],
    "rename-noreplace": ["'a' -> 'b'", "flags=1"],
    "rename-exchange": ["'x' -> 'y/z'", "flags=2"],
    "chmod-root": ["'' mode=0o1777"],
    "chown": ["'dir/file'", "uid=65534", "gid=4294967295"],
    "utimes": ["atime_ns=-1500000000123", "mtime_ns=4611686018427387913"],
    "setxattr": ["name=user.key", r"data=b'\x00\xffvalue'"],
    "removexattr": ["'' name=trusted.k"],
    "reset": [],
    "prune": ["'dir/sub'"],
    "fallocate": ["'dir/file'", "offset=1099511627779 length=8589934593", "flags=16"],
    "fallocate-punch": ["'f'", "offset=4096 length=8192", "flags=3"],
    "file": ["'dir/small'", "length=10", "mode=0o102640", "uid=70000", "gid=70001",
             "atime_ns=-1099511627776", "mtime_ns=2305843009213693961"],
}


def fill(path: Path) -> list[tuple[Record, list[str]]]:
    """A journal holding every spec'd op, then one voided record and a SYNC."""
    expected = []
    j = Journal(path)
    try:
        for case, spec in SPECS.items():
            if spec.op in (Op.SYNC, Op.VOID):
                continue
            record = j.append(spec.op, **{f: getattr(spec, f) for f in FIELDS[spec.op]})
            expected.append((record, SHOWS[case]))
        doomed = j.append(Op.UNLINK, path=b"never")
        j.put(doomed.voided())
        expected.append((doomed.voided(), []))
        j.close_set()
        sync = j.last()
        assert sync is not None
        expected.append((sync, [f"count={sync.seq}"]))
    finally:
        j.close()
    return expected


def test_dump_ok(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    expected = fill(path)
    result = replfs("dump", path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[-1] == f"# {len(expected)} records"
    assert len(lines) == len(expected) + 1, "one line per record"
    for line, (record, shows) in zip(lines[:-1], expected, strict=True):
        head = f"{record.set:>8}/{record.seq:<6} {record.op.name:<11}"
        assert line.startswith(head), line
        assert line.endswith(f" checksum={record.encode()[-8:].hex()}"), line
        for text in shows:
            assert text in line, f"{text!r} not in {line!r}"


def test_dump_ok_empty_journal(tmp_path: Path) -> None:
    Journal(tmp_path / "journal").close()
    result = replfs("dump", tmp_path / "journal")
    assert (result.returncode, result.stdout, result.stderr) == (0, "# 0 records\n", "")


def test_dump_ok_torn_log(tmp_path: Path) -> None:
    """A damaged entry ends the dump, said as such; the records before it print."""
    path = tmp_path / "journal"
    j = Journal(path)
    try:
        j.append(Op.UNLINK, path=b"a")
        j.append(Op.UNLINK, path=b"b")
        end = j.end
    finally:
        j.close()
    (segment,) = path.glob("*.log")
    with open(segment, "r+b") as f:
        f.seek(end - 1)
        f.write(b"\xff")  # the last byte of the last entry's checksum
    result = replfs("dump", path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("       1/0      UNLINK      'a'")
    assert lines[1] == "# 1 records"
    assert lines[2].startswith("# the log ends in a damaged or unfinished entry at position ")


@pytest.mark.parametrize("what", ["empty-dir", "missing", "file", "other-lmdb", "garbage"])
def test_dump_err_no_journal(tmp_path: Path, what: str) -> None:
    path = tmp_path / what
    if what == "empty-dir":
        path.mkdir()
    elif what == "file":
        path.write_text("not a journal\n")
    elif what == "other-lmdb":
        env = lmdb.open(str(path))
        with env.begin(write=True) as txn:
            txn.put(b"key", b"value")
        env.close()
    elif what == "garbage":
        path.mkdir()
        (path / f"{0:016x}.log").write_bytes(b"\x5a" * 8192)
    result = replfs("dump", path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"replfs: {path} ")
    assert "journal" in result.stderr
    assert result.stderr.count("\n") == 1, f"one line, no traceback: {result.stderr}"
