"""What a sync's snapshot journals for each entry of the tree, in-process."""

from __future__ import annotations

import os
import threading
from contextlib import closing
from pathlib import Path

import trio
import trio.lowlevel

from repl.primary import recovery
from repl.primary.capture import Capture
from repl.primary.snapshot import SMALL_FILE
from repl.tree import Tree
from store.journal import Journal
from store.records import Op


def test_snapshot_tree_ok_small_files_whole(tmp_path: Path) -> None:
    """A small file is one FILE record with its bytes and times, and no UTIMES at the
    close; a file past SMALL_FILE and a sparse one are a CREATE and dirty ranges."""
    backing = tmp_path / "b"
    (backing / "d").mkdir(parents=True)
    (backing / "d" / "small").write_bytes(b"s" * 2048)
    os.setxattr(backing / "d" / "small", "user.tag", b"kept")
    os.utime(backing / "d" / "small", ns=(1_000_000_007, 2_000_000_009))
    (backing / "empty").write_bytes(b"")
    (backing / "large").write_bytes(b"L" * (SMALL_FILE + 1))
    with open(backing / "sparse", "wb") as f:
        f.truncate(16384)
        f.write(b"head")
    os.link(backing / "d" / "small", backing / "hard")
    with closing(Journal(tmp_path / "journal")) as journal, closing(Tree(backing)) as tree:
        capture = Capture(journal, tree, secondaries=["beta:7070"])
        set_id = capture.resync.start_full_sync()
        trio.run(capture.walk)
        records = [r for r in journal.records(set_id) if r.op not in (Op.CHMOD, Op.CHOWN)]
        xattrs = [(r.path, r.name, r.data) for r in records if r.op == Op.SETXATTR]
        assert xattrs == [(b"hard", b"user.tag", b"kept")]
        records = [r for r in records if r.op != Op.SETXATTR]
        ops = {r.path2 or r.path: r for r in records}
        assert {path: r.op for path, r in ops.items() if path} == {
            b"d": Op.MKDIR, b"hard": Op.FILE, b"d/small": Op.LINK, b"empty": Op.FILE,
            b"large": Op.CREATE, b"sparse": Op.CREATE}
        whole = ops[b"hard"]  # the first name of the two the walk meets
        assert (whole.data, whole.atime_ns, whole.mtime_ns) == (b"s" * 2048, 1_000_000_007,
                                                                2_000_000_009)
        assert capture.resync.progress_total == SMALL_FILE + 1 + 16384


def test_snapshot_tree_ok_the_close_restates_all_but_the_files_sent_whole(
        tmp_path: Path) -> None:
    """A set that sends the whole tree tracks only the regular files the application's
    ops touch: its close restates the times of those and of every entry that is not a
    regular file, as BACKING has them then, and leaves the small files sent whole with
    their times alone. A large file's times follow its data, in the step that sent
    the last of it: the sync remembers no path per file until its close. A file sent
    whole whose times change later gets a record of its own."""
    backing = tmp_path / "b"
    (backing / "d" / "sub").mkdir(parents=True)
    (backing / "d" / "small").write_bytes(b"s" * 2048)
    (backing / "large").write_bytes(b"L" * (SMALL_FILE + 1))
    os.symlink("d/small", backing / "link")
    with closing(Journal(tmp_path / "journal")) as journal, closing(Tree(backing)) as tree:
        capture = Capture(journal, tree, secondaries=["beta:7070"])
        set_id = capture.resync.start_full_sync()
        trio.run(capture.walk)
        assert capture.touched.everything and capture.touched.paths == set()
        capture.record(Op.RENAME, path=b"d", path2=b"e", flags=0)
        os.rename(backing / "d", backing / "e")
        capture.record(Op.CREATE, path=b"e/new", mode=0o100644, uid=0, gid=0)
        (backing / "e" / "new").write_bytes(b"")
        assert not capture.restates_times(b"e/small"), "sent whole: not tracked"
        capture.record(Op.UTIMES, path=b"e/small", atime_ns=5, mtime_ns=7)
        os.utime(backing / "e" / "small", ns=(5, 7))
        with capture.lock:
            while capture.resync.step() is None:
                pass
        assert not capture.touched.everything, "the set closed"
        utimes = [r for r in journal.records(set_id) if r.op == Op.UTIMES]
        assert (utimes[0].path, utimes[0].atime_ns, utimes[0].mtime_ns) == (b"e/small", 5, 7)
        restated = {r.path: r.mtime_ns for r in utimes[1:]}
    # Listing them here changes the directories' atimes: mtimes only.
    now = {b"": backing.lstat().st_mtime_ns} | {
        os.fsencode(p.relative_to(backing)): p.lstat().st_mtime_ns for p in backing.rglob("*")}
    assert set(now) == {b"", b"e", b"e/sub", b"e/small", b"e/new", b"large", b"link"}
    del now[b"e/small"]
    assert restated == now


def test_snapshot_tree_ok_a_linked_file_removed_before_its_data_keeps_its_times(
        tmp_path: Path) -> None:
    """A large file with two names, one of them removed before the sync's steps sent
    its data: the data goes into the set ahead of the unlink, and the file's times
    after it, so the name left shows them on the replica."""
    backing = tmp_path / "b"
    backing.mkdir()
    (backing / "a").write_bytes(b"L" * (SMALL_FILE + 1))
    os.link(backing / "a", backing / "z")
    os.utime(backing / "a", ns=(1_000_000_007, 2_000_000_009))
    with closing(Journal(tmp_path / "journal")) as journal, closing(Tree(backing)) as tree:
        capture = Capture(journal, tree, secondaries=["beta:7070"])
        set_id = capture.resync.start_full_sync()
        trio.run(capture.walk)
        capture.record(Op.UNLINK, path=b"a")
        os.unlink(backing / "a")
        with capture.lock:
            while capture.resync.step() is None:
                pass
        ops = [(r.op, r.path, r.mtime_ns if r.op == Op.UTIMES else None)
               for r in journal.records(set_id) if r.path == b"a" and r.op != Op.LINK]
    assert ops[:2] == [(Op.CREATE, b"a", None), (Op.WRITE, b"a", None)]
    assert ops[2:] == [(Op.UTIMES, b"a", 2_000_000_009), (Op.UNLINK, b"a", None)]


def test_bring_up_ok_a_sync_set_the_journal_lost_brings_the_whole_tree(
        tmp_path: Path) -> None:
    """A secondary waiting for sync set S, which the journal holds without its RESET
    (a power cut took the snapshot before it was durable, and recovery reused the id),
    gets the whole tree in a new sync; one waiting for a sync set the journal holds
    whole streams on from it."""
    backing = tmp_path / "b"
    backing.mkdir()
    (backing / "f").write_bytes(b"data")
    with closing(Journal(tmp_path / "journal")) as journal, closing(Tree(backing)) as tree:
        capture = Capture(journal, tree, secondaries=["beta:7070", "gamma:7070"])
        capture.resync.start_full_sync()
        trio.run(capture.walk)
        while capture.resync.step() is None:
            pass
        whole = journal.set - 1  # the sync set, closed, held for the secondaries
        assert capture.bring_up("gamma:7070", whole - 1, whole) is None, "streams on"
        capture.record(Op.CHMOD, path=b"f", mode=0o600)
        os.chmod(backing / "f", 0o600)
        capture.close_set()
        lost = journal.set  # the replica was told to wait for this set as a sync's
        capture.record(Op.CHMOD, path=b"f", mode=0o640)
        os.chmod(backing / "f", 0o640)
        started = capture.bring_up("beta:7070", lost - 1, lost)
        trio.run(capture.walk)
        assert started is not None and started >= lost, "a new sync, not streaming on"
        assert Op.RESET in [r.op for r in journal.records(started) if r.set == started]


def test_snapshot_tree_ok_recovery_in_a_whole_sync_tracks_no_path(tmp_path: Path) -> None:
    """A primary restarted in the middle of an initial sync does not track every path of
    the snapshot from its records again: the files came whole with their times, and the
    close restates every other entry anyway."""
    backing = tmp_path / "b"
    (backing / "d").mkdir(parents=True)
    for i in range(20):
        (backing / "d" / f"f{i}").write_bytes(b"x")
    with closing(Journal(tmp_path / "journal")) as journal, closing(Tree(backing)) as tree:
        capture = Capture(journal, tree, secondaries=["beta:7070"])
        capture.resync.start_full_sync()
        trio.run(capture.walk)
        journal.sync()
    with closing(Journal(tmp_path / "journal")) as journal, closing(Tree(backing)) as tree:
        capture = Capture(journal, tree, secondaries=["beta:7070"])
        recovery.recover(capture)
        assert capture.resync.syncing is not None
        assert capture.touched.everything
        assert capture.touched.paths == {b""}, "the root's mode and owner; no file"


async def test_snapshot_walk_ok_other_tasks_run_between_its_steps(tmp_path: Path) -> None:
    """The tree's walk for a sync journals step by step and lets trio's other tasks in
    between (the sender ships what was walked meanwhile), while the capture's lock
    keeps the request threads out until it is whole."""
    backing = tmp_path / "b"
    for d in range(4):
        (backing / f"d{d}").mkdir(parents=True)
        for i in range(600):
            (backing / f"d{d}" / f"f{i}").write_bytes(b"x")
    with closing(Journal(tmp_path / "journal")) as journal, closing(Tree(backing)) as tree:
        capture = Capture(journal, tree, secondaries=["beta:7070"])
        set_id = capture.resync.start_full_sync()
        seen: list[int] = []
        blocked = threading.Event()

        def request() -> None:  # a request thread: waits for the lock
            with capture.lock:
                blocked.set()

        async def watch() -> None:
            while capture.resync.syncing is None:
                seen.append(sum(1 for _ in journal.records(set_id)))
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            with capture.lock:
                nursery.start_soon(watch)
                thread = threading.Thread(target=request)
                thread.start()
                await capture.walk()
                assert not blocked.is_set(), "a request thread got in during the walk"
        thread.join()
        whole = sum(1 for _ in journal.records(set_id))
        partial = sorted(set(seen) - {0})
        assert len([n for n in partial if n < whole]) > 4, partial
        assert capture.resync.syncing == set_id and capture.resync.walk_begun is None


async def test_snapshot_walk_ok_cut_short_the_next_bring_up_walks_anew(
        tmp_path: Path) -> None:
    """A walk cut short (cancelled, or a crash: it is in the journal) leaves its set
    open, not a sync, and nothing may close it; the next secondary brought up, even
    one that says it applied the set before, gets the whole tree walked anew in the
    same set, after the first RESET."""
    backing = tmp_path / "b"
    (backing / "d").mkdir(parents=True)
    for i in range(2000):
        (backing / "d" / f"f{i}").write_bytes(b"x")
    with closing(Journal(tmp_path / "journal")) as journal, closing(Tree(backing)) as tree:
        capture = Capture(journal, tree, secondaries=["beta:7070"])
        journal.base = journal.set - 1  # it holds every set since the empty tree's
        set_id = capture.resync.start_full_sync()
        steps = 0

        async def cut() -> None:
            nonlocal steps
            while (steps := steps + 1) < 3:
                await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cut)
            await capture.walk()
        assert capture.resync.walk_begun == set_id and capture.resync.syncing is None
        capture.caught_up("beta:7070", set_id - 1)
        assert not capture.resync.ready(), "a walk cut short: no step may close its set"
        journal.sync()
    with closing(Journal(tmp_path / "journal")) as journal, closing(Tree(backing)) as tree:
        capture = Capture(journal, tree, secondaries=["beta:7070"])
        recovery.recover(capture)
        assert capture.resync.walk_begun == set_id, "known after a restart too"
        assert capture.bring_up("beta:7070", set_id - 1, set_id) == set_id
        # That session ends before it walks (its link lost): the next one walks.
        assert capture.bring_up("beta:7070", set_id - 1, set_id) == set_id
        await capture.walk()
        ops = [r.op for r in journal.records(set_id)]
        assert ops.count(Op.RESET) == 2 and ops[0] == Op.RESET
        assert ops.count(Op.FILE) > 2000, "part of the tree, then all of it"
        assert capture.resync.syncing == set_id and capture.resync.walk_begun is None
