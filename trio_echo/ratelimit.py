"""Token buckets (pure): rates of connections per source and of echoed bytes per connection."""

from __future__ import annotations


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
