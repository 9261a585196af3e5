"""The sender, end to end: what it ships, and when, against a real secondary.

Each test pins one claim the sender carries (see its module comment): records
go out before their set is complete (1, 23), set N+1 before N is applied
(22), and the journal keeps every version of a block until its set is
applied (6). The secondary's side is read from its status and, as one more
LMDB reader, from its staging store; the primary's from its status and its
journal.
"""

from __future__ import annotations

import os
from pathlib import Path

from repl.secondary.run import pause, resume
from store.records import Op
from tests.support import (
    checkpoint,
    diff,
    open_set_staged,
    primary,
    read_journal,
    read_staging,
    secondary,
    snapshot,
    status,
    until,
    wait_applied,
)


def open_set_ops(m: Path) -> None:
    """Ops of several kinds, file data among them, none of which closes a set."""
    (m / "d").mkdir()
    fd = os.open(m / "d" / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"written into the open set" * 100, 0)
    finally:
        os.close(fd)  # a flush of the written pages, not a sync
    os.symlink("d/f", m / "s")
    os.setxattr(m / "d" / "f", "user.k", b"v")
    os.rename(m / "d" / "f", m / "d" / "g")


def test_claim_1_23_open_set_shipped_staged_acked_before_its_sync(tmp_path: Path) -> None:
    """The records of the set still open reach staging and are acknowledged, while
    no SYNC for that set exists anywhere: neither in the journal nor in staging."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}", "--set-interval", "3600"):
        base = checkpoint(mount)
        open_set_ops(mount)
        st = open_set_staged(mount, replica)
        open_set, ops = st["open_set"], st["open_set_ops"]
        assert (st["last_closed_set"], open_set) == (base, base + 1) and ops >= 6

        journal = [r for r in read_journal(backing) if r.set == open_set]
        assert [r.seq for r in journal] == list(range(ops)), "the set is still open"
        assert Op.SYNC not in {r.op for r in journal}
        assert {Op.MKDIR, Op.CREATE, Op.WRITE, Op.SYMLINK, Op.SETXATTR, Op.RENAME} <= {
            r.op for r in journal}

        state, records = read_staging(replica)[open_set]
        assert records == journal, "staging holds exactly the open set's records"
        assert not state.sync_seen and not state.complete
        assert state.received() == ops
        sst = status(replica)
        assert sst["last_applied"] == sst["last_complete"] == base
        assert sst["duplicates"] == 0, "sent once: no session ended in between"
        assert not (replica / "d").exists(), "an incomplete set is not applied"

        assert checkpoint(mount) == open_set  # its SYNC at last: the set applies whole
        assert diff(snapshot(backing), snapshot(replica)) == []


def test_claim_22_next_set_sent_before_the_previous_is_applied(tmp_path: Path) -> None:
    """With the replica held, set N is not applied (nor acknowledged as applied), and
    set N+1 is shipped and staged whole all the same."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}", "--set-interval", "3600"):
        first = checkpoint(mount)
        assert pause(replica, None) == first
        (mount / "a").write_bytes(b"set N")
        n = checkpoint(mount, wait=0)
        (mount / "b").write_bytes(b"set N+1")
        assert checkpoint(mount, wait=0) == n + 1

        until(lambda: read_staging(replica),
              lambda sets: all(i in sets and sets[i][0].complete for i in (n, n + 1)),
              what=f"sets {n} and {n + 1} staged whole")
        assert status(replica)["last_applied"] == first
        st = status(mount)
        assert st["last_applied"] == first, "the primary never heard that N was applied"
        assert st["last_shipped"][0] == n + 1 and st["lag_sets"] == 2
        assert not (replica / "a").exists()

        resume(replica, None)
        assert wait_applied(replica, n + 1) == n + 1
        assert diff(snapshot(backing), snapshot(replica)) == []


BLOCK = 4096


def test_claim_6_journal_keeps_each_version_of_a_block_until_applied(tmp_path: Path) -> None:
    """Three versions of one block, each in its own set, all stay in the primary's
    journal while the secondary has applied none of them, and go once it has."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    versions = [bytes([ord("A") + i]) * BLOCK for i in range(3)]
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}", "--set-interval", "3600"):
        fd = os.open(mount / "f", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"0" * BLOCK, 0)
            first = checkpoint(mount)
            assert pause(replica, None) == first
            for version in versions:
                os.pwrite(fd, version, 0)
                os.fsync(fd)  # closes a set: one version per set
        finally:
            os.close(fd)
        last = status(mount)["last_closed_set"]
        until(lambda: status(replica), lambda st: st["last_complete"] == last,
              what=f"set {last} staged")

        def block_versions() -> list[tuple[int, bytes]]:
            return [(r.set, r.data) for r in read_journal(backing)
                    if r.op == Op.WRITE and r.path == b"f" and r.offset == 0]

        # (The version of set `first` may stay a while too: applied, but kept until
        # BACKING's next sync.)
        held = [(set_id, data) for set_id, data in block_versions() if set_id > first]
        assert [data for _, data in held] == versions
        assert len({set_id for set_id, _ in held}) == 3 and min(s for s, _ in held) > first
        assert status(mount)["last_applied"] == first

        resume(replica, None)
        assert wait_applied(replica, last) == last
        until(lambda: status(mount), lambda st: st["last_applied"] == last,
              what=f"the primary told that set {last} is applied")
        # Applied, and BACKING synced since (within a few seconds): the versions go.
        until(block_versions, lambda held: held == [], what="the versions let go")
        assert (replica / "f").read_bytes() == versions[-1]
