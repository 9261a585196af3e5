"""replfs's version, as pyproject.toml gives it: ``replfs --version``, both daemons'
status and their ``replfs_node_info`` series say it, so that after an upgrade the
daemons still running the old code can be told apart."""

from __future__ import annotations

import tomllib
from pathlib import Path

with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as _f:
    VERSION: str = tomllib.load(_f)["project"]["version"]
