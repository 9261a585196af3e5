"""Primary power cuts in a torture run: BACKING and the journal on a simulated disk.

With power cuts on, a run keeps the primary's BACKING and its journal on the
power-cut simulator (tests/powercut). A cut stops the disk, kills the
primary at that instant and drops what was not synced (all of it, or a
seeded half of the dirty pages, as if the kernel had written those back);
then the disk comes back and the primary starts again on it. Checked after
each cut by ``PowerCuts.boot``:

- the journal is readable, the primary starts again on it and is still of
  its cluster (if not, it raises Violation: the run cannot go on);
- BACKING is the primary's tree at the close of the journal's last durable
  set (when the journal ends with that set's SYNC: records after it, durable
  without their SYNC, leave a state no digest recorded, counted as unchecked),
  but for what the activity log noted (repl/activity.py) and the files of the
  dirty map (written over budget, repl/primary/resync.py): BACKING may hold
  more there than the journal, and the primary resends it as it is. Those
  paths are left out, and the rest compared path by path (the trees the
  primary recorded at each close, REPLFS_TEST_SET_TREES);
- every SQLite commit the workload got back is in the database.

The last two are kept in ``problems`` and the run goes on, so that one run
also shows what follows from them (a replica that does not converge, a torn
sample); the run fails at its end with all of them.

The replica converging and no sample showing a torn set are the run's own
checks; set ids the primary closes again after a cut are accepted with
either history's contents (Run.set_hashes).

``ReplicaPowerCuts`` does the same on the secondary's host: the replica and its
staging on a simulated disk of their own, the secondary and the standby mount
killed with its power. Checked by ``ReplicaPowerCuts.boot``, before the
secondary starts again:

- every set the secondary had reported applied is still applied;
- unless the cut caught a batch before it was durable (a redo or the primary's
  resend mends that; the run's samples check what follows), the replica is
  the primary's tree at the close of the set the apply log says.
"""

from __future__ import annotations

import ast
import os
import random
import shutil
import sqlite3
import stat
import tempfile
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from pathlib import Path

from repl.activity import name_roots
from repl.verify import tree_digest, walk
from store.errors import StoreError
from store.hold import interrupted
from store.journal import Journal
from store.notes import Note, NoteKind
from store.records import is_under
from store.staging import read_applied, read_syncing
from tests.powercut.harness import Simulator
from tests.support import Daemon, status, unmount
from tests.torture.violation import Violation

KIND = "primary_powercut"
REPLICA_KIND = "secondary_powercut"
NLINK = 4  # where a tree entry holds its link count (repl/verify.py, _summary)
KEEP = (0.0, 0.0, 0.5)  # the fraction of dirty pages the kernel wrote back before the cut



class PowerCuts:
    """The simulated disk under a run's primary, and its power switch."""

    def __init__(self, run_dir: Path, hashes: Path) -> None:
        self.sim = Simulator(run_dir / "disk-lower", run_dir / "disk", run_dir / "disk.log")
        self.sim.lower.mkdir()
        self.hashes = hashes
        self.trees = run_dir / "set-trees"  # what the primary recorded at each close
        self.trees.mkdir()
        self.pages_lost = self.unchecked = self.resent = 0
        self.keep = 0.0  # the last cut's
        self.cluster = ""  # the primary's cluster id before the last cut
        self.problems: list[str] = []  # violations found after a cut

    @property
    def backing(self) -> Path:
        return self.sim.mountpoint / "b"

    def start(self) -> None:
        self.sim.start()

    def close(self) -> None:
        self.sim.close()

    def power_off(self, primary: Daemon, mount: Path, rng: random.Random) -> None:
        """Cut the power under *primary*: it dies, the disk drops what was not synced."""
        self.cluster = status(mount)["cluster"]
        self.keep = rng.choice(KEEP)
        counts = self.sim.power_cut(primary, keep=self.keep, seed=rng.randrange(1 << 32))
        unmount(mount)
        self.pages_lost += counts["pages"] - counts["kept"]

    def boot(self, start_primary: Callable[[], Daemon], mount: Path, committed: int) -> Daemon:
        """Bring the host back after ``power_off`` and check it; returns the new primary.

        Args:
            committed: the SQLite commits the workload got back.
        """
        keep = self.keep
        digests = self._digests()  # what the primary recorded before the power went
        last, closed, notes, dirty = self._last_set()
        self.sim.start()
        try:
            primary = start_primary()
        except AssertionError as exc:
            raise Violation(f"the primary does not start after a power cut (keep {keep}): "
                            f"{str(exc).strip().splitlines()[-1]}") from None
        if status(mount)["cluster"] != self.cluster:
            raise Violation(f"after a power cut (keep {keep}) the primary is another cluster, "
                            "which its secondary refuses")
        if not closed or last not in digests:
            self.unchecked += 1
        elif notes or dirty:
            self.resent += 1
            differ = self._differences(last, notes, dirty)
            if differ:
                self.problems.append(f"after a power cut (keep {keep}) the primary's tree "
                                     f"differs from its tree at the close of set {last}, the "
                                     f"journal's last durable set, outside what the activity "
                                     f"log noted: {differ[:3]}")
        elif tree_digest(self.backing) != digests[last]:
            self.problems.append(f"after a power cut (keep {keep}) the primary's tree is not "
                                 f"its tree at the close of set {last}, the journal's last "
                                 "durable set")
        have = sqlite_count(mount)
        if have != committed:
            self.problems.append(f"after a power cut (keep {keep}) SQLite on the primary "
                                 f"holds {have} of the {committed} commits the workload got "
                                 "back")
        return primary

    def _digests(self) -> dict[int, str]:
        out = {}
        if self.hashes.exists():
            for line in self.hashes.read_text().splitlines():
                set_id, digest = line.split()
                out[int(set_id)] = digest
        return out

    def _last_set(self) -> tuple[int, bool, list[Note], set[bytes]]:
        """The journal's last set on the disk as the cut left it, whether it ends
        with that set's SYNC (or holds no record after a trim), its notes, and the
        files its dirty map names (written over budget: their ranges are resent as
        BACKING holds them, in the set left open)."""
        try:
            journal = Journal(self.sim.lower / ".b.replfs" / "journal", read_only=True)
        except StoreError as exc:
            raise Violation(f"the journal is unreadable after a power cut (keep {self.keep}): "
                            f"{exc}") from None
        try:
            dirty = set(journal.dirty)
            if journal.seq == 0:
                return journal.set - 1, True, journal.notes, dirty
            return journal.set, False, journal.notes, dirty
        finally:
            journal.close()

    def _differences(self, set_id: int, notes: list[Note],
                     dirty: AbstractSet[bytes] = frozenset()) -> list[str]:
        """The paths where BACKING differs from its tree at *set_id*'s close, but for
        the noted ones: NAME paths with all under them and their directory's own
        entry, the other notes' paths, other names of a file among them, and the
        link count of the names left of a file whose noted name is gone; and the
        files of the dirty map."""
        roots = name_roots(notes)
        skip = {n.path for n in notes if n.kind != NoteKind.NAME} | dirty
        skip |= {root.rpartition(b"/")[0] for root in roots}
        before = {}
        for line in (self.trees / str(set_id)).read_text().splitlines():
            path, entry = line.split(" ", 1)
            before[bytes.fromhex(path)] = entry
        now = {os.fsencode(path): repr(entry) for path, entry in walk(self.backing)}

        def noted(path: bytes) -> bool:
            return path in skip or any(is_under(path, root) for root in roots)

        linked = set()  # inodes of skipped files: their other names show the same change
        for path in now:
            if noted(path):
                st = os.lstat(os.path.join(self.backing, os.fsdecode(path)))
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    linked.add(st.st_ino)
        # Skipped names of files that had several, gone since: the names left lost a
        # link (seen as the same entry but for its link count).
        unlinked = {_but_nlink(fields) for path, entry in before.items() if noted(path)
                    for fields in [ast.literal_eval(entry)]
                    if fields[NLINK] > 1 and not fields[0].startswith("d")}
        out = []
        for path in sorted(before.keys() | now.keys()):
            if noted(path):
                continue
            was, is_ = before.get(path), now.get(path)
            if was != is_:
                if path in now and os.lstat(self.backing / os.fsdecode(path)).st_ino in linked:
                    continue
                if was and is_ and (rest := _but_nlink(ast.literal_eval(was))) in unlinked \
                        and rest == _but_nlink(ast.literal_eval(is_)):
                    continue
                out.append(os.fsdecode(path) or "/")
        return out


class ReplicaPowerCuts:
    """The simulated disk under a run's replica and its staging, and its power switch."""

    def __init__(self, run_dir: Path) -> None:
        self.sim = Simulator(run_dir / "rdisk-lower", run_dir / "rdisk", run_dir / "rdisk.log")
        self.sim.lower.mkdir()
        self.pages_lost = self.torn = 0
        self.keep = 0.0
        self.reported = 0  # the last set the secondary reported applied before the cut
        self.problems: list[str] = []

    @property
    def replica(self) -> Path:
        return self.sim.mountpoint / "r"

    @property
    def staging(self) -> Path:
        return self.sim.mountpoint / ".r.replfs" / "staging"

    def power_off(self, mount: Path, rng: random.Random, *host: Daemon) -> None:
        """Cut the power under the secondary's host: *host*'s daemons die, the disk
        drops what was not synced. *mount* is the primary's, asked what the secondary
        reported applied (it reports a set once the apply log holds it durably)."""
        self.reported = int(status(mount).get("last_applied") or 0)
        self.keep = rng.choice(KEEP)
        counts = self.sim.power_cut(*host, keep=self.keep, seed=rng.randrange(1 << 32))
        self.pages_lost += counts["pages"] - counts["kept"]

    def boot(self, set_hashes: dict[int, set[str]]) -> None:
        """Bring the host's disk back after ``power_off`` and check the replica on it,
        before the secondary starts again; *set_hashes*: each set's digests at its close."""
        self.sim.start()
        applied = read_applied(self.staging)
        if applied < self.reported:
            self.problems.append(f"after a power cut of the secondary (keep {self.keep}) its "
                                 f"apply log says set {applied}; it had reported "
                                 f"{self.reported} applied")
        batch = interrupted(self.staging)
        if read_syncing(self.staging) is not None or (batch is not None and batch[0] > applied):
            self.torn += 1  # a batch not yet durable: mended by a resend, seen by samples
        elif applied and tree_digest(self.replica) not in set_hashes.get(applied, set()):
            self.problems.append(f"after a power cut of the secondary (keep {self.keep}) the "
                                 f"replica is not the primary's tree at the close of set "
                                 f"{applied}, the set its apply log says")

    def close(self) -> None:
        self.sim.close()


def _but_nlink(fields: tuple[object, ...]) -> tuple[object, ...]:
    """A tree entry (repl/verify.py, _summary) without its link count."""
    return (*fields[:NLINK], *fields[NLINK + 1:])


def sqlite_count(tree: Path) -> int:
    """Rows in the workload's table, in a copy of the database and its WAL in *tree*."""
    if not (tree / "app.db").exists():
        return 0
    scratch = Path(tempfile.mkdtemp())
    try:
        for name in ("app.db", "app.db-wal"):
            if (tree / name).exists():
                shutil.copyfile(tree / name, scratch / name)
        db = sqlite3.connect(scratch / "app.db")
        try:
            if db.execute("pragma integrity_check").fetchone()[0] != "ok":
                raise Violation(f"SQLite in {tree} fails integrity_check")
            return int(db.execute("select count(*) from t").fetchone()[0])
        except sqlite3.OperationalError:
            return 0  # the table's creation was never committed
        finally:
            db.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
