"""The inode table's cost: one node per inode the kernel holds, which a walk of a
large tree through a mount fills."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

from fs.inodes import NO_FDS, ROOT, Inodes

FILES = 20_000
NODE_BYTES = 500  # each node, its name and its place in the table (667 with two sets)


def test_inodes_ok_a_node_a_file_stays_small(tmp_path: Path) -> None:
    (tmp_path / "f").touch()
    st = os.stat(tmp_path / "f")
    inodes = Inodes(str(tmp_path))
    try:
        tracemalloc.start()
        try:
            for i in range(FILES):
                inodes.remember(ROOT, b"f%06d" % i, st, ino=st.st_ino + 1 + i)
            used, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(inodes.nodes) == FILES + 1
        assert used / FILES < NODE_BYTES, f"{used / FILES:.0f} bytes a node"
        node = inodes.node(st.st_ino + 1)
        assert node.names == [(ROOT, b"f000000")] and not node.fds
        inodes.add_name(st.st_ino + 1, ROOT, b"f000000")  # known already: once
        assert node.names == [(ROOT, b"f000000")]
        inodes.drop_name(st.st_ino + 1, ROOT, b"f000000")
        assert node.names == []
    finally:
        os.close(inodes.root_fd)


def test_inodes_ok_surplus_names_the_oldest_files_only(tmp_path: Path) -> None:
    """Past its limit the table names the files first looked up, for the kernel to
    forget (fs/prune.py): never a directory, nor a file with an open handle. With too
    few of those, it is not crowded again before it grows by a tenth of its limit."""
    (tmp_path / "d").mkdir()
    (tmp_path / "f").touch()
    dst, fst = os.stat(tmp_path / "d"), os.stat(tmp_path / "f")
    inodes = Inodes(str(tmp_path), limit=20)
    try:
        for i in range(10):
            inodes.remember(ROOT, b"d%d" % i, dst, ino=1000 + i)
        for i in range(12):
            inodes.remember(ROOT, b"f%d" % i, fst, ino=2000 + i)
        assert inodes.crowded.is_set()  # 23 nodes, the root too
        inodes.node(2000).fds = frozenset({7})  # open: kept
        assert inodes.surplus() == [(ROOT, b"f1"), (ROOT, b"f2"), (ROOT, b"f3"),
                                    (ROOT, b"f4"), (ROOT, b"f5")]  # down to 18
        for i in range(12):
            inodes.forget(2000 + i, 1)
        inodes.node(2000).fds = NO_FDS
        inodes.crowded.clear()
        for i in range(10, 21):
            inodes.remember(ROOT, b"d%d" % i, dst, ino=1000 + i)
        assert inodes.crowded.is_set()
        inodes.crowded.clear()
        assert inodes.surplus() == [(ROOT, b"f0")]  # the rest are directories
        inodes.remember(ROOT, b"d21", dst, ino=1021)
        assert not inodes.crowded.is_set()  # until 23 + 2 nodes
        inodes.remember(ROOT, b"d22", dst, ino=1022)
        inodes.remember(ROOT, b"d23", dst, ino=1023)
        assert inodes.crowded.is_set()
    finally:
        os.close(inodes.root_fd)
