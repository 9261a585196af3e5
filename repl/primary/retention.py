"""What the journal keeps, and for which secondary, when there are several.

Each secondary reads the journal from its own place (its own Sender), so
the journal keeps a set until every secondary that *pins* it has applied
it. A secondary pins the journal while its backlog is within the budget
(``journal_max``). One whose backlog passes the budget while another one
is still within it is *dropped*: it pins nothing any more, so the others
(and the application) go on as if it were not there, and the records
trimmed that it had not applied are folded into what it *missed*: the
paths, and for files only written the byte ranges, as a Divergence
(repl/diverge.py). When it is back, it gets just those paths, read from
the backing directory, as one set (the rejoin path, repl/primary/snapshot.py
``Snapshot.paths``), not the whole tree. Past MISSED_PATHS paths it gets
the whole tree instead (an initial sync).

When every secondary is past the budget (always the case with one), the
journal's own overflow takes over instead (repl/primary/resync.py): the dirty map.
With no secondary at all, the oldest sets are dropped past the budget.

A set is trimmed once every pinning secondary applied it and BACKING holds
it durably (``backing_at``, repl/primary/capture.py). Until every pinning secondary
applied it, the time it closed is kept too, for the lag shown in status.

All of it survives a restart of the primary: each secondary's last applied
set and whether it was dropped are one meta value of the journal
(``followers``), and what a dropped one missed is one meta value per path,
so a fold writes only what changed.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from repl.diverge import Divergence
from store.journal import Journal
from store.records import decode_ranges, encode_ranges

log = logging.getLogger("replfs.retention")

_FOLLOWERS = b"followers"
_MISSED = b"missed\0"  # + address + b"\0" + b"c" (a content path) or b"r" (ranges) + path
# Past this many paths, what a dropped secondary missed is the whole tree: one initial
# sync then costs less than keeping (and later walking) that many names.
MISSED_PATHS = 10_000


@dataclass
class Follower:
    applied: int = 0  # the last set it reported applied (0: never heard of)
    dropped: bool = False
    missed: Divergence = field(default_factory=Divergence)  # only while dropped


class Retention:
    """The secondaries of one journal, as the journal's trimming sees them.

    Called by capture under its lock; nothing here blocks on anything but the
    journal's own reads.
    """

    def __init__(self, journal: Journal, addresses: Iterable[str]) -> None:
        """Read what the journal says of *addresses*; writes nothing (a recovery that
        follows tells the journal's last record from what was appended after it)."""
        self.journal = journal
        self.followers: dict[str, Follower] = {}
        # set -> when it closed (time.monotonic), oldest first: the sets not yet
        # applied by every secondary that pins the journal (consecutive ids).
        self.closed_times: OrderedDict[int, float] = OrderedDict()
        self._stale: list[bytes] = []  # entries of secondaries no longer configured
        saved = _load_json(journal.get_meta(_FOLLOWERS))
        for address in addresses:
            entry = saved.get(address, {})
            applied = entry.get("applied", 0)
            self.followers[address] = Follower(applied if type(applied) is int else 0,
                                               entry.get("dropped") is True)
        for key, value in journal.meta_items(_MISSED):
            name, _, rest = key[len(_MISSED):].partition(b"\0")
            follower = self.followers.get(name.decode())
            if follower is None or not follower.dropped:
                self._stale.append(key)
            elif rest[:1] == b"c":
                follower.missed.content.add(rest[1:])
            else:
                follower.missed.ranges[rest[1:]] = decode_ranges(value)

    def add(self, address: str) -> None:
        """A secondary joins; it pins everything until it says what it applied."""
        if address not in self.followers:
            self.followers[address] = Follower()
            self._save()

    def pinning(self) -> dict[str, int]:
        """The secondaries the journal keeps records for, with their applied sets."""
        return {a: f.applied for a, f in self.followers.items() if not f.dropped}

    def slowest(self) -> int | None:
        """The set up to which every pinning secondary applied (None: nobody pins)."""
        return min(self.pinning().values(), default=None)

    def fastest(self) -> int | None:
        """The most advanced pinning secondary's applied set."""
        return max(self.pinning().values(), default=None)

    def is_dropped(self, address: str) -> bool:
        follower = self.followers.get(address)
        return follower is not None and follower.dropped

    def report(self, address: str, applied: int) -> None:
        """*address* applied *applied* (a dropped one is told to come back anew)."""
        follower = self.followers.get(address)
        if follower is not None and not follower.dropped:
            follower.applied = applied

    def past_budget(self, journal_max: int) -> list[str]:
        """The pinning secondaries whose backlog is over *journal_max* bytes."""
        slowest = self.slowest()
        if slowest is None or self._backlog(slowest) <= journal_max:
            return []
        return [a for a, applied in self.pinning().items()
                if self._backlog(applied) > journal_max]

    def all_past_budget(self, journal_max: int, backing_at: int) -> bool:
        """The journal is over *journal_max*: drop the secondaries past it if another
        one is within it (then trim, up to *backing_at*). True if every pinning
        secondary is past it (the dirty map takes over: repl/primary/resync.py)."""
        behind = self.past_budget(journal_max)
        if not behind:
            return False
        if len(behind) < len(self.pinning()):
            self.drop(behind)
            self.trim(backing_at)
            return False
        return True

    def _backlog(self, applied: int) -> int:
        return self.journal.bytes_after(applied) - self.journal.set_bytes

    def drop(self, addresses: list[str]) -> None:
        """Let the journal go on without *addresses*: from now on the records they did
        not apply are folded into what they missed as they are trimmed."""
        for address in addresses:
            follower = self.followers[address]
            follower.dropped, follower.missed = True, Divergence()
            log.warning("secondary %s is past the journal's budget at set %d; the others "
                        "go on, and it gets what it missed as one set when it is back",
                        address, follower.applied)
        self._save()

    def attach(self, address: str, applied: int) -> None:
        """*address* streams from the set after *applied* again (it pins the journal)."""
        follower = self.followers.setdefault(address, Follower())
        if follower.dropped:
            self._forget_missed(address, follower)
        follower.applied, follower.dropped = applied, False
        self._save()

    def missed_since(self, address: str, applied: int) -> Divergence | None:
        """What *address*, which reports *applied*, must get to be level with the open
        set, if it was dropped at or before *applied*; else None (it needs it all)."""
        follower = self.followers.get(address)
        if follower is None or not follower.dropped or applied < follower.applied:
            return None
        if follower.missed.whole_tree:
            return None  # too much to name: the whole tree
        div = Divergence().update(follower.missed)
        return div.add(self.journal.records(follower.applied + 1))

    def fold(self, upto: int) -> None:
        """The journal is about to drop every set through *upto*: fold their records
        into what each dropped secondary missed (only sets after its applied one)."""
        dropped = {a: f for a, f in self.followers.items() if f.dropped}
        first = self.journal.first_set()
        if not dropped or first is None or first > upto:
            return
        changed: dict[str, tuple[set[bytes], set[bytes]]] = {a: (set(), set()) for a in dropped}
        for record in self.journal.records(first):
            if record.set > upto:
                break
            for address, follower in dropped.items():
                if record.set <= follower.applied or follower.missed.whole_tree:
                    continue  # not its to miss, or it gets the whole tree anyway
                follower.missed.add([record])
                content, ranges = changed[address]
                (content if record.path in follower.missed.content else ranges).add(record.path)
                if record.path2:
                    content.add(record.path2)
        for address, (content, ranges) in changed.items():
            self._persist_missed(address, dropped[address], content, ranges)

    def _persist_missed(self, address: str, follower: Follower, content: set[bytes],
                        ranges: set[bytes]) -> None:
        """Journal the entries of what *address* missed that changed (*content* and
        *ranges* paths), or, past MISSED_PATHS or after a RESET, the whole tree."""
        missed = follower.missed
        prefix = _MISSED + address.encode() + b"\0"
        if missed.whole_tree or len(missed.content) + len(missed.ranges) > MISSED_PATHS:
            if missed.content != {b""} or missed.ranges:  # not yet the whole tree alone
                if not missed.whole_tree:
                    log.warning("secondary %s missed more than %d paths: it gets the whole "
                                "tree when it is back", address, MISSED_PATHS)
                self._forget_missed(address, follower)
                missed.content.add(b"")
                self.journal.put_meta(prefix + b"c", b"")
            return
        for path in content:
            if path in missed.content:
                self.journal.put_meta(prefix + b"c" + path, b"")
        for path in ranges:
            if path in missed.ranges and path not in missed.content:
                self.journal.put_meta(prefix + b"r" + path, encode_ranges(missed.ranges[path]))

    def _forget_missed(self, address: str, follower: Follower) -> None:
        prefix = _MISSED + address.encode() + b"\0"
        for key, _ in list(self.journal.meta_items(prefix)):
            self.journal.put_meta(key, None)
        follower.missed.content.clear()
        follower.missed.ranges.clear()

    def closed(self, set_id: int, at: float) -> None:
        """Set *set_id* closed at *at* (time.monotonic)."""
        self.closed_times[set_id] = at
        if len(self.closed_times) > 100_000:  # nobody is applying: forget the oldest
            self.closed_times.popitem(last=False)

    def forget_closed(self) -> None:
        """Forget when the sets every pinning secondary applied closed."""
        slowest = self.slowest()
        while (slowest is not None and self.closed_times
               and next(iter(self.closed_times)) <= slowest):
            self.closed_times.popitem(last=False)

    def lag_seconds(self, applied: int) -> float:
        """How long the oldest closed set after *applied* has waited."""
        if not self.closed_times:
            return 0.0
        first = next(iter(self.closed_times))
        closed_at = self.closed_times.get(max(applied + 1, first))  # ids are consecutive
        return 0.0 if closed_at is None else time.monotonic() - closed_at

    def trim(self, backing_at: int) -> None:
        """Drop what every pinning secondary applied and BACKING holds durably (the
        records before log position *backing_at*)."""
        slowest = self.slowest()
        if slowest is None:
            return
        upto = min(slowest, self.journal.sets_before(backing_at))
        if upto >= (self.journal.first_set() or upto + 1):
            self.fold(upto)
            self.journal.trim(upto)
            self.save()

    def drop_oldest(self, journal_max: int, backing_at: int) -> None:
        """With nobody to send to, keep the journal within *journal_max* by dropping old
        sets that BACKING holds durably (before log position *backing_at*)."""
        while self.journal.bytes > journal_max:
            first = self.journal.first_set()
            if first is None or first >= self.journal.set - 1 \
                    or first > self.journal.sets_before(backing_at):
                return
            self.journal.trim(first)

    def save(self) -> None:
        """Keep each secondary's applied set in the journal (with a trim: cheap)."""
        self._save()

    def _save(self) -> None:
        for key in self._stale:
            self.journal.put_meta(key, None)
        self._stale.clear()
        value = json.dumps({a: {"applied": f.applied, "dropped": f.dropped}
                            for a, f in sorted(self.followers.items())},
                           sort_keys=True).encode()
        if self.journal.get_meta(_FOLLOWERS) != value:
            self.journal.put_meta(_FOLLOWERS, value)

    def status(self, address: str) -> dict[str, object]:
        follower = self.followers.get(address, Follower())
        out: dict[str, object] = {"dropped": follower.dropped}
        if follower.dropped:
            out["missed_paths"] = ("all" if follower.missed.whole_tree else
                                   len(follower.missed.content) + len(follower.missed.ranges))
        return out


def _load_json(raw: bytes | None) -> dict[str, dict[str, object]]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        log.warning("the journal's followers entry is not JSON; starting afresh")
        return {}
    return value if isinstance(value, dict) else {}
