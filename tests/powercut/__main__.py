"""python -m tests.powercut LOWER MOUNTPOINT --control SOCKET: serve the simulator.

Logs "serving LOWER at MOUNTPOINT" on stderr once mounted. The control
socket takes one JSON request per connection and answers one JSON line:

- ``{"cmd": "freeze"}``: the power goes off; every request fails with EIO from
  now on (the data is not dropped yet, nothing more reaches LOWER);
- ``{"cmd": "cut", "keep": 0.0, "seed": 0}``: drop the pending data but each
  page with probability *keep*, unmount, and exit; answered once unmounted;
- ``{"cmd": "pending"}``: how many files and pages are pending;
- ``{"cmd": "hold", "held": true}``: every fsync waits until ``"held": false``.

SIGTERM, SIGINT or an unmount is a clean stop: every pending page is written
to LOWER first, as a real filesystem does at unmount. SIGKILL loses them all.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import pyfuse3

from tests.powercut.fs import PowerCutFS

log = logging.getLogger("powercut")
WORKERS = 4  # an fsync waits for LOWER's disk in its thread; the others go on


class Control:
    """The control socket's server, in a thread of its own."""

    def __init__(self, fs: PowerCutFS, path: Path) -> None:
        self.fs = fs
        self.cut = False
        self.unmounted = threading.Event()
        self.replied = threading.Event()  # the cut's answer is sent: the process may end
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path.unlink(missing_ok=True)
        self.sock.bind(str(path))
        self.sock.listen(8)
        # Started with SIGTERM and SIGINT blocked (a thread inherits the mask):
        # the process's signals must reach the main thread, which waits in
        # main_threads(). A signal this thread took would run its handler only
        # once the main thread woke for something else.
        stops = {signal.SIGTERM, signal.SIGINT}
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            threading.Thread(target=self._serve, daemon=True, name="control").start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            with conn:
                request = json.loads(conn.makefile("rb").readline())
                conn.sendall(json.dumps(self._answer(request)).encode() + b"\n")
            if self.cut:
                self.replied.set()
                return

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "freeze":
            self.fs.freeze()
            return {"frozen": True}
        if cmd == "pending":
            return self.fs.pending()
        if cmd == "hold":
            self.fs.hold(request.get("held") is True)
            return {"held": request.get("held") is True}
        if cmd == "cut":
            counts = self.fs.cut(float(request.get("keep", 0.0)), int(request.get("seed", 0)))
            self.cut = True
            log.info("cut: %s", counts)
            pyfuse3.terminate()
            self.unmounted.wait()
            return counts
        return {"error": f"unknown command {cmd!r}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="powercut", description=__doc__.split("\n")[0])
    parser.add_argument("lower", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--control", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # an fd per inode in use
    os.umask(0)  # the kernel already applied the caller's
    fs = PowerCutFS(str(args.lower))
    options = set(pyfuse3.default_options) | {"fsname=powercut", "subtype=powercut"}
    if os.geteuid() == 0:
        options.add("allow_other")
    pyfuse3.init(fs, str(args.mountpoint), options)
    control = Control(fs, args.control)
    signal.signal(signal.SIGTERM, lambda *_: pyfuse3.terminate())
    signal.signal(signal.SIGINT, lambda *_: pyfuse3.terminate())
    log.info("serving %s at %s", args.lower, args.mountpoint)
    try:
        pyfuse3.main_threads(WORKERS)
    finally:
        if not control.cut:
            log.info("clean stop: wrote %d files' pending data", fs.sync_all())
        pyfuse3.close(unmount=True)
        control.unmounted.set()
    if control.cut:
        control.replied.wait(30)
    log.info("unmounted %s", args.mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
