"""Telling systemd how a daemon is doing (units of ``Type=notify``).

The sd_notify protocol: one datagram of ``KEY=VALUE`` lines to the unix
socket named by ``$NOTIFY_SOCKET`` (a name starting with ``@`` is in the
abstract namespace). Without that variable (not started by systemd), it
does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("replfs.sdnotify")


def notify(*lines: str) -> bool:
    """Send *lines* (``READY=1``, ``STATUS=...``, ``STOPPING=1``); True if sent.

    Never raises: a service manager that went away costs one log line.
    """
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return False
    address = "\0" + where[1:] if where.startswith("@") else where
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", where, exc.strerror or exc)
        return False
    return True
