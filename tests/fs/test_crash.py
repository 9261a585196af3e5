"""kill -9 of the primary daemon: on restart the backing tree and the journal agree exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import diff, primary, replay, snapshot, unmount

# Runs on the mount until the mount dies. After each fsync returns it prints
# the iteration, so the test knows what was promised durable.
WORKLOAD = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate64.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
m = sys.argv[1]
os.makedirs(f"{m}/dir", exist_ok=True)
i = 0
while True:
    fd = os.open(f"{m}/sparse", os.O_RDWR | os.O_CREAT, 0o644)
    assert libc.fallocate64(fd, 0, (i % 7) * 8192, 8192) == 0  # grows it
    assert libc.fallocate64(fd, 3, (i % 5) * 4096, 4096) == 0  # punches a hole
    assert libc.fallocate64(fd, 0x10, (i % 3) * 5000, 100) == 0  # zeroes a range
    os.pwrite(fd, os.urandom(3000), (i % 11) * 3000)
    os.close(fd)
    if os.path.exists(f"{m}/log"):
        src = os.open(f"{m}/log", os.O_RDONLY)
        dst = os.open(f"{m}/log-copy", os.O_WRONLY | os.O_CREAT, 0o644)
        os.copy_file_range(src, dst, 1 << 20, 0, 0)
        os.close(dst)
        os.close(src)
    with open(f"{m}/tmp{i % 3}", "wb") as f:
        f.write(os.urandom(100 + i % 5000))
    os.replace(f"{m}/tmp{i % 3}", f"{m}/dir/data{i % 5}")
    if i % 4 == 0:
        os.mkdir(f"{m}/sub{i}")
        os.setxattr(f"{m}/sub{i}", "user.i", str(i).encode())
    if i % 4 == 2:
        os.rmdir(f"{m}/sub{i - 2}")
        os.chmod(f"{m}/dir/data{i % 5}", 0o600 + i % 8)
    with open(f"{m}/log", "ab") as log:
        log.write(b"%d\n" % i)
        log.flush()
        os.fsync(log.fileno())
    print(i, flush=True)
    i += 1
"""


@pytest.mark.parametrize("kill_after", [3, 40, 150])
def test_primary_kill9_backing_and_journal_agree(tmp_path: Path, kill_after: int) -> None:
    backing, mount, rebuilt = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    journal = tmp_path / ".b.replfs" / "journal"
    backing.mkdir()
    rebuilt.mkdir()
    promised = -1
    with primary(backing, mount) as daemon:
        work = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(mount)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert work.stdout is not None
        for line in work.stdout:
            promised = int(line)
            if promised >= kill_after:
                daemon.kill()
                break
        for line in work.stdout:  # what it printed before noticing the mount is gone
            promised = int(line)
        work.wait()
        unmount(mount)
    assert promised >= kill_after

    # Restart on the same backing and journal: recovery runs, and work goes on.
    with primary(backing, mount):
        assert (mount / "log").read_bytes().startswith(
            b"".join(b"%d\n" % i for i in range(promised + 1)))
        (mount / "after").write_bytes(b"after the crash")

    log = (backing / "log").read_bytes().split()
    assert [int(x) for x in log[: promised + 1]] == list(range(promised + 1)), \
        "every fsync that returned is in the backing tree"
    replay(journal, rebuilt)
    assert diff(snapshot(backing), snapshot(rebuilt)) == [], "journal and backing disagree"


def test_primary_recovery_redoes_a_fallocate(tmp_path: Path) -> None:
    """A FALLOCATE journaled and cut short by a crash is done again at restart."""
    from store.journal import Journal
    from store.records import FALLOC_FL_ZERO_RANGE, Op

    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    data = bytes(range(256)) * 256
    (backing / "f").write_bytes(data)
    journal = Journal(tmp_path / ".b.replfs" / "journal")
    journal.append(Op.FALLOCATE, path=b"f", flags=FALLOC_FL_ZERO_RANGE, offset=60_000,
                   length=10_000)
    journal.close()
    with primary(backing, mount) as daemon:
        assert (mount / "f").read_bytes() == data[:60_000] + bytes(10_000)
    assert "redid FALLOCATE" in daemon.log()


def test_primary_recovery_never_prunes_its_own_tree(tmp_path: Path) -> None:
    """A sync's PRUNE left as the journal's last record by a crash is for a replica."""
    from store.journal import Journal
    from store.records import Op

    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    (backing / "keep").mkdir()
    (backing / "keep" / "data").write_bytes(b"precious")
    journal = Journal(tmp_path / ".b.replfs" / "journal")
    journal.append(Op.PRUNE, path=b"keep")
    journal.close()
    with primary(backing, mount) as daemon:
        assert (mount / "keep" / "data").read_bytes() == b"precious"
    assert "starts again" in daemon.log()


def test_primary_recovery_after_a_kill_replays_nothing_across_a_rename(tmp_path: Path) -> None:
    """A kill -9 keeps the page cache: BACKING holds every op journaled before the
    last, and the log holds records never flushed, a rename among them. Replaying
    them by path would cross that rename and write into the wrong file."""
    from repl.activity import note_boot
    from store.journal import Journal
    from store.records import Op, encode_set

    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    (backing / "b").write_bytes(b"X" * 10)  # the first a, written, then renamed to b
    (backing / "a").write_bytes(b"Y" * 20)  # a new a
    journal = Journal(tmp_path / ".b.replfs" / "journal")
    journal.append(Op.CREATE, path=b"a", mode=0o100644, uid=0, gid=0)
    journal.put_meta(b"backing_at", encode_set(journal.end))  # BACKING synced here
    journal.append(Op.WRITE, path=b"a", offset=0, data=b"X" * 10)
    journal.append(Op.RENAME, path=b"a", path2=b"b", flags=0)
    journal.append(Op.CREATE, path=b"a", mode=0o100644, uid=0, gid=0)
    journal.append(Op.WRITE, path=b"a", offset=0, data=b"Y" * 20)
    note_boot(journal)  # the daemon was killed on this boot
    journal.close()
    with primary(backing, mount):
        assert (mount / "b").read_bytes() == b"X" * 10
        assert (mount / "a").read_bytes() == b"Y" * 20
