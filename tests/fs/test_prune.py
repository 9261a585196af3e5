"""The mount's table of inodes the kernel knows stays near --max-inodes: past it, the
kernel forgets the files looked up first, and looks them up again when used."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.support import primary, status

LIMIT = 200
FILES = 2_000


def test_prune_ok_the_table_stays_near_its_bound(tmp_path: Path) -> None:
    backing, mnt = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    mnt.mkdir()
    with primary(backing, mnt, "--max-inodes", str(LIMIT)):
        (mnt / "d").mkdir()
        with open(mnt / "d" / "open", "wb") as held:  # in use: keeps its name
            for i in range(FILES):
                (mnt / "d" / f"f{i}").write_bytes(b"%d" % i)
            deadline = time.monotonic() + 30
            while (known := status(mnt)["inodes"]) > LIMIT:
                assert time.monotonic() < deadline, f"{known} inodes known, bound {LIMIT}"
                time.sleep(0.05)  # FORGETs arrive when the kernel gets to them
            assert os.readlink(f"/proc/self/fd/{held.fileno()}") == str(mnt / "d" / "open")
            # Every file is still there, the forgotten ones looked up again.
            assert [(mnt / "d" / f"f{i}").read_bytes() for i in range(FILES)] == \
                [b"%d" % i for i in range(FILES)]
            held.write(b"still the same file")
        assert (mnt / "d" / "open").read_bytes() == b"still the same file"
        assert status(mnt)["inodes"] <= LIMIT + 10


def test_prune_ok_a_working_directory_keeps_its_name(tmp_path: Path) -> None:
    """Directories are never dropped: a process working in one keeps its path."""
    backing, mnt = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    mnt.mkdir()
    with primary(backing, mnt, "--max-inodes", "20"):
        (mnt / "work").mkdir()
        here = os.getcwd()
        os.chdir(mnt / "work")
        try:
            for i in range(200):
                Path(f"f{i}").write_bytes(b"x")
            deadline = time.monotonic() + 30
            while status(mnt)["inodes"] > 20:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert os.getcwd() == str(mnt / "work")
        finally:
            os.chdir(here)
