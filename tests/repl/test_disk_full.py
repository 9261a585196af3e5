"""A full replica disk: a clear error, a replica that is never torn, and recovery."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import checkpoint, diff, primary, replfs, secondary, snapshot


@pytest.fixture
def small_replica(tmp_path: Path) -> Iterator[Path]:
    replica = tmp_path / "r"
    replica.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(replica)], check=True)
    try:
        yield replica
    finally:
        subprocess.run(["umount", "-l", str(replica)], capture_output=True)


def test_replica_disk_full_then_space_returns(tmp_path: Path, small_replica: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", small_replica
    backing.mkdir()
    with secondary(replica) as sec:
        port = sec.port
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}") as pri:
            (mount / "small").write_bytes(b"fits")
            checkpoint(mount)
            before = snapshot(replica)
            (mount / "big").write_bytes(b"x" * (3 << 20))  # three times the replica's disk
            last = int(replfs("checkpoint", mount).stdout)
            sec.wait_for("No space left on device")
            st = json.loads(replfs("status", replica, "--json").stdout)
            assert "No space left" in st["apply_error"]
            held = replfs("pause", replica, "--timeout", "1")
            assert held.returncode == 1
            assert "in the middle of a set" in held.stderr
            assert "not paused" in replfs("resume", replica).stderr, "refused: no hold left"
            assert sec.stop(timeout=20) == 0, "stops cleanly while a set is stuck"

            subprocess.run(["mount", "-o", "remount,size=64m", str(replica)], check=True)
            with secondary(replica, port=port):
                assert checkpoint(mount) >= last
                assert diff(snapshot(backing), snapshot(replica)) == []
            assert before != snapshot(replica)
    assert "No space" not in pri.log()
