"""The echo listeners as supervisor children (I/O): each binds its sockets (or takes the ones systemd
passed), then runs an accept loop per socket that hands connections to the Intake, or for ``udp://``
the datagram echo loop.
"""

from __future__ import annotations

import functools
import logging
import socket as stdlib_socket
from collections.abc import Awaitable, Callable, Mapping, Sequence

import trio

from .addresses import format_sockaddr
from .admission import source_of
from .config import Config, ListenerConfig
from .datagrams import echo_datagrams
from .events import Flag
from .intake import Intake
from .listeners import ListeningSocket, accept_loop, open_listeners
from .ratelimit import SourceBudget
from .restarts import Restart
from .stats import Stats
from .supervisor import ChildSpec
from .trace import Tracer

logger = logging.getLogger("trio_echo.server")  # the logger these lines had before the split

Opener = Callable[[], Awaitable[list[ListeningSocket]]]


class Listeners:
    """Builds the supervisor children of the echo listeners of one server.

    Args:
        intake: where accepted connections go (its settings give the backlog and buffer sizes).
        stats: the UDP counters.
        tracer: ``listener.up`` / ``listener.down`` events.
        reuse_port: bind with SO_REUSEPORT (a worker process: its siblings bind the same ports).
        shared: sockets another process opened for a listen entry, by label (a worker's Unix
            listeners, which SO_REUSEPORT cannot share): served as they are, never closed here.
    """

    def __init__(
        self,
        intake: Intake,
        stats: Stats,
        tracer: Tracer,
        *,
        reuse_port: bool = False,
        shared: Mapping[str, Sequence[stdlib_socket.socket]] | None = None,
    ) -> None:
        self.intake = intake
        self.stats = stats
        self.tracer = tracer
        self.reuse_port = reuse_port
        self.shared = dict(shared or {})
        self.configure(intake.settings.config)

    def configure(self, config: Config) -> None:
        """New UDP budgets (for datagrams from now on)."""
        limits = config.limits
        self._budget = SourceBudget(
            limits.max_datagrams_per_second_per_ip, limits.max_datagram_bytes_per_second_per_ip
        )

    def child(self, entry: ListenerConfig) -> ChildSpec:
        shared = self.shared.get(entry.label)
        if shared is not None:
            return self._served(entry.label, shared, why=f"{entry.label}, shared by the master")

        async def opened() -> list[ListeningSocket]:
            return await open_listeners(
                entry.address,
                backlog=entry.backlog or self.intake.settings.config.server.backlog,
                socket_buffer=self.intake.settings.config.limits.socket_buffer,
                reuse_port=self.reuse_port,
            )

        run = functools.partial(self._listen, entry.label, opened, owned=True, why=entry.label)
        return ChildSpec(entry.label, run, Restart.PERMANENT)

    def adopted_child(self, label: str, sock: stdlib_socket.socket) -> ChildSpec:
        """A listener systemd opened: it stays open across restarts of this child (it is systemd's; the
        server closes its own copy when it stops)."""
        return self._served(label, [sock], why="socket activation")

    def _served(self, label: str, socks: Sequence[stdlib_socket.socket], *, why: str) -> ChildSpec:
        """A child serving sockets someone else opened (systemd, a worker master)."""

        async def opened() -> list[ListeningSocket]:
            await trio.lowlevel.checkpoint()
            return [ListeningSocket(sock, format_sockaddr(sock.getsockname())) for sock in socks]

        run = functools.partial(self._listen, label, opened, owned=False, why=why)
        return ChildSpec(label, run, Restart.PERMANENT)

    async def _listen(
        self, label: str, opened: Opener, *, owned: bool, why: str, task_status: trio.TaskStatus[list[str]]
    ) -> None:
        sockets = await opened()
        try:
            datagram = [item.sock.type == stdlib_socket.SOCK_DGRAM for item in sockets]
            names = [
                f"udp://{item.name}" if udp else item.name
                for item, udp in zip(sockets, datagram, strict=True)
            ]
            for name in names:
                logger.info("listening on %s (%s)", name, why)
            self.tracer.emit(Flag.INFO, "listener.up", listener=label, addresses=names)
            task_status.started(names)
            async with trio.open_nursery() as nursery:
                for item, udp in zip(sockets, datagram, strict=True):
                    if udp:
                        nursery.start_soon(self._echo_datagrams, label, item.sock)
                    else:
                        nursery.start_soon(
                            accept_loop, item, functools.partial(self.intake.accepted, label, item)
                        )
        finally:
            if owned:
                for item in sockets:
                    item.close()
            self.tracer.emit(Flag.INFO, "listener.down", listener=label)

    async def _echo_datagrams(self, label: str, sock: stdlib_socket.socket) -> None:
        await echo_datagrams(
            sock,
            verdict=self._datagram_verdict,
            counts=self.stats.datagrams[label],
            dropped=self.stats.dropped,
            tracer=self.tracer,
            listener=label,
            plan_of=lambda: self.intake.fault_plans.get(label),
            on_fault=functools.partial(self.intake.fault_applied, None),
        )

    def _datagram_verdict(self, ip: str, size: int) -> str | None:
        """UDP: whether to echo a datagram of ``size`` bytes from ``ip`` (None) or why not."""
        address, source = source_of(ip)
        if not self.intake.admission.permits(address):
            return "denied"
        return self._budget.allow(source, size, trio.current_time())


def adopted_label(sock: stdlib_socket.socket) -> str:
    """The label of a socket systemd passed: its address, with ``udp://`` for a datagram socket."""
    name = format_sockaddr(sock.getsockname())
    return f"udp://{name}" if sock.type == stdlib_socket.SOCK_DGRAM else name
