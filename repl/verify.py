"""Compare two trees by what the guarantee covers: content and metadata.

Each entry is summarised as (type, mode, uid, gid, size, nlink, mtime,
xattrs, xxh3-128 of the content or the symlink target). atime and ctime
are left out: no copy can reproduce them. Trees are walked in sorted order
with dir fds, so deep trees work and two trees stream side by side.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import xxhash

from repl import control
from repl.errors import UsageError
from store.libc import fd_path

Entry = tuple[object, ...]
_CHUNK = 1 << 20


def _summary(dir_fd: int, name: str | None, st: os.stat_result) -> Entry:
    where: bytes | int = fd_path(dir_fd, os.fsencode(name)) if name else dir_fd
    names = sorted(os.listxattr(where, follow_symlinks=name is None))
    xattrs = tuple((n, os.getxattr(where, n, follow_symlinks=name is None)) for n in names)
    body: object = None
    if stat.S_ISREG(st.st_mode):
        h = xxhash.xxh3_128()
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd) \
            if name else os.dup(dir_fd)
        try:
            while chunk := os.read(fd, _CHUNK):
                h.update(chunk)
        finally:
            os.close(fd)
        body = h.hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        assert name is not None  # the root is a directory
        body = os.readlink(name, dir_fd=dir_fd)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        body = st.st_rdev
    size = None if stat.S_ISDIR(st.st_mode) else st.st_size
    return (stat.filemode(st.st_mode), st.st_uid, st.st_gid, size, st.st_nlink,
            st.st_mtime_ns, xattrs, body)


def walk(root: str | os.PathLike[str]) -> Iterator[tuple[str, Entry]]:
    """(relative path, summary) of every entry under *root*, root first, sorted."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield "", _summary(root_fd, None, os.fstat(root_fd))
        yield from _walk_dir(root_fd, "")
    finally:
        os.close(root_fd)


def _walk_dir(dir_fd: int, prefix: str) -> Iterator[tuple[str, Entry]]:
    for name in sorted(os.listdir(dir_fd)):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        path = f"{prefix}/{name}" if prefix else name
        yield path, _summary(dir_fd, name, st)
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=dir_fd)
            try:
                yield from _walk_dir(sub, path)
            finally:
                os.close(sub)


def tree_digest(root: str | os.PathLike[str]) -> str:
    """One xxh3-128 over every entry's summary: equal trees, equal digests."""
    return digest(walk(root))


def digest(entries: Iterable[tuple[str, Entry]]) -> str:
    """``tree_digest`` of the tree whose ``walk`` gave *entries*."""
    h = xxhash.xxh3_128()
    for path, entry in entries:
        h.update(repr((path, entry)).encode())
    return h.hexdigest()


def differences(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> Iterator[str]:
    """One line per path where the trees differ, streaming both walks in step."""
    left, right = walk(a), walk(b)
    x, y = next(left, None), next(right, None)
    while x is not None or y is not None:
        # Walk order is by path components, which is not plain string order.
        if y is None or (x is not None and x[0].split("/") < y[0].split("/")):
            yield f"only in {a}: {x[0] or '/'}"  # type: ignore[index]
            x = next(left, None)
        elif x is None or y[0].split("/") < x[0].split("/"):
            yield f"only in {b}: {y[0] or '/'}"
            y = next(right, None)
        else:
            if x[1] != y[1]:
                fields = ("mode", "uid", "gid", "size", "nlink", "mtime", "xattrs", "content")
                what = [f for f, p, q in zip(fields, x[1], y[1], strict=True) if p != q]
                yield f"differs: {x[0] or '/'} ({', '.join(what)})"
            x, y = next(left, None), next(right, None)


def verify(primary: Path, replica: Path, out: TextIO, wait: float = 60.0) -> int:
    """Compare a primary with its replica at one set boundary. Returns the differences.

    *primary* is a live primary's mountpoint (it is frozen, checkpointed and
    compared once the secondary applied that set) or, with no daemon
    serving it, a plain directory compared as it is.
    """
    sock_path = control.socket_path(primary)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(wait + 30)
        sock.connect(str(sock_path))
    except OSError:
        sock.close()
        return _report(primary, replica, out, None)
    with sock:
        sock.sendall(json.dumps({"cmd": "freeze", "wait": wait}).encode() + b"\n")
        reply = json.loads(sock.makefile("rb").readline())
        if "error" in reply:
            raise UsageError(str(reply["error"]))
        set_id = int(reply["set"])
        return _report(Path(reply["backing"]), replica, out, set_id)


def _report(a: Path, b: Path, out: TextIO, set_id: int | None) -> int:
    count = 0
    for line in differences(a, b):
        out.write(line + "\n")
        count += 1
    at = f" at set {set_id}" if set_id is not None else ""
    out.write(f"{count} differences between {a} and {b}{at}\n" if count else
              f"{a} and {b} are identical{at}\n")
    return count
