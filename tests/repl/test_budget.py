"""The journal budget: a long outage turns into a dirty map and one resync set."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from repl.errors import UsageError
from repl.faults import ENV_SET_HASHES
from repl.secondary.run import pause, resume
from repl.verify import tree_digest
from tests.fs.test_ranges import (
    KEEP_SIZE,
    PUNCH_HOLE,
    ZERO_RANGE,
    copy_all,
    fallocate,
    first_hole,
    pattern,
)
from tests.support import (
    checkpoint,
    diff,
    primary,
    secondary,
    snapshot,
    status,
    wait_applied,
)


def churn(m: Path, rounds: int, seed: int) -> None:
    """Writes well past the budget, with the namespace ops the dirty map must follow."""
    for i in range(rounds):
        d = m / f"dir{i % 4}"
        d.mkdir(exist_ok=True)
        name = d / f"f{i % 9}"
        with open(name, "ab") as f:
            f.write(os.urandom(20_000 + (i * seed) % 9000))
        if i % 5 == 0:
            with open(name, "r+b") as f:
                f.seek(100)
                f.write(b"overwritten")
                f.truncate(15_000)
        if i % 7 == 3:
            os.replace(name, m / f"moved{i % 3}")
        if i % 11 == 5:
            os.rename(d, m / f"renamed{seed}-{i}")
        if i % 13 == 6 and (m / "moved0").exists():
            os.link(m / "moved0", m / f"link{seed}-{i}")
            os.unlink(m / "moved0")


def fill_past_budget(mount: Path) -> None:
    """With the secondary stopped, close sets past a 64K budget: the primary overflows."""
    for _ in range(3):
        (mount / "filler").write_bytes(os.urandom(40_000))
        checkpoint(mount, wait=0)
    (mount / "filler").write_bytes(b"over budget")
    assert status(mount)["mode"] == "overflow"


def test_outage_past_budget_resyncs_as_one_set(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    budget = 256 << 10
    with secondary(replica) as sec:
        port = sec.port
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}",
                     "--journal-max", str(budget), "--set-bytes", "64K") as pri:
            churn(mount, 5, seed=1)
            before = checkpoint(mount)
            assert diff(snapshot(backing), snapshot(replica)) == []
            sec.stop()

            churn(mount, 200, seed=7)  # about 5 MB: twenty times the budget
            st = status(mount)
            assert st["mode"] == "overflow"
            assert int(st["journal_bytes"]) < 2 * budget
            assert diff(snapshot(backing), snapshot(replica)) != [], "the outage is real"

            with secondary(replica, port=port):
                after = checkpoint(mount)
                assert after > before
                assert diff(snapshot(backing), snapshot(replica)) == []
                assert status(mount)["mode"] == "streaming"
                churn(mount, 20, seed=3)  # and streaming goes on afterwards
                checkpoint(mount)
                assert diff(snapshot(backing), snapshot(replica)) == []
    assert "resync done" in pri.log()


def test_no_secondary_journal_stays_within_budget(tmp_path: Path) -> None:
    backing, mount = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    budget = 256 << 10
    with primary(backing, mount, "--journal-max", str(budget), "--set-bytes", "64K"):
        churn(mount, 100, seed=5)
        checkpoint(mount, wait=0)
        st = status(mount)
    assert st["mode"] == "streaming"
    assert int(st["journal_bytes"]) <= budget + (128 << 10)


def test_outage_past_budget_ok_names_removed_after_writes(tmp_path: Path) -> None:
    """Ranges written over budget reach the file whatever name it keeps at the end:
    the names written through are removed, by unlink and by a rename over them."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec:
        port = sec.port
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}",
                     "--journal-max", "64K"):
            (mount / "a").write_bytes(b"A" * 10_000)
            os.link(mount / "a", mount / "b")
            (mount / "x").write_bytes(b"x")
            checkpoint(mount)
            sec.stop()
            fill_past_budget(mount)

            with open(mount / "a", "r+b") as f:
                f.write(b"B" * 5_000)
            os.unlink(mount / "a")
            with open(mount / "b", "r+b") as f:
                f.seek(8_000)
                f.write(b"C" * 1_000)
            os.link(mount / "b", mount / "c")
            os.rename(mount / "x", mount / "b")  # over a name of the written file
            assert (mount / "c").read_bytes() == b"B" * 5_000 + b"A" * 3_000 + b"C" * 1_000 \
                + b"A" * 1_000

            with secondary(replica, port=port):
                checkpoint(mount)
                assert diff(snapshot(backing), snapshot(replica)) == []


SAMPLE_EVERY = 0.02


class Sampler:
    """Samples a replica in a thread, as a reader that needs one whole set would.

    Each sample holds the replica (``pause``), takes its digest, lets it go,
    and checks it against the digest the primary recorded when it closed that
    set (``REPLFS_TEST_SET_HASHES``): a replica torn between two sets, or at a
    set the primary never closed, is a violation. The set shown never goes back.
    """

    def __init__(self, replica: Path, hashes: Path) -> None:
        self.replica, self.hashes = replica, hashes
        self.samples: list[int] = []  # the set each sample showed
        self.violations: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_EVERY)

    def sample(self) -> None:
        try:
            held = pause(self.replica, None, timeout=5)
        except UsageError as exc:
            self.violations.append(f"cannot hold the replica: {exc}")
            return
        try:
            digest = tree_digest(self.replica)
        finally:
            resume(self.replica, None)
        lines = self.hashes.read_text().split("\n")[:-1]  # whole lines only
        closed = dict(line.split() for line in lines)
        if closed.get(str(held)) != digest:
            self.violations.append(f"the replica at set {held} is not the primary at its close"
                                   if str(held) in closed else
                                   f"the replica shows set {held}, which the primary never closed")
        if self.samples and held < self.samples[-1]:
            self.violations.append(f"the replica went back to set {held}")
        self.samples.append(held)


def test_resync_run_ok_every_sample_a_whole_set(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The replica sampled from the secondary's return until the resync's set is
    applied, with the application writing meanwhile: every sample is the primary at
    the close of a set, never part of the resync."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    hashes = tmp_path / "set-hashes"
    monkeypatch.setenv(ENV_SET_HASHES, str(hashes))
    with secondary(replica) as sec:
        port = sec.port
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}",
                     "--journal-max", str(256 << 10), "--set-bytes", "64K") as pri:
            churn(mount, 5, seed=1)
            checkpoint(mount)
            sec.stop()
            churn(mount, 100, seed=7)  # about 2.5 MB: ten times the budget
            assert status(mount)["mode"] == "overflow"

            with secondary(replica, port=port):
                with Sampler(replica, hashes) as sampler:
                    churn(mount, 20, seed=3)  # the application goes on during the resync
                    pri.wait_for("resync done")
                    resynced = int(pri.log().split("resync done: set ")[1].split()[0])
                    assert wait_applied(replica, resynced) >= resynced
                last = checkpoint(mount)
                final = diff(snapshot(backing), snapshot(replica))
                sampler.sample()
    assert sampler.violations == []
    assert final == []
    during = [held for held in sampler.samples if held < resynced]
    assert len(during) >= 3, f"samples while the resync ran: {sampler.samples}"
    assert sampler.samples[-1] == last
def test_outage_past_budget_ok_fallocate_and_copies(tmp_path: Path) -> None:
    """Over budget, fallocate is still journaled (it carries no data) and what
    copy_file_range copies goes to the dirty map, like a write: a hole punched,
    a range zeroed, a file grown and bytes copied all reach the replica."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec:
        port = sec.port
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}",
                     "--journal-max", "64K"):
            (mount / "img").write_bytes(pattern(256 * 1024, 20))
            (mount / "src").write_bytes(pattern(100_000, 21))
            (mount / "dst").write_bytes(pattern(50_000, 22))
            checkpoint(mount)
            sec.stop()
            fill_past_budget(mount)

            fd = os.open(mount / "img", os.O_RDWR)
            os.pwrite(fd, b"w" * 20_000, 50_000)  # dirty, and then partly punched
            fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 4096, 64 * 1024)
            fallocate(fd, ZERO_RANGE, 100_000, 1000)
            fallocate(fd, 0, 200_000, 300_000)
            os.close(fd)
            src = os.open(mount / "src", os.O_RDONLY)
            dst = os.open(mount / "dst", os.O_WRONLY)
            assert copy_all(src, dst, 30_000, 10, 40_000) == 30_000
            os.close(dst)
            os.close(src)
            assert diff(snapshot(backing), snapshot(replica)) != [], "the outage is real"

            with secondary(replica, port=port):
                checkpoint(mount)
                # Written over budget, then punched: the resync sends the hole as a hole.
                assert first_hole(replica / "img") == first_hole(backing / "img") == (
                    4096, 69632)
                assert diff(snapshot(backing), snapshot(replica)) == []
