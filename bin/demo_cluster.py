"""``replfs demo --cluster``: three nodes and an etcd on loopback, the primary killed.

Everything lives in a temporary directory that is removed afterwards, also on
Ctrl-C: an etcd of its own, a CA with a certificate per node, and three
``replfs node`` processes (alpha, beta, gamma), each with its own data
directory and mount. A writer appends numbered files through whichever mount
is the primary, fsyncs each, and checkpoints every second: the files a
primary wrote before a checkpoint its secondaries applied are *replicated*.
Part way, the primary's node is killed with SIGKILL; the others elect a new
primary, the writer goes on there, the killed node comes back as a standby,
and at the end every replicated file must be on the new primary byte for
byte, and all three trees must be equal once every node applied the last
set. Files whose fsync returned on the killed primary after its last
checkpoint may be lost: replication is asynchronous, and the demo counts them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trio
from demo import REPLFS, Proc, free_port, status

from repl import tlsca
from repl.cluster import members
from repl.verify import differences

NAMES = ("alpha", "beta", "gamma")
TTL = 3.0
KILL_AT, BACK_AT, SECONDS = 12.0, 30.0, 45.0


class Writer:
    """Numbered files written through the primary's mount, each fsynced."""

    def __init__(self, mounts: dict[str, Path]) -> None:
        self.mounts = mounts
        self.digests: dict[int, bytes] = {}  # each file whose fsync returned: what it holds
        self.unconfirmed: list[int] = []  # written on this primary since its last checkpoint
        self.replicated: set[int] = set()  # written before a checkpoint of the same primary
        self.at_risk: list[int] = []  # unconfirmed when their primary went away
        self.errors = 0  # writes refused (no primary, a fenced or dead one)
        self.primary: str | None = None
        self.failure: BaseException | None = None
        self.stop = threading.Event()

    @property
    def written(self) -> int:
        """Files whose fsync returned."""
        return len(self.digests)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # the demo fails with it, instead of a silent thread
            self.failure = exc

    def _run(self) -> None:
        last_checkpoint = time.monotonic()
        while not self.stop.is_set():
            name = self.primary or primary(self.mounts)
            if name is None:
                self.errors += 1
                time.sleep(0.1)  # no primary: the election is under way
                continue
            if name != self.primary:
                self.at_risk += self.unconfirmed  # the last primary's, never checkpointed
                self.unconfirmed = []
                self.primary = name
            number = len(self.digests) + 1
            data = os.urandom(1000 + number % 3000)
            try:
                with open(self.mounts[name] / f"w-{number:06}", "wb") as f:
                    f.write(data)
                    os.fsync(f.fileno())
            except OSError as exc:
                if exc.errno not in (errno.EROFS, errno.ENOTCONN, errno.EIO,
                                     errno.ECONNABORTED):
                    raise
                self.errors += 1
                self.primary = None
                time.sleep(0.05)  # the mount is going away: look for the new primary
                continue
            self.digests[number] = hashlib.blake2b(data).digest()
            self.unconfirmed.append(number)
            if time.monotonic() - last_checkpoint > 1.0:
                before = list(self.unconfirmed)
                result = subprocess.run([*REPLFS, "checkpoint", str(self.mounts[name]),
                                         "--wait", "10"], capture_output=True)
                if result.returncode == 0:
                    self.replicated.update(before)
                    self.unconfirmed = self.unconfirmed[len(before):]
                last_checkpoint = time.monotonic()


def primary(mounts: dict[str, Path]) -> str | None:
    """The node whose mount serves read-write now."""
    for name, mount in mounts.items():
        st = status(mount)
        if st.get("role") == "primary" and not st.get("fenced"):
            return name
    return None


def cluster(url: str) -> dict[str, Any]:
    try:
        return trio.run(members.show, [url], "demo")
    except Exception:  # the demo's display only: etcd busy for a moment
        return {}


def line(elapsed: float, view: dict[str, Any], writer: Writer) -> str:
    leader = view.get("primary") or {}
    parts = [f"{elapsed:5.1f}s", f"primary {leader.get('node', '-'):<6}",
             f"gen {view.get('generation', '-')}"]
    for m in view.get("members", []):
        parts.append(f"{m['name']}:{m['role'][:4]} {m['applied']}")
    parts.append(f"written {writer.written} replicated {len(writer.replicated)}")
    return "  " + "  ".join(parts)


def run() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="replfs-cluster-demo-"))
    ca = tmp / "tls"
    tlsca.init_ca(ca)
    for name in NAMES:
        tlsca.issue(ca, name)
    client, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{client}"
    with open(tmp / "etcd.log", "wb") as log:
        etcd = subprocess.Popen(
            ["etcd", "--data-dir", str(tmp / "etcd"), "--listen-client-urls", url,
             "--advertise-client-urls", url, "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
            stdout=subprocess.DEVNULL, stderr=log)
    mounts = {name: tmp / name / "mnt" for name in NAMES}
    nodes: dict[str, Proc] = {}
    for name in NAMES:
        (tmp / name / "data").mkdir(parents=True)
        mounts[name].mkdir()
        nodes[name] = Proc(name, ["node", "--name", name, str(tmp / name / "data"),
                                  str(mounts[name]), "--listen", f"127.0.0.1:{free_port()}",
                                  "--etcd", url, "--cluster", "demo", "--tls",
                                  str(ca / name), "--lease-ttl", str(TTL),
                                  "--set-interval", "0.2"],
                           tmp / f"{name}.log", f"node {name} of cluster", own_group=True)
    writer = Writer(mounts)
    started = time.monotonic()
    killed: str | None = None
    failover = 0.0
    result = 1
    try:
        print(f"replfs demo --cluster in {tmp}")
        print(f"  etcd at {url}; nodes alpha, beta, gamma with a lease of {TTL:g}s, over TLS")
        for proc in nodes.values():
            proc.start()
        while primary(mounts) is None:
            if time.monotonic() - started > 60:
                raise RuntimeError("no primary after 60s")
            time.sleep(0.1)  # the first election
        print(f"  {primary(mounts)} was elected; the others serve the standby view")
        thread = threading.Thread(target=writer.run, daemon=True)
        thread.start()
        while (elapsed := time.monotonic() - started) < SECONDS:
            if killed is None and elapsed > KILL_AT and writer.primary is not None:
                killed = writer.primary
                nodes[killed].signal(signal.SIGKILL)  # its mount stays, dead, until it is back
                kill_time = time.monotonic()
                print(f"\n  !! killed {killed} (the primary) with SIGKILL at {elapsed:.1f}s; "
                      "the writer waits for a new one")
            if killed and not failover and writer.primary not in (None, killed):
                failover = time.monotonic() - kill_time
                print(f"\n  !! {writer.primary} was elected and serves writes "
                      f"{failover:.1f}s after the kill")
            for name, proc in nodes.items():
                code = proc.proc.poll() if proc.proc is not None else None
                if code is None or (name == killed and code == -signal.SIGKILL):
                    continue
                print(f"\n  !! the node {name} exited ({code}), which it should never do; "
                      f"its log ends:\n{proc.tail(5)}")
                raise RuntimeError(f"the node {name} exited")
            if killed and elapsed > BACK_AT and nodes[killed].proc is not None \
                    and nodes[killed].proc.poll() == -signal.SIGKILL:  # type: ignore[union-attr]
                nodes[killed].start()
                print(f"\n  !! restarted {killed}: it rejoins as a standby")
            print(line(elapsed, cluster(url), writer),
                  end="\r" if sys.stdout.isatty() else "\n", flush=True)
            time.sleep(0.5)  # the refresh rate of the status line
        writer.stop.set()
        thread.join(30)
        print()
        result = check(tmp, url, mounts, writer, killed, failover, time.monotonic() - started)
        return result
    except KeyboardInterrupt:
        print("\nreplfs demo: interrupted; cleaning up", file=sys.stderr)
        return 130
    except (OSError, RuntimeError) as exc:
        print(f"\nreplfs demo: failed: {exc}", file=sys.stderr)
        for proc in nodes.values():
            print(f"--- last lines of {proc.name}'s log ---\n{proc.tail()}", file=sys.stderr)
        return 1
    finally:
        writer.stop.set()
        for proc in nodes.values():
            proc.signal(signal.SIGTERM)
        etcd.kill()
        etcd.wait()
        for mount in mounts.values():
            subprocess.run(["fusermount3", "-u", "-z", str(mount)], capture_output=True)
        for path in tmp.iterdir():
            if result != 0 and path.name.endswith(".log"):
                continue  # a failure keeps the logs
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()
        if result == 0:
            tmp.rmdir()
        else:
            print(f"  the logs of etcd and of each node are kept in {tmp}")


def check(tmp: Path, url: str, mounts: dict[str, Path], writer: Writer,
          killed: str | None, failover: float, took: float) -> int:
    """Every replicated file on the primary byte for byte, and the three trees equal once
    every node applied the primary's last set."""
    name = primary(mounts)
    if writer.failure is not None:
        print(f"  result: FAILED (the writer stopped: {writer.failure!r})")
        return 1
    if name is None or killed is None:
        print("  result: FAILED (no primary at the end, or no failover)")
        return 1
    result = subprocess.run([*REPLFS, "checkpoint", str(mounts[name]), "--wait", "60"],
                            capture_output=True, text=True)
    final = int(result.stdout) if result.returncode == 0 else -1
    behind = wait_applied(url, final, 60.0)
    if behind:
        print(f"  not every node applied set {final} within 60s: {behind}")
    missing = [i for i in sorted(writer.replicated)
               if not same(mounts[name] / f"w-{i:06}", writer.digests[i])]
    lost = [i for i in writer.at_risk if not same(mounts[name] / f"w-{i:06}", writer.digests[i])]
    unequal = []
    for other in NAMES:
        if other != name:
            diffs = list(differences(tmp / name / "data", tmp / other / "data"))
            if diffs:
                unequal.append(f"{other}: {diffs[:3]}")
    print(f"  primary {name} at set {final}; {writer.written} files written (fsync returned), "
          f"{len(writer.replicated)} of them before a checkpoint of the primary that wrote "
          "them")
    print(f"  every replicated file kept: {'yes' if not missing else f'NO, {missing[:5]}'}; "
          f"written on {killed} after its last checkpoint: {len(writer.at_risk)}, lost with "
          f"it (replication is asynchronous): {len(lost)}")
    print(f"  the three trees: {'identical' if not unequal else 'DIFFER ' + '; '.join(unequal)}")
    print(f"  failover: {failover:.1f}s from the kill to a write on the new primary "
          f"(lease {TTL:g}s); {writer.errors} writes refused meanwhile; {took:.0f}s in all")
    ok = final > 0 and not behind and not missing and not unequal
    print("  result: OK" if ok else "  result: FAILED")
    return 0 if ok else 1


def same(path: Path, digest: bytes) -> bool:
    try:
        return hashlib.blake2b(path.read_bytes()).digest() == digest
    except FileNotFoundError:
        return False


def wait_applied(url: str, final: int, seconds: float) -> str:
    """Wait until every node says (in etcd) it applied *final*; what lags, if one does."""
    deadline = time.monotonic() + seconds
    while True:
        view = cluster(url)
        behind = [f"{m['name']} at {m['applied']}" for m in view.get("members", [])
                  if m["applied"] < final]
        if (view.get("members") and not behind) or time.monotonic() > deadline:
            return ", ".join(behind) if view.get("members") else "etcd did not answer"
        time.sleep(0.2)  # nodes publish what they hold once a second
