"""``replfs demo``: a primary and a secondary on loopback, a real workload, a crash.

Everything lives in a temporary directory that is removed afterwards, also
on Ctrl-C, the cluster's CA included: the two daemons replicate over TLS,
each with a certificate of that CA (or, with ``--transport iscsi``, over
iSCSI with mutual CHAP: the secondary an iSCSI target, the primary its
initiator; with ``--transport fcip``, Fibre Channel over FCIP, the secondary
a fabric with an FCP target, authenticated with DH-CHAP). The demo starts
both daemons as separate processes, runs a SQLite application and a file
churner on the mount, shows replication progress and lag live, kills the
secondary with SIGKILL halfway, restarts it, and at the end checks that
the replica equals the primary byte for byte, metadata included.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from repl import control, tlsca
from repl.iscsi import chap
from repl.verify import differences

HERE = Path(__file__).resolve().parent
REPLFS = [sys.executable, str(HERE / "replfs.py")]
SECONDS = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A daemon whose stderr goes to a log file; started when its ready line appears.

    With *own_group*, it runs in a process group of its own, so a Ctrl-C reaches
    only the caller, which then stops it in order.
    """

    def __init__(self, name: str, args: list[str], log: Path, ready: str,
                 own_group: bool = False) -> None:
        self.name, self.args, self.log, self.ready = name, args, log, ready
        self.own_group = own_group
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        seen = threading.Event()
        self.proc = proc = subprocess.Popen(
            [*REPLFS, *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            process_group=0 if self.own_group else None)

        def pump() -> None:
            assert proc.stderr is not None
            with open(self.log, "ab") as out:
                for line in proc.stderr:
                    out.write(line)
                    out.flush()
                    if self.ready.encode() in line:
                        seen.set()
            seen.set()

        threading.Thread(target=pump, daemon=True).start()
        if not seen.wait(30) or proc.poll() is not None:
            raise RuntimeError(f"{self.name} did not start; see {self.log}:\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def signal(self, signum: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signum)
            self.proc.wait(30)


def links(tmp: Path) -> tuple[list[str], list[str]]:
    """A cluster CA in *tmp*/tls with certificates for the nodes alpha (the primary) and
    beta (the secondary); returns the primary's and the secondary's TLS options."""
    ca = tmp / "tls"
    tlsca.init_ca(ca)
    for name in ("alpha", "beta"):
        tlsca.issue(ca, name)
    return (["--tls", str(ca / "alpha"), "--peer", "beta"],
            ["--tls", str(ca / "beta"), "--peer", "alpha"])


def workload(mount: Path, stop: threading.Event, counts: dict[str, int]) -> None:
    """A small shop: orders committed to SQLite, invoices written, renamed, archived."""
    db = sqlite3.connect(mount / "shop.db")
    db.execute("pragma journal_mode=wal")
    db.execute("create table orders(id integer primary key, item text, qty int)")
    db.commit()
    (mount / "invoices").mkdir()
    (mount / "archive").mkdir()
    i = 0
    while not stop.is_set():
        db.execute("insert into orders(item, qty) values (?, ?)", (f"item-{i % 97}", i % 7))
        db.commit()
        counts["commits"] += 1
        draft = mount / "invoices" / f".draft-{i}"
        body = os.urandom(2048 + (i * 517) % 60000)
        draft.write_bytes(body)
        os.chmod(draft, 0o640)
        os.setxattr(draft, "user.order", str(i).encode())
        os.replace(draft, mount / "invoices" / f"invoice-{i:05}.bin")
        counts["bytes"] += len(body)
        if i % 10 == 9:
            old = mount / "invoices" / f"invoice-{i - 9:05}.bin"
            os.link(old, mount / "archive" / old.name)
            os.unlink(old)
        i += 1
    db.close()


def status(target: Path) -> dict[str, object]:
    try:
        return control.request(control.socket_path(target), "status", timeout=5)
    except OSError:
        return {}


def show_logs(*procs: Proc) -> None:
    for proc in procs:
        if proc.log.exists():
            print(f"--- last lines of the {proc.name} log ---\n{proc.tail()}", file=sys.stderr)


IQN = "iqn.2025-01.io.replfs:demo"
STREAMS = {"frames": "TLS streams", "iscsi": "iSCSI sessions", "fcip": "FCIP connections"}


def run(transport: str = "frames") -> int:
    tmp = Path(tempfile.mkdtemp(prefix="replfs-demo-"))
    backing, mount, replica = tmp / "primary-data", tmp / "mnt", tmp / "replica"
    backing.mkdir()
    mount.mkdir()
    port = free_port()
    if transport in ("iscsi", "fcip"):
        chap.make(tmp / "chap.secret", "alpha", "beta")
        keys = ["--chap", str(tmp / "chap.secret")]
    if transport == "iscsi":
        listen = ["--iscsi", f"127.0.0.1:{port}", "--iqn", IQN, *keys]
        to = [f"iscsi://127.0.0.1:{port}/{IQN}", *keys]
        how = f"iSCSI target {IQN} (mutual CHAP: beta, accepting alpha)"
    elif transport == "fcip":
        listen = ["--fcip", f"127.0.0.1:{port}", *keys]
        to = [f"fcip://127.0.0.1:{port}", *keys]
        how = "FCP target over FCIP (DH-CHAP both ways: beta, accepting alpha)"
    else:
        primary_tls, secondary_tls = links(tmp)
        listen = ["--listen", f"127.0.0.1:{port}", *secondary_tls]
        to = [f"127.0.0.1:{port}", *primary_tls]
        how = "TLS as beta, accepting alpha"
    sec = Proc("secondary", ["secondary", str(replica), *listen], tmp / "secondary.log",
               "listening on")
    pri = Proc("primary", ["primary", str(backing), str(mount), "--set-interval", "0.2",
                           "--secondary", *to], tmp / "primary.log", "serving")
    stop = threading.Event()
    counts = {"commits": 0, "bytes": 0}
    lags: list[float] = []
    started = time.monotonic()
    try:
        print(f"replfs demo in {tmp}")
        sec.start()
        if transport in ("iscsi", "fcip"):
            print(f"  CHAP secrets {tmp / 'chap.secret'}: alpha (initiator), beta (target)")
        else:
            print(f"  cluster CA {tmp / 'tls'}: certificates for alpha (primary), beta "
                  "(secondary)")
        print(f"  secondary  listening on 127.0.0.1:{port} ({how}), "
              f"replica {replica}")
        pri.start()
        print(f"  primary    {backing} mounted at {mount}, replicating over 4 "
              f"{STREAMS[transport]}")
        worker = threading.Thread(target=workload, args=(mount, stop, counts), daemon=True)
        worker.start()
        killed = restarted = False
        while (elapsed := time.monotonic() - started) < SECONDS:
            if not killed and elapsed > SECONDS * 0.4:
                sec.signal(signal.SIGKILL)
                killed = True
                print(f"\n  !! killed the secondary with SIGKILL at {elapsed:.1f}s "
                      "(the application keeps writing)")
            elif killed and not restarted and elapsed > SECONDS * 0.55:
                sec.start()
                restarted = True
                print(f"  !! restarted the secondary at {elapsed:.1f}s; it catches up")
            st = status(mount)
            if st:
                lag = float(st.get("lag_seconds", 0))  # type: ignore[arg-type]
                if st.get("connected"):
                    lags.append(lag)
                line = (f"  {elapsed:5.1f}s  closed {st['last_closed_set']:>5}  applied "
                        f"{st['last_applied']:>5}  lag {st['lag_sets']:>4} sets {lag:6.3f}s  "
                        f"commits {counts['commits']:>5}  "
                        f"{'streaming' if st.get('connected') else 'secondary down'}")
                print(line, end="\r" if sys.stdout.isatty() else "\n", flush=True)
            time.sleep(0.5)  # the refresh rate of the progress line
        stop.set()
        worker.join(30)
        print()
        result = subprocess.run([*REPLFS, "checkpoint", str(mount), "--wait", "60"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            print(f"replfs demo: final checkpoint failed: {result.stderr.strip()}",
                  file=sys.stderr)
            return 1
        final = int(result.stdout)
        diffs = list(differences(backing, replica))
        db = sqlite3.connect(f"file:{replica / 'shop.db'}?mode=ro", uri=True)
        integrity = db.execute("pragma integrity_check").fetchone()[0]
        rows = db.execute("select count(*) from orders").fetchone()[0]
        db.close()
        took = time.monotonic() - started
        print(f"  replica at set {final}: {'identical to the primary' if not diffs else 'DIFFERS'}"
              f" (content, modes, owners, links, xattrs, mtimes)")
        for line in diffs[:20]:
            print(f"    {line}")
        print(f"  SQLite on the replica: integrity_check {integrity}, {rows} orders "
              f"of {counts['commits']} committed")
        if lags:
            p99 = sorted(lags)[int(len(lags) * 0.99)]
            print(f"  lag while connected: median {statistics.median(lags) * 1000:.0f} ms, "
                  f"p99 {p99 * 1000:.0f} ms")
        print(f"  {counts['commits']} transactions, {counts['bytes'] / 1e6:.1f} MB of files, "
              f"{final} data sets, one secondary crash, {took:.1f}s")
        ok = not diffs and integrity == "ok" and rows == counts["commits"]
        print("  result: OK" if ok else "  result: FAILED")
        if not ok:
            show_logs(pri, sec)
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\nreplfs demo: interrupted; cleaning up", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, sqlite3.Error) as exc:
        print(f"\nreplfs demo: failed: {exc}", file=sys.stderr)
        show_logs(pri, sec)
        return 1
    finally:
        stop.set()
        pri.signal(signal.SIGTERM)
        sec.signal(signal.SIGTERM)
        # Unconditionally: a dead FUSE mount fails the stat that ismount() needs.
        subprocess.run(["fusermount3", "-u", "-z", str(mount)], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
