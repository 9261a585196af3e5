"""A daemon a cluster's node runs as its child: the primary, or the secondary.

The kernel kills it when the node dies (the parent-death signal), so no
daemon outlives the node that decided its role; its mount, left dead by
that kill, is cleared when the node starts again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from repl import control
from repl.errors import ReplError
from store.libc import die_with_parent

REPLFS = [sys.executable, str(Path(__file__).resolve().parents[2] / "bin" / "replfs.py")]
START_SECONDS = 60.0  # a daemon not serving by then is given up (and started again)
STOP_SECONDS = 30.0  # a daemon asked to stop is killed after this long


class Child:
    """A daemon the node runs: ``replfs ARGS``, killed by the kernel if the node dies.

    It is started from trio's own thread, not a worker thread: the kernel sends the
    parent-death signal when the *thread* that forked the child ends, and trio's
    worker threads end when idle.
    """

    def __init__(self, role: str, args: list[str], sock: Path,
                 accepts: frozenset[str] = frozenset(), generation: int = 0) -> None:
        self.role, self.args, self.sock = role, args, sock
        self.accepts = accepts  # a secondary over TLS: the primaries it accepts
        self.generation = generation  # a primary: the generation it leads
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self) -> None:
        """Start it; return once its control socket answers. Raises ReplError if it
        exits first, or does not answer within START_SECONDS."""
        # A fork and an exec: milliseconds, and in trio's thread on purpose (above).
        self.proc = subprocess.Popen(  # noqa: ASYNC220
            [*REPLFS, *self.args], preexec_fn=lambda: die_with_parent(signal.SIGKILL))
        with trio.move_on_after(START_SECONDS):
            while self.alive:
                try:
                    await self.ask("status")
                    return
                except (OSError, ValueError, trio.BrokenResourceError):
                    await trio.sleep(0.05)  # it is starting: no event says when it serves
            raise ReplError(f"the {self.role} daemon exited with status "
                            f"{self.proc.returncode} before it served (its log says why)")
        await self.kill()
        raise ReplError(f"the {self.role} daemon did not serve within {START_SECONDS:g}s")

    async def ask(self, cmd: str, **args: Any) -> dict[str, Any]:
        with trio.fail_after(5):
            return await control.ask(self.sock, cmd, **args)

    async def wait(self) -> None:
        """Return once it exited (and is reaped)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            fd = os.pidfd_open(self.proc.pid)
            try:
                await trio.lowlevel.wait_readable(fd)
            finally:
                os.close(fd)
        self.proc.wait()

    async def stop(self) -> None:
        """SIGTERM (it unmounts cleanly), then SIGKILL after STOP_SECONDS."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_SECONDS):
                await self.wait()
        await self.kill()

    async def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
        await self.wait()


async def clear_dead_mount(mount: Path) -> None:
    """Lazily unmount *mount* if a killed daemon left its FUSE mount there."""
    target = os.path.realpath(mount).encode()
    with open("/proc/self/mounts", "rb") as table:
        mounted = any(line.split()[1] == target for line in table)
    if mounted:
        await trio.run_process(["fusermount3", "-u", "-z", str(mount)], check=False)
