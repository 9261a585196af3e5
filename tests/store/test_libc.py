"""The libc calls the os module lacks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from store.libc import stat_untimed


def test_stat_untimed_is_lstat_but_for_the_times(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 5000)
    os.symlink("f", tmp_path / "s")
    os.mkfifo(tmp_path / "p")
    fd = os.open(tmp_path, os.O_PATH)
    try:
        for name in (b"f", b"s", b"p"):
            st, mine = os.lstat(tmp_path / os.fsdecode(name)), stat_untimed(fd, name, mtime_ns=7)
            for field in ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid",
                          "st_size", "st_atime_ns", "st_blksize", "st_blocks", "st_rdev"):
                assert getattr(mine, field) == getattr(st, field), (name, field)
            assert mine.st_mtime_ns == mine.st_ctime_ns == 7
        assert stat_untimed(fd, mtime_ns=0).st_ino == os.stat(tmp_path).st_ino
        with pytest.raises(FileNotFoundError):
            stat_untimed(fd, b"nothing", mtime_ns=0)
    finally:
        os.close(fd)
