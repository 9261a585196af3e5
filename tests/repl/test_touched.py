"""Touched: the paths whose times a data set changed, followed through renames."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from repl.apply import apply
from repl.primary.touched import Touched
from repl.tree import Tree
from store.records import RENAME_EXCHANGE, RENAME_NOREPLACE, Op, Record
from tests.support import record_of as rec
from tests.support import snapshot

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755




def touched(*records: Record, start: set[bytes] | None = None) -> set[bytes]:
    t = Touched()
    t.paths = set(start or ())
    for record in records:
        t.add(record)
    return t.paths


def test_touched_add_ok_data_ops() -> None:
    assert touched(
        rec(Op.WRITE, b"d/f", data=b"x"),
        rec(Op.TRUNCATE, b"g"),
        rec(Op.CHMOD, b"h", mode=0o600),
        rec(Op.CHOWN, b"i"),
        rec(Op.SETXATTR, b"j", name=b"user.k"),
        rec(Op.REMOVEXATTR, b"", name=b"user.k"),
        rec(Op.FALLOCATE, b"k", length=1),
    ) == {b"d/f", b"g", b"h", b"i", b"j", b"", b"k"}


def test_touched_add_ok_utimes_sets_its_own_times() -> None:
    assert touched(rec(Op.UTIMES, b"f", mtime_ns=5)) == set()


def test_touched_add_ok_creates_add_parent() -> None:
    assert touched(
        rec(Op.CREATE, b"top", mode=FILE),
        rec(Op.MKDIR, b"a/b/c", mode=DIR),
        rec(Op.MKNOD, b"x/fifo", mode=stat.S_IFIFO | 0o600),
        rec(Op.SYMLINK, b"y/s", data=b"t"),
    ) == {b"top", b"", b"a/b/c", b"a/b", b"x/fifo", b"x", b"y/s", b"y"}


def test_touched_add_ok_link() -> None:
    assert touched(rec(Op.LINK, b"a/f", path2=b"b/g")) == {b"a/f", b"b/g", b"b"}


def test_touched_add_ok_unlink_drops_path() -> None:
    start = {b"d/f", b"d/g", b"d/fx"}
    assert touched(rec(Op.UNLINK, b"d/f"), start=start) == {b"d/g", b"d/fx", b"d"}


def test_touched_add_ok_rmdir_drops_path() -> None:
    assert touched(rec(Op.MKDIR, b"p/e", mode=DIR), rec(Op.RMDIR, b"p/e")) == {b"p"}


def test_touched_add_ok_rename_moves_path() -> None:
    start = {b"a/f", b"a/f2", b"a/fx/y"}
    assert touched(rec(Op.RENAME, b"a/f", path2=b"b/g"), start=start) == {
        b"b/g", b"a/f2", b"a/fx/y", b"a", b"b"}


def test_touched_add_ok_rename_moves_descendants() -> None:
    start = {b"d/f", b"d/e/g", b"d", b"dd/h"}
    assert touched(rec(Op.RENAME, b"d", path2=b"n/m"), start=start) == {
        b"n/m/f", b"n/m/e/g", b"n/m", b"dd/h", b"", b"n"}


def test_touched_add_ok_rename_over_drops_replaced() -> None:
    """What the destination held is gone, descendants included (an empty dir replaced)."""
    start = {b"src", b"dst", b"dst/old", b"dstx"}
    assert touched(rec(Op.RENAME, b"src", path2=b"dst"), start=start) == {b"dst", b"dstx", b""}


def test_touched_add_ok_rename_noreplace() -> None:
    start = {b"a/f"}
    assert touched(rec(Op.RENAME, b"a/f", path2=b"g", flags=RENAME_NOREPLACE),
                   start=start) == {b"g", b"a", b""}


def test_touched_add_ok_exchange_swaps() -> None:
    start = {b"a", b"a/x", b"b/y", b"c"}
    assert touched(rec(Op.RENAME, b"a", path2=b"b", flags=RENAME_EXCHANGE), start=start) == {
        b"b", b"b/x", b"a/y", b"a", b"c", b""}


def test_touched_add_ok_exchange_across_dirs() -> None:
    start = {b"p/a/f"}
    assert touched(rec(Op.RENAME, b"p/a", path2=b"q/b", flags=RENAME_EXCHANGE),
                   start=start) == {b"q/b/f", b"p/a", b"q/b", b"p", b"q"}


def test_touched_add_ok_chain() -> None:
    """A path followed through several renames ends at its final name."""
    assert touched(
        rec(Op.MKDIR, b"d", mode=DIR),
        rec(Op.CREATE, b"d/f", mode=FILE),
        rec(Op.WRITE, b"d/f", data=b"x"),
        rec(Op.RENAME, b"d/f", path2=b"d/g"),
        rec(Op.RENAME, b"d", path2=b"e"),
        rec(Op.MKDIR, b"z", mode=DIR),
        rec(Op.RENAME, b"e", path2=b"z/e"),
    ) == {b"z/e", b"z/e/g", b"z", b""}


def test_touched_clear_ok() -> None:
    t = Touched()
    t.add(rec(Op.WRITE, b"f", data=b"x"))
    t.clear()
    assert t.paths == set()


# --- against a real tree ---------------------------------------------------------

OLD_NS = 1_000_000_000_000_000_000


def test_touched_add_ok_covers_real_changes(tmp_path: Path) -> None:
    """Applying a run really changes the mtime of no path Touched misses, and every
    path it keeps names something at the end."""
    root = tmp_path / "t"
    root.mkdir()
    for d in ("a", "a/sub", "b", "c"):
        (root / d).mkdir()
    for f in ("a/f", "a/sub/g", "b/h", "c/i", "c/j"):
        (root / f).write_bytes(b"12345")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""]:
            os.utime(os.path.join(dirpath, name), ns=(OLD_NS, OLD_NS))
    before = snapshot(root)

    records = [
        rec(Op.WRITE, b"a/sub/g", offset=1, data=b"x"),
        rec(Op.MKDIR, b"b/new", mode=DIR),
        rec(Op.CREATE, b"b/new/n", mode=FILE),
        rec(Op.RENAME, b"a", path2=b"b/new/a"),
        rec(Op.TRUNCATE, b"b/new/a/f", size=2),
        rec(Op.LINK, b"c/i", path2=b"b/i2"),
        rec(Op.UNLINK, b"c/i"),
        rec(Op.RENAME, b"c/j", path2=b"b/h"),
        rec(Op.RENAME, b"b/new/a/sub", path2=b"c", flags=RENAME_EXCHANGE),
        rec(Op.WRITE, b"c/g", data=b"y"),
        rec(Op.RMDIR, b"b/new/a/sub"),
    ]
    t = Touched()
    tree = Tree(root)
    try:
        for record in records:
            apply(tree, record)
            t.add(record)
    finally:
        tree.close()
    after = snapshot(root)

    def mtime(entry: tuple[object, ...]) -> object:
        return entry[6]

    changed = {p.encode() for p, e in after.items()
               if p not in before or mtime(before[p]) != mtime(e)}
    assert changed, "the run changed something"
    assert changed <= t.paths, f"missed: {sorted(changed - t.paths)}"
    assert {p.decode() for p in t.paths} <= after.keys(), "a touched path names nothing"


def test_touched_mtimes_ok_kept_through_writes_forgotten_otherwise() -> None:
    """The mtime the kernel last sent stays through ops that do not move it, writes
    among them (the kernel stamps the write(2) and sends the stamp if it moved);
    any other op forgets every kept mtime (a file may have several names)."""
    t = Touched()
    t.keep_mtime(b"old", 1_000_000_000)
    t.keep_mtime(b"other", 2_000_000_000)
    t.add(rec(Op.CHMOD, b"old", mode=0o600))
    t.add(rec(Op.WRITE, b"old", data=b"x"))
    assert t.mtimes == {b"old": 1_000_000_000, b"other": 2_000_000_000}
    t.paths = {b"old"}
    t.clear()  # the set closed: what it did not touch is forgotten
    assert list(t.mtimes) == [b"old"]
    t.add(rec(Op.TRUNCATE, b"other-name-of-old"))
    assert t.mtimes == {}
