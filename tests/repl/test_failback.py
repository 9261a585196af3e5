"""Failback: the old primary rejoins as a secondary, receiving only what diverged."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from store.journal import exists as journal_exists
from tests.support import (
    PRIMARY,
    SECONDARY,
    checkpoint,
    diff,
    primary,
    replfs,
    secondary,
    snapshot,
    steady_port,
    tls_args,
    unmount,
)

TREE_MB = 96


def test_old_primary_rejoins_with_only_what_diverged(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"  # a: the first primary's tree; b: its replica
    ma, mb = tmp_path / "ma", tmp_path / "mb"
    a.mkdir()
    with secondary(b) as sec_b:
        port_b = sec_b.port
        # A small journal: alone, a passes its budget, and its writes go to the dirty map.
        with primary(a, ma, "--secondary", f"127.0.0.1:{port_b}",
                     "--journal-max", "1M") as pri_a:
            for i in range(TREE_MB):  # the shared tree
                (ma / f"big{i % 8}").parent.mkdir(exist_ok=True)
                with open(ma / f"big{i % 8}", "ab") as f:
                    f.write(os.urandom(1 << 20))
            (ma / "dir").mkdir()
            (ma / "sub").mkdir()
            (ma / "ln").symlink_to("dir/keep")
            (ma / "dir" / "keep").write_bytes(b"shared")
            (ma / "dir" / "old-name").write_bytes(b"renamed on a, never replicated")
            checkpoint(ma)
            sec_b.stop()
            # a goes on alone: these changes never reach b
            with open(ma / "only-on-a", "wb") as f:
                f.write(os.urandom(2 << 20))
                os.fsync(f.fileno())  # a's journal passes its budget: no more written bytes
            with open(ma / "big3", "r+b") as f:
                f.seek(5 << 20)
                f.write(b"A" * 4096)
            os.rename(ma / "dir" / "old-name", ma / "dir" / "new-name")
            (ma / "team").mkdir()  # a directory others may write to, and a file in it
            os.chmod(ma / "team", 0o2775)
            (ma / "team" / "notes").write_bytes(b"kept aside")
            fd = os.open(ma, os.O_RDONLY)
            os.fsync(fd)  # durable on a: it must survive the failover, aside
            os.close(fd)
            pri_a.kill()
            unmount(ma)

    assert replfs("promote", b).returncode == 0
    (tmp_path / "early").mkdir()
    early = replfs("mount", a, tmp_path / "early")  # a standby view of a's own tree: no
    assert early.returncode == 1 and "a primary's tree, not a replica" in early.stderr
    port_a = steady_port()  # not an ephemeral port, which a busy machine may hand out
    view = tmp_path / "view"  # a's standby view: a shows no set until its rejoin's applies
    with secondary(a, "--rejoin", "--mount", str(view), port=port_a) as sec_a:
        for _ in range(3):
            with pytest.raises(OSError) as refused:
                (view / "only-on-a").stat()  # a's own tree, cut off mid-set: not shown
            assert refused.value.errno == errno.EIO
        assert sec_a.log().count("cut off in the middle of a set") == 1, "logged once"
        with primary(b, mb, "--secondary", f"127.0.0.1:{port_a}") as pri_b:
            # b, now primary, changes things too
            (mb / "new-on-b").write_bytes(os.urandom(1 << 20))
            with open(mb / "big5", "r+b") as f:
                f.seek(1 << 20)
                f.write(b"B" * 8192)
            os.chmod(mb / "dir" / "keep", 0o4750)  # no data: sent all the same, set-id bit too
            os.chmod(mb / "sub", 0o700)  # nor for a directory or a symlink
            os.utime(mb / "sub", ns=(10**15, 10**15))
            os.chown(mb / "ln", 1, 1, follow_symlinks=False)
            os.utime(mb / "ln", ns=(10**15, 10**15), follow_symlinks=False)
            os.utime(mb / "big6", ns=(10**15, 10**15))
            checkpoint(mb)
            assert diff(snapshot(b), snapshot(a)) == [], "the old primary now equals the new one"
            status = json.loads(replfs("status", mb, "--json").stdout)
            sent = status["sent_bytes"]
            print(f"failback sent {sent} bytes for a {TREE_MB} MiB tree")
            assert sent < 8 << 20, f"sent {sent} bytes for a {TREE_MB} MiB tree"
            # a shows b's sets now, cached: read through its view
            assert (view / "new-on-b").stat().st_size == 1 << 20
            assert not (view / "only-on-a").exists()
    assert "kept" in sec_a.log() and "rejoin sync" in pri_b.log()

    branches = list((tmp_path / ".a.replfs" / "branches").iterdir())
    assert len(branches) == 1
    manifest = json.loads((branches[0] / "manifest.json").read_text())
    assert {"only-on-a", "big3", "dir/old-name", "dir/new-name"} <= set(manifest["paths"])
    assert (branches[0] / "tree" / "only-on-a").stat().st_size == 2 << 20
    assert (branches[0] / "tree" / "team" / "notes").read_bytes() == b"kept aside"
    assert stat.S_IMODE((branches[0] / "tree" / "team").stat().st_mode) == 0o2775
    assert not (branches[0] / "tree" / "dir" / "keep").exists(), \
        "a directory whose times alone changed is kept without what did not change in it"
    assert (branches[0] / "tree" / "dir" / "new-name").read_bytes() == \
        b"renamed on a, never replicated"
    assert journal_exists(branches[0] / "journal")


def test_old_primary_tree_refused_without_rejoin(tmp_path: Path) -> None:
    a, ma = tmp_path / "a", tmp_path / "ma"
    a.mkdir()
    with primary(a, ma):
        (ma / "f").write_bytes(b"x")
    result = replfs("secondary", a, "--listen", "127.0.0.1:0", *tls_args(SECONDARY, PRIMARY))
    assert result.returncode == 1
    assert "pass --rejoin" in result.stderr
    assert (a / "f").read_bytes() == b"x"


def test_old_primary_with_its_journal_elsewhere_rejoins(tmp_path: Path) -> None:
    """A primary run with --journal on another disk: after a failover its tree is still
    known for an old primary's, and rejoins with its own changes kept aside."""
    a, b = tmp_path / "a", tmp_path / "b"
    ma, mb, disk = tmp_path / "ma", tmp_path / "mb", tmp_path / "disk"
    a.mkdir()
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], check=True)
    try:
        with secondary(b) as sec_b:
            with primary(a, ma, "--secondary", f"127.0.0.1:{sec_b.port}",
                         "--journal", str(disk / "journal")) as pri_a:
                (ma / "shared").write_bytes(b"on both")
                checkpoint(ma)
                sec_b.stop()
                with open(ma / "only-on-a", "wb") as f:
                    f.write(b"a alone")
                    os.fsync(f.fileno())
                pri_a.kill()
                unmount(ma)
        assert replfs("promote", b).returncode == 0
        port_a = steady_port()
        with secondary(a, "--rejoin", port=port_a), primary(
                b, mb, "--secondary", f"127.0.0.1:{port_a}"):
            (mb / "new-on-b").write_bytes(b"b alone")
            checkpoint(mb)
            assert diff(snapshot(b), snapshot(a)) == [], "the old primary now equals the new one"
        branch, = (tmp_path / ".a.replfs" / "branches").iterdir()
        assert (branch / "tree" / "only-on-a").read_bytes() == b"a alone"
        assert journal_exists(branch / "journal")  # moved from the other disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
