"""Faults on purpose: what a misbehaving echo does to each chunk and datagram (pure).

A :class:`FaultPlan` is one profile in force on one listener (from its ``faults = "NAME"`` or the
admin channel's ``set_faults``). It decides which new connections the profile applies to and gives
each one its own :class:`ConnectionFaults`, with its own random stream drawn from the plan's, so a
fixed ``seed`` replays the same decisions for the same sequence of connections. The I/O side
(:mod:`trio_echo.faulted` for streams, :mod:`trio_echo.datagrams` for UDP) asks, acts, and reports
each applied fault back for the trace event and the counter.

Kinds are the profile keys that did something (``jitter`` counts as ``latency``); a connection's
shaping kinds (``latency``, ``bandwidth``, ``slice``) are reported once per connection, everything
else each time it happens.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import random
from collections.abc import Callable, Mapping
from typing import Any

from .config import FaultProfile

REORDER_WAIT = 0.05  # UDP: a held-back datagram goes out after at most this long without a successor
MAX_DELAYED_DATAGRAMS = 1024  # UDP: datagrams waiting for their latency; more are dropped


class Ending(enum.Enum):
    """What a byte threshold does to the connection once the bytes before it have been echoed."""

    RESET = "reset_after_bytes"
    CLOSE = "close_after_bytes"
    STALL = "stall_after_bytes"
    BLACKHOLE = "blackhole"  # set live: stop reading and echoing at once


# Connection-wide shaping: reported the first time each acts on a connection, not per chunk.
SHAPING = frozenset({"latency", "bandwidth", "slice"})


class FaultPlan:
    """One named profile in force on one listener; the source of every connection's faults."""

    def __init__(self, name: str, profile: FaultProfile) -> None:
        self.name = name
        self.profile = profile
        self._rng = random.Random(profile.seed or None)

    def describe(self) -> dict[str, object]:
        """What the admin channel shows: the name (``""`` for an inline profile) and its set keys."""
        return {"name": self.name, **self.profile.to_dict()}

    def draw(self) -> ConnectionFaults | None:
        """The faults of the next new connection, or None if the profile's ``probability`` spares it."""
        profile = self.profile
        if profile.probability < 1.0 and self._rng.random() >= profile.probability:
            return None
        return ConnectionFaults(profile, random.Random(self._rng.getrandbits(64)))

    def for_connection(self) -> ConnectionFaults:
        """Faults for one chosen open connection (``set_faults`` by id: ``probability`` does not
        spare it)."""
        return ConnectionFaults(self.profile, random.Random(self._rng.getrandbits(64)))

    def datagrams(self) -> DatagramFaults:
        """The UDP shaper of one socket of this listener."""
        return DatagramFaults(self.profile, random.Random(self._rng.getrandbits(64)))


def plan_for(spec: str | FaultProfile | None, profiles: Mapping[str, FaultProfile]) -> FaultPlan | None:
    """The plan a ``set_faults`` spec names: a profile of ``profiles`` by name, an inline profile
    (named ``""``), or None.

    Raises:
        LookupError: no profile by that name (the message names the known ones).
    """
    if spec is None:
        return None
    if isinstance(spec, FaultProfile):
        return FaultPlan("", spec)
    if spec not in profiles:
        known = ", ".join(profiles) or "none defined"
        raise LookupError(f"no [faults.{spec}] profile ({known})")
    return FaultPlan(spec, profiles[spec])


class ConnectionFaults:
    """The faults of one stream connection: what to read, when to echo, what to change, when to end.

    Byte counts start when the profile is applied (at accept, or live from the admin channel).
    """

    __slots__ = ("_last_due", "_reported", "echoed", "on_change", "profile", "reset", "rng", "taken")

    def __init__(self, profile: FaultProfile, rng: random.Random) -> None:
        self.profile = profile
        self.rng = rng
        self.taken = 0  # bytes read for echo under this profile
        self.echoed = 0  # bytes echoed under this profile
        self.reset = False  # the connection is to end with RST rather than FIN
        self._last_due = 0.0
        self._reported: set[str] = set()
        self.on_change: Callable[[], None] | None = None  # the pump's, told when :meth:`become` runs

    @classmethod
    def none(cls) -> ConnectionFaults:
        """No faults (what ``set_faults`` with null leaves on a connection already faulted)."""
        return cls(FaultProfile(), random.Random(0))

    def become(self, other: ConnectionFaults) -> None:
        """Take ``other``'s profile from now on (set live on a connection already faulted): counts
        start again, and the pump is told so it re-reads the profile."""
        self.profile = other.profile
        self.rng = other.rng
        self.taken = self.echoed = 0
        self._reported.clear()
        if self.on_change is not None:
            self.on_change()

    def first(self, kind: str) -> bool:
        """Whether ``kind`` acts on this connection for the first time (shaping kinds are reported
        once per connection)."""
        if kind in self._reported:
            return False
        self._reported.add(kind)
        return True

    def _thresholds(self) -> list[tuple[int, Ending]]:
        profile = self.profile
        marks = [
            (profile.reset_after_bytes, Ending.RESET),
            (profile.close_after_bytes, Ending.CLOSE),
            (profile.stall_after_bytes, Ending.STALL),
        ]
        return [(count, ending) for count, ending in marks if count]

    def read_limit(self, room: int) -> int:
        """How many bytes the next read may take, of ``room``: never past a byte threshold, so the
        client gets exactly that many before the connection resets, closes or stalls. 0: read no more."""
        for count, _ in self._thresholds():
            room = min(room, max(0, count - self.taken))
        return room

    def took(self, count: int) -> None:
        self.taken += count

    def due(self, now: float) -> float:
        """When a chunk read ``now`` is to be echoed: ``latency`` +- ``jitter`` later, never before the
        chunk ahead of it (order is kept)."""
        self._last_due = max(self._last_due, now + _delay(self.profile, self.rng))
        return self._last_due

    def corrupt(self, chunk: bytes | bytearray | memoryview) -> tuple[bytes | bytearray | memoryview, int]:
        """The chunk to echo and the index of the byte changed in it (-1: none). Exactly one byte
        differs in a corrupted chunk."""
        probability = self.profile.corrupt
        if not chunk or not probability or self.rng.random() >= probability:
            return chunk, -1
        return _flip_one(chunk, self.rng)

    def pieces(self, size: int) -> list[tuple[int, int]]:
        """``(start, end)`` of each write of a ``size``-byte echo: at most ``slice`` bytes each."""
        step = self.profile.slice or size
        return [(start, min(start + step, size)) for start in range(0, size, step)]

    def echoed_now(self, count: int) -> Ending | None:
        """Record ``count`` bytes echoed; the threshold reached, if any (reset before close before
        stall when several fall on the same byte)."""
        self.echoed += count
        reached = [(mark, ending) for mark, ending in self._thresholds() if self.echoed >= mark]
        return min(reached, key=lambda item: (item[0], list(Ending).index(item[1])))[1] if reached else None


class DatagramFaults:
    """UDP faults of one socket: which datagrams are lost, changed, doubled, held back or delayed.

    :meth:`shape` takes each received datagram and queues what is to be sent for it; :meth:`due_now`
    hands back what may go out now, in order; :attr:`next_due` says when to look again. At most
    ``MAX_DELAYED_DATAGRAMS`` wait at once (more are dropped: memory stays bounded).
    """

    def __init__(self, profile: FaultProfile, rng: random.Random) -> None:
        self.profile = profile
        self.rng = rng
        self._queue: list[tuple[float, int, bytes, object]] = []  # (due, order, datagram, peer)
        self._order = itertools.count()
        self._held: list[tuple[bytes, object, float]] = []  # reorder: each waits for the next datagram
        self._last_due = 0.0

    def _chance(self, probability: float) -> bool:
        return bool(probability) and self.rng.random() < probability

    def shape(self, datagram: bytes, peer: object, now: float) -> list[str]:
        """Queue what to echo for ``datagram`` from ``peer``; the kinds applied (``loss`` means nothing
        is sent; ``overflow`` that the delay queue was full and it was dropped)."""
        profile = self.profile
        if profile.probability < 1.0 and self.rng.random() >= profile.probability:
            self._push(now, datagram, peer)
            return []
        if self._chance(profile.loss):
            return ["loss"]
        kinds = []
        if self._chance(profile.corrupt) and datagram:
            datagram = bytes(_flip_one(datagram, self.rng)[0])
            kinds.append("corrupt")
        due = max(self._last_due, now + _delay(profile, self.rng))
        if len(self) >= MAX_DELAYED_DATAGRAMS:
            return [*kinds, "overflow"]
        if self._chance(profile.reorder):
            self._held.append((datagram, peer, due + REORDER_WAIT))
            return [*kinds, "reorder"]
        self._last_due = due
        self._push(due, datagram, peer)
        if self._chance(profile.duplicate):
            self._push(due, datagram, peer)
            kinds.append("duplicate")
        for held, held_peer, _ in self._held:  # the datagrams held back go right after this one
            self._push(due, held, held_peer)
        self._held.clear()
        return kinds

    def _push(self, due: float, datagram: bytes, peer: object) -> None:
        heapq.heappush(self._queue, (due, next(self._order), datagram, peer))

    @property
    def next_due(self) -> float:
        """When the next queued or held datagram may go out (``inf``: nothing waits)."""
        due = self._queue[0][0] if self._queue else float("inf")
        return min(due, self._held[0][2]) if self._held else due

    def due_now(self, now: float) -> list[tuple[bytes, Any]]:
        """The datagrams whose time has come, in the order they are to be sent."""
        if self._held and self._held[0][2] <= now:  # no successor came: send them anyway
            for held, peer, due in self._held:
                self._push(due, held, peer)
            self._held.clear()
        out = []
        while self._queue and self._queue[0][0] <= now:
            _, _, datagram, peer = heapq.heappop(self._queue)
            out.append((datagram, peer))
        return out

    def __len__(self) -> int:
        return len(self._queue) + len(self._held)


def _delay(profile: FaultProfile, rng: random.Random) -> float:
    """``latency`` +- uniform ``jitter``, never below 0."""
    if not profile.jitter:
        return profile.latency
    return max(0.0, profile.latency + rng.uniform(-profile.jitter, profile.jitter))


def _flip_one(data: bytes | bytearray | memoryview, rng: random.Random) -> tuple[bytearray, int]:
    """A copy of ``data`` (not empty) with exactly one byte changed, and that byte's index."""
    changed = bytearray(data)
    index = rng.randrange(len(changed))
    changed[index] ^= rng.randrange(1, 256)
    return changed, index
