"""A directory tree reached only through directory fds.

Every path is walked one component at a time with ``openat(O_PATH |
O_NOFOLLOW | O_DIRECTORY)``, so a symlink inside the tree is never followed,
nothing reaches outside the root, and paths deeper than PATH_MAX work.
Walked directories are kept in a small cache; any namespace change drops it.
"""

from __future__ import annotations

import os
from collections import OrderedDict

from store.libc import fd_path

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
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

    def lstat(self, path: bytes) -> os.stat_result | None:
        """lstat of *path*, or None when it (or a parent) does not exist."""
        try:
            if not path:
                return os.stat(self.root_fd)
            fd, name = self.parent(path)
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def proc_path(self, path: bytes) -> bytes:
        """A /proc path naming *path* itself (for calls without an *at form, like xattrs)."""
        if not path:
            return fd_path(self.root_fd)
        return fd_path(*self.parent(path))

    def forget_dirs(self) -> None:
        """Drop cached directory fds; call after any rename, rmdir or exchange."""
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def close(self) -> None:
        self.forget_dirs()
        os.close(self.root_fd)
