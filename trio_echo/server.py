"""EchoServer: the public API, the nursery layout and the graceful drain.

Structure (accept loops and handlers live in different nurseries, so stopping closes the listeners
first and then gives handlers a deadline)::

    run()
      handler nursery ........ one task per connection (Connection.run), its own cancel scope, never
                               restarted; started by the Intake (intake.py)
      services nursery
        trace file writer .... (when [trace] file is set)
        Supervisor ........... one permanent child per listen entry (bind, then accept loops that hand
                               sockets to the Intake, or a UDP echo loop) and the admin port; on stop
                               the listener children are terminated at once, the admin port stays up
                               (/readyz says draining) until the drain is over
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence

import trio

from ._version import __version__
from .activation import Inherited
from .admin.agent import agent_children
from .admin.agentcheck import AgentStatus
from .admin.metrics import MetricsSnapshot
from .admin.port import AdminServer
from .admin.view import LocalView
from .admission import Admission
from .config import Config, FaultProfile
from .errors import SupervisorGaveUp, leaves
from .events import Flag
from .faults import plan_for
from .intake import Intake
from .listeners import ListeningSocket
from .listening import Listeners, adopted_label
from .reasons import Reason
from .relay import Relay
from .restarts import Restart
from .runtime import Settings, restart_required
from .stats import Stats
from .supervisor import ChildSpec, Supervisor
from .tls import Contexts
from .trace import TraceFile, Tracer

logger = logging.getLogger("trio_echo.server")

ADMIN_CHILD = "admin"
Opener = Callable[[], Awaitable[list[ListeningSocket]]]


class EchoServer:
    """The echo daemon's core, usable as a library::

        async with trio.open_nursery() as nursery:
            server = await nursery.start(EchoServer(config).run)
            print(server.addresses)      # e.g. ['127.0.0.1:40007', '[::]:40007']
            ...
            server.stop()                # graceful drain; run() returns when it is done

    Args:
        config: the validated configuration.
        max_connections: the effective connection cap (see ``Config.effective_max_connections``);
            default: the configured value, else unlimited.
        tracer: where events go; default: a tracer with ``config.trace.flags`` logging to ``trio_echo``.
        inherited: listening sockets passed by systemd (socket activation): when it has echo sockets
            they replace ``server.listen``; an inherited admin socket serves the admin port.
        reuse_port: bind listeners with SO_REUSEPORT (a worker process, see :mod:`trio_echo.worker`).
        shared: listen entries whose sockets another process opened (a worker's Unix listeners).
        first_id: the first connection id (workers get disjoint id ranges).
        worker: this worker's index (the web echo's JSON names it); None: not a worker.

    Raises:
        ConfigError: an unreadable certificate or admin token.
    """

    def __init__(
        self,
        config: Config,
        *,
        max_connections: int | None = None,
        tracer: Tracer | None = None,
        inherited: Inherited | None = None,
        reuse_port: bool = False,
        shared: Mapping[str, Sequence[socket.socket]] | None = None,
        first_id: int = 1,
        worker: int | None = None,
    ) -> None:
        self.tracer = tracer or Tracer(config.trace.flags)
        self.stats = Stats(started=0.0, next_id=first_id)
        self._inherited = inherited or Inherited()
        self.settings = Settings.from_config(config, max_connections)
        # The steady-state echo of every plain TCP and Unix connection, where the platform has epoll.
        self.relay = Relay() if Relay.available() else None
        self.intake = Intake(
            self.settings, self.stats, self.tracer, self._tls(self.settings), worker=worker, relay=self.relay
        )
        self.listeners = Listeners(self.intake, self.stats, self.tracer, reuse_port=reuse_port, shared=shared)
        admin_socket = self._inherited.admin
        self.admin = (
            AdminServer(LocalView(self), config.admin, inherited=admin_socket)
            if config.admin.listen or admin_socket is not None
            else None
        )
        self.trace_file = (
            TraceFile(config.trace.file, config.trace.file_max_bytes) if config.trace.file else None
        )
        if self._inherited.echo:
            adopted = [(adopted_label(sock), sock) for sock in self._inherited.echo]
            self._listener_names = [label for label, _ in adopted]
            children = [self.listeners.adopted_child(label, sock) for label, sock in adopted]
        else:
            self._listener_names = [entry.label for entry in config.server.listen]
            children = [self.listeners.child(entry) for entry in config.server.listen]
        if self.admin is not None:
            children.append(ChildSpec(ADMIN_CHILD, self.admin.run, Restart.PERMANENT))
        children += agent_children(config.admin.agent_listen, self.agent_status)
        self.reload_failed = False  # set by the daemon's SIGHUP handling; the agent check says maint
        self.supervisor = Supervisor.configured(children, config.supervisor, self.tracer)
        self._stop = trio.Event()
        self._hard_stop = trio.CancelScope()
        self._not_ready = False  # stopping: /readyz says so, though drain_delay may keep us accepting

    # -- what the admin port and the daemon read ------------------------------------------------------

    @property
    def config(self) -> Config:
        return self.settings.config

    @property
    def max_connections(self) -> int:
        return self.settings.max_connections

    @property
    def admission(self) -> Admission:
        return self.intake.admission

    @property
    def draining(self) -> bool:
        """True once a stop began: during ``limits.drain_delay`` (still accepting) and the drain."""
        return self._not_ready or self.intake.draining

    @property
    def addresses(self) -> list[str]:
        """Every address bound right now, e.g. ``['127.0.0.1:40007', '[::]:40007', 'unix:/run/e.sock']``."""
        bound: list[str] = []
        for name in self._listener_names:
            value = self.supervisor.value(name)
            if isinstance(value, list):
                bound.extend(value)
        return bound

    @property
    def active(self) -> int:
        """Connections open now."""
        return self.stats.active

    def healthy(self) -> bool:
        """Whether the systemd watchdog may be petted: a single process that runs is healthy."""
        return True

    def agent_status(self) -> AgentStatus:
        """What the HAProxy agent check answers: load, stopping, or maint (a failed reload, a
        listener being restarted)."""
        restarting = any(not self.supervisor.running(name) for name in self._listener_names)
        cap = self.max_connections
        return AgentStatus(
            active=self.stats.active,
            max_connections=cap if cap < sys.maxsize else 0,
            draining=self.draining,
            maint=self.reload_failed or restarting,
        )

    def status(self) -> str:
        """The one-line STATUS= for systemctl status: counts, and listeners still retrying."""
        stats = self.stats
        retrying = [name for name in self._listener_names if not self.supervisor.running(name)]
        text = (
            f"{stats.active} active, {stats.total} total, {sum(stats.refused.values())} refused; "
            f"listening on {', '.join(self.addresses) or 'nothing yet'}"
        )
        return text + (f"; retrying {', '.join(retrying)}" if retrying else "")

    @property
    def listener_names(self) -> list[str]:
        """The echo listeners' labels (supervisor child names)."""
        return list(self._listener_names)

    @property
    def admin_addresses(self) -> list[str]:
        """Where the admin port is bound right now (empty when it is off or not up)."""
        value = self.supervisor.value(ADMIN_CHILD)
        return list(value) if isinstance(value, list) else []

    def listener_descriptions(self) -> list[dict[str, str]]:
        """The bound echo addresses with their transport, for the admin ``hello``."""
        described = []
        for name in self._listener_names:
            value = self.supervisor.value(name)
            options = self.settings.listen_options.get(name)
            transport = options.address.transport if options is not None else "tcp"
            if options is None and name.startswith("udp://"):
                transport = "udp"  # an adopted datagram socket
            for address in value if isinstance(value, list) else []:
                kind = "unix" if address.startswith("unix:") and transport == "tcp" else transport
                described.append({"address": address, "transport": kind})
        return described

    def metrics_snapshot(self) -> MetricsSnapshot:
        stats = self.stats
        return MetricsSnapshot(
            version=__version__,
            uptime=max(0.0, trio.current_time() - stats.started),
            active={name: counts.active for name, counts in stats.listeners.items()},
            total={name: counts.total for name, counts in stats.listeners.items()},
            closed=dict(stats.closed),
            refused=dict(stats.refused),
            bytes_in=stats.bytes_in,
            bytes_out=stats.bytes_out,
            restarts=self.supervisor.restarts,
            trace_dropped=self.tracer.dropped,
            health_checks=dict(stats.health_checks),
            datagrams_in={name: counts.received for name, counts in stats.datagrams.items()},
            datagrams_out={name: counts.echoed for name, counts in stats.datagrams.items()},
            datagrams_dropped=dict(stats.dropped),
            faults=dict(stats.faults),
            http_requests=dict(stats.http_requests),
            websocket_messages=dict(stats.websocket_messages),
        )

    def faults_in_force(self) -> dict[str, object]:
        """The stats message's ``faults`` (each listener's profile now, ``None``: none) and
        ``fault_profiles`` (the named ones the file defines, for the dashboard to offer)."""
        plans = self.intake.fault_plans
        return {
            "faults": {
                name: plans[name].describe() if name in plans else None for name in self._listener_names
            },
            "fault_profiles": {name: profile.to_dict() for name, profile in self.config.faults.items()},
        }

    def listener_label(self, name: str) -> str:
        """The listen entry a name or bound address refers to.

        Raises:
            LookupError: neither a listener's name nor one of its bound addresses.
        """
        for label in self._listener_names:
            value = self.supervisor.value(label)
            bound = value if isinstance(value, list) else []
            if name == label or name in bound or name.removeprefix("udp://") in bound:
                return label
        raise LookupError(f"no listener {name!r} (listeners: {', '.join(self._listener_names)})")

    def set_faults(
        self, spec: str | FaultProfile | None, *, listener: str | None = None, conn_id: int | None = None
    ) -> dict[str, object] | None:
        """Put a fault profile (by name, inline, or None for none) on a listener's new connections,
        or on one open connection; return what is in force now.

        Raises:
            LookupError: an unknown profile name, listener or connection (nothing changed).
        """
        plan = plan_for(spec, self.config.faults)
        if listener is not None:
            label = self.listener_label(listener)
            if plan is None:
                self.intake.fault_plans.pop(label, None)
            else:
                self.intake.fault_plans[label] = plan
        else:
            info = self.stats.connections.get(conn_id or 0)
            if info is None or info.handle is None:
                raise LookupError(f"no open connection with id {conn_id}")
            info.handle.set_faults(plan.for_connection() if plan is not None else None)
        return plan.describe() if plan is not None else None

    def close_connection(self, conn_id: int, reason: Reason = Reason.ADMIN) -> bool:
        """Close one connection gracefully; False if no such connection is open."""
        info = self.stats.connections.get(conn_id)
        if info is None or info.handle is None:
            return False
        info.handle.close(reason)
        return True

    # -- control --------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Begin the graceful drain (idempotent; safe to call before ``run`` has started)."""
        self._not_ready = True  # /readyz says 503 from this instant, not when the run task wakes
        self._stop.set()

    def abort(self) -> None:
        """Close everything at once (a second signal); ``run`` returns promptly."""
        self.stop()
        self._hard_stop.cancel()

    def serve_stream(
        self, stream: trio.abc.Stream, *, peer: str = "memory", listener: str = "memory"
    ) -> None:
        """Serve an already-connected stream (an in-memory pair end, a wrapped socket) exactly like an
        accepted connection: same limits, table entry, drain. Only while :meth:`run` is running.
        The server owns the stream from here on and closes it."""
        if self.intake.handlers is None:
            raise RuntimeError("serve_stream needs a running server")
        self.intake.admit(stream, None, peer, listener)

    async def reconfigure(self, config: Config, *, max_connections: int | None = None) -> list[str]:
        """Apply a new configuration live (SIGHUP); return the changed keys that need a restart.

        Live: limits and timeouts (for connections accepted from now on; open ones keep theirs),
        the connection caps and allow/deny lists, trace flags, greeting/farewell/refusal, the admin
        token, origins and channel settings, and the listen list (new entries are opened, removed ones
        closed; their open connections keep running).

        Raises:
            ConfigError: an unreadable certificate (nothing has changed then).
        """
        needs_restart = restart_required(self.config, config, adopted_listeners=bool(self._inherited.echo))
        settings = Settings.from_config(config, max_connections)
        # Re-read even when the paths did not change: a renewed certificate serves new connections.
        tls_context = self._tls(settings)
        self.settings = settings
        self.intake.configure(settings, tls_context)
        self.listeners.configure(config)
        self.tracer.flags = config.trace.flags
        if self.admin is not None and "admin.listen" not in needs_restart:
            self.admin.reconfigure(config.admin)
        if not self._inherited.echo:
            await self._reconcile_listeners(config)
        return needs_restart

    async def _reconcile_listeners(self, config: Config) -> None:
        wanted = {entry.label: entry for entry in config.server.listen}
        for label in [name for name in self._listener_names if name not in wanted]:
            self._listener_names.remove(label)
            await self.supervisor.terminate_child(label)
        for label, entry in wanted.items():
            if label not in self._listener_names:
                self._listener_names.append(label)
                self.stats.listeners[label]  # shows at 0 from now on
                await self.supervisor.start_child(self.listeners.child(entry))

    # -- running --------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[EchoServer] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop` (then drain) or :meth:`abort`.

        Reports started (with this server) once every listener has bound or failed its first attempt;
        :attr:`addresses` then lists what is bound.

        Raises:
            SupervisorGaveUp: listeners kept failing beyond the restart budget; open connections were
                drained first.
        """
        self.stats.started = trio.current_time()
        for name in self._listener_names:
            self.stats.listeners[name]  # every listener shows in stats and metrics, even at 0
        gave_up: SupervisorGaveUp | None = None
        with self._hard_stop:
            async with trio.open_nursery() as handlers:
                self.intake.handlers = handlers
                try:
                    # Listeners and the admin port; the admin port outlives the listeners so that
                    # /readyz can say "draining" while connections finish.
                    async with trio.open_nursery() as services:
                        if self.relay is not None:  # before the listeners; stops after the drain
                            await services.start(self.relay.run)
                        if self.trace_file is not None:
                            await services.start(self.trace_file.run, self.tracer)
                        await services.start(self.supervisor.run)
                        self.tracer.emit(Flag.INFO, "server.ready", listeners=self.addresses)
                        task_status.started(self)
                        await self._stop.wait()
                        await self._not_ready_for(self.config.limits.drain_delay)
                        self.intake.draining = True
                        for name in self._listener_names:
                            await self.supervisor.terminate_child(name)
                        await self._drain()
                        services.cancel_scope.cancel()
                except* SupervisorGaveUp as group:
                    gave_up = next(e for e in leaves(group) if isinstance(e, SupervisorGaveUp))
                    await self._drain()
        self.intake.handlers = None
        for sock in (*self._inherited.echo, *filter(None, [self._inherited.admin])):
            trio.lowlevel.notify_closing(sock)
            sock.close()  # our copy; systemd keeps its own, and the backlog, for the next start
        self.tracer.emit(Flag.INFO, "server.stopped", connections=self.stats.total)
        if gave_up is not None:
            raise gave_up

    async def _not_ready_for(self, delay: float) -> None:
        """The drain delay (``stop`` has made /readyz 503): listeners still accepting and connections
        served (a second signal's abort cancels the wait)."""
        if delay:
            self.tracer.emit(Flag.INFO, "server.not_ready", drain_delay=delay)
            await trio.sleep(delay)

    async def _drain(self) -> None:
        intake = self.intake
        intake.draining = True
        intake.end_keep_alives()
        self.tracer.emit(
            Flag.INFO, "server.draining", active=self.stats.active, timeout=self.config.limits.drain_timeout
        )
        if self.stats.active or intake.health_checks:
            with trio.move_on_after(self.config.limits.drain_timeout):
                await intake.quiet.wait()
        intake.close_all(Reason.DRAIN)
        if self.stats.active or intake.health_checks:
            await intake.quiet.wait()  # each close is bounded by linger_timeout

    @staticmethod
    def _tls(settings: Settings) -> Contexts:
        return Contexts.from_config(settings.config)
