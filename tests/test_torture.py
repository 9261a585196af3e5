"""A short torture campaign in every test run, so CI guards the guarantee."""

from __future__ import annotations

import io
import os

from tests.torture.__main__ import campaign
from tests.torture.run import POWER_CUT


def test_torture_short_campaign() -> None:
    seed = int(os.environ.get("REPLFS_TORTURE_SEED", "20261126"))
    out = io.StringIO()
    results = campaign(runs=3, seed=seed, minutes=None, seconds=4.0, out=out)
    assert len(results) == 3
    assert all(r.samples > 0 for r in results), out.getvalue()
    assert [r.error for r in results] == [None, None, None], out.getvalue()


def test_torture_power_cuts_short_campaign() -> None:
    out = io.StringIO()
    results = campaign(runs=2, seed=20261201, minutes=None, seconds=4.0, out=out,
                       power_cuts=True)
    assert [r.faults[POWER_CUT] for r in results] == [1, 1]
    assert [r.error for r in results] == [None, None], out.getvalue()
