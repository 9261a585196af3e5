"""What one file holds that its disk does not have yet: written pages, its size, its mtime.

The lower file is the disk: what survives a power cut. Until an fsync, a
file's writes, truncates and the size and mtime they give it live here
instead, page by page, and reads see them merged over the lower file.

The model, with the lower file's size as the durable size:

- ``size``: the size a reader sees now;
- ``floor``: the smallest size the file had since its last sync. Below it,
  bytes no pending page covers are the lower file's; from it on they are
  zeros (a truncate cut them off, or they were never written);
- ``pages``: whole PAGE-sized pages as a reader sees them now (bytes past
  ``size`` in the last one are zeros).

``sync()`` writes the state to the lower file. ``cut()`` writes a seeded
part of it, as a power cut after the kernel wrote some of a file's dirty
pages back and not others: each page independently, and the inode (its
size and mtime, and any truncate) as one more coin.
"""

from __future__ import annotations

import os
import random
import time

PAGE = 4096


class Pending:
    def __init__(self, lower: os.stat_result) -> None:
        self.size = self.floor = lower.st_size
        self.mtime_ns = lower.st_mtime_ns
        self.pages: dict[int, bytearray] = {}

    def read(self, fd: int, offset: int, length: int) -> bytes:
        """*length* bytes at *offset* as a reader sees them (short at the end of the file).

        Args:
            fd: the lower file, read where no pending page covers.
        """
        end = min(offset + length, self.size)
        out = bytearray()
        at = offset
        while at < end:
            index, skip = divmod(at, PAGE)
            take = min(PAGE - skip, end - at)
            page = self.pages.get(index)
            out += page[skip : skip + take] if page is not None else self._lower(fd, at, take)
            at += take
        return bytes(out)

    def _lower(self, fd: int, offset: int, length: int) -> bytes:
        """What the lower file gives at *offset*, zeros from ``floor`` on."""
        data = os.pread(fd, max(0, min(length, self.floor - offset)), offset) \
            if offset < self.floor else b""
        return data + bytes(length - len(data))

    def write(self, fd: int, offset: int, data: bytes) -> None:
        """Keep *data* at *offset*; the file grows to its end if it was shorter."""
        at, done = offset, 0
        while done < len(data):
            index, skip = divmod(at, PAGE)
            take = min(PAGE - skip, len(data) - done)
            page = self.pages.get(index)
            if page is None:
                page = self.pages[index] = bytearray(self.read(fd, index * PAGE, PAGE)
                                                     .ljust(PAGE, b"\0"))
            page[skip : skip + take] = data[done : done + take]
            at, done = at + take, done + take
        self.size = max(self.size, offset + len(data))
        self.mtime_ns = time.time_ns()

    def truncate(self, size: int) -> None:
        """Cut the file to *size* or extend it with zeros."""
        if size < self.size:
            last, rest = divmod(size, PAGE)
            for index in [i for i in self.pages if i > last or (i == last and rest == 0)]:
                del self.pages[index]
            if last in self.pages:
                self.pages[last][rest:] = bytes(PAGE - rest)
            self.floor = min(self.floor, size)
        self.size = size
        self.mtime_ns = time.time_ns()

    def zero(self, fd: int, offset: int, length: int) -> None:
        """Zeros over [offset, offset+length) within the file (a punched hole)."""
        end = min(offset + length, self.size)
        if end > offset:
            self.write(fd, offset, bytes(end - offset))

    def sync(self, fd: int) -> None:
        """Write everything to the lower file *fd* (not flushed: the caller fsyncs)."""
        self._apply(fd, True, sorted(self.pages))

    def cut(self, fd: int, rng: random.Random, keep: float) -> int:
        """Write a seeded part to the lower file: each page, and the inode, with
        probability *keep*. Returns how many pages were kept."""
        inode = rng.random() < keep
        kept = [index for index in sorted(self.pages) if rng.random() < keep]
        self._apply(fd, inode, kept)
        return len(kept)

    def _apply(self, fd: int, inode: bool, pages: list[int]) -> None:
        lower = os.fstat(fd)
        size = self.size if inode else lower.st_size
        if inode and self.floor < lower.st_size:
            os.ftruncate(fd, self.floor)
        for index in pages:
            start = index * PAGE
            if start < size:
                os.pwrite(fd, self.pages[index][: min(PAGE, size - start)], start)
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        os.utime(fd, ns=(lower.st_atime_ns, self.mtime_ns if inode else lower.st_mtime_ns))
