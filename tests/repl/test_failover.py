"""Failover: promote a standby after the primary died; the old primary is fenced."""

from __future__ import annotations

import json
import os
from contextlib import closing
from pathlib import Path

from store.staging import Staging
from tests.faultproxy import UP, FaultProxy
from tests.repl.peers import assert_one_line_error
from tests.support import (
    checkpoint,
    diff,
    open_set_staged,
    primary,
    read_staging,
    replfs,
    secondary,
    snapshot,
    state_dir,
    status,
    unmount,
    until,
    wait_applied,
)


def test_promote_after_kill9_leaves_last_complete_set(tmp_path: Path) -> None:
    backing, mount, replica, mount2 = (tmp_path / n for n in ("b", "m", "r", "m2"))
    backing.mkdir()
    with secondary(replica) as sec:
        port = sec.port
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}",
                     "--set-interval", "3600") as old:
            for i in range(10):
                (mount / f"f{i}").write_bytes(b"committed %d" % i)
            last = checkpoint(mount)
            committed = snapshot(backing)
            (mount / "f0").write_bytes(b"never closed")  # an open set, partly shipped
            (mount / "late").write_bytes(b"never closed either")
            old.kill()
            unmount(mount)

        promoted = replfs("promote", replica)
        assert promoted.returncode == 0, promoted.stderr
        assert "generation 2" in promoted.stdout
        assert f"replfs primary {replica}" in promoted.stdout
        assert sec.proc is not None
        # promote returns once the secondary let go of its stores; the process may
        # still be on its way out
        assert sec.proc.wait(30) == 0, "promote stopped it"
    assert diff(committed, snapshot(replica)) == [], "exactly the last complete set"

    # The promoted replica serves as the new primary; its sets continue the numbering.
    with primary(replica, mount2, "--set-interval", "3600"):
        assert (mount2 / "f3").read_bytes() == b"committed 3"
        (mount2 / "new").write_bytes(b"written on the new primary")
        assert int(replfs("checkpoint", mount2).stdout) == last + 1
        st = json.loads(replfs("status", mount2, "--json").stdout)
        assert st["generation"] == 2


def test_old_primary_is_fenced(tmp_path: Path) -> None:
    backing, mount, replica = (tmp_path / n for n in ("b", "m", "r"))
    backing.mkdir()
    with secondary(replica) as sec:
        port = sec.port
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}") as old:
            (mount / "f").write_bytes(b"before failover")
            checkpoint(mount)
            old.kill()
            unmount(mount)
    assert replfs("promote", replica).returncode == 0
    promoted_state = snapshot(replica)

    # Someone starts a secondary on the promoted node, and the old primary comes back.
    with secondary(replica, port=port) as fenced, primary(
            backing, mount, "--secondary", f"127.0.0.1:{port}") as old:
        (mount / "f").write_bytes(b"split brain attempt")
        old.wait_for("stale")
        fenced.wait_for("stale")
        st = json.loads(replfs("status", mount, "--json").stdout)
        assert st["connected"] is False
        assert any("generation 1" in e and "stale" in e for e in st["errors"])
    assert diff(promoted_state, snapshot(replica)) == [], "nothing of the new tree changed"


def test_claim_27_promote_erases_a_partly_received_set(tmp_path: Path) -> None:
    """The set the primary never closed was shipped and staged in part; promote erases
    it, says so, and the replica is exactly the last complete set."""
    backing, mount, replica = (tmp_path / n for n in ("b", "m", "r"))
    backing.mkdir()
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}",
                                            "--set-interval", "3600") as old:
        (mount / "f").write_bytes(b"committed")
        checkpoint(mount)
        committed = snapshot(backing)
        (mount / "f").write_bytes(b"never closed")
        (mount / "late").mkdir()
        partial = open_set_staged(mount, replica)["open_set"]
        state, _ = read_staging(replica)[partial]
        assert not state.complete
        old.kill()
        unmount(mount)

        promoted = replfs("promote", replica)
        assert promoted.returncode == 0, promoted.stderr
    assert f"dropped incomplete sets [{partial}]" in promoted.stdout
    with closing(Staging(state_dir(replica) / "staging")) as staging:
        assert staging.sets() == {}, "nothing of the old generation's open set is left"
    assert diff(committed, snapshot(replica)) == []


def test_promote_outdated_ok_at_the_last_set_before_a_sync(tmp_path: Path) -> None:
    """A replica catching up (dropped past the journal's budget while another secondary
    kept up: a sync of the paths it missed is under way, stalled here) holds the set it
    applied before that sync whole: promote refuses it, saying where it stands, and
    ``--outdated`` promotes it there. The new primary's sets follow that set."""
    backing, mount, one, two, mount2 = (tmp_path / n for n in ("b", "m", "r1", "r2", "m2"))
    backing.mkdir()
    with secondary(one) as s1, secondary(two) as s2, FaultProxy(s2.port, seed=5) as proxy:
        a2 = f"127.0.0.1:{proxy.port}"
        with primary(backing, mount, "--secondary", f"127.0.0.1:{s1.port}", "--secondary", a2,
                     "--journal-max", "3M", "--set-bytes", "64K", "--compress-level", "0",
                     "--streams", "1", "--stall-seconds", "3600") as pri:
            for i in range(5):
                (mount / f"f{i}").write_bytes(b"before %d" % i)
            shown = checkpoint(mount)
            wait_applied(two, shown)
            before = snapshot(two)
            s2.kill()
            # 4.8 MB past the budget while the other keeps up: dropped; what it missed
            # (1.6 MB) comes back as one set, within the budget.
            for round_ in range(12):
                (mount / f"f{round_ % 4}").write_bytes(os.urandom(400_000))
                assert wait_applied(one, checkpoint(mount)) > shown
            until(lambda: status(mount), lambda st: int(st["journal_bytes"]) < 3 << 20,
                  what="the journal trimmed without the dropped secondary")
            stall = proxy.stall((300_000, 600_000), UP)
            with secondary(two, port=s2.port) as again:
                pri.wait_for(f"sync of what {a2} missed begins")
                assert stall.struck.wait(60)
                st = until(lambda: status(two),
                           lambda st: st["syncing"] and st["sets_in_flight"] == 1,
                           what="the sync's set staged in part")
                assert st["holds_whole"] == shown
                # The primary is up here, connected: only --force promotes at all.
                refused = replfs("promote", two, "--force")
                assert_one_line_error(refused, "catching up", f"holds set {shown} whole",
                                      "--outdated")
                assert again.proc is not None and again.proc.wait(30) == 0
                assert diff(before, snapshot(two)) == [], "refused: nothing changed"
                promoted = replfs("promote", two, "--outdated")
                assert promoted.returncode == 0, promoted.stderr
                assert "generation 2" in promoted.stdout
    assert st["last_applied"] > shown, "what the sync said it would bring"
    assert diff(before, snapshot(two)) == [], "the set it held whole"
    with primary(two, mount2, "--set-interval", "3600"):
        assert (mount2 / "f1").read_bytes() == b"before 1"
        (mount2 / "new").write_bytes(b"on the new primary")
        assert int(replfs("checkpoint", mount2).stdout) == shown + 1


def test_promote_err_primary_connected_then_force(tmp_path: Path) -> None:
    """A promote while the primary is up and connected would make two primaries: refused
    in one line, the secondary left serving; --force goes ahead."""
    backing, mount, replica = (tmp_path / n for n in ("b", "m", "r"))
    backing.mkdir()
    with secondary(replica) as sec, \
            primary(backing, mount, "--secondary", f"127.0.0.1:{sec.port}"):
        (mount / "f").write_bytes(b"x")
        checkpoint(mount)
        refused = replfs("promote", replica)
        assert_one_line_error(refused, "is connected to the secondary", "promote --force")
        assert status(replica)["connected_streams"] > 0, "the secondary still serves"
        forced = replfs("promote", replica, "--force")
        assert forced.returncode == 0, forced.stderr
        assert "generation 2" in forced.stdout
    assert (replica / "f").read_bytes() == b"x"


def test_promote_err_twice_takes_no_generation(tmp_path: Path) -> None:
    """A replica promoted already is said to be so, and the refused promote takes no
    generation: a promote with a fresh journal after it is generation 3, not 4."""
    backing, mount, replica = (tmp_path / n for n in ("b", "m", "r"))
    backing.mkdir()
    with secondary(replica) as sec:
        with primary(backing, mount, "--secondary", f"127.0.0.1:{sec.port}") as old:
            (mount / "f").write_bytes(b"x")
            checkpoint(mount)
            old.kill()
            unmount(mount)
    assert replfs("promote", replica).returncode == 0
    again = replfs("promote", replica)
    assert_one_line_error(again, "was promoted already", f"replfs primary {replica}")
    fresh = replfs("promote", replica, "--journal", tmp_path / "j2")
    assert fresh.returncode == 0, fresh.stderr
    assert "generation 3" in fresh.stdout
