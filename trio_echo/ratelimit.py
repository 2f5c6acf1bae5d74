"""Token buckets (pure): rates of connections per source, of echoed bytes per connection, and of
datagrams and their bytes per source (UDP echo)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
MAX_SOURCES = 4096  # per-source buckets kept before idle (full) ones are dropped


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; starts full.

    ``take`` is for all-or-nothing admissions (a connection either gets a token or is refused);
    ``debit`` is for flows that already happened (bytes echoed): the balance may go negative, and
    ``delay`` says how long until it is back to zero.
    """

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be > 0")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Take ``amount`` tokens if there are that many; False (and nothing taken) otherwise."""
        self._refill(now)
        if self.tokens >= amount:
            self.tokens -= amount
            return True
        return False

    def debit(self, now: float, amount: float) -> float:
        """Spend ``amount`` tokens, going into debt if need be; return the delay until out of debt."""
        self._refill(now)
        self.tokens -= amount
        return self.delay(now)

    def delay(self, now: float) -> float:
        """Seconds from ``now`` until the balance is back to zero (0 if it is not negative)."""
        self._refill(now)
        return -self.tokens / self.rate if self.tokens < 0 else 0.0

    def is_full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


class SourceTable(Generic[T]):
    """Per-source state (token buckets) with a bound, for tables keyed by client address.

    ``make(now)`` builds a new source's state; ``idle(state, now)`` says it is indistinguishable from a
    new one (its buckets have refilled), so it may be dropped. Past ``limit`` sources the idle ones are
    dropped, at most once a second, and while all of them are still active a new source gets ``None``:
    a flood from ever-new (or forged) addresses costs neither unbounded memory nor a scan per attempt.
    """

    def __init__(
        self, make: Callable[[float], T], idle: Callable[[T, float], bool], limit: int = MAX_SOURCES
    ) -> None:
        self._make = make
        self._idle = idle
        self._limit = limit
        self._items: dict[str, T] = {}
        self._next_prune = -math.inf

    def get(self, source: str, now: float) -> T | None:
        """The source's state (made now if new), or None when the table is full of active sources."""
        item = self._items.get(source)
        if item is None:
            if len(self._items) >= self._limit:
                if now >= self._next_prune:
                    self._next_prune = now + 1.0
                    for stale in [key for key, value in self._items.items() if self._idle(value, now)]:
                        del self._items[stale]
                if len(self._items) >= self._limit:
                    return None
            item = self._items[source] = self._make(now)
        return item

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


BucketPair = tuple[TokenBucket | None, TokenBucket | None]


class SourceBudget:
    """Per-source datagram and byte budgets for UDP echo, so the service cannot be aimed at a victim
    whose address a sender forges: each source gets at most ``datagrams_per_second`` and
    ``bytes_per_second`` (each 0 = unlimited), with one second's worth as burst.

    :meth:`allow` is asked once per datagram and answers ``None`` or the drop reason: ``rate`` (too
    many datagrams, or no room for a new source) or ``bandwidth`` (too many bytes). A datagram that is
    dropped costs nothing.
    """

    def __init__(self, datagrams_per_second: float, bytes_per_second: int) -> None:
        self.datagrams_per_second = datagrams_per_second
        self.bytes_per_second = bytes_per_second
        self._buckets: SourceTable[BucketPair] = SourceTable(self._new_pair, _idle)

    @property
    def enabled(self) -> bool:
        return bool(self.datagrams_per_second or self.bytes_per_second)

    def _new_pair(self, now: float) -> BucketPair:
        rate, volume = self.datagrams_per_second, self.bytes_per_second
        return (
            TokenBucket(rate, max(1.0, rate), now) if rate else None,
            TokenBucket(volume, volume, now) if volume else None,
        )

    def allow(self, source: str, size: int, now: float) -> str | None:
        if not self.enabled:
            return None
        buckets = self._buckets.get(source, now)
        if buckets is None:
            return "rate"
        count, size_bucket = buckets
        if count is not None and not count.take(now):
            return "rate"
        if size_bucket is not None and not size_bucket.take(now, size):
            if count is not None:
                count.tokens += 1  # the datagram was not echoed: give its token back
            return "bandwidth"
        return None

    def __len__(self) -> int:
        return len(self._buckets)


def _idle(pair: BucketPair, now: float) -> bool:
    return all(bucket is None or bucket.is_full(now) for bucket in pair)
