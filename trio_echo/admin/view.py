"""What the admin port sees of the server: a narrow, structural interface (``typing.Protocol``).

The admin port depends on this, not on ``EchoServer`` (which builds the admin port): dependencies point
down, and anything with these members can be shown and steered, for instance a view that aggregates
several worker processes.
"""

from __future__ import annotations

from typing import Protocol

from trio_echo.reasons import Reason
from trio_echo.stats import Stats
from trio_echo.trace import Tracer

from .metrics import MetricsSnapshot


class ServerView(Protocol):
    """Counts, the connection table, closing one connection, trace subscriptions, readiness."""

    @property
    def stats(self) -> Stats:
        """Counters and the live connection table."""

    @property
    def tracer(self) -> Tracer:
        """Where channels subscribe to trace events (and set the global flags)."""

    @property
    def draining(self) -> bool:
        """True once a stop began (/readyz answers 503)."""

    def listener_descriptions(self) -> list[dict[str, str]]:
        """The bound echo addresses with their transport."""

    def metrics_snapshot(self) -> MetricsSnapshot:
        """The server's counters for /metrics."""

    def close_connection(self, conn_id: int, reason: Reason = ...) -> bool:
        """Close one connection gracefully; False if no such connection is open."""
