"""Failover: promote a standby after the primary died; the old primary is fenced."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path

from store.staging import Staging
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
    unmount,
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
