"""One torture run of a cluster: three ``replfs node``s on a real etcd, a seeded
workload on whichever node leads, and kills and cuts drawn from the seed.

A killed primary (``kill -9`` of its node) is replaced by the nodes' own
election; its node starts again and rejoins as a standby. A primary cut off
(its node's link down: etcd and the other nodes out of reach, each node
being in a network namespace of its own) goes on taking the workload until
it fences itself; another is elected meanwhile, and once its link is back
the old one rejoins as a standby. A killed standby starts again and catches
up; one cut off for a while follows again once its link is back. When etcd
is cut off from every node, the primary fences itself and stops, and once
etcd is back the nodes elect a primary again. After each failover the new
primary's tree must be the old primary's at the close of one of its sets
(never part of a set), its SQLite a prefix of the commits (all of those
acknowledged while an fsync waited for a secondary, with ``--fsync
remote``), git fsck clean; at no moment may two nodes serve their mounts
read-write; at the end every node holds the primary's tree.
"""

from __future__ import annotations

import errno
import random
import re
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from repl.faults import ENV_SET_HASHES
from repl.verify import tree_digest
from tests.cluster import (
    NAMES,
    TTL,
    Node,
    Partition,
    Watchdog,
    etcd_server,
    primary_of,
    standing,
    stop_all,
)
from tests.support import checkpoint, diff, snapshot, wait_applied
from tests.torture.power import sqlite_count
from tests.torture.run import check_apps, in_step_at_death
from tests.torture.violation import Violation
from tests.torture.workload import Workload

KINDS = ("primary_kill", "primary_cut", "standby_kill", "standby_cut", "etcd_cut")


@dataclass
class ClusterResult:
    seed: int
    fsync: str = "local"
    faults: Counter[str] = field(default_factory=Counter)
    sets: int = 0
    ops: int = 0
    failover_seconds: list[float] = field(default_factory=list)  # kill or cut to a new primary
    lost_commits: int = 0  # acknowledged SQLite commits a failover lost
    in_step_failovers: int = 0  # with --fsync remote, fsyncs waiting for a secondary
    own_journal: int = 0  # failovers to a node that led before, from its own journal
    role_samples: int = 0  # the watchdog's looks at every node's role
    error: str | None = None
    kept: Path | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class ClusterRun:
    def __init__(self, seed: int, seconds: float, base: Path) -> None:
        self.seed, self.seconds = seed, seconds
        self.rng = random.Random(seed)
        self.dir = Path(tempfile.mkdtemp(prefix=f"torture-cluster-{seed}-", dir=base))
        # Half the runs make fsyncs wait for the secondaries in step.
        self.result = ClusterResult(seed, fsync=("local", "remote")[seed % 2])
        self.net: Partition | None = None  # each node in a network namespace of its own
        count = self.rng.randint(1, 3)
        self.faults = sorted((self.rng.uniform(0.15, 0.8) * seconds, self.rng.choice(KINDS))
                             for _ in range(count))

    def hashes(self, set_id: int) -> set[str]:
        """The digests of the tree at the close of set *set_id* by any node that led (a
        set id a failover voided closes again under the next leader, maybe unlike)."""
        found = set()
        for path in self.dir.glob("*.hashes"):
            for line in path.read_text().splitlines():
                closed, digest = line.split()
                if int(closed) == set_id:
                    found.add(digest)
        return found

    def execute(self, etcd_url: str, net: Partition) -> None:
        self.net = net
        nodes = [Node(name, self.dir, [etcd_url], f"torture{self.seed}",
                      host=net.address(i), netns=net.names[i], fsync=self.result.fsync,
                      # An fsync cut off with its primary gives up on the secondaries
                      # after the fence (TTL/2), before the node stops it (TTL).
                      fsync_timeout=TTL * 2 / 3,
                      env={ENV_SET_HASHES: str(self.dir / f"{name}.hashes")})
                 for i, name in enumerate(NAMES)]
        try:
            for node in nodes:
                node.start()
            with Watchdog(nodes) as watch:
                self.run(nodes)
            self.result.role_samples = watch.samples
            if watch.violations:
                raise Violation(f"two writable primaries at once: {watch.violations[:3]}")
        finally:
            stop_all(nodes)

    def run(self, nodes: list[Node]) -> None:
        primary = standing(nodes)
        workload = Workload(primary.mount, self.seed)
        plan = list(self.faults)
        started = time.monotonic()
        try:
            while (now := time.monotonic()) - started < self.seconds:
                if plan and now - started >= plan[0][0]:
                    kind = plan.pop(0)[1]
                    self.result.faults[kind] += 1
                    if kind == "primary_kill":
                        primary = self.fail_over(nodes, primary, workload)
                    elif kind == "primary_cut":
                        primary = self.cut_off(nodes, primary, workload)
                    elif kind == "standby_kill":
                        standby = self.rng.choice([n for n in nodes if n is not primary])
                        standby.kill()
                        standby.start()
                    elif kind == "standby_cut":
                        self.cut_standby(nodes, primary, workload)
                    else:
                        primary = self.cut_etcd(nodes, primary, workload)
                    started += time.monotonic() - now  # waiting out a fault is not
                    continue  # the run's time
                try:
                    workload.step()
                except OSError as exc:
                    # EROFS: fenced for a moment, a renewal of its lease late (under
                    # load), which is always allowed; else only from a fenced primary.
                    if exc.errno != errno.EROFS and primary.writable():
                        raise
            workload.close()
            primary = standing(nodes, timeout=TTL + 60)
            for node in nodes:
                if node is not primary and not converges(primary, node):
                    raise Violation(f"{node.name}'s replica differs from the primary "
                                    f"{primary.name} at the end")
            self.result.sets = checkpoint(primary.mount)
            check_apps(primary.data, workload, True, self.dir)
        finally:
            self.result.ops = workload.ops
            workload.close()

    def fail_over(self, nodes: list[Node], old: Node, workload: Workload) -> Node:
        """Kill the primary's node; once another leads, check its tree, and start the
        old one again (it rejoins as a standby)."""
        assert old.daemon is not None
        in_step = in_step_at_death(old.daemon.log_path)
        old.kill()
        killed = time.monotonic()
        workload.close()
        new = primary_of([n for n in nodes if n is not old], timeout=TTL + 60)
        self.result.failover_seconds.append(time.monotonic() - killed)
        self.check_promoted(new, in_step, workload)
        old.start()
        return new

    def cut_off(self, nodes: list[Node], old: Node, workload: Workload) -> Node:
        """Cut the primary's node off (its link down) while the workload goes on
        writing there until it refuses (fenced: EROFS, and EIO for an fsync whose set
        no secondary staged); once another leads, check its tree as after a kill, and
        bring the old one's link back (it rejoins as a standby)."""
        assert old.daemon is not None and self.net is not None
        in_step = in_step_at_death(old.daemon.log_path)  # its last word before the cut
        index = nodes.index(old)
        self.net.isolate(index)
        cut = time.monotonic()
        while old.writable() and time.monotonic() - cut < 4 * TTL:
            try:
                workload.step()
            except (OSError, sqlite3.Error):
                pass  # refused, fenced
        workload.close()
        new = primary_of([n for n in nodes if n is not old], timeout=TTL + 60)
        self.result.failover_seconds.append(time.monotonic() - cut)
        self.check_promoted(new, in_step, workload)
        self.net.reconnect(index)
        return new

    def cut_standby(self, nodes: list[Node], primary: Node, workload: Workload) -> None:
        """Cut a standby off for two TTLs (its lease runs out, and with --fsync remote
        the primary's fsyncs stop waiting for it) while the workload goes on at the
        primary; then bring its link back: it follows again and catches up."""
        assert self.net is not None
        index = nodes.index(self.rng.choice([n for n in nodes if n is not primary]))
        self.net.isolate(index)
        cut = time.monotonic()
        try:
            while time.monotonic() - cut < 2 * TTL:
                try:
                    workload.step()
                except OSError as exc:
                    if exc.errno != errno.EROFS and primary.writable():
                        raise
        finally:
            self.net.reconnect(index)

    def cut_etcd(self, nodes: list[Node], old: Node, workload: Workload) -> Node:
        """Cut every node off from etcd for two TTLs (they still reach each other) while
        the workload goes on: the primary fences itself, then stops. Once etcd is back
        the nodes elect a primary: the same one, from its own journal, or another,
        checked as after a kill."""
        assert old.daemon is not None and self.net is not None
        in_step = in_step_at_death(old.daemon.log_path)
        for index in range(len(nodes)):
            self.net.cut(index, self.net.host)
        cut = time.monotonic()
        try:
            while time.monotonic() - cut < 2 * TTL:
                try:
                    workload.step()
                except (OSError, sqlite3.Error):
                    pass  # refused, fenced, or the primary stopped
        finally:
            for index in range(len(nodes)):
                self.net.join(index, self.net.host)
        workload.close()
        new = primary_of(nodes, timeout=TTL + 60)
        if new is not old:
            self.result.failover_seconds.append(time.monotonic() - cut)
            self.check_promoted(new, in_step, workload)
            return new
        # Leading again from its own journal: every commit acknowledged is there, and
        # maybe some whose fsync failed once it was fenced (written, not promised).
        have = sqlite_count(new.data)
        if have < workload.committed:
            raise Violation(f"{new.name} leads again from its own journal without "
                            f"{workload.committed - have} acknowledged SQLite commits")
        workload.committed, workload.unsure = have, False
        return new

    def check_promoted(self, new: Node, in_step: bool, workload: Workload) -> None:
        """The new primary's tree is the tree at the close of the set it was promoted
        at, its applications' files whole, and (with --fsync remote, the old primary
        in step when it died or was cut off) no acknowledged SQLite commit lost. The
        workload goes on there."""
        assert new.daemon is not None
        promoted = promoted_at(new.daemon.log_path)
        if promoted is None:  # it led before and leads again from its own journal, as
            self.result.own_journal += 1  # a primary restarted after a crash does
        elif tree_digest(new.data) not in self.hashes(promoted):
            raise Violation(f"{new.name}, promoted at set {promoted}, is not the tree at "
                            "that set's close")
        check_apps(new.data, workload, False, self.dir)
        have = sqlite_count(new.data)
        if self.result.fsync == "remote" and in_step:
            self.result.in_step_failovers += 1
            if have < workload.committed:
                raise Violation(f"--fsync remote: the failover lost {workload.committed - have} "
                                "SQLite commits acknowledged while a secondary was in step")
        self.result.lost_commits += max(workload.committed - have, 0)
        workload.committed, workload.unsure = have, False
        workload.root = new.mount
        workload.git_ready = (new.data / "repo" / ".git").is_dir()


def converges(primary: Node, node: Node, timeout: float = 60.0) -> bool:
    """Whether *node*'s replica becomes the primary's tree within *timeout*: compared
    once it applied a set closed then, until they are alike. (A rejoin's set of what
    diverged, which every replica applies, may still be on its way at the first
    look, and its applier at work during it.)"""
    deadline = time.monotonic() + timeout
    while True:
        try:
            set_id = checkpoint(primary.mount)
            wait_applied(node.data, set_id)
            if not diff(snapshot(primary.data), snapshot(node.data)):
                return True
        except OSError:
            pass  # a name the applier replaces as it is read, or a daemon restarting
        if time.monotonic() >= deadline:
            return False


_LEADS = re.compile(r"promoted to generation \d+ at set (\d+)|(leading again from its own "
                    r"journal)|(a new cluster: )")


def promoted_at(log: Path) -> int | None:
    """The set the node logging to *log* was promoted at, if the last time it took the
    lead was a promotion (not its own journal again, nor a new cluster)."""
    found = _LEADS.findall(log.read_text(errors="replace"))
    return int(found[-1][0]) if found and found[-1][0] else None


def run_cluster(seed: int, seconds: float, base: Path, keep: bool = False) -> ClusterResult:
    run = ClusterRun(seed, seconds, base)
    try:
        with Partition(len(NAMES)) as net, etcd_server(run.dir, net.host) as etcd:
            run.execute(etcd.urls[-1], net)  # type: ignore[attr-defined]
    except Violation as exc:
        run.result.error = str(exc)
    except Exception as exc:  # a harness or product failure: also a failed run
        run.result.error = f"{type(exc).__name__}: {exc}"
    if run.result.ok and not keep:
        shutil.rmtree(run.dir, ignore_errors=True)
    else:
        run.result.kept = run.dir
    return run.result
