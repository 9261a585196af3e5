"""Errors of the replication protocol and roles."""

from store.errors import ReplfsError


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
