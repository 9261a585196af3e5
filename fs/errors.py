"""The one place where errors become FUSE errnos."""

from __future__ import annotations

import errno
import logging

import pyfuse3

log = logging.getLogger("replfs.fs")


def fuse_error(exc: Exception, where: str) -> pyfuse3.FUSEError:
    """What to answer for *exc*, raised by handler *where*: its errno; for anything
    unexpected, EIO, and the traceback in the log (call it inside the except)."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, OSError):
        return pyfuse3.FUSEError(exc.errno or errno.EIO)
    log.exception("%s failed", where)
    return pyfuse3.FUSEError(errno.EIO)
