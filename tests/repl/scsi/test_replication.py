"""Replication over iSCSI and over FCIP, end to end: the tests the frames transport passes.

A real ``replfs secondary --iscsi`` (the staging store as an iSCSI LUN) or
``--fcip`` (a fabric whose FCP target's LUN is the staging store), and a real
``replfs primary --secondary iscsi://...`` or ``fcip://...`` (an initiator), with
mutual CHAP or DH-CHAP, over loopback: records are SCSI WRITE(16)s (in FCP
exchanges over FCIP), arrive out of order across four sessions, and the replica
converges through a crash of the secondary while it receives.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.repl.peers import wait_for_log
from tests.repl.scsi.transports import Transport, secrets
from tests.repl.test_replication import busy_tree
from tests.repl.test_secondary_crash import phase
from tests.support import checkpoint, diff, primary, snapshot, status, steady_port


def test_replica_follows_primary_scrambled(tmp_path: Path, transport: Transport) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    keys = secrets(tmp_path)
    with transport.secondary(replica, keys) as sec, primary(
            backing, mount, *transport.over(sec.port, keys, "--scramble", "42")):
        busy_tree(mount, 60)
        # past iSCSI's FirstBurstLength; FC frames by the thousand
        (mount / "big").write_bytes(bytes(range(256)) * 12_000)
        db = sqlite3.connect(mount / "app.db")
        db.execute("create table t(x)")
        for i in range(30):
            db.execute("insert into t values (?)", (i,))
            db.commit()
        db.close()
        assert checkpoint(mount) > 30
        assert diff(snapshot(backing), snapshot(replica)) == []
        st = status(mount)
        assert st["transport"] == transport.name and st["streams"] == 4
        assert not st["insecure"]
        assert status(replica)[transport.name] == f"127.0.0.1:{sec.port}"
    check = sqlite3.connect(replica / "app.db")
    assert check.execute("select count(*) from t").fetchone() == (30,)


def test_secondary_killed_while_receiving_converges(tmp_path: Path,
                                                     transport: Transport) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    keys, port = secrets(tmp_path), steady_port()
    with transport.secondary(replica, keys, port) as sec, primary(
            backing, mount, *transport.over(port, keys, "--scramble", "3")):
        for i in range(20):
            phase(mount, i)
        sec.kill()
        for i in range(20, 40):  # the application never notices
            phase(mount, i)
        with transport.secondary(replica, keys, port):
            last = checkpoint(mount)
            assert diff(snapshot(backing), snapshot(replica)) == []
    assert last > 0


def test_primary_refused_err_wrong_secret(tmp_path: Path, transport: Transport) -> None:
    """A primary without the secondary's CHAP secrets gets no further than the login
    (DH-CHAP over FCIP), and the replica stays as it was."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    theirs, ours = secrets(tmp_path), secrets(tmp_path, "other.secret")
    with transport.secondary(replica, theirs) as sec, primary(
            backing, mount, *transport.over(sec.port, ours)) as pri:
        (mount / "f").write_bytes(b"not for them")
        for daemon, (line, detail) in ((pri, transport.primary_refused),
                                       (sec, transport.secondary_refused)):
            lines = wait_for_log(daemon, line)
            assert detail in lines[0]
        assert not status(mount)["connected"]
    assert list(replica.iterdir()) == []
