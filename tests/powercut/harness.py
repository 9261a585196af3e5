"""Drive the power-cut simulator from a test: start it, cut the power, start it again.

    with simulator(lower, mnt) as sim:
        ...                                # a daemon keeps its files under mnt
        sim.power_cut(daemon, keep=0.5, seed=7)   # power off, daemon killed, data dropped
        sim.start()                        # the machine boots: a new mount over lower

The simulator runs in its own process (``python -m tests.powercut``), so a
daemon under test and the simulator die independently, as a process and a
disk do. Each start is a boot of the machine: ``boot_id`` names a file that
holds a new id, for a daemon to read in place of the kernel's (repl/faults.py).
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support import Daemon, unmount


class Simulator:
    """One LOWER directory, served at one mountpoint by a simulator process at a time."""

    def __init__(self, lower: Path, mountpoint: Path, log: Path) -> None:
        self.lower, self.mountpoint = lower, mountpoint
        # A short path: a unix socket's must fit in 108 bytes.
        self._dir = Path(tempfile.mkdtemp(prefix="powercut-"))
        self.control = self._dir / "control.sock"
        self.boot_id = self._dir / "boot_id"
        self.daemon = Daemon([str(lower), str(mountpoint), "--control", str(self.control)],
                             log, "serving", command=[sys.executable, "-m", "tests.powercut"])

    @property
    def running(self) -> bool:
        return self.daemon.proc is not None and self.daemon.proc.poll() is None

    def start(self) -> Simulator:
        """Mount a new simulator over LOWER (the previous one must be gone)."""
        assert not self.running, "the simulator is already running"
        self.boot_id.write_text(f"{uuid.uuid4()}\n")
        self.mountpoint.mkdir(exist_ok=True)
        self.daemon.start()
        return self

    def request(self, cmd: str, **fields: Any) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(60)
            sock.connect(str(self.control))
            sock.sendall(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
            reply: dict[str, Any] = json.loads(sock.makefile("rb").readline())
        if "error" in reply:
            raise AssertionError(f"simulator: {reply['error']}")
        return reply

    def freeze(self) -> None:
        """The power goes off: nothing more reaches LOWER, every request fails."""
        self.request("freeze")

    def cut(self, keep: float = 0.0, seed: int = 0) -> dict[str, int]:
        """Drop what was not synced (but each page with probability *keep*, drawn
        from *seed*), and unmount. Returns counts: files, pages, kept."""
        counts = self.request("cut", keep=keep, seed=seed)
        assert self.daemon.proc is not None
        self.daemon.proc.wait(30)
        unmount(self.mountpoint)
        return counts

    def power_cut(self, *daemons: Daemon, keep: float = 0.0, seed: int = 0) -> dict[str, int]:
        """The host loses power: the disk stops, *daemons* die with SIGKILL at that
        instant, and what the disk had not made durable is lost (see ``cut``)."""
        self.freeze()
        for daemon in daemons:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.kill()
        return self.cut(keep, seed)

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Every fsync on the simulator waits until the block ends (a slow disk)."""
        self.request("hold", held=True)
        try:
            yield
        finally:
            self.request("hold", held=False)

    def pending(self) -> dict[str, int]:
        """Files and pages written and not yet synced."""
        return self.request("pending")

    def stop(self) -> None:
        """A clean unmount: every pending page is written to LOWER first."""
        if self.running:
            assert self.daemon.stop() == 0, self.daemon.log()
        unmount(self.mountpoint)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextmanager
def simulator(lower: Path, mountpoint: Path, log: Path | None = None) -> Iterator[Simulator]:
    """A running simulator of LOWER at *mountpoint*, stopped however the test ends."""
    lower.mkdir(exist_ok=True)
    sim = Simulator(lower, mountpoint, log or lower.parent / f"{mountpoint.name}.log")
    sim.start()
    try:
        yield sim
    finally:
        sim.close()
