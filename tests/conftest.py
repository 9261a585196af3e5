import os

import pytest

import tests.fuzz  # noqa: F401  (registers the hypothesis profiles: default, deep)


def pytest_sessionstart(session: pytest.Session) -> None:
    # Mount tests never skip: a machine without FUSE fails loudly.
    if not os.path.exists("/dev/fuse"):
        raise pytest.UsageError("/dev/fuse is missing: these tests need FUSE (run bin/test)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Long runs (many failovers, every partition) only when asked: REPLFS_SLOW=1.
    if os.environ.get("REPLFS_SLOW") == "1":
        return
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.skip(reason="slow: run with REPLFS_SLOW=1"))
