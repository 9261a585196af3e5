"""One torture run: a seed decides the workload, the faults and when they strike."""

from __future__ import annotations

import errno
import random
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from repl.errors import UsageError
from repl.faults import ENV_BOOT_ID, ENV_KILL_AT_APPLY_STEP, ENV_SET_HASHES, ENV_SET_TREES
from repl.secondary.run import pause, resume, staging_dir_of
from repl.verify import differences, tree_digest
from store.hold import is_held
from store.journal import exists as journal_exists
from store.staging import read_applied, read_shows, read_syncing, whole_in_sync
from tests.faultproxy import DOWN, UP, FaultProxy
from tests.support import (
    PRIMARY,
    SECONDARY,
    Daemon,
    checkpoint,
    replfs,
    steady_port,
    tls_args,
    unmount,
    wait_applied,
)
from tests.torture.disk import PrimaryDisk
from tests.torture.power import KIND as POWER_CUT
from tests.torture.power import REPLICA_KIND as REPLICA_POWER_CUT
from tests.torture.power import PowerCuts, ReplicaPowerCuts, sqlite_count
from tests.torture.violation import Violation
from tests.torture.workload import Workload

KINDS = ("secondary_kill", "apply_step_kill", "primary_kill", "link_corrupt", "link_cut",
         "link_stall", "replica_enospc", "user_hold", "replica_new", "failover",
         "primary_enospc")
# Journal budgets a run may draw: None is the default (1G, never reached); the small
# ones send the primary into the dirty-map resync while samples are taken.
JOURNAL_BUDGETS = (None, None, "64K", "512K")


@dataclass
class Result:
    seed: int
    faults: Counter[str] = field(default_factory=Counter)
    sets: int = 0
    samples: int = 0
    busy: int = 0  # samples not taken: the replica was stuck in the middle of a set
    holds: int = 0  # user holds placed (pause ... resume), the standby read while held
    refused: int = 0  # pauses refused (no secondary to finish a torn set), no hold left
    journal_max: str | None = None  # a small journal budget, if the run drew one
    cached_lost: int = 0  # cached samples not taken: the secondary (serving it) had died
    pages_lost: int = 0  # dirty pages the power cuts dropped
    unchecked: int = 0  # power cuts after which the journal ended in an open set
    resent: int = 0  # power cuts after which the primary resent what its notes named
    replica_pages_lost: int = 0  # dirty pages the secondary's power cuts dropped
    replica_torn: int = 0  # secondary power cuts that caught a batch not yet durable
    lost_commits: int = 0  # SQLite commits a failover lost (acknowledged, never shipped)
    outdated: int = 0  # failovers that promoted a replica in a sync of paths (--outdated)
    in_step_failovers: int = 0  # failovers with --fsync remote/received, secondary in step
    ops: int = 0
    error: str | None = None
    kept: Path | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def in_step_at_death(log: Path) -> bool:
    """Whether the last primary process that wrote to *log* last said its fsyncs wait
    for the secondary: then every set closed before is staged there, and every
    fsync after waited for it."""
    lines = log.read_text(errors="replace").splitlines()
    starts = [at for at, line in enumerate(lines) if "replfs.primary: serving" in line]
    said = [line for line in lines[starts[-1] if starts else 0:]
            if "replfs.fsync: fsync remote: secondary" in line]
    return bool(said) and "fsyncs wait for it" in said[-1]


class Run:
    def __init__(self, seed: int, seconds: float, base: Path, power_cuts: bool = False) -> None:
        self.seed, self.seconds = seed, seconds
        self.rng = random.Random(seed)
        self.dir = Path(tempfile.mkdtemp(prefix=f"torture-{seed}-", dir=base))
        self.backing, self.mount = self.dir / "b", self.dir / "m"
        self.replica, self.hashes = self.dir / "r", self.dir / "set-hashes"
        # With power cuts, BACKING and its journal are on a simulated disk.
        self.power = PowerCuts(self.dir, self.hashes) if power_cuts else None
        if self.power is not None:
            self.backing = self.power.backing
        self.standby = self.dir / "s"  # replfs mount: uncached
        self.cached = self.dir / "c"  # the secondary's own standby mount: cached
        self.secondary: Daemon | None = None
        self.standby_daemon: Daemon | None = None
        self.staging = staging_dir_of(self.replica, None)
        self.result = Result(seed)
        self.last_sample = 0
        self.tmpfs = False
        self.journal_max = self.result.journal_max = self.rng.choice(JOURNAL_BUDGETS)
        # Half the runs keep the mounts' inode tables small: the kernel is asked to
        # forget files as the workload uses them (fs/prune.py).
        self.max_inodes = ["--max-inodes", "48"] if self.rng.random() < 0.5 else []
        # Half the runs make fsyncs wait for the secondary: a failover may then lose no
        # commit acknowledged while it was in step. From the seed, not the draws above.
        self.fsync = ("local", "local", "received", "remote")[seed % 4]
        self.hold: tuple[int, float] | None = None  # a user hold: its set, and until when
        self.swapped = False  # after a failover: the trees (and hosts) swapped roles
        self.faults = self.plan()
        # primary_enospc: BACKING and its journal on a tmpfs that the fault fills
        self.disk = PrimaryDisk(self.dir / "pdisk") if any(
            kind == "primary_enospc" for _, kind in self.faults) else None
        if self.disk is not None:
            self.backing = self.disk.path / "b"
        # With power cuts, the replica and its staging are on a simulated disk too, unless
        # the replica is a small tmpfs (replica_enospc).
        self.replica_power = ReplicaPowerCuts(self.dir) if any(
            kind == REPLICA_POWER_CUT for _, kind in self.faults) else None
        if self.replica_power is not None:
            self.replica, self.staging = self.replica_power.replica, self.replica_power.staging

    # --- daemons -------------------------------------------------------------------

    def host_env(self) -> dict[str, str]:
        """The secondary's host boots anew at each of its power cuts (the simulator
        says so); after a failover, that host is the old primary's."""
        power = self.power if self.swapped else self.replica_power
        return {ENV_BOOT_ID: str(power.sim.boot_id)} if power is not None else {}

    def start_secondary(self, kill_at_step: int | None = None) -> Daemon:
        env = {ENV_KILL_AT_APPLY_STEP: str(kill_at_step)} if kill_at_step else {}
        env |= self.host_env()
        # Over TLS, through the byte-level proxy: a corrupted byte fails a TLS record
        # (or the handshake), and the link is made anew, as after a bad checksum.
        # It serves the cached standby mount too; a killed one leaves it dead.
        unmount(self.cached)
        self.cached.mkdir(exist_ok=True)
        # After a failover the replica is the old primary's tree: it rejoins, until its
        # journal has gone aside with what it alone changed.
        rejoin = ["--rejoin"] if journal_exists(self.staging.parent / "journal") else []
        daemon = Daemon(["secondary", str(self.replica), "--listen", f"127.0.0.1:{self.port}",
                         "--mount", str(self.cached), *rejoin, *self.max_inodes,
                         *tls_args(SECONDARY, PRIMARY)],
                        self.dir / "secondary.log", "listening on", env=env)
        self.secondary = daemon
        try:
            return daemon.start()
        except AssertionError:
            if not kill_at_step or daemon.proc is None or daemon.proc.returncode != -9:
                raise
            # The fault fired in the redo it runs before it listens: start it again.
            return self.start_secondary()

    def start_primary(self) -> Daemon:
        self.mount.mkdir(exist_ok=True)
        budget = ["--journal-max", self.journal_max] if self.journal_max else []
        # With power cuts, the machine boots anew at each (the simulator says so), and
        # the primary records its tree at each close, for PowerCuts.boot to compare.
        boot = {ENV_BOOT_ID: str(self.power.sim.boot_id),
                ENV_SET_TREES: str(self.power.trees)} if self.power is not None else {}
        if self.swapped:  # the old secondary's host, which no power cut strikes any more
            power = self.replica_power
            boot = {ENV_BOOT_ID: str(power.sim.boot_id)} if power is not None else {}
        d = Daemon(["primary", str(self.backing), str(self.mount), "--secondary",
                    f"127.0.0.1:{self.proxy.port}", "--set-interval", "0.2",
                    "--stall-seconds", "1", "--scramble", str(self.seed), *budget,
                    "--fsync", self.fsync, "--fsync-timeout", "1",
                    *self.max_inodes,
                    *tls_args(PRIMARY, SECONDARY)],
                   self.dir / "primary.log", "serving",
                   env={ENV_SET_HASHES: str(self.hashes), **boot})
        return d.start()

    def start_standby(self) -> Daemon:
        self.standby.mkdir(exist_ok=True)
        self.standby_daemon = Daemon(["mount", str(self.replica), str(self.standby),
                                      *self.max_inodes],
                                     self.dir / "standby.log", "serving",
                                     env=self.host_env()).start()
        return self.standby_daemon

    # --- the checker ---------------------------------------------------------------

    def set_hashes(self) -> dict[int, set[str]]:
        """Each set id's digests at its close: more than one if a power cut made the
        primary close that id again."""
        out: dict[int, set[str]] = {}
        if self.hashes.exists():
            for line in self.hashes.read_text().splitlines():
                set_id, digest = line.split()
                out.setdefault(int(set_id), set()).add(digest)
        return out

    def try_pause(self, timeout: float) -> int | None:
        """``replfs pause``; None if refused, which must leave no hold behind."""
        try:
            return pause(self.replica, None, timeout=timeout)
        except UsageError as exc:  # a set cannot finish yet (a full replica, a torn
            if is_held(self.staging):  # set and no secondary): no whole set to see
                raise Violation(f"a refused pause left its hold behind: {exc}") from None
            return None

    def sample(self, workload: Workload) -> None:
        """Hold the replica at one set, and check it is the primary at that set's close,
        read directly and through both standby mounts (the cached one keeps what it
        read in the kernel's cache from one sample to the next)."""
        if self.hold is not None:
            self.check_held(workload)
            return
        held = self.try_pause(0.5)
        if held is None:
            self.result.busy += 1
            return
        try:
            self.check_set(held, workload)
        finally:
            resume(self.replica, None)

    def check_set(self, held: int, workload: Workload) -> None:
        if held == 0 or read_syncing(self.staging) is not None:
            return  # no consistent set yet: an initial sync is under way
        want = self.set_hashes().get(held)
        if want is None:
            raise Violation(f"replica shows set {held}, which the primary never closed")
        if tree_digest(self.replica) not in want:
            raise Violation(f"replica at set {held} differs from the primary at its close")
        if tree_digest(self.standby) not in want:
            what = list(differences(self.replica, self.standby))[:3]
            raise Violation(f"standby mount at set {held} differs from the primary at its "
                            f"close: {what}")
        cached = self.cached_digest()
        if cached is not None and cached not in want:
            what = list(differences(self.replica, self.cached))[:3]
            raise Violation(f"cached standby mount at set {held} differs from the primary "
                            f"at its close: {what}")
        if held < self.last_sample:
            raise Violation(f"replica went back from set {self.last_sample} to {held}")
        self.last_sample = held
        self.check_apps(self.replica, workload, final=False)
        self.result.samples += 1

    def cached_digest(self) -> str | None:
        """The cached standby's digest; None if its secondary died meanwhile (an
        apply-step kill may strike in the redo a hold lets run)."""
        try:
            return tree_digest(self.cached)
        except OSError:
            sec = self.secondary
            if sec is None or sec.proc is None or sec.proc.poll() is not None:
                self.result.cached_lost += 1
                return None
            raise

    # --- user holds ----------------------------------------------------------------

    def begin_hold(self, seconds: float, workload: Workload) -> None:
        """A user's ``replfs pause``: the replica and its standby stay at one set."""
        held = self.try_pause(2.0)
        if held is None:
            self.result.refused += 1
            return
        self.hold = (held, time.monotonic() + seconds)
        self.result.holds += 1
        self.check_held(workload)

    def check_held(self, workload: Workload) -> None:
        assert self.hold is not None
        held = self.hold[0]
        if (now := read_applied(self.staging)) != held:
            raise Violation(f"held at set {held}, the replica moved to {now}")
        self.check_set(held, workload)

    def end_hold(self, workload: Workload) -> None:
        if self.hold is not None:
            self.check_held(workload)
            self.hold = None
            resume(self.replica, None)

    def check_apps(self, tree: Path, workload: Workload, final: bool) -> None:
        check_apps(tree, workload, final, self.dir)

    # --- the run -------------------------------------------------------------------

    def plan(self) -> list[tuple[float, str]]:
        """When which faults strike, drawn from the seed; with power cuts, one of the
        primary's always, and one of the secondary's unless its replica is a tmpfs,
        and a failover (a power cut of the primary's host too) after all of them."""
        kinds = self.rng.sample(KINDS, self.rng.randint(1, 3))
        if "primary_enospc" in kinds and self.power is not None:
            kinds.remove("primary_enospc")  # BACKING is on the power-cut simulator's disk
        if ("replica_enospc" in kinds or "primary_enospc" in kinds) and "failover" in kinds:
            kinds.remove("failover")  # the hosts' disks are not alike: no roles to swap
        if "failover" in kinds and self.power is None and self.rng.random() < 0.4:
            kinds.append("failover")  # and back: the first primary leads again
        if self.power is not None:
            kinds.append(POWER_CUT)
            if "replica_enospc" not in kinds:
                kinds.append(REPLICA_POWER_CUT)
        plan = sorted((self.rng.uniform(0.15, 0.7) * self.seconds, k) for k in kinds)
        if self.power is not None and "failover" in kinds:
            # Last: it cuts the primary's power, and the disks change hosts after it.
            last = plan[-1][0]
            plan = [(at, k) for at, k in plan if k != "failover"] + [(last, "failover")]
        return plan

    def execute(self) -> Result:
        if self.power is not None:
            self.power.start()
        if self.replica_power is not None:
            self.replica_power.sim.start()
        if self.disk is not None:
            self.disk.__enter__()
        self.backing.mkdir()
        self.replica.mkdir()
        plan = list(self.faults)
        if any(kind == "replica_enospc" for _, kind in plan):
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                            str(self.replica)], check=True)
            self.tmpfs = True
        self.port = steady_port()  # the secondary restarts on it
        secondary = self.start_secondary()
        self.proxy = FaultProxy(self.port, self.seed).__enter__()
        primary = self.start_primary()
        wait_applied(self.replica, 1)  # before the initial sync, the standby has no set
        self.start_standby()
        # git syncs what it writes, and so fails where its writes did (power, a full disk)
        workload = Workload(self.mount, self.seed,
                            fsync_git=self.power is not None or self.disk is not None)
        started = time.monotonic()
        next_sample = started + 0.3
        try:
            while (now := time.monotonic()) - started < self.seconds:
                while plan and now - started >= plan[0][0]:
                    kind = plan.pop(0)[1]
                    if self.swapped and kind in (POWER_CUT, REPLICA_POWER_CUT):
                        continue  # the simulated disks changed hosts: no more power cuts
                    self.result.faults[kind] += 1
                    secondary, primary = self.strike(kind, secondary, primary, workload)
                    if kind in ("replica_new", REPLICA_POWER_CUT, "failover"):  # the wait for its
                        started += time.monotonic() - now  # replica is not the run's time:
                        now = time.monotonic()  # the rest still strike
                if secondary.proc is not None and secondary.proc.poll() is not None:
                    secondary = self.restart_secondary(workload)  # an apply-step kill fired
                if self.hold is not None and now >= self.hold[1]:
                    self.end_hold(workload)
                try:
                    workload.step()
                except OSError:
                    if primary.proc is not None and primary.proc.poll() is None:
                        raise
                if now >= next_sample:
                    self.sample(workload)
                    next_sample = time.monotonic() + 0.4
            self.end_hold(workload)
            if self.tmpfs:
                self.grow_replica()
            if self.disk is not None:
                self.disk.grow()
            if secondary.proc is not None and (secondary.proc.poll() is not None
                                               or ENV_KILL_AT_APPLY_STEP in secondary.env):
                secondary.stop()  # dead, or still armed to kill itself: no faults at the end
                secondary = self.start_secondary()
            workload.close()
            last = checkpoint(self.mount, wait=60)
            self.result.sets = last
            diffs = list(differences(self.backing, self.replica))
            if diffs:
                raise Violation(f"final replica differs: {diffs[:3]}")
            self.check_apps(self.replica, workload, final=True)
            self.sample(workload)
        finally:
            self.result.ops = workload.ops
            workload.close()
            for daemon in (primary, secondary, self.secondary, self.standby_daemon):
                if daemon is not None and daemon.proc is not None and daemon.proc.poll() is None:
                    daemon.stop()
            unmount(self.mount)
            unmount(self.standby)
            unmount(self.cached)
            self.proxy.__exit__(None, None, None)
            if self.power is not None:
                self.result.pages_lost = self.power.pages_lost
                self.result.unchecked = self.power.unchecked
                self.result.resent = self.power.resent
            if self.replica_power is not None:
                self.result.replica_pages_lost = self.replica_power.pages_lost
                self.result.replica_torn = self.replica_power.torn
            if self.tmpfs:
                subprocess.run(["umount", "-l", str(self.replica)], capture_output=True)
            if self.disk is not None:
                self.disk.__exit__()
        return self.result

    def strike(self, kind: str, secondary: Daemon, primary: Daemon,
               workload: Workload) -> tuple[Daemon, Daemon]:
        rng = self.rng
        if kind == "secondary_kill":
            secondary.kill()
            secondary = self.restart_secondary(workload)
        elif kind == "apply_step_kill":
            secondary.kill()
            secondary = self.start_secondary(kill_at_step=rng.randrange(1, 400))
        elif kind == "user_hold":
            if self.hold is None:
                self.begin_hold(rng.uniform(0.3, 1.5), workload)
        elif kind == "primary_kill":
            primary.kill()
            workload.close()
            unmount(self.mount)
            primary = self.start_primary()
        elif kind == POWER_CUT:
            assert self.power is not None
            self.power.power_off(primary, self.mount, rng)
            workload.close()  # its database was open: closed now, before the mount is back
            primary = self.power.boot(self.start_primary, self.mount, workload.committed)
        elif kind == REPLICA_POWER_CUT:
            secondary = self.replica_power_cut(secondary, workload)
        elif kind == "link_corrupt":
            self.proxy.corrupt((1, 200_000), rng.choice((UP, DOWN)))
        elif kind == "link_cut":
            self.proxy.cut((1, 200_000), rng.choice((UP, DOWN)))
        elif kind == "link_stall":
            self.proxy.stall((1, 200_000), rng.choice((UP, DOWN)))
        elif kind == "replica_enospc":
            pass  # the replica is a small tmpfs from the start; it grows at the end
        elif kind == "primary_enospc":
            assert self.disk is not None
            self.disk.fill(rng.uniform(0.5, 2.0))
            workload.full_disk = True
        elif kind == "replica_new":
            secondary = self.replace_replica(secondary, workload)
        elif kind == "failover":
            secondary, primary = self.fail_over(secondary, primary, workload)
        return secondary, primary

    def fail_over(self, secondary: Daemon, primary: Daemon,
                  workload: Workload) -> tuple[Daemon, Daemon]:
        """The primary's host dies (with power cuts, its power: its disk drops what was
        not synced); the secondary is promoted and serves the mount, and the old
        primary's tree, back, rejoins as its secondary, keeping aside what it alone
        changed. From then on the two trees (and hosts) have swapped roles."""
        self.end_hold(workload)
        outdated = False
        for _ in range(5):
            if read_syncing(self.staging) is not None:
                self.wait_synced()  # a replica with no consistent set cannot be promoted
            if self.power is not None:
                self.power.power_off(primary, self.mount, self.rng)
            else:
                primary.kill()
                unmount(self.mount)
            workload.close()
            if read_syncing(self.staging) is None:
                break
            # The primary had begun a sync (its resend after a power cut, say) as it
            # died. A sync of paths leaves the set before it whole: promoted there
            # (--outdated). Else the standby cannot take over (promote refuses it): the
            # primary's host comes back, the sync ends, and the primary dies again.
            if whole_in_sync(self.staging, read_shows(self.staging)) is not None:
                outdated = True
                self.result.outdated += 1
                break
            primary = self.power.boot(self.start_primary, self.mount, workload.committed) \
                if self.power is not None else self.start_primary()
        else:
            raise Violation("the replica was always in a sync when the primary died")
        if self.standby_daemon is not None:
            self.standby_daemon.stop()
        unmount(self.standby)
        promoted = replfs("promote", str(self.replica), *(["--outdated"] if outdated else []))
        if promoted.returncode != 0:
            raise Violation(f"promote refused: {promoted.stderr.strip()[-300:]}")
        unmount(self.cached)  # its secondary stopped for the promote
        shared = read_applied(self.staging)
        if tree_digest(self.replica) not in self.set_hashes().get(shared, set()):
            raise Violation(f"the promoted replica is not the primary at set {shared}")
        self.check_apps(self.replica, workload, final=False)
        # The new primary's sets follow the replica's last; the old one's past it are gone.
        lines = [line for line in self.hashes.read_text().splitlines()
                 if line.split()[0].isdigit() and int(line.split()[0]) <= shared]
        self.hashes.write_text("".join(f"{line}\n" for line in lines))
        have = sqlite_count(self.replica)
        if self.fsync != "local" and in_step_at_death(self.dir / "primary.log"):
            self.result.in_step_failovers += 1
            if have < workload.committed:
                raise Violation(f"--fsync {self.fsync}: the failover lost "
                                f"{workload.committed - have} SQLite commits acknowledged "
                                "while the secondary was in step")
        self.result.lost_commits += workload.committed - have
        workload.committed = have
        workload.git_ready = (self.replica / "repo" / ".git").is_dir()
        self.backing, self.replica = self.replica, self.backing
        self.staging = staging_dir_of(self.replica, None)
        self.swapped = not self.swapped
        if self.power is not None:
            self.power.sim.start()  # the old primary's host is back, its disk as it was left
        secondary = self.start_secondary()
        try:  # its tree was cut off mid-set: no standby view shows it
            tree_digest(self.cached)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
        else:
            raise Violation("the old primary's standby view shows its own tree before its "
                            "rejoin")
        primary = self.start_primary()
        self.wait_synced(past=shared)
        self.start_standby()
        return secondary, primary

    def replace_replica(self, secondary: Daemon, workload: Workload) -> Daemon:
        """A new standby host in the old one's place: the secondary and its standby
        mount stop, the replica and its staging are emptied, and the new secondary
        gets an initial sync of the tree the workload keeps changing."""
        self.end_hold(workload)
        secondary.kill()
        if self.tmpfs:
            self.grow_replica()  # the new host's disk is not the old one's, full
        if self.standby_daemon is not None:
            self.standby_daemon.stop()
        unmount(self.standby)
        for entry in self.replica.iterdir():  # the directory stays: it may be a tmpfs
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        shutil.rmtree(self.staging.parent)
        secondary = self.start_secondary()
        self.wait_synced()
        self.start_standby()  # refused while the replica has no consistent set
        return secondary

    def replica_power_cut(self, secondary: Daemon, workload: Workload) -> Daemon:
        """The secondary's host loses its power: the secondary and the standby mount
        die, the replica's disk drops what was not synced; it boots, the replica is
        checked, and both start again (the standby once the replica has a set)."""
        power = self.replica_power
        assert power is not None
        self.end_hold(workload)
        host = [d for d in (secondary, self.standby_daemon)
                if d is not None and d.proc is not None and d.proc.poll() is None]
        power.power_off(self.mount, self.rng, *host)
        unmount(self.standby)
        unmount(self.cached)
        power.boot(self.set_hashes())
        secondary = self.start_secondary()
        self.wait_synced()
        self.start_standby()
        return secondary

    def wait_synced(self, timeout: float = 60.0, past: int = 0) -> None:
        """Until the new secondary applied its initial sync's set (a rejoin's: a set
        after *past*, which its staging may show applied from before)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            syncing = read_syncing(self.staging)
            if syncing is not None:
                wait_applied(self.replica, syncing, deadline - time.monotonic())
            elif read_applied(self.staging) > past:
                return
            else:
                time.sleep(0.05)  # no primary yet: nothing to wait on but its arrival
        raise AssertionError(f"no initial sync applied within {timeout:g}s")

    def restart_secondary(self, workload: Workload) -> Daemon:
        """Start the secondary after a kill; half the time a user pauses right then,
        before it is up (refused if the kill tore a set) and right after."""
        hold = self.hold is None and self.rng.random() < 0.5
        if hold:
            self.begin_hold(0.2, workload)
            self.end_hold(workload)
        secondary = self.start_secondary()
        if hold:
            self.begin_hold(self.rng.uniform(0.3, 1.5), workload)
        return secondary

    def grow_replica(self) -> None:
        subprocess.run(["mount", "-o", "remount,size=1g", str(self.replica)], check=True)


def check_apps(tree: Path, workload: Workload, final: bool, scratch: Path) -> None:
    """SQLite in *tree* holds a prefix of the commits *workload* made (all of them if
    *final*); git fsck is clean. Copies go to a directory in *scratch*. After the
    primary's disk filled too: what the kernel had taken went into the journal's
    reserve, and the fsyncs failed from then on (store/reserve.py)."""
    copy = Path(tempfile.mkdtemp(dir=scratch))
    try:
        for name in ("app.db", "app.db-wal"):
            if (tree / name).exists():
                shutil.copy2(tree / name, copy / name)
        if (copy / "app.db").exists():
            db = sqlite3.connect(copy / "app.db")
            try:
                if db.execute("pragma integrity_check").fetchone()[0] != "ok":
                    raise Violation("SQLite on the replica fails integrity_check")
                have = db.execute("select count(*), coalesce(max(id), 0) from t").fetchone()
            except sqlite3.OperationalError:
                have = (0, 0)  # the table's creation is not in this set yet
            finally:
                db.close()
            if have[0] != have[1] or have[0] > workload.committed + workload.unsure:
                raise Violation(f"SQLite holds {have} of {workload.committed} commits")
            if final and have[0] < workload.committed:
                raise Violation(f"SQLite lost commits: {have[0]} of {workload.committed}")
        git = tree / "repo" / ".git"
        if all((git / part).exists() for part in ("HEAD", "objects", "refs")):
            shutil.copytree(tree / "repo", copy / "repo", symlinks=True)
            fsck = subprocess.run(["git", "-C", str(copy / "repo"), "fsck", "--full"],
                                  capture_output=True, text=True)
            if fsck.returncode != 0 and "HEAD" not in fsck.stderr:
                raise Violation(f"git fsck on the replica: {fsck.stderr.strip()[:300]}")
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def run_one(seed: int, seconds: float, base: Path, keep: bool = False,
            power_cuts: bool = False) -> Result:
    run = Run(seed, seconds, base, power_cuts)
    try:
        run.execute()
    except Violation as exc:
        run.result.error = str(exc)
    except Exception as exc:  # a harness or product failure: also a failed run
        run.result.error = f"{type(exc).__name__}: {exc}"
    finally:
        for power in (run.power, run.replica_power):
            if power is not None:  # after the daemons that used it stopped
                try:
                    power.close()
                except AssertionError as exc:  # the simulator did not stop cleanly
                    run.result.error = run.result.error or f"simulator: {exc}"
    problems = [problem for power in (run.power, run.replica_power) if power is not None
                for problem in power.problems]
    if problems:
        run.result.error = "\n  ".join([*problems, *filter(None, [run.result.error])])
    if run.result.ok and not keep:
        shutil.rmtree(run.dir, ignore_errors=True)
    else:
        run.result.kept = run.dir
    return run.result
