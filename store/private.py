"""replfs's own state is private to the user its daemons run as.

The daemons run with umask 0, because the passthrough must create the
callers' files with exactly the modes the kernel passes on; so nothing
replfs makes for itself may lean on the umask. Every directory it makes for
itself (journal, staging, branches, the control sockets' directory) is made
here, 0700, and every file 0600.

State that another user could change is refused, as ssh's StrictModes
refuses a writable ``~/.ssh``: a journal or staging store that someone else
replaced while the daemon was down would be replayed by root into BACKING
or the replica at the next start.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from store.errors import UnsafeState

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Make *path* a private directory, with any missing parents, and return it.

    Raises UnsafeState if *path* or its parent already exists and another user
    owns it or could write to it (a parent may be world-writable with the
    sticky bit, as /tmp is: others cannot move what is ours in it).
    """
    path = Path(path)
    missing = []
    at = path
    while not at.exists():
        missing.append(at)
        if at.parent == at:
            break
        at = at.parent
    for new in reversed(missing):
        try:
            new.mkdir(mode=DIR_MODE)
        except FileExistsError:
            pass  # made meanwhile: checked below like any existing directory
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    check_private(path)
    check_private(path.parent, sticky_ok=True)
    return path


def check_private(path: Path, sticky_ok: bool = False) -> None:
    """Raise UnsafeState unless *path* is ours (or root's) and only we can write to it."""
    st = os.stat(path)
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise UnsafeState(f"{path} belongs to uid {st.st_uid}, not to uid {me} that replfs "
                          f"runs as; chown {me} {path} if it is replfs state, or use another "
                          "directory")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (sticky_ok
                                                          and st.st_mode & stat.S_ISVTX):
        raise UnsafeState(f"{path} can be written by other users (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); run chmod go-w {path} "
                          "and check nothing in it was changed")


def write_private(path: Path, data: bytes) -> None:
    """Write *path* whole, mode 0600 whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # an older file may have been made with a looser mode
        os.write(fd, data)
    finally:
        os.close(fd)
