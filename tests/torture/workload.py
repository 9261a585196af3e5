"""A seeded workload on a mount: files, names, metadata, SQLite and git."""

from __future__ import annotations

import errno
import os
import random
import sqlite3
import subprocess
from pathlib import Path

# Errors a random op may meet on a tree it does not track: they change nothing.
EXPECTED = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR,
            errno.EINVAL, errno.ENODATA, errno.ELOOP}
DIRS = ("", "a", "a/b", "c")


class Workload:
    def __init__(self, root: Path, seed: int, fsync_git: bool = False) -> None:
        """*fsync_git*: git fsyncs what it writes (by default it does not sync loose
        objects, which a power cut then leaves empty: git's loss, not replfs's)."""
        self.root = root
        self.fsync_git = fsync_git
        self.git = ["git", "-c", "core.fsync=all", "-c", "core.fsyncMethod=fsync"] \
            if fsync_git else ["git"]
        self.rng = random.Random(seed)
        self.committed = 0  # SQLite transactions whose commit returned
        # The next one's commit failed: it may be there all the same (SQLite wrote it;
        # its fsync failed), as the one past those counted.
        self.unsure = False
        self.git_commits = 0
        self.ops = 0
        self.db: sqlite3.Connection | None = None
        self.git_ready = False
        # Once the disk filled (primary_enospc): ENOSPC is expected, and SQLite's errors
        # with it ("database or disk is full", "disk I/O error" of a failed fsync)
        self.full_disk = False

    def close(self) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except sqlite3.Error:
                pass
            self.db = None

    def step(self) -> None:
        """One random op; SQLite and git get their turn too."""
        r = self.rng.random()
        self.ops += 1
        try:
            if r < 0.15:
                self.sqlite_commit()
            elif r < 0.19:
                self.git_commit()
            else:
                self.file_op()
        except OSError as exc:
            if exc.errno not in EXPECTED and not (self.full_disk
                                                  and exc.errno == errno.ENOSPC):
                raise
        except sqlite3.OperationalError as exc:
            if not self.full_disk or not ("full" in str(exc) or "I/O" in str(exc)):
                raise
        except subprocess.CalledProcessError:
            # git died with the primary mid-command: it leaves a lock, as after a crash.
            for lock in (self.root / "repo" / ".git").glob("*.lock"):
                lock.unlink(missing_ok=True)

    def _path(self) -> Path:
        d = self.rng.choice(DIRS)
        return self.root / d / f"f{self.rng.randrange(12)}"

    def file_op(self) -> None:
        rng, p = self.rng, self._path()
        kind = rng.randrange(16)
        if kind in (0, 1):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(rng.randbytes(rng.randrange(1, 40_000)))
        elif kind == 2:
            with open(p, "ab") as f:
                f.write(rng.randbytes(rng.randrange(1, 9000)))
        elif kind == 3:
            with open(p, "r+b") as f:
                f.seek(rng.randrange(30_000))
                f.write(rng.randbytes(rng.randrange(1, 5000)))
        elif kind == 4:
            os.truncate(p, rng.randrange(20_000))
        elif kind in (5, 6):
            q = self._path()
            q.parent.mkdir(parents=True, exist_ok=True)
            os.rename(p, q)  # also over an existing name, also across dirs
        elif kind == 7:
            os.link(p, self._path())
        elif kind == 8:
            os.symlink(p.name, self._path())  # may dangle; never leaves the tree
        elif kind == 9:
            os.unlink(p)
        elif kind == 10:  # unlink of an open file, then write through it
            fd = os.open(p, os.O_RDWR)
            try:
                os.unlink(p)
                os.write(fd, b"into the void")
            finally:
                os.close(fd)
        elif kind == 11:
            # Attributes alone: of a file, a directory, or a symlink itself.
            owner = (rng.randrange(3) * 1000, rng.randrange(3) * 1000)
            if rng.random() < 0.25:
                os.chmod(p.parent, rng.choice((0o700, 0o751, 0o755)))
                os.chown(p.parent, *owner)
            elif p.is_symlink() and rng.random() < 0.5:
                os.chown(p, *owner, follow_symlinks=False)
            else:  # the owner first: a chown after the mode would clear its set-id bit
                os.chown(p, *owner)
                os.chmod(p, rng.choice((0o600, 0o644, 0o751, 0o4755, 0o2755)))
        elif kind == 12:
            times = (rng.randrange(1 << 50), rng.randrange(1 << 50))
            if rng.random() < 0.25:
                os.utime(p.parent, ns=times)
            else:
                os.utime(p, ns=times, follow_symlinks=not p.is_symlink() or rng.random() < 0.5)
        elif kind == 13:
            if rng.random() < 0.5:
                os.setxattr(p, f"user.k{rng.randrange(3)}", rng.randbytes(rng.randrange(60)))
            else:
                os.removexattr(p, f"user.k{rng.randrange(3)}")
        elif kind == 14:
            d = self.root / rng.choice(DIRS[1:]) / f"d{rng.randrange(3)}"
            if rng.random() < 0.5:
                d.mkdir(parents=True)
            else:
                d.rmdir()
        else:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)  # closes a data set
            finally:
                os.close(fd)

    def sqlite_commit(self) -> None:
        if self.db is None:
            self.db = sqlite3.connect(self.root / "app.db", timeout=30)
            self.db.execute("pragma journal_mode=wal")
            self.db.execute("pragma synchronous=full")
            self.db.execute("create table if not exists t(id integer primary key, v blob)")
            self.db.commit()
        try:
            self.db.execute("insert into t(id, v) values (?, ?)",
                            (self.committed + 1,
                             self.rng.randbytes(self.rng.randrange(10, 3000))))
            self.db.commit()
        except sqlite3.IntegrityError:
            if not self.unsure:
                raise
            self.committed += 1  # the commit that failed was made all the same
            self.unsure = False
            return
        except BaseException:
            self.unsure = True
            raise
        self.committed += 1
        self.unsure = False

    def git_commit(self) -> None:
        repo = self.root / "repo"
        env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
        if not self.git_ready:
            repo.mkdir(exist_ok=True)
            subprocess.run([*self.git, "init", "-q", str(repo)], check=True, env=env,
                           capture_output=True)
            if self.fsync_git:  # init syncs none of what it writes: HEAD, config...
                for path in [repo / ".git", *(repo / ".git").rglob("*")]:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            self.git_ready = True
        (repo / f"file{self.rng.randrange(5)}").write_bytes(self.rng.randbytes(500))
        subprocess.run([*self.git, "-C", str(repo), "add", "-A"], check=True, env=env,
                       capture_output=True)
        subprocess.run([*self.git, "-C", str(repo), "commit", "-qm", f"c{self.git_commits}"],
                       check=True, env=env, capture_output=True)
        self.git_commits += 1
        if self.git_commits % 8 == 0:
            subprocess.run([*self.git, "-C", str(repo), "repack", "-adq"], check=True, env=env,
                           capture_output=True)
