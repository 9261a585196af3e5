"""Errors of the replication protocol and roles."""

import logging
import time

from store.errors import ReplfsError

REPEAT_LOG_SECONDS = 60.0  # the same failure is logged again this often at most


class ReplError(ReplfsError):
    """Replication could not go on as asked."""


class ProtocolError(ReplError):
    """The peer sent something that is not valid replfs protocol."""


class Refused(ReplError):
    """The peer is replfs but must not be served (other cluster, stale generation...)."""


class NotYet(ReplError):
    """What was asked must wait for something under way (a sync of another secondary)."""


class UsageError(ReplfsError):
    """Bad input from the user: said in one line, nothing touched."""


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf of a (nested) exception group, for a one-line log."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


class Repeats:
    """Log failures to *logger*, the same one again only once a REPEAT_LOG_SECONDS, with
    how often it came meanwhile: a peer down for an hour is a line a minute, not a line
    at each retry."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._text: str | None = None  # the failure logged last
        self._at = 0.0
        self._unlogged = 0

    def warning(self, text: str) -> None:
        now = time.monotonic()
        if text == self._text and now - self._at < REPEAT_LOG_SECONDS:
            self._unlogged += 1
            return
        again = (f" (again, {self._unlogged} times since it was last logged)"
                 if text == self._text and self._unlogged else "")
        self.logger.warning("%s%s", text, again)
        self._text, self._at, self._unlogged = text, now, 0

    def clear(self) -> None:
        """It worked: the next failure is logged at once."""
        self._text = None
