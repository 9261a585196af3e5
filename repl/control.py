"""The daemon's control socket: one JSON request, one JSON answer, per connection.

``replfs checkpoint`` and ``replfs status`` talk to a running daemon
through a unix socket whose path is derived from the mountpoint (or
replica), so the commands need nothing but what the user typed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from store.libc import mounts
from store.private import private_dir

log = logging.getLogger("replfs.control")
MAX_LINKS = 40  # symbolic links followed in a path, as the kernel does

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
# A reply may carry this key with a function: the connection then stays open
# until the client closes it, and the function runs then (e.g. a thaw).
UNTIL_CLOSED = "__until_closed__"


def real_path(target: str | os.PathLike[str]) -> str:
    """``os.path.realpath(target)``, but a mount point is not looked at: the look
    would wait for ever on a FUSE mount whose daemon is stopped, and ``replfs status``
    of such a mount is how its user finds out."""
    target = os.fspath(target).rstrip("/") or "/"
    points = {point for point, _ in mounts()}
    for _ in range(MAX_LINKS):
        head, tail = os.path.split(target)
        if tail in ("", ".", ".."):
            break
        path = os.path.join(os.path.realpath(head), tail)
        if path in points:
            return path
        if not os.path.islink(path):  # not a mount point: the look stays out of it
            return path
        target = os.path.join(os.path.dirname(path), os.readlink(path))
    return os.path.realpath(target)


def socket_path(target: str | os.PathLike[str]) -> Path:
    """The control socket of the daemon serving *target* (a mountpoint or replica)."""
    key = hashlib.sha1(os.fsencode(real_path(target))).hexdigest()[:16]
    if os.geteuid() == 0:
        base = Path("/run/replfs")
    else:
        base = Path(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/replfs-{os.geteuid()}") / "replfs"
    return base / f"{key}.sock"


async def serve(path: Path, handlers: dict[str, Handler], *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer requests on *path* until cancelled; the socket file is removed on exit. A
    handler that fails (a bug, an OSError) answers an error, logged with its traceback:
    a ``replfs status`` must never take the daemon, and the mount it serves, down."""
    private_dir(path.parent)
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()

        async def answer(stream: trio.SocketStream) -> None:
            async with stream:
                reply: dict[str, Any]
                cmd = None
                try:
                    request = json.loads(await _read_line(stream))
                    cmd = request.get("cmd")
                    handler = handlers.get(cmd)
                    if handler is None:
                        reply = {"error": f"unknown command {cmd!r}"}
                    else:
                        reply = await handler(request)
                except (ValueError, KeyError, TypeError, AttributeError,
                        trio.BrokenResourceError) as exc:
                    reply = {"error": f"bad request: {exc!r}"}
                except Exception as exc:  # a failure of ours: an answer, not the daemon's end
                    log.exception("the %s request failed", cmd)
                    reply = {"error": f"the daemon failed to answer {cmd}: {exc!r} (see its log)"}
                hold = reply.pop(UNTIL_CLOSED, None)
                try:
                    await stream.send_all(json.dumps(reply).encode() + b"\n")
                    if hold is not None:
                        try:
                            while await stream.receive_some(4096):
                                pass  # the client keeps the connection open while it needs it
                        finally:
                            hold()
                except trio.BrokenResourceError:
                    pass

        await trio.serve_listeners(answer, [listener])
    finally:
        sock.close()
        path.unlink(missing_ok=True)


async def _read_line(stream: trio.SocketStream) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def request(path: Path, cmd: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
    """Send one request to a daemon (blocking). Raises OSError when none listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)  # type: ignore[no-any-return]


async def ask(path: Path, cmd: str, **args: Any) -> dict[str, Any]:
    """``request``, from trio: one request to the daemon at *path*, without blocking the
    thread. Raises OSError when none listens, ValueError on a garbled answer; bound
    it with a trio scope."""
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        return json.loads(await _read_line(stream))  # type: ignore[no-any-return]
