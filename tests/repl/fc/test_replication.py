"""Replication over Fibre Channel (FCIP), end to end: the tests the other transports pass.

A real ``replfs secondary --fcip`` (a fabric whose FCP target's LUN is the
staging store) and a real ``replfs primary --secondary fcip://...`` (an
N_Port initiator), authenticated with DH-CHAP, over loopback: records are
SCSI WRITE(16)s in FCP exchanges, arrive out of order across four
connections, and the replica converges through a crash of the secondary
while it receives.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.repl.iscsi.test_replication import secrets
from tests.repl.peers import wait_for_log
from tests.repl.test_replication import busy_tree
from tests.repl.test_secondary_crash import phase
from tests.support import (
    Daemon,
    checkpoint,
    diff,
    primary,
    snapshot,
    status,
    steady_port,
)


@contextmanager
def fcip_secondary(replica: Path, chap_file: Path, port: int = 0) -> Iterator[Daemon]:
    """``replfs secondary REPLICA --fcip`` (no other listener); ``daemon.port``."""
    daemon = Daemon(["secondary", str(replica), "--fcip", f"127.0.0.1:{port}", "--chap",
                     str(chap_file)], replica.parent / f"{replica.name}.log", "listening on")
    daemon.start()
    daemon.port = int(daemon.log().split("listening on 127.0.0.1:")[-1].split()[0])
    try:
        yield daemon
    finally:
        if daemon.proc and daemon.proc.poll() is None:
            daemon.stop()


def over_fcip(port: int, chap_file: Path, *extra: str) -> list[str]:
    return ["--secondary", f"fcip://127.0.0.1:{port}", "--chap", str(chap_file), *extra]


def test_replica_follows_primary_over_fcip_scrambled(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    keys = secrets(tmp_path)
    with fcip_secondary(replica, keys) as sec, primary(
            backing, mount, *over_fcip(sec.port, keys, "--scramble", "42")):
        busy_tree(mount, 60)
        (mount / "big").write_bytes(bytes(range(256)) * 12_000)  # frames by the thousand
        db = sqlite3.connect(mount / "app.db")
        db.execute("create table t(x)")
        for i in range(30):
            db.execute("insert into t values (?)", (i,))
            db.commit()
        db.close()
        assert checkpoint(mount) > 30
        assert diff(snapshot(backing), snapshot(replica)) == []
        st = status(mount)
        assert st["transport"] == "fcip" and st["streams"] == 4 and not st["insecure"]
        assert status(replica)["fcip"] == f"127.0.0.1:{sec.port}"
    check = sqlite3.connect(replica / "app.db")
    assert check.execute("select count(*) from t").fetchone() == (30,)


def test_secondary_killed_while_receiving_over_fcip_converges(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    keys, port = secrets(tmp_path), steady_port()
    with fcip_secondary(replica, keys, port) as sec, primary(
            backing, mount, *over_fcip(port, keys, "--scramble", "3")):
        for i in range(20):
            phase(mount, i)
        sec.kill()
        for i in range(20, 40):  # the application never notices
            phase(mount, i)
        with fcip_secondary(replica, keys, port):
            last = checkpoint(mount)
            assert diff(snapshot(backing), snapshot(replica)) == []
    assert last > 0


def test_primary_refused_over_fcip_err_wrong_secret(tmp_path: Path) -> None:
    """A primary without the secondary's CHAP secrets gets no further than DH-CHAP, and
    the replica stays as it was."""
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    theirs, ours = secrets(tmp_path), secrets(tmp_path, "other.secret")
    with fcip_secondary(replica, theirs) as sec, primary(
            backing, mount, *over_fcip(sec.port, ours)) as pri:
        (mount / "f").write_bytes(b"not for them")
        lines = wait_for_log(pri, "authentication refused (AUTH_Reject")
        assert "the secret is not the one the peer has" in lines[0]
        lines = wait_for_log(sec, "refused FCIP login")
        assert "does not know the initiator's CHAP secret" in lines[0]
        assert not status(mount)["connected"]
    assert list(replica.iterdir()) == []
