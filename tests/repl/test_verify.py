"""replfs verify: primary and replica compared at one set boundary, while both run."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from tests.support import checkpoint, primary, replfs, secondary


def test_verify_live_pair_identical_then_finds_damage(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    stop = threading.Event()
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}"):
        (mount / "data").write_bytes(b"0123456789" * 1000)
        (mount / "data2").write_bytes(b"abc")
        os.setxattr(mount / "data2", "user.tag", b"v")
        checkpoint(mount)

        def writer() -> None:  # the primary keeps changing while verify runs
            i = 0
            while not stop.is_set():
                (mount / "busy").write_bytes(b"%d" % i)
                i += 1

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            for _ in range(3):
                ok = replfs("verify", mount, replica)
                assert ok.returncode == 0, ok.stdout + ok.stderr
                assert "are identical at set" in ok.stdout
        finally:
            stop.set()
            thread.join()

        with open(replica / "data", "r+b") as f:  # damage behind the secondary's back
            f.seek(5000)
            f.write(b"X")
        os.chmod(replica / "data2", 0o600)
        os.removexattr(replica / "data2", "user.tag")
        bad = replfs("verify", mount, replica)
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    assert "differs: data (mtime, content)" in lines  # writing moved its mtime too
    assert "differs: data2 (mode, xattrs)" in lines
    assert lines[-1].startswith("2 differences between")


def test_verify_offline_directories(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "f").write_bytes(b"same")
        os.utime(d / "f", ns=(1, 2))
    os.utime(a, ns=(1, 2))
    os.utime(b, ns=(1, 2))
    assert replfs("verify", a, b).returncode == 0
    (b / "extra").mkdir()
    os.utime(b, ns=(1, 2))
    result = replfs("verify", a, b)
    assert result.returncode == 1
    assert f"only in {b}: extra" in result.stdout
