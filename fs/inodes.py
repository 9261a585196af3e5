"""The inodes the kernel knows, their names, and bounded fds to reach them.

The FUSE inode number is the backing file's st_ino (the root is ROOT_INODE),
so hard links share one number and numbers survive a restart. For each
inode the table keeps the names it was seen under, as (parent inode, name):
a directory has one, a hard-linked file may have several. The backing
directory is reached through the parent's directory fd and the name, with
the ``*at`` calls, so paths never grow past PATH_MAX. Directory fds live in
an LRU cache bounded by ``fd_limit``: the process may hold 20,000 fds in all,
so an fd per inode ever seen is not an option. ``trim()`` closes the
surplus; handlers call it when they are done with the fds they borrowed.

A tree that changes under the mount (``verify``: a replica) reuses numbers
behind the kernel's back: ext4 gives a new file the number of one just
removed, at once, while the kernel may still hold the removed file (a path
walk that found it and is about to open it). Its requests name the number
only, so a file that takes a number the kernel may still mean by another
file gets an inode number of its own (an alias, from ALIAS up), and the old
one answers ESTALE, on which the kernel looks the path up again.

A file such a tree removes or replaces under a name the kernel knows may be
*held* (``hold``): an fd of it kept for a while, through which the kernel's
number for it still opens it, as a local filesystem opens a file a path
walk found just before it was removed (fs/kernel_cache.py says when).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import OrderedDict

import pyfuse3

from store.libc import fd_path, lstat_at

ROOT = pyfuse3.ROOT_INODE
ALIAS = 1 << 63  # above every number a filesystem gives (see the module's comment)
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ESTALE})  # a name no longer there
NO_FDS: frozenset[int] = frozenset()  # shared: each empty frozenset() is an object of its own


class Node:
    """One inode the kernel knows. Small: there is one per inode in the kernel's
    cache, which a walk of a large tree fills: a list of names (almost always one)
    and a frozenset of open handles (almost always the shared empty one) cost 340
    bytes a node less than two sets."""

    __slots__ = ("directory", "fds", "ino", "lookups", "names", "number", "replaced")

    def __init__(self, ino: int, number: int, directory: bool = True) -> None:
        self.ino = ino  # the kernel's number for it
        self.number = number  # the backing file's st_ino: *ino*, unless an alias
        self.directory = directory
        self.names: list[tuple[int, bytes]] = []  # (parent, name), each once
        self.lookups = 0
        self.fds = NO_FDS  # open handles, for unlinked ones
        self.replaced = False  # its number names another file now: ESTALE

    def add_name(self, parent: int, name: bytes) -> None:
        if (parent, name) not in self.names:
            self.names.append((parent, name))

    def drop_name(self, parent: int, name: bytes) -> None:
        if (parent, name) in self.names:
            self.names.remove((parent, name))


class Inodes:
    def __init__(self, backing: str, fd_limit: int = 4096, verify: bool = False,
                 limit: int | None = None) -> None:
        """*limit*: past this many nodes, ``crowded`` is set (fs/prune.py)."""
        self.verify = verify
        self.limit = self._crowded_past = limit
        self.crowded = threading.Event()
        self.root_fd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.root_st_ino = os.fstat(self.root_fd).st_ino
        self.nodes: dict[int, Node] = {ROOT: Node(ROOT, self.root_st_ino)}
        self.nodes[ROOT].lookups = 1
        self._dir_fds: OrderedDict[int, int] = OrderedDict()
        self._found: dict[int, bytes] = {}  # names found by walking, see _other_name
        self._aliases: dict[int, int] = {}  # backing number -> inode number, where not it
        self._next_alias = ALIAS
        self.fd_limit = fd_limit
        self.held: dict[int, tuple[int, float]] = {}  # inode -> (fd, until when), see hold()

    def ino_of(self, st: os.stat_result) -> int:
        return self.ino_of_number(st.st_ino)

    def ino_of_number(self, number: int) -> int:
        """The kernel's number for the backing file numbered *number*."""
        return ROOT if number == self.root_st_ino else self._aliases.get(number, number)

    def node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise OSError(2, "unknown inode")  # ESTALE would do too; ENOENT is what callers expect
        if node.replaced:
            raise OSError(errno.ESTALE, "the file with this number is gone")
        return node

    # --- names -------------------------------------------------------------

    def ino_for(self, parent: int, name: bytes, st: os.stat_result) -> int:
        """The inode number to give the kernel for *name* in *parent*, found as *st*.

        With ``verify``, a known node none of whose names still reaches it, met
        under a new name, is taken to be gone and its number reused (or its file
        moved, which the caller cannot tell apart): the file gets an alias, and
        the old node answers ESTALE until the kernel forgets it. Not for a node
        with open handles, or held: the filesystem keeps an open file's number.
        """
        ino = self.ino_of(st)
        node = self.nodes.get(ino)
        if node is None or not self.verify or ino == ROOT:
            return ino
        if not node.replaced and (node.fds or ino in self.held or (parent, name) in node.names
                                  or self._verified(node) is not None):
            return ino
        node.replaced = True
        node.names.clear()
        self._close_dir(ino)
        alias = self._aliases[st.st_ino] = self._next_alias
        self._next_alias += 1
        return alias

    def remember(self, parent: int, name: bytes, st: os.stat_result,
                 ino: int | None = None) -> int:
        """Count one kernel lookup of *name* in *parent*, given the number *ino* (what
        ``ino_for`` answers, unless given). Returns the inode number."""
        if ino is None:
            ino = self.ino_for(parent, name, st)
        node = self.nodes.get(ino)
        if node is None:
            node = self.nodes[ino] = Node(ino, st.st_ino, stat.S_ISDIR(st.st_mode))
            if self._crowded_past is not None and len(self.nodes) > self._crowded_past:
                self.crowded.set()
        else:  # a number the filesystem gave again, the kernel not done with the old file
            node.directory = stat.S_ISDIR(st.st_mode)
        node.add_name(parent, name)
        node.lookups += 1
        return ino

    def add_name(self, ino: int, parent: int, name: bytes) -> None:
        node = self.nodes.get(ino)
        if node is not None:
            node.add_name(parent, name)

    def drop_name(self, ino: int | None, parent: int, name: bytes) -> None:
        node = self.nodes.get(ino) if ino is not None else None
        if node is not None:
            node.drop_name(parent, name)
            if not node.names:
                self._close_dir(ino)  # type: ignore[arg-type]

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        if node is None or ino == ROOT:
            return
        node.lookups -= count
        if node.lookups <= 0 and not node.fds:
            del self.nodes[ino]
            self._found.pop(ino, None)
            self._close_dir(ino)
            self.release(ino)
            if self._aliases.get(node.number) == ino:
                del self._aliases[node.number]
            if self.limit is not None and len(self.nodes) <= self.limit:
                self._crowded_past = self.limit  # back under it: the bound is the limit again

    def surplus(self) -> list[tuple[int, bytes]]:
        """The names of the files first looked up that bring the table down to 90 % of
        its limit if the kernel forgets them: not directories, nor files with open
        handles (fs/prune.py says why). Their nodes go last in that order: one the
        kernel keeps anyway is not asked for again before all the others."""
        assert self.limit is not None
        excess = len(self.nodes) - self.limit * 9 // 10
        picked: list[Node] = []
        for node in self.nodes.values():  # in the order of their first lookup
            if len(picked) >= excess:
                break
            if not node.directory and not node.fds:
                picked.append(node)
        for node in picked:
            del self.nodes[node.ino]
            self.nodes[node.ino] = node
        # Too few to pick (directories, open files): not again before the table grows
        # by a tenth more, or each new node would cost a walk of the table.
        self._crowded_past = self.limit if len(picked) >= excess else \
            len(self.nodes) + self.limit // 10
        return [place for node in picked for place in node.names]

    def name_of(self, ino: int) -> tuple[int, bytes] | None:
        """One (parent, name) of *ino* whose parent is still known, or None."""
        node = self.node(ino)
        for parent, name in node.names:
            if parent in self.nodes:
                return parent, name
        return None

    def path(self, ino: int) -> bytes | None:
        """A path of *ino* relative to the backing root, or None if it has no name."""
        parts: list[bytes] = []
        start = ino
        while ino != ROOT:
            found = self.name_of(ino)
            if found is None:
                return self._other_name(start) if ino == start else None
            ino, name = found
            parts.append(name)
        return b"/".join(reversed(parts))

    def _other_name(self, ino: int) -> bytes | None:
        """A name of an open file whose known names are all gone, yet which has others.

        The kernel never looked those up (say, since a restart); without one, a write
        through the handle would change a named file with no record. Found by a walk
        of the tree, once, then checked on each use. Rare: a hard-linked file, one of
        whose names was removed while open.
        """
        node = self.nodes.get(ino)
        if node is None or not node.fds:
            return None
        if os.fstat(next(iter(node.fds))).st_nlink == 0:
            return None  # truly nameless: nothing any name shows changes
        cached = self._found.get(ino)
        if cached is not None:
            try:
                if os.stat(cached, dir_fd=self.root_fd,
                           follow_symlinks=False).st_ino == node.number:
                    return cached
            except OSError:
                pass
        root = fd_path(self.root_fd)
        for top, _, files in os.walk(root):
            for name in files:
                full = os.path.join(top, name)
                if os.lstat(full).st_ino == node.number:
                    self._found[ino] = os.path.relpath(full, root)
                    return self._found[ino]
        return None

    def child_path(self, parent: int, name: bytes) -> bytes | None:
        base = self.path(parent)
        if base is None:
            return None
        return base + b"/" + name if base else name

    # --- fds ------------------------------------------------------------------

    def dir_fd(self, ino: int) -> int:
        """An O_PATH fd of directory *ino*, valid until the next ``trim()``."""
        if ino == ROOT:
            return self.root_fd
        fd = self._dir_fds.get(ino)
        if fd is not None:
            self._dir_fds.move_to_end(ino)
            return fd
        parent_fd, name = self.at(ino)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        self._dir_fds[ino] = fd
        return fd

    def at(self, ino: int) -> tuple[int, bytes]:
        """(parent dir fd, name) reaching *ino* in the backing directory.

        With ``verify`` (a tree that changes under the mount, like a replica),
        each name is checked to still hold *ino*, and stale names are dropped,
        also those whose parent directory is gone: its number may be known again
        as a file's, as the backing filesystem reuses numbers (ext4 at once). With
        none left, ESTALE: the kernel's view is older than the tree, and a path
        lookup that gets ESTALE looks its names up again.
        """
        if not self.verify:
            found = self.name_of(ino)
            if found is None:
                raise FileNotFoundError(2, "inode has no name")
            return self.dir_fd(found[0]), found[1]
        found = self._verified(self.node(ino))
        if found is None:
            raise OSError(errno.ESTALE, "inode has no name left")
        return found

    def _verified(self, node: Node) -> tuple[int, bytes] | None:
        """(parent dir fd, name) of a name that still holds *node*; the stale ones
        are dropped."""
        for parent, name in list(node.names):
            if parent in self.nodes:
                try:
                    fd = self.dir_fd(parent)
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if st.st_ino == node.number:
                        return fd, name
                except OSError as exc:
                    if exc.errno not in _GONE:
                        raise
            node.drop_name(parent, name)
        return None

    def unlinked_fd(self, ino: int) -> int | None:
        """An open handle of *ino* (or its held fd) when no known name reaches it
        (open, then removed, or, with ``verify``, removed or moved under the mount)."""
        node = self.node(ino)
        if node.fds:
            fd = next(iter(node.fds))
        elif ino in self.held:
            fd = self.held[ino][0]
        else:
            return None
        return None if self.reaches(ino) else fd

    def reaches(self, ino: int) -> bool:
        """Whether a known name still reaches *ino* (with ``verify``: checked)."""
        node = self.nodes.get(ino)
        if node is None or node.replaced:
            return False
        return (self._verified(node) if self.verify else self.name_of(ino)) is not None

    def hold(self, ino: int, fd: int, until: float) -> None:
        """Keep *fd*, an fd of *ino*'s file, as the way to reach it once no name does,
        until *until* (``time.monotonic``) or until the kernel forgets *ino*."""
        self.release(ino)
        self.held[ino] = fd, until

    def release(self, ino: int) -> None:
        held = self.held.pop(ino, None)
        if held is not None:
            os.close(held[0])

    def release_all(self) -> None:
        for ino in list(self.held):
            self.release(ino)

    def release_expired(self, now: float) -> None:
        for ino in [ino for ino, (_, until) in self.held.items() if until <= now]:
            self.release(ino)

    def stat(self, ino: int, mtime_ns: int | None = None) -> os.stat_result:
        """lstat of *ino* in the backing directory; given *mtime_ns*, one that does not
        ask for the change and modification times (they read as *mtime_ns*:
        store/libc.py ``stat_untimed``)."""
        if ino == ROOT:
            return lstat_at(self.root_fd, mtime_ns=mtime_ns)
        fd = self.unlinked_fd(ino)
        if fd is not None:
            return lstat_at(fd, mtime_ns=mtime_ns)
        return lstat_at(*self.at(ino), mtime_ns=mtime_ns)

    def trim(self) -> None:
        while len(self._dir_fds) > self.fd_limit:
            os.close(self._dir_fds.popitem(last=False)[1])

    def _close_dir(self, ino: int) -> None:
        fd = self._dir_fds.pop(ino, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        self.release_all()
        for fd in self._dir_fds.values():
            os.close(fd)
        self._dir_fds.clear()
        os.close(self.root_fd)
