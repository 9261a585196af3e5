"""Several secondaries: each with its own session and place in the journal; a slow or
absent one never holds back the others, and one past the journal's budget is dropped
alone and gets just what it missed when it is back."""

from __future__ import annotations

import os
from pathlib import Path

from tests.repl.test_budget import churn
from tests.support import (
    checkpoint,
    diff,
    primary,
    secondary,
    snapshot,
    status,
    until,
    wait_applied,
)


def blocks(mount: Path) -> dict[str, dict[str, object]]:
    """The primary's status block of each secondary, by address."""
    return {str(b["secondary"]): b for b in status(mount)["secondaries"]}


def test_fanout_two_secondaries_ok_one_down_the_other_goes_on(tmp_path: Path) -> None:
    backing, mount = tmp_path / "b", tmp_path / "m"
    one, two = tmp_path / "r1", tmp_path / "r2"
    backing.mkdir()
    with secondary(one) as s1, secondary(two) as s2:
        a1, a2 = f"127.0.0.1:{s1.port}", f"127.0.0.1:{s2.port}"
        with primary(backing, mount, "--secondary", a1, "--secondary", a2):
            churn(mount, 10, seed=1)
            checkpoint(mount)  # both are connected: both applied it
            assert diff(snapshot(backing), snapshot(one)) == []
            assert diff(snapshot(backing), snapshot(two)) == []
            assert set(blocks(mount)) == {a1, a2}

            gone = checkpoint(mount)
            s2.kill()  # an outage of one
            for round_ in range(5):  # the other's applied set keeps up, set after set
                churn(mount, 4, seed=10 + round_)
                set_id = checkpoint(mount)
                assert wait_applied(one, set_id) >= set_id
                assert diff(snapshot(backing), snapshot(one)) == []
            st = blocks(mount)
            assert st[a1]["connected"] is True and st[a1]["lag_sets"] == 0
            assert st[a2]["connected"] is False and int(st[a2]["lag_sets"]) >= 5
            assert st[a1]["dropped"] is False and st[a2]["dropped"] is False

            with secondary(two, port=s2.port):  # back: it catches up from the journal
                set_id = checkpoint(mount)
                assert wait_applied(two, set_id) >= set_id > gone
                assert diff(snapshot(backing), snapshot(two)) == []
                assert diff(snapshot(backing), snapshot(one)) == []


def test_fanout_past_budget_ok_dropped_alone_gets_what_it_missed(tmp_path: Path) -> None:
    """Past the budget, the absent secondary is dropped (no overflow: the other streams
    on and the journal stays small); when it is back it gets the paths it missed, not
    the whole tree."""
    backing, mount = tmp_path / "b", tmp_path / "m"
    one, two = tmp_path / "r1", tmp_path / "r2"
    backing.mkdir()
    # The outage journals about 4 MB (churn, and a file written anew each round), a MB
    # past the budget; what the absent one missed is only the last contents, about
    # 1.3 MB, so the set that brings it back is well within the budget: applying that
    # set never puts the one that keeps up past it.
    budget = 3 << 20
    with secondary(one) as s1, secondary(two) as s2:
        a1, a2 = f"127.0.0.1:{s1.port}", f"127.0.0.1:{s2.port}"
        with primary(backing, mount, "--secondary", a1, "--secondary", a2,
                     "--journal-max", str(budget), "--set-bytes", "64K") as pri:
            for i in range(50):  # files nobody touches during the outage
                (mount / f"still{i}").write_bytes(os.urandom(4096))
            set_id = checkpoint(mount)
            assert wait_applied(two, set_id) >= set_id
            s2.kill()

            for round_ in range(10):  # in steps the other one keeps up with
                churn(mount, 10, seed=7 + round_)
                (mount / "rewritten").write_bytes(os.urandom(300_000))
                set_id = checkpoint(mount)
                assert wait_applied(one, set_id) >= set_id
            assert status(mount)["mode"] == "streaming", "the other one is within budget"
            # Trimmed to what the other one needs, once BACKING is synced (every 5 s).
            until(lambda: status(mount), lambda st: int(st["journal_bytes"]) < budget,
                  timeout=30, what="the journal trimmed without the dropped secondary")
            assert blocks(mount)[a2]["dropped"] is True
            assert blocks(mount)[a1]["dropped"] is False
            assert diff(snapshot(backing), snapshot(one)) == []

            with secondary(two, port=s2.port):
                pri.wait_for(f"sync of what {a2} missed begins")  # not the whole tree
                set_id = checkpoint(mount)
                assert wait_applied(two, set_id) >= set_id
                assert diff(snapshot(backing), snapshot(two)) == []
                assert diff(snapshot(backing), snapshot(one)) == []
                assert blocks(mount)[a2]["dropped"] is False
                churn(mount, 10, seed=3)  # and both stream on
                set_id = checkpoint(mount)
                assert wait_applied(two, set_id) >= set_id
                assert diff(snapshot(backing), snapshot(two)) == []
