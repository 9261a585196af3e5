"""The backing tree journaled as records, for a replica brought up from it.

A sync (repl/primary/resync.py) starts with a snapshot in the open set: for an
initial sync a RESET record and then one record per entry of the backing
tree (directories, files, hard links, symlinks, nodes, owners, modes and
xattrs), written in one synchronous step so that the namespace is a
snapshot; for a rejoin, or a resend after an unclean stop, just the paths
that differ. A small file goes whole, with its data and times, as one FILE
record (up to INLINE_BYTES in all, so the step holding the capture's lock
stays short); the data of the others does not go into the journal here:
its ranges go to the dirty map, which the resync's steps read.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Generator

from repl.diverge import Divergence
from repl.primary.touched import Touched
from repl.tree import Tree
from store.dirty import DirtyMap
from store.journal import Journal
from store.libc import fd_path
from store.notes import Note, NoteKind
from store.records import Op, is_under

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
SMALL_FILE = 64 << 10  # a file up to this size goes whole in one FILE record...
INLINE_BYTES = 1 << 30  # ... while a snapshot has read less than this in all
STEP_ENTRIES = 256  # tree_steps() yields at least this often


class Snapshot:
    """Journals entries of *backing* into *journal*'s open set, their data ranges
    into *dirty* and their paths into *touched* (the set's closing UTIMES; for the
    whole tree, every path).

    ``entries`` and ``data`` count what was journaled: entries, and data bytes
    left in the dirty map."""

    def __init__(self, journal: Journal, backing: Tree, dirty: DirtyMap,
                 touched: Touched) -> None:
        self.journal, self.backing, self.dirty, self.touched = journal, backing, dirty, touched
        self.entries = self.data = self.inline = 0
        self._first_name: dict[int, bytes] = {}  # inode with several names -> the first

    def tree(self) -> None:
        """Journal RESET and every entry of the backing tree."""
        for _ in self.tree_steps():
            pass

    def tree_steps(self) -> Generator[None, None, None]:
        """``tree()`` in steps: yields after every STEP_ENTRIES entries and every
        directory, so whoever drives it can let other work in between (the entries
        journaled meanwhile shipped). Nothing may change the tree until it is done."""
        journal = self.journal
        self.dirty.clear()
        journal.append(Op.RESET)
        root = self.backing.root_fd
        st = os.fstat(root)
        self._own(b"", st)
        self._xattrs(root, b"")
        self.touched.all()  # the close restates every path's times: none is tracked
        yield from self._walk(root, b"")

    def paths(self, div: Divergence) -> None:
        """Journal what makes a rejoining node's copy of *div*'s paths equal to ours."""
        roots = div.roots()
        if b"" in roots:
            self.tree()
            return
        self.dirty.clear()
        journal, backing = self.journal, self.backing
        # The set is never empty, even when nothing differs (an old primary whose every
        # change had reached the new one): the replica waits for it to close.
        top = os.fstat(backing.root_fd)
        journal.append(Op.UTIMES, path=b"", atime_ns=top.st_atime_ns, mtime_ns=top.st_mtime_ns)
        for path in roots:
            journal.append(Op.PRUNE, path=path)
            self.touched.note(path, path.rpartition(b"/")[0])
            fd, name = backing.parent(path) if backing.lstat(path) else (-1, b"")
            if fd >= 0:
                self._entry(fd, name, path)
        for path, spans in sorted(div.only_ranges().items()):
            st = backing.lstat(path)
            if st is None:
                continue  # gone on this side too: nothing of it to send
            # Its owner, mode and times (the close's UTIMES), whatever it is: a
            # directory or a symlink whose attributes alone changed is here too.
            self._own(path, st)
            self.touched.note(path)
            self.entries += 1
            if not stat.S_ISREG(st.st_mode):
                continue
            journal.append(Op.TRUNCATE, path=path, size=st.st_size)
            for start, end in spans:
                end = min(end, st.st_size)
                if end > start:
                    self.dirty.add(path, start, end)
                    self.data += end - start

    def resend(self, notes: list[Note]) -> list[bytes]:
        """Journal what makes a replica's copy of the noted paths what the backing
        directory holds now.

        A NAME note's path (and every other name of a file with several, found by one
        walk of the tree) is removed on the replica and sent again whole: PRUNE, then
        its entry and subtree. The other notes are sent in place, where no NAME
        path covers them: a file's size and noted ranges (DATA), a node's mode and
        owner (ATTR), one extended attribute (XATTR). Every path goes into the set's
        UTIMES.

        Returns the paths sent whole.
        """
        journal, backing = self.journal, self.backing
        div = Divergence({n.path for n in notes if n.kind == NoteKind.NAME})
        roots = div.follow_links(os.fsdecode(fd_path(backing.root_fd))).roots()
        for root in roots:
            self.dirty.forget(root)
            journal.append(Op.PRUNE, path=root)
            self.touched.note(root, root.rpartition(b"/")[0])
            if backing.lstat(root) is not None:
                fd, name = backing.parent(root)
                self._entry(fd, name, root)
        in_place: dict[bytes, None] = {}
        sized: set[bytes] = set()
        # Extended attributes last: a CHOWN after them would remove a file capability.
        for note in sorted(notes, key=lambda n: n.kind == NoteKind.XATTR):
            if note.kind == NoteKind.NAME or any(is_under(note.path, top) for top in roots):
                continue
            st = backing.lstat(note.path)
            if st is None:
                continue  # removed before BACKING's last sync, as the replica has it
            if note.path not in in_place:
                in_place[note.path] = None
                self.entries += 1
                self.touched.note(note.path)
            if note.kind == NoteKind.DATA and stat.S_ISREG(st.st_mode):
                if note.path not in sized:
                    sized.add(note.path)
                    journal.append(Op.TRUNCATE, path=note.path, size=st.st_size)
                end = min(note.end, st.st_size)
                if end > note.start:
                    self.dirty.add(note.path, note.start, end)
                    self.data += end - note.start
            elif note.kind == NoteKind.ATTR:
                self._own(note.path, st)
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
        return roots

    def _own(self, path: bytes, st: os.stat_result) -> None:
        """Journal *path*'s owner, then its mode (a symlink has none): applied the
        other way round, the chown would clear the set-id bits the mode gives."""
        self.journal.append(Op.CHOWN, path=path, uid=st.st_uid, gid=st.st_gid)
        if not stat.S_ISLNK(st.st_mode):
            self.journal.append(Op.CHMOD, path=path, mode=stat.S_IMODE(st.st_mode))

    def _walk(self, dir_fd: int, prefix: bytes) -> Generator[None, None, None]:
        """Journal every entry under an open directory, depth first, in sorted order,
        yielding between steps (``tree_steps``)."""
        stack: list[tuple[int, bytes]] = [(os.dup(dir_fd), prefix)]
        try:
            while stack:
                fd, top = stack.pop()
                try:
                    for at, name in enumerate(sorted(os.listdir(fd)), 1):
                        raw = os.fsencode(name)
                        path = top + b"/" + raw if top else raw
                        if self._entry(fd, raw, path, descend=False):
                            stack.append((os.open(raw, _DIR_FLAGS, dir_fd=fd), path))
                        if at % STEP_ENTRIES == 0:
                            yield
                finally:
                    os.close(fd)
                yield
        finally:
            for fd, _ in stack:
                os.close(fd)

    def _entry(self, fd: int, raw: bytes, path: bytes, descend: bool = True) -> bool:
        """Journal one entry (and, with *descend*, a directory's subtree). True for a dir."""
        journal = self.journal
        st = os.stat(raw, dir_fd=fd, follow_symlinks=False)
        self.entries += 1
        mode, uid, gid = st.st_mode, st.st_uid, st.st_gid
        if not self.touched.everything:  # a whole tree's close walks all but the files
            self.touched.note(path)
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            # A file, a symlink or a node with several names: one inode on the replica too.
            if st.st_ino in self._first_name:
                journal.append(Op.LINK, path=self._first_name[st.st_ino], path2=path)
                return False  # its data and xattrs came with the first name
            self._first_name[st.st_ino] = path
        if stat.S_ISDIR(mode):
            journal.append(Op.MKDIR, path=path, mode=mode, uid=uid, gid=gid)
        elif stat.S_ISREG(mode):
            if self._whole(fd, raw, path):
                # Its times came with it. A later record of the set (a step's, the
                # application's) that changes them notes the path: the close restates it.
                return False  # and its xattrs came with it
            else:
                # Its data comes later, in the steps' records, and its times after them.
                journal.append(Op.CREATE, path=path, mode=mode, uid=uid, gid=gid)
                if st.st_size:
                    self.dirty.add(path, 0, st.st_size)
                    self.data += st.st_size
        elif stat.S_ISLNK(mode):
            journal.append(Op.SYMLINK, path=path, data=os.readlink(raw, dir_fd=fd), uid=uid,
                           gid=gid)
        else:
            journal.append(Op.MKNOD, path=path, mode=mode, rdev=st.st_rdev, uid=uid, gid=gid)
        self._xattrs(fd_path(fd, raw), path, follow=False)
        if stat.S_ISDIR(mode) and descend:
            sub = os.open(raw, _DIR_FLAGS, dir_fd=fd)
            try:
                for _ in self._walk(sub, path):
                    pass
            finally:
                os.close(sub)
        return stat.S_ISDIR(mode)

    def _whole(self, dir_fd: int, raw: bytes, path: bytes) -> bool:
        """Journal the regular file *raw* in *dir_fd* as one FILE record and its xattrs,
        if it is small, not sparse, and the snapshot's INLINE_BYTES allow. True if it
        was."""
        fd = os.open(raw, _FILE_FLAGS, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            size = st.st_size
            if (size > SMALL_FILE or self.inline + size > INLINE_BYTES
                    or st.st_blocks * 512 < size or not stat.S_ISREG(st.st_mode)):
                return False  # the dirty map's ranges, holes and all, via the steps
            chunks, left = [], size
            while left:
                chunk = os.read(fd, left)
                if not chunk:
                    break  # shorter than it was: the file is what was read
                chunks.append(chunk)
                left -= len(chunk)
            data = b"".join(chunks)
            self.journal.append(Op.FILE, path=path, mode=st.st_mode, uid=st.st_uid,
                                gid=st.st_gid, atime_ns=st.st_atime_ns,
                                mtime_ns=st.st_mtime_ns, data=data)
            self._xattrs(fd, path)
        finally:
            os.close(fd)
        self.inline += len(data)
        return True

    def _xattrs(self, where: bytes | int, path: bytes, follow: bool = True) -> None:
        """Journal a SETXATTR for each extended attribute of *where* (an open file or
        directory, or with *follow* False a node's /proc path) as *path*'s."""
        for attr in sorted(os.listxattr(where, follow_symlinks=follow)):
            value = os.getxattr(where, attr, follow_symlinks=follow)
            self.journal.append(Op.SETXATTR, path=path, name=os.fsencode(attr), data=value)
