"""What a batch of sets will change, named as the replica shows it before the batch;
and what it changed, synced (``sync_batch``).

A standby mount that lets the kernel cache the replica (fs/standby.py) must
drop, before a batch is applied, every cached thing the batch changes: the
names it adds, removes or replaces, the attributes it changes, the bytes it
writes. The kernel knows them by inode number, the replica's own, so they
are named here by the numbers the replica has *before* the batch.

The records name paths as of the moment each op happened: after ``rename a
b`` in the batch, a later ``write b/f`` reaches the directory that was
``a`` before the batch. So the batch's namespace ops are replayed on a small
overlay of the tree (the replica itself is not touched): each name the batch
set is looked up there first, and only the names it never set are looked up
in the replica. Nodes the batch creates have no number yet; their paths at
the batch's end are kept, so that once applied, their numbers can be read
(``created_inodes``): a number the filesystem reused may still be known to
the kernel, with the cached pages of the file that had it.

RESET and PRUNE remove whole trees without a record per name: after either,
the footprint says ``everything``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from repl.tree import Tree
from store.libc import FUSE_SUPER_MAGIC, fs_magic, syncfs
from store.records import RENAME_EXCHANGE, Op, Record

if TYPE_CHECKING:
    from store.staging import Staging

_DATA_OPS = frozenset({Op.WRITE, Op.TRUNCATE, Op.FALLOCATE})
_ATTR_OPS = frozenset({Op.CHMOD, Op.CHOWN, Op.UTIMES, Op.SETXATTR, Op.REMOVEXATTR})
_NEW_NODE_OPS = frozenset({Op.CREATE, Op.MKDIR, Op.MKNOD, Op.SYMLINK, Op.FILE})
# A replica on a FUSE filesystem is synced node by node (``sync_batch``); a batch that
# names more than this many paths, every file and directory of the replica.
FUSE_SYNC_PATHS = 10_000


class Invalidator(Protocol):
    """What the applier asks of a mount that lets the kernel cache the replica.

    The order, for each batch: ``begin`` (drop the caches of what the batch
    touches while readers go on: the replica still shows the set before);
    then ``settled`` (was nothing of it read back in since?) and, if not,
    ``sweep`` (drop that too), until it is; then the same, holding the apply
    lock exclusively, but letting it go to sweep; once settled with the lock
    held, apply the batch and call ``applied`` before letting the lock go;
    ``end`` in any case.
    """

    def begin(self, touched: Footprint) -> None: ...

    def settled(self) -> bool: ...

    def sweep(self) -> None: ...

    def applied(self, created: list[int]) -> None: ...

    def end(self) -> None: ...

    def let_go(self) -> None:
        """The disk is full: let go of whatever the mount keeps that takes space."""


class _Node:
    """A node of the overlay: one the replica had before the batch (*ino*, reached at
    *path* in the replica), or one the batch made (*ino* None). *parent* and *name*
    are where it is now in the replay; *parent* None once no name reaches it."""

    __slots__ = ("ino", "name", "parent", "path")

    def __init__(self, ino: int | None, path: bytes | None, parent: _Node | None,
                 name: bytes) -> None:
        self.ino, self.path, self.parent, self.name = ino, path, parent, name


class Footprint:
    """The names, attributes and bytes a batch changes (add its records in order).

    ``entries``: (directory inode, name) pairs the batch adds, removes or
    replaces. ``attrs``: inodes whose attributes change (directories whose
    entries change among them). ``data``: files whose bytes change. All are
    the replica's inode numbers before the batch.
    """

    def __init__(self, tree: Tree, everything: bool = False) -> None:
        self.tree = tree
        self.entries: set[tuple[int, bytes]] = set()
        self.attrs: set[int] = set()
        self.data: set[int] = set()
        self.everything = everything
        self.records = 0
        root = tree.lstat(b"")
        assert root is not None
        self._root = _Node(root.st_ino, b"", None, b"")
        self._old: dict[int, _Node] = {root.st_ino: self._root}
        self._overlay: dict[tuple[_Node, bytes], _Node | None] = {}
        self._created: list[_Node] = []
        self._reset = False  # after a RESET nothing of the replica before is left

    def add(self, record: Record) -> None:
        self.records += 1
        op = record.op
        if op in _DATA_OPS or op in _ATTR_OPS:
            node = self._resolve(record.path)
            if node is not None and node.ino is not None:
                self.attrs.add(node.ino)
                if op in _DATA_OPS:
                    self.data.add(node.ino)
        elif op in _NEW_NODE_OPS:
            parent, name = self._place(record.path)
            if parent is not None:
                node = _Node(None, None, parent, name)
                self._set(parent, name, node)
                self._created.append(node)
        elif op == Op.LINK:
            node = self._resolve(record.path)
            parent, name = self._place(record.path2)
            if parent is not None:
                self._set(parent, name, node)
            self._changed(node)
        elif op in (Op.UNLINK, Op.RMDIR):
            parent, name = self._place(record.path)
            if parent is not None:
                self._changed(self._child(parent, name))
                self._set(parent, name, None)
        elif op == Op.RENAME:
            self._rename(record)
        elif op in (Op.RESET, Op.PRUNE):
            self.everything = True
            if op == Op.RESET:
                self._reset = True
                self._overlay.clear()
                self._created.clear()
            else:
                parent, name = self._place(record.path)
                if parent is not None:
                    self._set(parent, name, None)

    def _rename(self, record: Record) -> None:
        src_parent, src_name = self._place(record.path)
        dst_parent, dst_name = self._place(record.path2)
        if src_parent is None or dst_parent is None:
            return
        moved = self._child(src_parent, src_name)
        replaced = self._child(dst_parent, dst_name)
        self._changed(moved)
        self._changed(replaced)
        if moved is replaced:
            self._touch(src_parent, src_name)  # two names of one inode: a no-op
            self._touch(dst_parent, dst_name)
            return
        if record.flags & RENAME_EXCHANGE:
            self._set(src_parent, src_name, replaced)
        else:
            self._set(src_parent, src_name, None)
        self._set(dst_parent, dst_name, moved)

    # --- the overlay ---------------------------------------------------------------

    def _place(self, path: bytes) -> tuple[_Node | None, bytes]:
        """The directory holding *path* now, and its last component."""
        parent, _, name = path.rpartition(b"/")
        return self._resolve(parent), name

    def _resolve(self, path: bytes) -> _Node | None:
        node: _Node | None = self._root
        for name in path.split(b"/") if path else ():
            node = self._child(node, name)  # type: ignore[arg-type]
            if node is None:
                return None
        return node

    def _child(self, parent: _Node, name: bytes) -> _Node | None:
        key = (parent, name)
        if key in self._overlay:
            return self._overlay[key]
        if parent.path is None or self._reset:
            return None  # a directory the batch made holds only what the batch put there
        path = parent.path + b"/" + name if parent.path else name
        st = self.tree.lstat(path)
        if st is None:
            return None
        node = self._old.get(st.st_ino)
        if node is None:
            node = self._old[st.st_ino] = _Node(st.st_ino, path, parent, name)
        return node

    def _set(self, parent: _Node, name: bytes, node: _Node | None) -> None:
        self._overlay[(parent, name)] = node
        if node is not None:
            node.parent, node.name = parent, name
        self._touch(parent, name)

    def _touch(self, parent: _Node, name: bytes) -> None:
        if parent.ino is not None:
            self.entries.add((parent.ino, name))
            self.attrs.add(parent.ino)

    def _changed(self, node: _Node | None) -> None:
        """A node whose link count or ctime the op changes."""
        if node is not None and node.ino is not None:
            self.attrs.add(node.ino)

    # --- after the batch -------------------------------------------------------------

    def created_inodes(self) -> list[int]:
        """The replica's numbers of the nodes the batch made, read once it is applied."""
        out = []
        for node in self._created:
            path = self._path_of(node)
            st = self.tree.lstat(path) if path is not None else None
            if st is not None:
                out.append(st.st_ino)
        return out

    def _path_of(self, node: _Node) -> bytes | None:
        parts: list[bytes] = []
        at: _Node | None = node
        while at is not self._root:
            if at is None or at.parent is None or self._overlay.get((at.parent, at.name),
                                                                    at) is not at:
                return None  # no name reaches it any more
            parts.append(at.name)
            at = at.parent
        return b"/".join(reversed(parts))


def sync_batch(tree: Tree, staging: Staging, first: int, last: int) -> None:
    """Make the ops of staged sets *first* to *last* durable in the replica *tree*: one
    syncfs.

    Not on a FUSE filesystem: the kernel never tells its daemon of a syncfs
    (virtiofs aside), so there every node the sets name is fsynced, and the
    directory that holds it, and all that is under both names of a rename (a
    file written in a directory moved since is found there); the whole
    replica if they start over from a RESET or name more than FUSE_SYNC_PATHS
    paths.
    """
    if fs_magic(tree.root_fd) != FUSE_SUPER_MAGIC:
        syncfs(tree.root_fd)
        return
    named: set[bytes] = set()
    moved: set[bytes] = set()
    for set_id in range(first, last + 1):
        for record in staging.records(set_id, data=False):
            if record.op == Op.RESET or len(named) > FUSE_SYNC_PATHS:
                tree.sync(b"")
                return
            if record.op == Op.RENAME:
                moved.update((record.path, record.path2))
            named.update(path for path in (record.path, record.path2) if path)
    for path in sorted(moved):
        tree.sync(path)
    for path in sorted(named | {path.rpartition(b"/")[0] for path in named} | {b""}):
        tree.sync_node(path)
