"""Declarative record fixtures shared by the store tests: one named record per case.

Every Op appears at least once, with every field it carries set to a value
that is not the default, so a field dropped or reordered by the encoder
shows up in the round-trip and golden tests.
"""

from __future__ import annotations

import stat

import xxhash

from store.records import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Op,
    Record,
)

SET = (1 << 40) + 7  # wider than 32 bits: pins the u64 set field

SPECS: dict[str, Record] = {
    "write": Record(Op.WRITE, SET, 0, path=b"dir/caf\xc3\xa9", offset=(1 << 33) + 5,
                    data=b"hello\x00world"),
    "write-empty": Record(Op.WRITE, SET, 1, path=b"f", offset=0, data=b""),
    "truncate": Record(Op.TRUNCATE, SET, 2, path=b"dir/file", size=123_456_789_012),
    "create": Record(Op.CREATE, SET, 3, path=b"dir/new", mode=stat.S_IFREG | 0o4751,
                     uid=1000, gid=1001),
    "mkdir": Record(Op.MKDIR, SET, 4, path=b"dir/sub", mode=stat.S_IFDIR | 0o2750,
                    uid=0xFFFF_FFFE, gid=7),
    "mknod-fifo": Record(Op.MKNOD, SET, 5, path=b"fifo", mode=stat.S_IFIFO | 0o640,
                         rdev=0, uid=1, gid=2),
    "mknod-chr": Record(Op.MKNOD, SET, 6, path=b"dev/null2", mode=stat.S_IFCHR | 0o666,
                        rdev=(1 << 32) | 3, uid=0, gid=0),
    "symlink": Record(Op.SYMLINK, SET, 7, path=b"link", data=b"../../outside/target",
                      uid=3, gid=4),
    "link": Record(Op.LINK, SET, 8, path=b"dir/file", path2=b"other/hard"),
    "unlink": Record(Op.UNLINK, SET, 9, path=b"dir/gone"),
    "rmdir": Record(Op.RMDIR, SET, 10, path=b"dir/sub"),
    "rename": Record(Op.RENAME, SET, 11, path=b"a/b", path2=b"c/d"),
    "rename-noreplace": Record(Op.RENAME, SET, 12, path=b"a", path2=b"b",
                               flags=RENAME_NOREPLACE),
    "rename-exchange": Record(Op.RENAME, SET, 13, path=b"x", path2=b"y/z",
                              flags=RENAME_EXCHANGE),
    "chmod-root": Record(Op.CHMOD, SET, 14, path=b"", mode=0o1777),
    "chown": Record(Op.CHOWN, SET, 15, path=b"dir/file", uid=65534, gid=0xFFFF_FFFF),
    "utimes": Record(Op.UTIMES, SET, 16, path=b"dir/file", atime_ns=-1_500_000_000_123,
                     mtime_ns=(1 << 62) + 9),
    "setxattr": Record(Op.SETXATTR, SET, 17, path=b"dir/file", name=b"user.key",
                       data=b"\x00\xffvalue"),
    "removexattr": Record(Op.REMOVEXATTR, SET, 18, path=b"", name=b"trusted.k"),
    "void": Record(Op.VOID, SET, 19),
    "sync": Record(Op.SYNC, SET, 20, count=20),
    "reset": Record(Op.RESET, SET, 21),
    "prune": Record(Op.PRUNE, SET, 22, path=b"dir/sub"),
    "fallocate": Record(Op.FALLOCATE, SET, 23, path=b"dir/file", flags=FALLOC_FL_ZERO_RANGE,
                        offset=(1 << 40) + 3, length=(1 << 33) + 1),
    "fallocate-punch": Record(Op.FALLOCATE, SET, 24, path=b"f",
                              flags=FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset=4096,
                              length=8192),
    "file": Record(Op.FILE, SET, 25, path=b"dir/small", mode=stat.S_IFREG | 0o2640,
                   uid=70_000, gid=70_001, atime_ns=-(1 << 40), mtime_ns=(1 << 61) + 9,
                   data=b"whole\x00file"),
}


def reseal(body: bytes) -> bytes:
    """*body* with a valid checksum appended: bytes that fail only on their content."""
    return body + xxhash.xxh3_64_intdigest(body).to_bytes(8, "big")


def body(record: Record) -> bytes:
    """The encoded *record* without its checksum."""
    return record.encode()[:-8]
