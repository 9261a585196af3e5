"""The inode table's cost: one node per inode the kernel holds, which a walk of a
large tree through a mount fills."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

from fs.inodes import ROOT, Inodes

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
