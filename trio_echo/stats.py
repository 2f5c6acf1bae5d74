"""Counters and the live connection table (pure).

The pump never touches this module per chunk: a connection's byte counts live in its echo session
(which its table entry extends) and are read here on demand, and closed connections fold theirs
into the totals once. Readers (admin channel, metrics, systemd STATUS) take :meth:`Stats.snapshot`.
"""

from __future__ import annotations

import collections
from typing import NotRequired, Protocol, TypedDict, Unpack

import attrs

from .echo import EchoSession
from .faults import ConnectionFaults
from .reasons import Reason


class Handle(Protocol):
    """What the table needs of a connection's I/O side."""

    @property
    def stream(self) -> object:
        """The client stream or socket (I/O code reports on it: TCP_INFO)."""

    def close(self, reason: Reason) -> None: ...

    @property
    def faults(self) -> ConnectionFaults | None:
        """The connection's faults, if any (the admin list shows their keys)."""

    def set_faults(self, faults: ConnectionFaults | None) -> None: ...


class SessionOptions(TypedDict):
    """The echo session's settings, as keyword arguments (see :class:`~trio_echo.echo.EchoSession`)."""

    buffer_size: int
    greeting: NotRequired[bytes]
    farewell: NotRequired[bytes]


class ConnectionInfo(EchoSession):
    """One live connection: its echo session (whose byte counts the table shows) plus who it is.

    One object rather than a table entry pointing at a session: every idle connection saves an object.
    ``handle.close(reason)`` asks its task to close it (admin kick, drain); ``handle.stream`` is the
    stream, for I/O code that reports on the socket (TCP_INFO).
    """

    __slots__ = ("handle", "id", "ip", "listener", "opened", "peer", "proxy")

    def __init__(
        self, id: int, peer: str, listener: str, opened: float, **session: Unpack[SessionOptions]
    ) -> None:
        super().__init__(session["buffer_size"], session.get("greeting", b""), session.get("farewell", b""))
        self.id = id
        self.peer = peer
        self.listener = listener
        self.opened = opened
        self.handle: Handle | None = None
        self.ip: str | None = None  # the client's IP (None for a Unix peer): what admission counted
        self.proxy = ""  # the load balancer it came through (PROXY protocol listeners), else empty


@attrs.define
class ListenerStats:
    active: int = 0
    total: int = 0


@attrs.define
class DatagramCounts:
    """One UDP listener's traffic (its echo loop adds to these per datagram)."""

    received: int = 0
    echoed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@attrs.define
class Stats:
    """Everything counted since start. ``now`` values come from the caller's clock."""

    started: float
    connections: dict[int, ConnectionInfo] = attrs.field(factory=dict)
    listeners: dict[str, ListenerStats] = attrs.field(factory=lambda: collections.defaultdict(ListenerStats))
    total: int = 0
    closed: collections.Counter[str] = attrs.field(factory=collections.Counter)
    refused: collections.Counter[str] = attrs.field(factory=collections.Counter)
    health_checks: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """Per listener: PROXY v2 LOCAL connections (a load balancer checking on us, not a client)."""
    closed_bytes_in: int = 0
    closed_bytes_out: int = 0
    datagrams: dict[str, DatagramCounts] = attrs.field(
        factory=lambda: collections.defaultdict(DatagramCounts)
    )
    dropped: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """UDP datagrams received but not echoed, by reason."""
    faults: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """Faults applied on purpose, by kind (``fault.applied`` events)."""
    http_requests: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """Web listeners: answers sent, by status (``101`` for each WebSocket opened)."""
    websocket_messages: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """Web listeners: WebSocket messages echoed, by kind (``text``, ``binary``)."""
    _next_id: int = 1

    def open(
        self, *, peer: str, listener: str, now: float, **session: Unpack[SessionOptions]
    ) -> ConnectionInfo:
        """Register a new connection and return its table entry, which is also its echo session (ids
        start at 1, never reused)."""
        info = ConnectionInfo(self._next_id, peer, listener, now, **session)
        self._next_id += 1
        self.connections[info.id] = info
        self.total += 1
        counts = self.listeners[listener]
        counts.active += 1
        counts.total += 1
        return info

    def close(self, info: ConnectionInfo, reason: str) -> None:
        """Remove a connection from the table, folding its bytes into the totals."""
        if self.connections.pop(info.id, None) is None:
            return
        # The entry and its connection point at each other (handle, session): drop the link so both
        # are freed when the task ends, not at the garbage collector's next full pass. Left to the
        # collector, 19,000 closed connections stayed in memory and made every later round trip
        # ~30 % dearer (docs/performance.md).
        info.handle = None
        self.closed[reason] += 1
        self.closed_bytes_in += info.bytes_in
        self.closed_bytes_out += info.bytes_out
        self.listeners[info.listener].active -= 1

    def refuse(self, reason: str) -> None:
        self.refused[reason] += 1

    @property
    def active(self) -> int:
        return len(self.connections)

    @property
    def bytes_in(self) -> int:
        live = sum(c.bytes_in for c in self.connections.values())
        return self.closed_bytes_in + live + sum(d.bytes_in for d in self.datagrams.values())

    @property
    def bytes_out(self) -> int:
        live = sum(c.bytes_out for c in self.connections.values())
        return self.closed_bytes_out + live + sum(d.bytes_out for d in self.datagrams.values())

    def snapshot(self, now: float) -> dict[str, object]:
        """Live counts in the shape of the admin ``stats`` message (without its ``type``)."""
        return {
            "connections": {
                "active": self.active,
                "total": self.total,
                "refused": sum(self.refused.values()),
            },
            "bytes": {"in": self.bytes_in, "out": self.bytes_out},
            "listeners": [
                {"address": name, "active": counts.active} for name, counts in self.listeners.items()
            ],
            "uptime": max(0.0, now - self.started),
        }
