"""Errors raised by the durable stores."""


class ReplfsError(Exception):
    """Base of every error replfs raises on purpose."""


class StoreError(ReplfsError):
    """A durable store could not do what was asked."""


class RecordError(StoreError):
    """Bytes that do not decode to a valid record."""


class JournalLocked(StoreError):
    """Another daemon holds the journal."""


class UnsafeState(StoreError):
    """replfs's own state could be changed by another user: refused, nothing read."""
