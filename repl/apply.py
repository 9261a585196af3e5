"""Apply records to a directory tree, redo-safe.

The same code applies data sets on the secondary and redoes the journal's
last record on the primary after a crash.

The redo rule. Data ops (WRITE, TRUNCATE, FALLOCATE, CHMOD, CHOWN, UTIMES,
SETXATTR, REMOVEXATTR) set bytes or attributes to values the record carries
(a FALLOCATE zeroes its range or, like a WRITE, grows the file to its end), so
replaying any run of them in order from a state where a prefix of the run
already happened gives the same result. Namespace ops (create, link,
unlink, rename, ...) are not idempotent, so the caller writes a marker
naming the op before running it; after a crash, replay starts at the last
marker and only its op is in doubt. Whether it happened is decided by what
it leaves behind, which nothing after it in the replayed run can change
(only data ops follow it):

- CREATE, MKDIR, MKNOD, SYMLINK, LINK: done iff the new name exists. The
  kernel checked the name was free on the primary, and the replica mirrors
  it. Ownership and mode are set again either way (idempotent).
- FILE: done iff the name exists; its size, bytes, owner, mode and times
  are set again either way (data ops, idempotent).
- UNLINK, RMDIR, RENAME: done iff the old name is gone. (A rename between
  two names of one inode is a no-op in POSIX, and so is its redo.)
- RENAME with RENAME_EXCHANGE: both names exist before and after, so the
  marker carries an intent, the inode numbers of both names before the op;
  done iff the first name now holds the second's inode.
- RESET (empty the tree) and PRUNE (remove a subtree if there) are
  idempotent: they are simply done again.
"""

from __future__ import annotations

import errno
import os
import stat

from repl.tree import Tree
from store.libc import fallocate, renameat2
from store.records import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    RENAME_EXCHANGE,
    Op,
    Record,
    decode_intent,
    encode_intent,
)

_ZEROS = bytes(1 << 20)
_FILE_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_READ = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
OPEN_FILES = 64  # files an OpenFiles keeps open at most
_WRITES = frozenset({Op.WRITE, Op.TRUNCATE, Op.FALLOCATE})  # ops on an open file's bytes
# Ops after which a path may name another node, or none, anywhere in the tree.
_MOVES = frozenset({Op.RMDIR, Op.RENAME, Op.PRUNE, Op.RESET})


class OpenFiles:
    """The files a run of records writes, kept open from one record to the next.

    For a caller that alone changes the tree (the secondary's applier): a set
    that writes a file a thousand times opens it once, and a file it creates
    is written, given its owner, mode and times through the fd its CREATE
    made. ``apply`` drops a path when an UNLINK removes it and everything when
    a RMDIR, RENAME, PRUNE or RESET may have moved or removed what a path
    names. The caller ``close()``s it when the run ends and whenever an error
    cut it short.
    """

    def __init__(self) -> None:
        self._fds: dict[bytes, int] = {}

    def get(self, tree: Tree, path: bytes) -> int:
        """A write fd of regular file *path*, opened now or kept from before."""
        fd = self._fds.get(path)
        if fd is None:
            dir_fd, name = tree.parent(path)
            fd = self.keep(path, os.open(name, _FILE_FLAGS, dir_fd=dir_fd))
        return fd

    def kept(self, path: bytes) -> int | None:
        """The fd kept for *path*, if any (none is opened)."""
        return self._fds.get(path)

    def keep(self, path: bytes, fd: int) -> int:
        """Keep *fd*, a write fd of the regular file *path*; returns it."""
        if len(self._fds) >= OPEN_FILES:
            self.close()
        self._fds[path] = fd
        return fd

    def forget(self, path: bytes) -> None:
        fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _fallocate_as_seen(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2), or on a filesystem without *mode* what a reader would see of it.

    A replica's filesystem may lack a mode the primary's has (tmpfs has no
    ZERO_RANGE, some have no PUNCH_HOLE): the range then gets zeros written
    and the file its new size, the same bytes without the same allocation.
    """
    try:
        fallocate(fd, mode, offset, length)
        return
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
    size, end = os.fstat(fd).st_size, offset + length
    if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
        for at in range(offset, min(end, size), len(_ZEROS)):
            zeros = memoryview(_ZEROS)[: min(end, size) - at]
            while zeros:
                n = os.pwrite(fd, zeros, at)
                zeros, at = zeros[n:], at + n
    if not mode & FALLOC_FL_KEEP_SIZE and end > size:
        os.ftruncate(fd, end)


def intent_for(tree: Tree, record: Record) -> bytes | None:
    """The intent to write with *record*'s marker, for ops that need one."""
    if record.op == Op.RENAME and record.flags & RENAME_EXCHANGE:
        a, b = tree.lstat(record.path), tree.lstat(record.path2)
        return encode_intent(a.st_ino if a else 0, b.st_ino if b else 0)
    return None


def is_done(tree: Tree, record: Record, intent: bytes | None) -> bool:
    """Whether the namespace op *record* already happened (the redo rule above)."""
    op = record.op
    if op in (Op.CREATE, Op.MKDIR, Op.MKNOD, Op.SYMLINK, Op.FILE):
        return tree.lstat(record.path) is not None
    if op == Op.LINK:
        return tree.lstat(record.path2) is not None
    if op == Op.RENAME and record.flags & RENAME_EXCHANGE:
        if intent is None:
            raise ValueError("exchange redo needs its intent")
        ino_a, ino_b = decode_intent(intent)
        now = tree.lstat(record.path)
        return ino_a != ino_b and now is not None and now.st_ino == ino_b
    if op in (Op.UNLINK, Op.RMDIR, Op.RENAME):
        return tree.lstat(record.path) is None
    return False


def redo(tree: Tree, record: Record, intent: bytes | None) -> None:
    """Apply *record* whose outcome is in doubt after a crash."""
    if record.op == Op.FILE and is_done(tree, record, intent):
        fd, name = tree.parent(record.path)
        _fill(os.open(name, _FILE_FLAGS, dir_fd=fd), record, truncate=True)
    elif record.op in (Op.CREATE, Op.MKDIR, Op.MKNOD, Op.SYMLINK) and is_done(tree, record,
                                                                                intent):
        _set_owner_mode(tree, record)
    elif not is_done(tree, record, intent):
        apply(tree, record)


def apply(tree: Tree, record: Record, files: OpenFiles | None = None) -> None:
    """Carry out *record* on *tree*, writing through *files* if given. Raises OSError
    as the syscall did."""
    op = record.op
    if files is not None:
        if op in _WRITES:
            _write(files.get(tree, record.path), record)
            return
        if op == Op.CREATE:
            fd, name = tree.parent(record.path)
            _own(files.keep(record.path, os.open(
                name, _FILE_FLAGS | os.O_CREAT | os.O_EXCL, record.mode & 0o7777, dir_fd=fd)),
                record)
            return
        if op == Op.UTIMES and (kept := files.kept(record.path)) is not None:
            os.utime(kept, ns=(record.atime_ns, record.mtime_ns))
            return
        if op == Op.UNLINK:
            files.forget(record.path)
        elif op in _MOVES:
            files.close()
    if op in (Op.SYNC, Op.VOID):
        return
    if op == Op.RESET:
        tree.forget_dirs()
        _empty_dir(tree.root_fd)
        for attr in os.listxattr(tree.root_fd):
            os.removexattr(tree.root_fd, attr)
        return
    if op == Op.PRUNE:
        st = tree.lstat(record.path)
        if st is not None:
            fd, name = tree.parent(record.path)
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(name, _DIR_READ, dir_fd=fd)
                try:
                    _empty_dir(sub)
                finally:
                    os.close(sub)
                os.rmdir(name, dir_fd=fd)
            else:
                os.unlink(name, dir_fd=fd)
        tree.forget_dirs()
        return
    if op in _WRITES:
        fd, name = tree.parent(record.path)
        file_fd = os.open(name, _FILE_FLAGS, dir_fd=fd)
        try:
            _write(file_fd, record)
        finally:
            os.close(file_fd)
    elif op == Op.CREATE:
        fd, name = tree.parent(record.path)
        os.close(os.open(name, _FILE_FLAGS | os.O_CREAT | os.O_EXCL, record.mode & 0o7777,
                         dir_fd=fd))
        _set_owner_mode(tree, record)
    elif op == Op.FILE:
        fd, name = tree.parent(record.path)
        _fill(os.open(name, _FILE_FLAGS | os.O_CREAT | os.O_EXCL, record.mode & 0o7777,
                      dir_fd=fd), record)
    elif op == Op.MKDIR:
        fd, name = tree.parent(record.path)
        os.mkdir(name, record.mode & 0o7777, dir_fd=fd)
        _set_owner_mode(tree, record)
    elif op == Op.MKNOD:
        fd, name = tree.parent(record.path)
        os.mknod(name, record.mode, record.rdev, dir_fd=fd)
        _set_owner_mode(tree, record)
    elif op == Op.SYMLINK:
        fd, name = tree.parent(record.path)
        os.symlink(bytes(record.data), name, dir_fd=fd)
        _set_owner_mode(tree, record)
    elif op == Op.LINK:
        src_fd, src = tree.parent(record.path)
        dst_fd, dst = tree.parent(record.path2)
        os.link(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
    elif op == Op.UNLINK:
        fd, name = tree.parent(record.path)
        os.unlink(name, dir_fd=fd)
    elif op == Op.RMDIR:
        fd, name = tree.parent(record.path)
        os.rmdir(name, dir_fd=fd)
        tree.forget_dirs()
    elif op == Op.RENAME:
        src_fd, src = tree.parent(record.path)
        dst_fd, dst = tree.parent(record.path2)
        renameat2(src_fd, src, dst_fd, dst, record.flags)
        tree.forget_dirs()
    elif op == Op.CHMOD:
        _chmod(tree, record.path, record.mode & 0o7777)
    elif op == Op.CHOWN:
        _at(tree, record.path, os.chown, record.uid, record.gid)
    elif op == Op.UTIMES:
        _at(tree, record.path, os.utime, ns=(record.atime_ns, record.mtime_ns))
    elif op == Op.SETXATTR:
        os.setxattr(tree.proc_path(record.path), record.name, record.data,
                    follow_symlinks=not record.path)
    elif op == Op.REMOVEXATTR:
        try:
            os.removexattr(tree.proc_path(record.path), record.name,
                           follow_symlinks=not record.path)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
    else:
        raise ValueError(f"cannot apply {op!r}")


def _write(fd: int, record: Record) -> None:
    """A WRITE, TRUNCATE or FALLOCATE on the file open at *fd*."""
    if record.op == Op.WRITE:
        view, offset = memoryview(record.data), record.offset
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    elif record.op == Op.TRUNCATE:
        os.ftruncate(fd, record.size)
    else:
        _fallocate_as_seen(fd, record.flags, record.offset, record.length)


def _fill(fd: int, record: Record, truncate: bool = False) -> None:
    """Give the file open at *fd* (closed here) a FILE record's bytes, then its owner,
    its exact mode (chown clears set-id bits) and its times."""
    try:
        if truncate:
            os.ftruncate(fd, len(record.data))
        view, offset = memoryview(record.data), 0
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
        _own(fd, record)
        os.utime(fd, ns=(record.atime_ns, record.mtime_ns))
    finally:
        os.close(fd)


def _own(fd: int, record: Record) -> None:
    """Give the file open at *fd* the record's owner, then its exact mode (chown clears
    set-id bits)."""
    os.fchown(fd, record.uid, record.gid)
    os.fchmod(fd, stat.S_IMODE(record.mode))


def _empty_dir(dir_fd: int) -> None:
    """Remove everything inside a directory, never following a symlink.

    Iterative, with one open fd per level, so trees of any depth empty out.
    """
    stack: list[tuple[int, str]] = [(os.dup(dir_fd), "")]
    try:
        while stack:
            fd, _name = stack[-1]
            subdir = None
            for name in os.listdir(fd):
                if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    subdir = subdir or name
                else:
                    os.unlink(name, dir_fd=fd)
            if subdir is not None:
                stack.append((os.open(subdir, _DIR_READ, dir_fd=fd), subdir))
                continue
            stack.pop()
            os.close(fd)
            if stack:
                os.rmdir(_name, dir_fd=stack[-1][0])
    finally:
        for fd, _ in stack:
            os.close(fd)


def _at(tree: Tree, path: bytes, func: object, *args: object, **kwargs: object) -> None:
    """Call an os function on *path* without following a final symlink."""
    if not path:
        func(tree.root_fd, *args, **kwargs)  # type: ignore[operator]
        return
    fd, name = tree.parent(path)
    func(name, *args, dir_fd=fd, follow_symlinks=False, **kwargs)  # type: ignore[operator]


def _chmod(tree: Tree, path: bytes, mode: int) -> None:
    """chmod *path* itself; a symlink has no mode of its own (EOPNOTSUPP).

    Python reports that EOPNOTSUPP from fchmodat(AT_SYMLINK_NOFOLLOW) as a
    ValueError; it is turned back into the OSError the call failed with.
    """
    try:
        _at(tree, path, os.chmod, mode)
    except ValueError:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP)) from None


def _set_owner_mode(tree: Tree, record: Record) -> None:
    """Give a new node its owner, then its exact mode (chown clears set-id bits)."""
    _at(tree, record.path, os.chown, record.uid, record.gid)
    if record.op != Op.SYMLINK:
        _at(tree, record.path, os.chmod, stat.S_IMODE(record.mode))
