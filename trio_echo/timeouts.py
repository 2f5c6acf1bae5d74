"""Deadlines of one connection and why they fired (pure).

A connection runs in a cancel scope whose deadline is what limits its current wait (see
``connection.py``): ``idle_timeout`` while it waits for input, ``send_timeout`` while its echo cannot be
written, never past ``max_lifetime``. The socket pump keeps the idle deadline lazily (activity only
records a time), so when its scope fires it asks :func:`expired` whether the limit really passed.
"""

from __future__ import annotations

from .reasons import PHASE_REASON, Phase, Reason


def deadline(now: float, timeout: float, lifetime_deadline: float) -> float:
    """When a wait that started ``now`` and may last ``timeout`` must end (``inf`` = never)."""
    return min(now + timeout, lifetime_deadline)


def expired(
    now: float,
    *,
    close_reason: Reason | None,
    lifetime_deadline: float,
    phase: Phase,
    idle_deadline: float | None = None,
) -> Reason | None:
    """Why a connection's scope was cancelled, or None when it should carry on.

    ``close_reason`` (someone called ``close``) wins, then the lifetime, then the phase's own limit.
    ``idle_deadline`` is given when the idle deadline is kept lazily: a scope that fired while waiting
    for input before ``idle_deadline`` fired early (there was activity since it was set).
    """
    if close_reason is not None:
        return close_reason
    if now >= lifetime_deadline:
        return Reason.LIFETIME
    if phase is Phase.IDLE and idle_deadline is not None and now < idle_deadline:
        return None
    return PHASE_REASON[phase]
