"""The secondary killed while receiving or in the middle of applying a set.

On restart it reaches exactly the primary's state at the close of its last
complete set (never a mix of two sets, never an op done twice), then
catches up with the primary.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from repl.faults import ENV_BOOT_ID, ENV_KILL_AT_APPLY_STEP
from repl.secondary.run import default_state_dir
from store.hold import interrupted, is_held, lost_to_power, set_hold
from store.hold import torn as torn_for_readers
from store.records import Op
from store.staging import Staging, read_applied
from tests.support import (
    Daemon,
    Entry,
    checkpoint,
    diff,
    open_set_staged,
    primary,
    replfs,
    secondary,
    snapshot,
    state_dir,
    status,
    until,
    wait_applied,
)


def phase(m: Path, i: int) -> None:
    """Ops of every kind whose replay could go wrong: renames, links, appends, truncates."""
    d = m / f"d{i % 2}"
    d.mkdir(exist_ok=True)
    with open(m / "append.log", "ab") as f:
        f.write(b"phase %d\n" % i)
    (m / "new").write_bytes(os.urandom(3000 + i))
    os.replace(m / "new", d / f"file{i % 3}")
    if i % 3 == 0:
        os.link(d / f"file{i % 3}", m / f"hard{i}")
    if i % 3 == 1 and (m / f"hard{i - 1}").exists():
        os.unlink(m / f"hard{i - 1}")
    with open(d / f"file{i % 3}", "r+b") as f:
        f.truncate(1000 + i)
    os.chmod(d / f"file{i % 3}", 0o600 + i % 8)
    if i % 4 == 3:
        os.rename(m / "d0", m / "tmp")
        os.rename(m / "d1", m / "d0")
        os.rename(m / "tmp", m / "d1")


# Where each kill lands, each set applied before the next is written (the applier
# steps before each record, again before a namespace op once its marker is committed,
# and once before a batch is synced):
# 1, before the RESET of the initial sync's set; 7, its batch applied, not yet synced
# and recorded; 23, 58, 131, at a plain op after a namespace op was done (its marker
# in doubt) in sets 2, 4 and 8. The last two are the third's situation again, so only
# the slow run has them; tests/repl/test_applier.py cuts a batch at every step, and
# tests/repl/test_apply.py redoes every namespace op at every stage, in process.
KILL_POINTS = [1, 7, 23, *(pytest.param(step, marks=pytest.mark.slow) for step in (58, 131))]


def applied_or_killed(daemon: Daemon, staging_dir: Path, set_id: int) -> None:
    """Wait until the secondary applied *set_id*, or a fault point killed it."""
    proc = daemon.proc
    assert proc is not None
    until(lambda: proc.poll() is not None or read_applied(staging_dir) >= set_id, bool,
          what=f"set {set_id} applied, or the secondary killed")


@pytest.mark.parametrize("kill_at_step", KILL_POINTS)
def test_secondary_killed_mid_apply_reaches_whole_set(tmp_path: Path, kill_at_step: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    staging_dir = default_state_dir(replica) / "staging"
    states: dict[int, dict[str, Entry]] = {}
    monkeypatch.setenv(ENV_KILL_AT_APPLY_STEP, str(kill_at_step))
    with secondary(replica) as daemon:
        monkeypatch.delenv(ENV_KILL_AT_APPLY_STEP)
        port = daemon.port
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}",
                     "--set-interval", "3600") as pri:
            pri.wait_for("initial sync done: set 1")  # the first set: the empty tree
            states[last := 1] = snapshot(backing)
            for i in range(12):
                applied_or_killed(daemon, staging_dir, last)
                phase(mount, i)
                last = checkpoint(mount, wait=0)
                states[last] = snapshot(backing)
            assert daemon.proc is not None
            assert daemon.proc.wait(60) == -9, "the fault point killed the secondary"
            refused = replfs("pause", replica, "--timeout", "5")
            assert refused.returncode == 1
            assert "no secondary is running to finish it" in refused.stderr
            assert not is_held(staging_dir), "a refused pause leaves no hold behind"
            torn = interrupted(staging_dir)
            assert torn is not None
            # The initial sync's set is applied as it arrives: killed at its RESET, it
            # may not have been whole yet (its SYNC still on the way).
            with contextlib.closing(Staging(staging_dir)) as staged:
                state = staged.state(torn[0])
                whole = state is not None and state.complete
            assert whole or kill_at_step == 1
            set_hold(staging_dir, True)  # as if a pause came while the batch was applied

    # Held, the restarted secondary still finishes the torn batch, then holds. (A set
    # not yet whole is erased at the restart: only the primary can send it again.)
    if whole:
        with secondary(replica, port=port):
            assert wait_applied(replica, torn[0]) == torn[1]
            assert diff(states[torn[1]], snapshot(replica)) == []
            paused = replfs("pause", replica)
            assert paused.returncode == 0 and int(paused.stdout) == torn[1], paused.stderr
            assert status(replica)["held"] is True
            assert replfs("resume", replica).returncode == 0
    else:
        set_hold(staging_dir, False)

    # The primary is gone: the secondary can only apply what it holds, whole sets only.
    with secondary(replica, port=port):
        st = status(replica)
        target = int(st["applicable_through"])
        assert wait_applied(replica, target) == target
        assert target in states or target == 0
        expected = states.get(target)
        if expected is not None:
            assert diff(expected, snapshot(replica)) == []

    # With the primary back, it catches up to the end.
    with secondary(replica, port=port), primary(backing, mount, "--secondary",
                                                f"127.0.0.1:{port}"):
        last = max(states)
        assert wait_applied(replica, last) >= last
        assert diff(states[last], snapshot(replica)) == []


def test_secondary_killed_while_receiving_converges(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec:
        port = sec.port
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}", "--scramble", "3"):
            for i in range(30):
                phase(mount, i)
            sec.kill()
            for i in range(30, 60):  # the application never notices
                phase(mount, i)
            with secondary(replica, port=port):
                last = checkpoint(mount)
                assert diff(snapshot(backing), snapshot(replica)) == []
    assert last > 0


def replicating(port: int) -> list[str]:
    """A primary's options: replicate to *port*; only fsync and checkpoint close sets."""
    return ["--secondary", f"127.0.0.1:{port}", "--set-interval", "3600"]


def power_cut_after_partial_set(backing: Path, mount: Path, replica: Path, port: int,
                                before: Callable[[], None]) -> int:
    """The primary of *backing* ships part of a set, then its host loses power.

    It closes a set, stops cleanly (a synced journal), and is copied as its
    disk would be after a power cut. Started again, it journals an op in a
    new set that is shipped, staged and acknowledged, never synced; *before*
    runs, then the primary is killed and *backing* and its journal go back to
    the copy. Returns the set the secondary holds in part.
    """
    with primary(backing, mount, *replicating(port)):
        (mount / "f").write_bytes(b"synced")
        base = checkpoint(mount)
    durable = backing.parent / "durable"
    for path in (backing, state_dir(backing)):
        shutil.copytree(path, durable / path.name, symlinks=True)

    with primary(backing, mount, *replicating(port)) as pri:
        os.setxattr(mount / "f", "user.v", b"lost")
        partial = int(open_set_staged(mount, replica)["open_set"])
        assert partial > base
        before()
        pri.kill()
    for path in (backing, state_dir(backing)):
        shutil.rmtree(path)
        shutil.copytree(durable / path.name, path, symlinks=True)
    return partial


def write_other_records(mount: Path) -> int:
    """Journal other ops at the places the lost ones had, and close the set."""
    os.setxattr(mount / "f", "user.v", b"kept")
    os.chmod(mount / "f", 0o600)
    return checkpoint(mount, wait=20)


def test_claim_27_restarted_secondary_erases_its_partial_set(tmp_path: Path) -> None:
    """A set the secondary held in part when it died is erased at its restart, and
    received again whole. Needed here: while it was down the primary lost power, so
    what it sends at those places now is not what it sent before."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec:
        port = sec.port
        partial = power_cut_after_partial_set(backing, mount, replica, port, sec.kill)
    with secondary(replica, port=port) as again, primary(backing, mount, *replicating(port)):
        assert write_other_records(mount) == partial
        assert diff(snapshot(backing), snapshot(replica)) == []
    assert os.getxattr(replica / "f", "user.v") == b"kept"
    assert f"erased partial sets [{partial}]" in again.log()


def test_claim_27_partial_set_erased_when_the_primary_lost_power(tmp_path: Path) -> None:
    """The same power cut with the secondary up throughout: the primary reconnects and
    sends other records at the places of the partial set, which must not be mistaken
    for duplicates of what the secondary holds."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec:
        partial = power_cut_after_partial_set(backing, mount, replica, sec.port, lambda: None)
        with primary(backing, mount, *replicating(sec.port)):
            assert write_other_records(mount) == partial
            assert diff(snapshot(backing), snapshot(replica)) == []
    assert os.getxattr(replica / "f", "user.v") == b"kept"


def test_secondary_host_power_lost_mid_apply_primary_sends_the_paths_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The secondary's host loses its power in the middle of a batch: its disk keeps
    what it kept of the batch's ops, here not a write made before the marker's op
    (its bytes zeroed). A redo from the marker would leave that hole for good: no
    later set writes that file again. The
    secondary, back on another boot, asks the primary for every path the batch
    touched, reads as torn meanwhile, and the replica equals the primary's tree."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    staging_dir = default_state_dir(replica) / "staging"
    boot = tmp_path / "boot_id"
    boot.write_text("boot-before-the-cut\n")
    monkeypatch.setenv(ENV_BOOT_ID, str(boot))
    monkeypatch.setenv(ENV_KILL_AT_APPLY_STEP, "23")  # set 2, past a namespace op
    with secondary(replica) as daemon:
        monkeypatch.delenv(ENV_KILL_AT_APPLY_STEP)
        monkeypatch.delenv(ENV_BOOT_ID)
        port = daemon.port
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}",
                     "--set-interval", "3600") as pri:
            pri.wait_for("initial sync done: set 1")
            last = 1
            for i in range(4):
                applied_or_killed(daemon, staging_dir, last)
                phase(mount, i)
                last = checkpoint(mount, wait=0)
            assert daemon.proc is not None
            assert daemon.proc.wait(60) == -9, "the fault point killed the secondary"

            # The power is gone with it: the disk lost the data written to "new" before
            # the marker, and before "new" became d0/file0 (a rename, done too). No
            # later set writes that file again.
            torn = interrupted(staging_dir)
            assert torn is not None
            staging = Staging(staging_dir)
            try:
                marker = staging.marker()
                assert marker is not None
                before = [r for r in staging.records(marker[0]) if r.seq < marker[1]]
            finally:
                staging.close()
            lost = [r for r in before if r.op == Op.WRITE and r.path == b"new"]
            assert lost, "a write to new before the marker"
            assert any((r.op, r.path, r.path2) == (Op.RENAME, b"new", b"d0/file0")
                       for r in before)
            with open(replica / "d0" / "file0", "r+b") as f:
                for record in lost:
                    f.seek(record.offset)
                    f.write(bytes(len(record.data)))

            boot.write_text("boot-after-the-cut\n")  # the host boots again
            monkeypatch.setenv(ENV_BOOT_ID, str(boot))
            with secondary(replica, port=port) as again:
                monkeypatch.delenv(ENV_BOOT_ID)
                again.wait_for("lost its power")
                last = checkpoint(mount)
                assert wait_applied(replica, last) >= last
                assert diff(snapshot(backing), snapshot(replica)) == []
                assert lost_to_power(staging_dir) is None and torn_for_readers(staging_dir) is None
