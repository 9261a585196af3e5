"""A directory tree reached only through directory fds.

Every path is walked one component at a time with ``openat(O_PATH |
O_NOFOLLOW | O_DIRECTORY)``, so a symlink inside the tree is never followed,
nothing reaches outside the root, and paths deeper than PATH_MAX work.
Walked directories are kept in a small cache; any namespace change drops it.
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict

from store.libc import fd_path, lstat_at

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SYNC_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
CACHE_SIZE = 256


class Tree:
    """The tree under *root*. Paths are bytes relative to it; b"" is the root."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirs: OrderedDict[bytes, int] = OrderedDict()

    def dir_fd(self, path: bytes) -> int:
        """An O_PATH fd of directory *path* (cached; do not close it).

        Each call caches at most one new directory and so closes at most the
        least recently used one: the fd returned by the previous call stays
        open through this one (a link or rename holds two).
        """
        if not path:
            return self.root_fd
        fd = self._dirs.get(path)
        if fd is not None:
            self._dirs.move_to_end(path)
            return fd
        # Start at the deepest cached ancestor and walk down in a loop (a
        # path may have thousands of components), closing the intermediate
        # directories as soon as the next one is open.
        fd, done = self.root_fd, 0
        end = len(path)
        while (end := path.rfind(b"/", 0, end)) > 0:
            cached = self._dirs.get(path[:end])
            if cached is not None:
                fd, done = cached, end + 1
                break
        opened = -1
        try:
            for name in path[done:].split(b"/"):
                fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                if opened >= 0:
                    os.close(opened)
                opened = fd
        except BaseException:
            if opened >= 0:
                os.close(opened)
            raise
        self._dirs[path] = fd
        if len(self._dirs) > CACHE_SIZE:
            os.close(self._dirs.popitem(last=False)[1])
        return fd

    def parent(self, path: bytes) -> tuple[int, bytes]:
        """(fd of the parent directory, last component) of *path*."""
        parent, _, name = path.rpartition(b"/")
        return self.dir_fd(parent), name

    def lstat(self, path: bytes, mtime_ns: int | None = None) -> os.stat_result | None:
        """lstat of *path*, or None when it (or a parent) does not exist; given
        *mtime_ns*, one that does not ask for its change and modification times
        (they read as *mtime_ns*: store/libc.py ``stat_untimed``)."""
        try:
            return lstat_at(*self.parent(path), mtime_ns=mtime_ns) if path else \
                lstat_at(self.root_fd, mtime_ns=mtime_ns)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def utime(self, path: bytes, atime_ns: int, mtime_ns: int) -> None:
        """Set *path*'s times (a symlink's own)."""
        if not path:
            os.utime(self.root_fd, ns=(atime_ns, mtime_ns))
            return
        fd, name = self.parent(path)
        os.utime(name, dir_fd=fd, ns=(atime_ns, mtime_ns), follow_symlinks=False)

    def proc_path(self, path: bytes) -> bytes:
        """A /proc path naming *path* itself (for calls without an *at form, like xattrs)."""
        if not path:
            return fd_path(self.root_fd)
        return fd_path(*self.parent(path))

    def sync_node(self, path: bytes) -> None:
        """fsync the file or directory *path* names, or the directory of anything else
        (a symlink, a fifo: their inode goes with their directory's). Gone: nothing."""
        try:
            fd = os.open(self.proc_path(path), _SYNC_FLAGS)
        except OSError:
            fd = -1
        try:
            mode = os.fstat(fd).st_mode if fd >= 0 else 0
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                os.fsync(fd)
            elif path:
                self.sync_node(path.rpartition(b"/")[0])
        finally:
            if fd >= 0:
                os.close(fd)

    def sync(self, path: bytes) -> None:
        """fsync every regular file and directory at and under *path*, and the
        directory that holds it (where the node's own name and metadata live).
        Gone: nothing."""
        stack = [path.rpartition(b"/")[0]] if path else []
        try:
            fd, name = self.parent(path) if path else (self.root_fd, b".")
            top = os.open(name, _SYNC_FLAGS, dir_fd=fd)
        except OSError:
            top = -1
        try:
            if top >= 0 and stat.S_ISDIR(os.fstat(top).st_mode):
                _sync_dir_tree(top)
            elif top >= 0 and stat.S_ISREG(os.fstat(top).st_mode):
                os.fsync(top)
        finally:
            if top >= 0:
                os.close(top)
        for parent in stack:
            try:
                parent_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                                    dir_fd=self.dir_fd(parent))
            except OSError:
                continue
            try:
                os.fsync(parent_fd)
            finally:
                os.close(parent_fd)

    def forget_dirs(self) -> None:
        """Drop cached directory fds; call after any rename, rmdir or exchange."""
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def close(self) -> None:
        self.forget_dirs()
        os.close(self.root_fd)


def _sync_dir_tree(top: int) -> None:
    """fsync the directory open as *top*, and every file and directory under it
    (iterative, one open fd per level, so trees of any depth are synced)."""
    stack: list[tuple[int, list[str]]] = []
    fd = os.dup(top)
    try:
        while True:
            os.fsync(fd)
            stack.append((fd, os.listdir(fd)))
            fd = -1
            while stack and fd < 0:
                parent, names = stack[-1]
                if not names:
                    os.close(stack.pop()[0])
                    continue
                name = names.pop()
                mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    fd = os.open(name, _SYNC_FLAGS | os.O_DIRECTORY, dir_fd=parent)
                elif stat.S_ISREG(mode):
                    child = os.open(name, _SYNC_FLAGS, dir_fd=parent)
                    try:
                        os.fsync(child)
                    finally:
                        os.close(child)
            if fd < 0:
                return
    finally:
        if fd >= 0:
            os.close(fd)
        for open_fd, _ in stack:
            os.close(open_fd)
