"""systemd: the shipped unit files verify, and each daemon says READY=1 on a real
$NOTIFY_SOCKET once it serves, and STOPPING=1 when told to stop."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from repl.sdnotify import notify
from store.staging import Staging
from tests.support import ROOT, SECONDARY, Daemon, state_dir, tls_args, unmount

UNITS = sorted((ROOT / "docs" / "systemd").glob("*.service"))


def test_units_verify_ok(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts each unit, with replfs installed where it is."""
    assert [u.name for u in UNITS] == [
        "replfs-primary.service", "replfs-secondary.service", "replfs-standby.service"]
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: bin/test installs it (the systemd package)"
    for unit in UNITS:
        text = unit.read_text()
        for line in ("Type=notify", "Restart=on-failure", "--config /etc/replfs/replfs.toml"):
            assert line in text, (unit.name, line)
        (tmp_path / unit.name).write_text(text.replace("/opt/replfs", str(ROOT)))
    result = subprocess.run([analyze, "verify", *sorted(p.name for p in tmp_path.iterdir())],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "replfs" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


@contextmanager
def notify_socket(path: Path | None) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket to hand a daemon as NOTIFY_SOCKET: at *path*, or abstract."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if path is not None:
            sock.bind(str(path))
            name = str(path)
        else:
            sock.bind("\0replfs-test-" + os.urandom(8).hex())
            name = "@" + sock.getsockname()[1:].decode()
        sock.settimeout(30)
        yield sock, name


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().splitlines()


def test_notify_ok_no_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_notify_ok_secondary_ready_once_listening(tmp_path: Path) -> None:
    with notify_socket(tmp_path / "notify") as (sock, name):
        daemon = Daemon(["secondary", str(tmp_path / "r"), "--listen", "127.0.0.1:0",
                         *tls_args(SECONDARY, "alpha")], tmp_path / "sec.log", "listening on",
                        env={"NOTIFY_SOCKET": name})
        daemon.start()
        try:
            lines = receive(sock)
            assert lines[0] == "READY=1", lines
            port = int(lines[1].split("listening on 127.0.0.1:")[1].split(",")[0])
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        finally:
            assert daemon.stop() == 0
        assert receive(sock) == ["STOPPING=1"]


@pytest.mark.parametrize("role", ["primary", "mount"])
def test_notify_ok_mount_ready_once_serving(tmp_path: Path, role: str) -> None:
    tree, mount = tmp_path / "tree", tmp_path / "m"
    tree.mkdir()
    mount.mkdir()
    (tree / "hello").write_text("hi")
    if role == "mount":  # a replica: a secondary made its staging store
        Staging(state_dir(tree) / "staging").close()
    with notify_socket(None) as (sock, name):  # the abstract namespace, as systemd's
        daemon = Daemon([role, str(tree), str(mount)], tmp_path / "d.log", "serving",
                        env={"NOTIFY_SOCKET": name})
        daemon.start()
        try:
            lines = receive(sock)
            assert lines[0] == "READY=1" and lines[1].startswith("STATUS=serving"), lines
            assert (mount / "hello").read_text() == "hi"
            assert daemon.stop() == 0
            assert receive(sock) == ["STOPPING=1"]
            assert not os.path.ismount(mount)
        finally:
            if daemon.proc and daemon.proc.poll() is None:
                daemon.kill()
            unmount(mount)
