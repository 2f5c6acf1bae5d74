"""Restart policy math for the supervisor (pure): who is restarted, when, and when to give up.

OTP semantics (Erlang's ``supervisor``): a *permanent* child is always restarted, a *transient* one only
after an abnormal exit (an exception), a *temporary* one never. A cancelled child (its scope was
cancelled from outside, OTP's ``shutdown``) counts as a normal exit. The supervisor allows at most
``max_restarts`` restarts within a sliding ``period``; the next failure escalates. Each restart waits an
exponential backoff that grows with the child's own recent restarts.
"""

from __future__ import annotations

import collections
import enum

import attrs


class Restart(enum.Enum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


class Strategy(enum.Enum):
    ONE_FOR_ONE = "one_for_one"  # restart only the child that exited
    ONE_FOR_ALL = "one_for_all"  # stop every other child, then restart them all


class ExitKind(enum.Enum):
    NORMAL = "normal"  # the child returned
    ERROR = "error"  # the child raised
    CANCELLED = "cancelled"  # the child's own cancel scope was cancelled from outside


def should_restart(restart: Restart, exit_kind: ExitKind) -> bool:
    """The OTP restart decision for one child exit."""
    if restart is Restart.PERMANENT:
        return True
    if restart is Restart.TRANSIENT:
        return exit_kind is ExitKind.ERROR
    return False


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Delay before restart number ``attempt`` (1-based): ``initial * 2**(attempt-1)``, capped."""
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    # min() before the power keeps the exponent small enough never to overflow a float.
    return min(maximum, initial * 2.0 ** min(attempt - 1, 64))


@attrs.define
class SlidingWindow:
    """Timestamps of events within the last ``period`` seconds."""

    period: float
    _times: collections.deque[float] = attrs.field(factory=collections.deque, init=False)

    def count(self, now: float) -> int:
        """Events in ``(now - period, now]``."""
        horizon = now - self.period
        while self._times and self._times[0] <= horizon:
            self._times.popleft()
        return len(self._times)

    def add(self, now: float) -> int:
        """Record an event at ``now``; return the count in the window including it."""
        self.count(now)
        self._times.append(now)
        return len(self._times)


@attrs.define
class RestartIntensity:
    """The supervisor-wide restart budget: ``max_restarts`` within ``period`` seconds."""

    max_restarts: int
    period: float
    _window: SlidingWindow = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._window = SlidingWindow(self.period)

    def allow(self, now: float) -> bool:
        """Record a restart at ``now`` if the budget has room; False means escalate."""
        if self._window.count(now) >= self.max_restarts:
            return False
        self._window.add(now)
        return True
