"""replfs pause / resume: the replica holds one set while staging keeps receiving."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from repl import control
from store.hold import is_held
from tests.support import (
    checkpoint,
    diff,
    primary,
    read_staging,
    replfs,
    secondary,
    snapshot,
    state_dir,
    until,
    wait_applied,
)


def sec_status(replica: Path) -> dict[str, object]:
    result = replfs("status", replica, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_pause_holds_replica_while_staging_receives(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec, primary(backing, mount, "--secondary",
                                            f"127.0.0.1:{sec.port}"):
        (mount / "a").write_bytes(b"first")
        first = checkpoint(mount)
        at_first = snapshot(backing)
        paused = replfs("pause", replica)
        assert paused.returncode == 0, paused.stderr
        assert int(paused.stdout) == first

        (mount / "a").write_bytes(b"second")
        (mount / "b").write_bytes(b"new")
        second = int(replfs("checkpoint", mount).stdout)
        assert second > first
        # Staging receives every set up to the second, whole, while the replica holds.
        received = range(first + 1, second + 1)
        until(lambda: read_staging(replica),
              lambda sets: all(n in sets and sets[n][0].complete for n in received),
              what=f"sets {first + 1} to {second} staged whole")
        st = sec_status(replica)
        assert st["held"] is True
        assert st["last_applied"] == first
        assert (st["last_complete"], st["complete_waiting"]) == (second, second - first)
        assert diff(at_first, snapshot(replica)) == [], "held at the first set"

        resumed = replfs("resume", replica)
        assert resumed.returncode == 0, resumed.stderr
        assert wait_applied(replica, second) >= second
        assert diff(snapshot(backing), snapshot(replica)) == []


def test_pause_outlives_the_daemon(tmp_path: Path) -> None:
    backing, mount, replica = tmp_path / "b", tmp_path / "m", tmp_path / "r"
    backing.mkdir()
    with secondary(replica) as sec:
        port = sec.port
        with primary(backing, mount, "--secondary", f"127.0.0.1:{port}"):
            (mount / "a").write_bytes(b"first")
            first = checkpoint(mount)
            sec.stop()
            assert int(replfs("pause", replica).stdout) == first  # no daemon running
            (mount / "a").write_bytes(b"second")
            with secondary(replica, port=port):
                last = int(replfs("checkpoint", mount).stdout)
                st = sec_status(replica)
                assert st["held"] is True and st["last_applied"] == first
                assert (replica / "a").read_bytes() == b"first"
                assert replfs("resume", replica).returncode == 0
                assert wait_applied(replica, last) >= last
                assert (replica / "a").read_bytes() == b"second"


def test_resume_err_not_paused(tmp_path: Path) -> None:
    with secondary(tmp_path / "r"):
        pass
    result = replfs("resume", tmp_path / "r")
    assert result.returncode == 1
    assert result.stderr.strip() == f"replfs: replica {tmp_path / 'r'} is not paused"


def test_pause_err_not_a_replica_places_no_hold(tmp_path: Path) -> None:
    """A directory no secondary ever served is refused, and nothing is written beside it."""
    plain = tmp_path / "plain"
    plain.mkdir()
    for command in ("pause", "resume"):
        result = replfs(command, plain)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1
        assert result.stderr.startswith(f"replfs: {plain} is not a replica: no staging store")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def test_secondary_status_ok_held_as_soon_as_paused(tmp_path: Path) -> None:
    """``held`` is the hold itself, not what the applier saw when it last woke: an idle
    secondary shows it as soon as pause returns, and drops it at resume."""
    replica = tmp_path / "r"
    with secondary(replica):
        assert sec_status(replica)["held"] is False
        assert replfs("pause", replica).returncode == 0
        assert sec_status(replica)["held"] is True
        assert replfs("resume", replica).returncode == 0
        assert sec_status(replica)["held"] is False


@contextmanager
def silent_control_socket(replica: Path) -> Iterator[None]:
    """A control socket for *replica* that takes each request and hangs up without
    an answer, as a secondary that is stopping may."""
    path = control.socket_path(replica)
    path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()

        def serve() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:  # closed: the test is over
                    return
                with conn:
                    conn.recv(65536)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield
        finally:
            server.shutdown(socket.SHUT_RDWR)
            path.unlink()
    thread.join(10)


def test_resume_ok_daemon_stops_without_answering(tmp_path: Path) -> None:
    """The hold is lifted and resume succeeds even if the secondary, stopping, takes
    the wake-up and hangs up without a word."""
    replica = tmp_path / "r"
    with secondary(replica):
        pass
    assert replfs("pause", replica).returncode == 0
    with silent_control_socket(replica):
        resumed = replfs("resume", replica)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == "0"
    assert not is_held(state_dir(replica) / "staging")
