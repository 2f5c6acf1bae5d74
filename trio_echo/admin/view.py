"""What the admin port sees of the server: a narrow, structural interface (``typing.Protocol``).

The admin port depends on :class:`ServerView`, not on ``EchoServer`` (which builds the admin port):
dependencies point down. Two things implement it: :class:`LocalView` over one process's server, and
the worker master's view (:mod:`trio_echo.master`), which asks its worker processes, hence ``async``.
"""

from __future__ import annotations

from typing import Protocol

import trio

from trio_echo.config import FaultProfile
from trio_echo.reasons import Reason
from trio_echo.stats import Stats
from trio_echo.trace import Tracer

from . import table
from .metrics import MetricsSnapshot
from .protocol import ListConnections


class ServerView(Protocol):
    """Counts, the connection table, closing one connection, trace subscriptions, readiness."""

    @property
    def tracer(self) -> Tracer:
        """Where channels subscribe to trace events (and set the global flags)."""

    @property
    def draining(self) -> bool:
        """True once a stop began (/readyz answers 503)."""

    def listener_descriptions(self) -> list[dict[str, str]]:
        """The bound echo addresses with their transport."""

    async def stats_snapshot(self) -> dict[str, object]:
        """The admin ``stats`` message's fields (without ``type``)."""

    async def metrics_snapshot(self) -> MetricsSnapshot:
        """The counters for /metrics."""

    async def connections(self, query: ListConnections) -> tuple[int, list[dict[str, object]]]:
        """``(total, items)``: one page of the open connections."""

    async def close_connection(self, conn_id: int, reason: Reason) -> bool:
        """Close one connection gracefully; False if no such connection is open."""

    async def set_faults(
        self, spec: str | FaultProfile | None, *, listener: str | None, conn_id: int | None
    ) -> dict[str, object] | None:
        """Put a fault profile on a listener's new connections or one open connection; what is in
        force now. Raises LookupError naming what is unknown (nothing changed)."""


class LocalServer(Protocol):
    """What :class:`LocalView` needs of a single-process server (``EchoServer``)."""

    @property
    def stats(self) -> Stats: ...

    @property
    def tracer(self) -> Tracer: ...

    @property
    def draining(self) -> bool: ...

    def listener_descriptions(self) -> list[dict[str, str]]: ...

    def metrics_snapshot(self) -> MetricsSnapshot: ...

    def close_connection(self, conn_id: int, reason: Reason = ...) -> bool: ...

    def faults_in_force(self) -> dict[str, object]: ...

    def set_faults(
        self, spec: str | FaultProfile | None, *, listener: str | None = ..., conn_id: int | None = ...
    ) -> dict[str, object] | None: ...


class LocalView:
    """The :class:`ServerView` of a server in this process: every answer straight from its table."""

    def __init__(self, server: LocalServer) -> None:
        self._server = server

    @property
    def tracer(self) -> Tracer:
        return self._server.tracer

    @property
    def draining(self) -> bool:
        return self._server.draining

    def listener_descriptions(self) -> list[dict[str, str]]:
        return self._server.listener_descriptions()

    async def stats_snapshot(self) -> dict[str, object]:
        await trio.lowlevel.checkpoint()
        return {**self._server.stats.snapshot(trio.current_time()), **self._server.faults_in_force()}

    async def metrics_snapshot(self) -> MetricsSnapshot:
        await trio.lowlevel.checkpoint()
        return self._server.metrics_snapshot()

    async def connections(self, query: ListConnections) -> tuple[int, list[dict[str, object]]]:
        await trio.lowlevel.checkpoint()
        return table.page(self._server.stats.connections.values(), query, trio.current_time())

    async def close_connection(self, conn_id: int, reason: Reason) -> bool:
        await trio.lowlevel.checkpoint()
        return self._server.close_connection(conn_id, reason)

    async def set_faults(
        self, spec: str | FaultProfile | None, *, listener: str | None, conn_id: int | None
    ) -> dict[str, object] | None:
        await trio.lowlevel.checkpoint()
        return self._server.set_faults(spec, listener=listener, conn_id=conn_id)
