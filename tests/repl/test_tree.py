"""Tree: directory fds walked one component at a time, and their cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from repl.tree import CACHE_SIZE, Tree


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "t"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"x")
    (root / "file").write_bytes(b"y")
    os.symlink("a", root / "link")
    return root


@pytest.fixture
def tree(root: Path) -> Iterator[Tree]:
    with closing(Tree(root)) as t:
        yield t


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_tree_dir_fd_ok(root: Path, tree: Tree) -> None:
    assert tree.dir_fd(b"") == tree.root_fd
    fd = tree.dir_fd(b"a/b")
    assert os.fstat(fd).st_ino == os.stat(root / "a" / "b").st_ino
    assert tree.dir_fd(b"a/b") == fd, "cached"
    assert os.fstat(tree.dir_fd(b"a")).st_ino == os.stat(root / "a").st_ino


def test_tree_dir_fd_err_symlink(tree: Tree) -> None:
    with pytest.raises(NotADirectoryError):
        tree.dir_fd(b"link")
    with pytest.raises(NotADirectoryError):
        tree.dir_fd(b"link/b")


def test_tree_dir_fd_err_leaks_nothing(tree: Tree) -> None:
    tree.dir_fd(b"a")
    before = open_fds()
    for path in (b"a/b/f/x", b"a/missing/x", b"link/b", b"file/x"):
        with pytest.raises(OSError):
            tree.dir_fd(path)
    assert open_fds() == before


def test_tree_lstat_ok(root: Path, tree: Tree) -> None:
    st = tree.lstat(b"a/b/f")
    assert st is not None and st.st_ino == os.stat(root / "a" / "b" / "f").st_ino
    link = tree.lstat(b"link")
    assert link is not None and os.path.islink(root / "link") and link.st_size == 1
    root_st = tree.lstat(b"")
    assert root_st is not None and root_st.st_ino == os.stat(root).st_ino


@pytest.mark.parametrize("path", [b"missing", b"a/missing/f", b"file/x", b"link/b/f"])
def test_tree_lstat_ok_none(tree: Tree, path: bytes) -> None:
    assert tree.lstat(path) is None


def test_tree_proc_path_ok(root: Path, tree: Tree) -> None:
    assert os.stat(tree.proc_path(b"a/b/f")).st_ino == os.stat(root / "a" / "b" / "f").st_ino
    assert os.stat(tree.proc_path(b"")).st_ino == os.stat(root).st_ino
    assert os.path.islink(tree.proc_path(b"link"))


def test_tree_dir_fd_ok_cache_bounded(root: Path, tree: Tree) -> None:
    for i in range(CACHE_SIZE * 2):
        (root / "a" / f"d{i}").mkdir()
    before = open_fds()
    for i in range(CACHE_SIZE * 2):
        tree.dir_fd(b"a/d%d" % i)
    assert open_fds() - before <= CACHE_SIZE


def test_tree_dir_fd_ok_previous_fd_survives(root: Path, tree: Tree) -> None:
    """The fd from one call stays valid through the next, even a walk of many directories
    (a link or rename holds both parents)."""
    for i in range(CACHE_SIZE):
        (root / "a" / f"d{i}").mkdir()
        tree.dir_fd(b"a/d%d" % i)
    first = tree.dir_fd(b"a/b")
    deep = b"/".join([b"n"] * (CACHE_SIZE + 10))
    (root / os.fsdecode(deep)).mkdir(parents=True)
    second = tree.dir_fd(deep)
    assert os.fstat(first).st_ino == os.stat(root / "a" / "b").st_ino
    assert os.fstat(second).st_ino == os.stat(root / os.fsdecode(deep)).st_ino


def test_tree_forget_dirs_ok(root: Path, tree: Tree) -> None:
    """Cached directories follow the inode, not the name, until forget_dirs()."""
    tree.dir_fd(b"a/b")
    os.rename(root / "a" / "b", root / "a" / "c")
    (root / "a" / "b").mkdir()
    assert tree.lstat(b"a/b/f") is not None, "stale until told"
    before = open_fds()
    tree.forget_dirs()
    assert open_fds() < before
    assert tree.lstat(b"a/b/f") is None
    assert os.fstat(tree.dir_fd(b"a/b")).st_ino == os.stat(root / "a" / "b").st_ino


def test_tree_sync_ok(tmp_path: Path) -> None:
    """``sync`` makes durable every file at and under a path, ``sync_node`` one file
    (a symlink: its directory); on a disk that loses what was not synced."""
    from tests.powercut.harness import simulator

    with simulator(tmp_path / "lower", tmp_path / "disk") as sim:
        root = sim.mountpoint / "t"
        deep = root / "d" / "e" / "f"
        deep.mkdir(parents=True)
        for path in (deep / "1", root / "d" / "2", root / "other", root / "one"):
            path.write_bytes(b"unsynced")
        os.symlink("one", root / "link")
        with closing(Tree(root)) as tree:
            assert sim.pending()["files"] == 4
            tree.sync(b"d")
            assert sim.pending()["files"] == 2
            tree.sync_node(b"link")
            tree.sync_node(b"gone/missing")
            assert sim.pending()["files"] == 2
            tree.sync_node(b"one")
            assert sim.pending()["files"] == 1
            tree.sync(b"")
            assert sim.pending()["files"] == 0
