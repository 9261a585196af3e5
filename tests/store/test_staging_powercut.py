"""The staging store across a power cut of the secondary's host.

A stager process stages a set and is stopped (with the power) after the
commit and before the sync that would make it durable: the pages of that
commit the disk had not got are dropped, a seeded half of them kept (the
power-cut simulator, tests/powercut). The store opens again whole, with
every set synced before the cut: an acknowledged set is never lost, and
never a torn store (LMDB's meta page over pages the disk did not get).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.powercut.harness import simulator

# Stages sets 1, 2, ... into the store at argv[1], says SYNCED n once each is durable;
# after staging set argv[2] it says HELD and waits for the power to go.
STAGER = """
import sys, time
from store.records import Op, Record
from store.staging import Staging
staging, held = Staging(sys.argv[1]), int(sys.argv[2])
for s in range(1, held + 1):
    records = [Record(Op.WRITE, s, 0, path=b"log", offset=s * 4096, data=bytes(3000)),
               Record(Op.UTIMES, s, 1, path=b"log", atime_ns=1, mtime_ns=2),
               Record(Op.SYNC, s, 2, count=2)]
    staging.stage(records)
    if s == held:
        print("HELD", flush=True)
        time.sleep(600)
    staging.sync()
    print("SYNCED", s, flush=True)
"""
# Opens the store at argv[1] again (in a process of its own: LMDB may crash reading a
# torn store) and prints, per set, whether it is complete and its records' seqs.
CHECK = """
import json, sys
from store.staging import Staging
staging = Staging(sys.argv[1])
print(json.dumps({s: [state.complete, [r.seq for r in staging.records(s)]]
                  for s, state in staging.sets().items()}))
"""


@pytest.mark.parametrize("seed", range(4))
def test_staging_powercut_ok_synced_sets_survive_a_cut_before_the_sync(
        tmp_path: Path, seed: int) -> None:
    mnt = tmp_path / "mnt"
    with simulator(tmp_path / "lower", mnt) as sim:
        held = 4 + seed
        stager = subprocess.Popen([sys.executable, "-c", STAGER, str(mnt / "staging"),
                                   str(held)], stdout=subprocess.PIPE, text=True)
        assert stager.stdout is not None
        synced = 0
        for line in stager.stdout:
            if line.startswith("SYNCED"):
                synced = int(line.split()[1])
            elif line.startswith("HELD"):
                break
        assert synced == held - 1
        sim.freeze()
        stager.kill()
        stager.wait()
        counts = sim.cut(keep=0.5, seed=seed)
        assert counts["pages"] > 0  # the commit of the set held left pages to lose
        sim.start()
        check = subprocess.run([sys.executable, "-c", CHECK, str(mnt / "staging")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr[-2000:]
        sets = {int(s): v for s, v in json.loads(check.stdout).items()}
        for s in range(1, synced + 1):
            assert sets.get(s) == [True, [0, 1, 2]], (s, sets)
        assert set(sets) <= set(range(1, held + 1))
