import os

import pytest

import tests.fuzz  # noqa: F401  (registers the hypothesis profiles: default, deep)


def pytest_sessionstart(session: pytest.Session) -> None:
    # Mount tests never skip: a machine without FUSE fails loudly.
    if not os.path.exists("/dev/fuse"):
        raise pytest.UsageError("/dev/fuse is missing: these tests need FUSE (run bin/test)")
