"""Footprint: what a batch changes, named by the replica's inode numbers before it."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from repl.apply import apply
from repl.secondary.footprint import Footprint
from repl.tree import Tree
from store.records import RENAME_EXCHANGE, Op, Record
from tests.support import record_of as rec

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755




@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    """A replica before the batch: a/f, a/g, b/ and the file top."""
    root = tmp_path / "r"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for name in ("a/f", "a/g", "top"):
        (root / name).write_bytes(b"before")
    t = Tree(root)
    yield t
    t.close()


def ino(tree: Tree, path: bytes) -> int:
    st = tree.lstat(path)
    assert st is not None
    return st.st_ino


def footprint(tree: Tree, *records: Record) -> Footprint:
    """The footprint of *records*, which are then applied to *tree*."""
    touched = Footprint(tree)
    for record in records:
        touched.add(record)
    for record in records:
        apply(tree, record)
    return touched


def test_footprint_add_ok_data_and_attributes(tree: Tree) -> None:
    f, top, root = ino(tree, b"a/f"), ino(tree, b"top"), ino(tree, b"")
    touched = footprint(tree, rec(Op.WRITE, b"a/f", data=b"x"),
                        rec(Op.CHMOD, b"top", mode=0o600), rec(Op.UTIMES, b""))
    assert touched.data == {f}
    assert touched.attrs == {f, top, root}
    assert touched.entries == set()
    assert not touched.everything


def test_footprint_add_ok_names_added_and_removed(tree: Tree) -> None:
    a, b, g = ino(tree, b"a"), ino(tree, b"b"), ino(tree, b"a/g")
    touched = footprint(tree, rec(Op.CREATE, b"b/new", mode=FILE),
                        rec(Op.UNLINK, b"a/g"), rec(Op.MKDIR, b"b/d", mode=DIR),
                        rec(Op.CREATE, b"b/d/inner", mode=FILE))
    assert touched.entries == {(b, b"new"), (a, b"g"), (b, b"d")}
    assert touched.attrs == {a, b, g}
    assert sorted(touched.created_inodes()) == sorted(
        ino(tree, p) for p in (b"b/new", b"b/d", b"b/d/inner"))


def test_footprint_add_ok_paths_after_a_rename_reach_the_moved_directory(tree: Tree) -> None:
    """After ``rename a c``, c/f is the file that was a/f, and its entry is in a."""
    a, f, g, root = ino(tree, b"a"), ino(tree, b"a/f"), ino(tree, b"a/g"), ino(tree, b"")
    touched = footprint(tree, rec(Op.RENAME, b"a", path2=b"c"),
                        rec(Op.WRITE, b"c/f", data=b"x"), rec(Op.UNLINK, b"c/g"))
    assert touched.data == {f}
    assert touched.entries == {(root, b"a"), (root, b"c"), (a, b"g")}
    assert {a, f, g, root} <= touched.attrs


def test_footprint_add_ok_rename_over_a_name_and_exchange(tree: Tree) -> None:
    a, f, g, top, root = (ino(tree, p) for p in (b"a", b"a/f", b"a/g", b"top", b""))
    touched = footprint(tree, rec(Op.RENAME, b"a/f", path2=b"top"),
                        rec(Op.RENAME, b"top", path2=b"a/g", flags=RENAME_EXCHANGE),
                        rec(Op.WRITE, b"top", data=b"x"))
    assert touched.entries == {(a, b"f"), (root, b"top"), (a, b"g")}
    assert touched.data == {g}, "top holds what was a/g after the exchange"
    assert {f, g, top} <= touched.attrs


def test_footprint_created_inodes_ok_followed_through_renames(tree: Tree) -> None:
    touched = footprint(tree, rec(Op.MKDIR, b"new", mode=DIR),
                        rec(Op.CREATE, b"new/x", mode=FILE),
                        rec(Op.RENAME, b"new", path2=b"a/moved"),
                        rec(Op.CREATE, b"gone", mode=FILE), rec(Op.UNLINK, b"gone"))
    assert sorted(touched.created_inodes()) == sorted(
        ino(tree, p) for p in (b"a/moved", b"a/moved/x"))


def test_footprint_add_ok_link_touches_the_source(tree: Tree) -> None:
    b, f = ino(tree, b"b"), ino(tree, b"a/f")
    touched = footprint(tree, rec(Op.LINK, b"a/f", path2=b"b/l"),
                        rec(Op.WRITE, b"b/l", data=b"x"))
    assert touched.entries == {(b, b"l")}
    assert touched.data == {f}
    assert f in touched.attrs


@pytest.mark.parametrize("op", [Op.RESET, Op.PRUNE])
def test_footprint_add_ok_everything_after_reset_or_prune(tree: Tree, op: Op) -> None:
    touched = Footprint(tree)
    touched.add(rec(op, b"a" if op == Op.PRUNE else b""))
    assert touched.everything


def test_footprint_add_ok_nothing_of_the_tree_after_reset(tree: Tree) -> None:
    """After RESET, a/f is a file the batch makes, not the replica's a/f."""
    touched = footprint(tree, rec(Op.RESET, b""), rec(Op.MKDIR, b"a", mode=DIR),
                        rec(Op.CREATE, b"a/f", mode=FILE), rec(Op.WRITE, b"a/f", data=b"x"))
    assert touched.data == set()
    assert sorted(touched.created_inodes()) == sorted(ino(tree, p) for p in (b"a", b"a/f"))


def test_footprint_add_ok_counts_records(tree: Tree) -> None:
    touched = Footprint(tree)
    for _ in range(3):
        touched.add(rec(Op.WRITE, b"top", data=b"x"))
    assert touched.records == 3
    assert os.path.exists(tree.proc_path(b"top"))
