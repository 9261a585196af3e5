"""A token bucket: the sender's cap on bytes a second (``--max-rate``), for links
shared with other traffic, and the pace of the secondary's apply batches.

Tokens accrue at ``rate`` a second up to ``burst``. A send (or a batch)
takes them, and one that takes more than what is there runs the bucket
into debt and waits until the debt is paid back. So the rate holds on
average over any span longer than one send, and one send is never split or
refused, however large. The sender keeps each send to a tenth of a second's
worth (see ``chunk``), so the rate also holds over short spans.
"""

from __future__ import annotations

import trio

BURST_SECONDS = 0.1  # a sender idle for a while may send this long at full speed


class TokenBucket:
    def __init__(self, rate: float, burst_seconds: float = BURST_SECONDS) -> None:
        """*rate* tokens a second; an idle bucket fills up to *burst_seconds* of them."""
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = rate
        self.burst = rate * burst_seconds
        self._tokens = self.burst
        self._at = trio.current_time()
        self.waited = 0.0  # seconds spent waiting for tokens, in all

    @property
    def chunk(self) -> int:
        """How many bytes one send should carry at most: a tenth of a second's worth."""
        return max(1, int(self.rate * BURST_SECONDS))

    async def take(self, n: int) -> None:
        """Take *n* bytes' worth of tokens, waiting as long as the rate requires.

        Cancelled while waiting, the tokens are still taken (the bytes were about
        to go out): a new session starts no faster than the cap.
        """
        now = trio.current_time()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate) - n
        self._at = now
        if self._tokens < 0:
            delay = -self._tokens / self.rate
            self.waited += delay
            await trio.sleep(delay)  # the pacing itself, not a wait for an event
