"""Bringing a replica up to date from the backing directory, not from the journal.

Three cases end here. Over budget (repl/capture.py), the open set holds the
namespace ops and the dirty map holds the written ranges. After an unclean
stop, what the activity log noted (repl/activity.py) is sent again as the
backing directory holds it (``resend``): the same open set and dirty map. For an initial
sync (a replica that the journal cannot bring forward: new, older than what
the journal keeps, or of a tree that was never empty), the open set gets a
RESET record and then one record per entry of the backing tree: directories,
files, hard links, symlinks, nodes, owners, modes and xattrs, written in one
synchronous step so that the namespace is a snapshot; every file's whole
content goes into the dirty map. From there both cases are the same.

The data is read in steps of at most STEP bytes: each step journals WRITE
records for a piece of a dirty range and marks it clean, and the
application runs between steps; what it writes meanwhile becomes dirty
again. The step that finds the map empty closes the set, so the replica
goes from one whole set to the next. Everything lives in the journal and
the dirty map, so an interrupted sync resumes where it was.

Holes. The holes in a piece (as SEEK_DATA/SEEK_HOLE show them) are
journaled as FALLOCATE punching them, not as zeros written, so sparse files
stay sparse on the replica. A punch keeps the size, so a hole that ends the
file also takes a TRUNCATE to the size: it only ever grows the replica's
file, whose size never passes the primary's (every op that shrinks a file
is journaled, over budget too; only writes, which grow it, are not).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio
import trio.lowlevel

from repl.diverge import Divergence
from repl.errors import NotYet
from store.libc import fd_path
from store.records import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, Note, NoteKind, Op, is_under

if TYPE_CHECKING:
    from repl.capture import Capture

log = logging.getLogger("replfs.resync")

STEP = 4 << 20  # read per step: small enough that the application barely waits
PROGRESS_EVERY = 2.0
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def bring_up(capture: Capture, address: str, applied: int, syncing: int | None,
             rejoin: Divergence | None) -> int | None:
    """Where the secondary at *address*, which applied *applied*, starts (capture's
    lock held): None to stream from the next set, or the set of a sync just begun,
    which it must reset to.

    A secondary whose sets the journal still holds streams on; one in the middle
    of a sync (*syncing*) reports the set before it as applied, and is brought on
    the same way. Else it needs a sync: an old primary rejoining (*rejoin*: what it
    changed since *applied*, the set we last shared) and a secondary dropped past
    the budget (repl/retention.py) get just the paths that differ, as one set;
    others get the whole tree.

    Raises:
        NotYet: another secondary's sync of part of the tree is under way: this one
            waits for it to finish (a sync must start a set of its own).
    """
    journal = capture.journal
    base = journal.base
    follows = base is not None and base <= applied < journal.set
    if rejoin is None and follows:
        capture.retention.attach(address, applied)
        return None
    if rejoin is not None:
        only = (rejoin.update(Divergence().add(journal.records(applied + 1))) if follows
                else None)
    else:
        only = capture.retention.missed_since(address, applied)
    if capture.syncing is not None:
        if not capture.sync_whole:
            raise NotYet(f"the sync of set {capture.syncing} is under way; {address} is "
                         "brought up once it is done")
        # The whole tree is on its way in the open set: join it from its start.
        capture.retention.attach(address, capture.syncing - 1)
        log.info("%s joins the initial sync of set %d", address, capture.syncing)
        return capture.syncing
    if capture.overflow:
        only = None  # the open set's records so far are no one's to skip: all of it
    else:
        capture.close_set()  # a sync starts a set of its own
    if only is not None:
        only.follow_links(os.fsdecode(fd_path(capture.backing.root_fd)))
    set_id = capture.start_full_sync(only, "rejoin sync of what diverged" if rejoin else
                                     f"sync of what {address} missed")
    capture.retention.attach(address, set_id - 1)
    return set_id


def snapshot_tree(capture: Capture) -> tuple[int, int]:
    """Journal RESET and every entry of the backing tree. Returns (entries, data bytes)."""
    journal = capture.journal
    capture.dirty.clear()
    journal.append(Op.RESET)
    root = capture.backing.root_fd
    st = os.fstat(root)
    journal.append(Op.CHMOD, path=b"", mode=stat.S_IMODE(st.st_mode))
    journal.append(Op.CHOWN, path=b"", uid=st.st_uid, gid=st.st_gid)
    _xattrs(capture, root, None, b"")
    capture.touched.paths.add(b"")
    counts = [0, 0]
    _walk(capture, root, b"", {}, counts)
    return counts[0], counts[1]


def snapshot_paths(capture: Capture, div: Divergence) -> tuple[int, int]:
    """Journal what makes a rejoining node's copy of *div*'s paths equal to ours.

    Returns (entries, data bytes); the data itself goes to the dirty map.
    """
    roots = div.roots()
    if b"" in roots:
        return snapshot_tree(capture)
    capture.dirty.clear()
    journal = capture.journal
    first_name: dict[int, bytes] = {}
    counts = [0, 0]
    # The set is never empty, even when nothing differs (an old primary whose every
    # change had reached the new one): the replica waits for it to close.
    top = os.fstat(capture.backing.root_fd)
    journal.append(Op.UTIMES, path=b"", atime_ns=top.st_atime_ns, mtime_ns=top.st_mtime_ns)
    for path in roots:
        journal.append(Op.PRUNE, path=path)
        capture.touched.paths.update((path, path.rpartition(b"/")[0]))
        fd, name = capture.backing.parent(path) if capture.backing.lstat(path) else (-1, b"")
        if fd >= 0:
            _entry(capture, fd, name, path, first_name, counts)
    for path, spans in sorted(div.only_ranges().items()):
        st = capture.backing.lstat(path)
        if st is None or not stat.S_ISREG(st.st_mode):
            continue  # gone on this side too: nothing of it to send
        journal.append(Op.CHMOD, path=path, mode=stat.S_IMODE(st.st_mode))
        journal.append(Op.CHOWN, path=path, uid=st.st_uid, gid=st.st_gid)
        journal.append(Op.TRUNCATE, path=path, size=st.st_size)
        for start, end in spans:
            end = min(end, st.st_size)
            if end > start:
                capture.dirty.add(path, start, end)
                counts[1] += end - start
        capture.touched.paths.add(path)
        counts[0] += 1
    return counts[0], counts[1]


def resend(capture: Capture, notes: list[Note]) -> tuple[int, int, list[bytes]]:
    """Journal, in the open set, what makes a replica's copy of the noted paths what
    the backing directory holds now; their data goes to the dirty map.

    A NAME note's path (and every other name of a file with several, found by one
    walk of the tree) is removed on the replica and sent again whole: PRUNE, then
    its entry and subtree. The other notes are sent in place, where no NAME
    path covers them: a file's size and noted ranges (DATA), a node's mode and
    owner (ATTR), one extended attribute (XATTR). Every path goes into the set's
    UTIMES.

    Returns (entries, data bytes, the paths sent whole).
    """
    journal, backing = capture.journal, capture.backing
    div = Divergence({n.path for n in notes if n.kind == NoteKind.NAME})
    roots = div.follow_links(os.fsdecode(fd_path(backing.root_fd))).roots()
    first_name: dict[int, bytes] = {}
    counts = [0, 0]
    for root in roots:
        capture.dirty.forget(root)
        journal.append(Op.PRUNE, path=root)
        capture.touched.paths.update((root, root.rpartition(b"/")[0]))
        if backing.lstat(root) is not None:
            fd, name = backing.parent(root)
            _entry(capture, fd, name, root, first_name, counts)
    in_place: dict[bytes, None] = {}
    sized: set[bytes] = set()
    for note in notes:
        if note.kind == NoteKind.NAME or any(is_under(note.path, top) for top in roots):
            continue
        st = backing.lstat(note.path)
        if st is None:
            continue  # removed before BACKING's last sync, as the replica has it
        if note.path not in in_place:
            in_place[note.path] = None
            counts[0] += 1
            capture.touched.paths.add(note.path)
        if note.kind == NoteKind.DATA and stat.S_ISREG(st.st_mode):
            if note.path not in sized:
                sized.add(note.path)
                journal.append(Op.TRUNCATE, path=note.path, size=st.st_size)
            end = min(note.end, st.st_size)
            if end > note.start:
                capture.dirty.add(note.path, note.start, end)
                counts[1] += end - note.start
        elif note.kind == NoteKind.ATTR:
            if not stat.S_ISLNK(st.st_mode):
                journal.append(Op.CHMOD, path=note.path, mode=stat.S_IMODE(st.st_mode))
            journal.append(Op.CHOWN, path=note.path, uid=st.st_uid, gid=st.st_gid)
        elif note.kind == NoteKind.XATTR:
            if note.name.startswith(b"user.") and not (stat.S_ISREG(st.st_mode)
                                                       or stat.S_ISDIR(st.st_mode)):
                continue  # user xattrs live on files and directories only: none to send
            where = backing.proc_path(note.path)
            try:
                value = os.getxattr(where, note.name, follow_symlinks=not note.path)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
                journal.append(Op.REMOVEXATTR, path=note.path, name=note.name)
            else:
                journal.append(Op.SETXATTR, path=note.path, name=note.name, data=value)
    return counts[0], counts[1], roots


def _walk(capture: Capture, dir_fd: int, prefix: bytes, first_name: dict[int, bytes],
          counts: list[int]) -> None:
    """Journal every entry under an open directory, depth first, in sorted order."""
    stack: list[tuple[int, bytes]] = [(os.dup(dir_fd), prefix)]
    try:
        while stack:
            fd, top = stack.pop()
            try:
                for name in sorted(os.listdir(fd)):
                    raw = os.fsencode(name)
                    path = top + b"/" + raw if top else raw
                    if _entry(capture, fd, raw, path, first_name, counts, descend=False):
                        stack.append((os.open(raw, _DIR_FLAGS, dir_fd=fd), path))
            finally:
                os.close(fd)
    finally:
        for fd, _ in stack:
            os.close(fd)


def _entry(capture: Capture, fd: int, raw: bytes, path: bytes, first_name: dict[int, bytes],
           counts: list[int], descend: bool = True) -> bool:
    """Journal one entry (and, with *descend*, a directory's subtree). True for a dir."""
    journal = capture.journal
    st = os.stat(raw, dir_fd=fd, follow_symlinks=False)
    counts[0] += 1
    mode, uid, gid = st.st_mode, st.st_uid, st.st_gid
    capture.touched.paths.add(path)
    if not stat.S_ISDIR(mode) and st.st_nlink > 1:
        # A file, a symlink or a node with several names: one inode on the replica too.
        if st.st_ino in first_name:
            journal.append(Op.LINK, path=first_name[st.st_ino], path2=path)
            return False  # its data and xattrs came with the first name
        first_name[st.st_ino] = path
    if stat.S_ISDIR(mode):
        journal.append(Op.MKDIR, path=path, mode=mode, uid=uid, gid=gid)
    elif stat.S_ISREG(mode):
        journal.append(Op.CREATE, path=path, mode=mode, uid=uid, gid=gid)
        if st.st_size:
            capture.dirty.add(path, 0, st.st_size)
            counts[1] += st.st_size
    elif stat.S_ISLNK(mode):
        journal.append(Op.SYMLINK, path=path, data=os.readlink(raw, dir_fd=fd), uid=uid, gid=gid)
    else:
        journal.append(Op.MKNOD, path=path, mode=mode, rdev=st.st_rdev, uid=uid, gid=gid)
    _xattrs(capture, fd, raw, path)
    if stat.S_ISDIR(mode) and descend:
        sub = os.open(raw, _DIR_FLAGS, dir_fd=fd)
        try:
            _walk(capture, sub, path, first_name, counts)
        finally:
            os.close(sub)
    return stat.S_ISDIR(mode)


def _xattrs(capture: Capture, dir_fd: int, name: bytes | None, path: bytes) -> None:
    where: bytes | int = fd_path(dir_fd, name) if name else dir_fd
    follow = name is None
    for attr in sorted(os.listxattr(where, follow_symlinks=follow)):
        value = os.getxattr(where, attr, follow_symlinks=follow)
        capture.journal.append(Op.SETXATTR, path=path, name=os.fsencode(attr), data=value)


def keep_data(capture: Capture, path: bytes) -> None:
    """Journal *path*'s dirty data now: an op is about to remove the name, and the
    file may live on under other names that the dirty map does not know.

    The map knows a file by the one name it was written through. A hard-linked
    file keeps its data when that name goes, so the data is read now, as it is,
    into the open set ahead of the op; the replica's other names see it there.
    """
    ranges = capture.dirty.files.get(path)
    st = capture.backing.lstat(path) if ranges else None
    if ranges is None or st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
        return  # the file goes with its name (or is not one): nothing to keep
    dir_fd, name = capture.backing.parent(path)
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        for start, end in ranges:
            for offset in range(start, min(end, st.st_size), STEP):
                data = os.pread(fd, min(STEP, min(end, st.st_size) - offset), offset)
                capture.journal.append(Op.WRITE, path=path, offset=offset, data=data)
                capture.progress_done += len(data)
    finally:
        os.close(fd)
    capture.dirty.forget(path)  # after the data is journaled: a crash between loses nothing


def step(capture: Capture, max_bytes: int = STEP) -> int | None:
    """Journal up to *max_bytes* of dirty data; when none is left, close the set.

    Returns the closed set's id once done, else None.
    """
    chunk = capture.dirty.next_chunk(max_bytes)
    if chunk is None:
        return capture.finish_resync()
    path, start, end = chunk
    st = capture.backing.lstat(path)
    if st is None or not stat.S_ISREG(st.st_mode):
        capture.dirty.forget(path)  # gone since, or replaced by something without data
        return None
    dir_fd, name = capture.backing.parent(path)
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        for at, until, is_data in pieces(fd, start, min(end, st.st_size)):
            if is_data:
                data = os.pread(fd, until - at, at)
                capture.journal.append(Op.WRITE, path=path, offset=at, data=data)
                continue
            capture.journal.append(Op.FALLOCATE, path=path, offset=at, length=until - at,
                                   flags=FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
            if until == st.st_size:
                capture.journal.append(Op.TRUNCATE, path=path, size=until)
    finally:
        os.close(fd)
    capture.touched.paths.add(path)
    capture.dirty.remove(path, start, end)
    capture.progress_done += end - start
    return None


def pieces(fd: int, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is data) of the data and the holes of [start, end) of a file.

    A filesystem that cannot tell (SEEK_DATA refused) has only data.
    """
    at = start
    while at < end:
        try:
            data = os.lseek(fd, at, os.SEEK_DATA)
            hole = os.lseek(fd, data, os.SEEK_HOLE) if data < end else end
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data from here on
                data = hole = end
            elif exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                data, hole = at, end
            else:
                raise
        if hole <= data:  # a filesystem answering oddly: data to the end, never a loop
            hole = end
        if data > at:
            yield at, min(data, end), False
        if data < end:
            yield data, min(hole, end), True
        at = min(hole, end)


async def run(capture: Capture) -> None:
    """Resync whenever capture asks for it (the secondary caught up while over budget)."""
    while True:
        await capture.resync_wanted.wait()
        capture.resync_wanted = trio.Event()
        started = last_report = trio.current_time()
        done_at_start = capture.progress_done
        while capture.overflow and capture.resync_ready():
            with capture.lock:  # the request threads wait one step at most
                capture.settle()
                finished = step(capture) is not None
            capture.flush_soon()
            if finished:
                break
            now = trio.current_time()
            if now - last_report >= PROGRESS_EVERY:
                last_report = now
                log.info("%s", progress_line(capture, (capture.progress_done - done_at_start)
                                             / max(now - started, 1e-9)))
            await trio.lowlevel.checkpoint()  # let the trio side's other tasks in between steps


def progress_line(capture: Capture, rate: float) -> str:
    total = max(capture.progress_total, capture.progress_done, 1)
    done = capture.progress_done
    bar = "#" * int(30 * done / total)
    eta = (total - done) / rate if rate > 0 else float("inf")
    what = "initial sync" if capture.syncing else "resync"
    return (f"{what} [{bar:<30}] {done / 1e6:.1f}/{total / 1e6:.1f} MB "
            f"{rate / 1e6:.1f} MB/s ETA {eta:.0f}s")
