"""The worker master (``[server] workers`` > 1): N worker processes under the OTP supervisor, and
one admin view, one trace stream and one systemd conversation for all of them.

Structure::

    Master.run()
      services nursery
        trace file writer ...... (when [trace] file is set): the master's, fed by every worker
        Supervisor ............. one transient child per worker slot (WorkerProcess.run: a process,
                                 restarted with backoff when it crashes or hangs) and the admin port
                                 (permanent); the supervisor's restart budget covers both

The master owns no echo connection. Before the first worker starts it resolves what the workers must
agree on: a listen entry with port 0 gets a port the master holds bound (not listening, so the
kernel gives it no connections) for the daemon's life, and Unix listeners, which SO_REUSEPORT does not
spread, are opened here once and inherited by every worker (as are systemd's sockets under socket
activation). Each worker binds its own TCP and UDP sockets with SO_REUSEPORT.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
from collections.abc import Callable

import attrs
import trio

from ._version import __version__
from .activation import Inherited
from .addresses import TLS_TRANSPORTS
from .admin.agent import agent_children
from .admin.agentcheck import AgentStatus
from .admin.listing import merge_ranked
from .admin.metrics import MetricsSnapshot
from .admin.port import AdminServer
from .admin.protocol import ListConnections, fault_spec, fault_spec_json
from .config import Config, FaultProfile, ListenerConfig
from .configfile import config_to_toml
from .control import Message
from .errors import SupervisorGaveUp, leaves
from .events import Flag
from .faults import plan_for
from .listeners import ListeningSocket, open_listeners
from .reasons import Reason
from .restarts import Restart
from .runtime import Settings, restart_required
from .supervisor import ChildSpec, Supervisor
from .tls import server_context
from .trace import TraceFile, Tracer
from .workerproc import WorkerProcess
from .workerstats import first_id, merge_metrics, merge_stats, retired, run_of, shares

logger = logging.getLogger("trio_echo.master")

ADMIN_CHILD = "admin"
HEARTBEAT_INTERVAL = 0.5  # seconds between pings to each worker
HEARTBEAT_TIMEOUT = 3.0  # a worker silent this long is hung: killed and restarted
DRAIN_GRACE = 5.0  # beyond drain_timeout + linger_timeout before a draining worker is killed


def worker_count(setting: int | str) -> int:
    """``[server] workers`` as a number: ``"auto"`` is the CPUs this process may run on."""
    if isinstance(setting, int):
        return setting
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class Master:
    """Supervises worker processes and answers for them as one server (the admin port's
    :class:`~trio_echo.admin.view.ServerView`; :mod:`trio_echo.daemon` runs it like an EchoServer).

    Args:
        config: the validated configuration.
        workers: how many worker processes (>= 2).
        inherited: systemd's sockets: echo ones go to every worker, an admin one serves the admin port.

    Raises:
        ConfigError: an unreadable admin token or TLS file.
    """

    def __init__(self, config: Config, *, workers: int, inherited: Inherited | None = None) -> None:
        Settings.from_config(config)
        if any(entry.address.transport in TLS_TRANSPORTS for entry in config.server.listen):
            server_context(config.tls)  # an unreadable certificate is a config error now, not N crashes
        self._config = config
        self._inherited = inherited or Inherited()
        self.tracer = Tracer(config.trace.flags)
        self.tracer.on_wanted = self._wanted_changed
        self.trace_file = (
            TraceFile(config.trace.file, config.trace.file_max_bytes) if config.trace.file else None
        )
        self._runs = itertools.count(1)
        self._reserved: dict[str, list[ListeningSocket]] = {}  # port-0 entries: held bound, not listening
        self._shared: dict[str, list[ListeningSocket]] = {}  # Unix entries: opened here, inherited
        self._unix: list[ListenerConfig] | None = None  # the Unix entries opened at start
        self._worker_config = config
        self.workers = [
            WorkerProcess(
                index,
                start_message=self._start_message,
                pass_fds=self._pass_fds,
                tracer=self.tracer,
                heartbeat=(HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT),
                drain_deadline=self._drain_deadline,
                next_run=lambda: next(self._runs),
                on_retire=self._retire,
            )
            for index in range(workers)
        ]
        self.admin = (
            AdminServer(self, config.admin, inherited=self._inherited.admin)
            if config.admin.listen or self._inherited.admin is not None
            else None
        )
        children = [ChildSpec(worker.name, worker.run, Restart.TRANSIENT) for worker in self.workers]
        if self.admin is not None:
            children.append(ChildSpec(ADMIN_CHILD, self.admin.run, Restart.PERMANENT))
        children += agent_children(config.admin.agent_listen, self.agent_status)
        self.reload_failed = False  # set by the daemon's SIGHUP handling; the agent check says maint
        self.supervisor = Supervisor.configured(children, config.supervisor, self.tracer)
        self.started = 0.0
        self.draining = False
        self._stop = trio.Event()
        self._aborted = trio.Event()
        self._services: trio.Nursery | None = None
        # Listener faults set live (label -> the spec as sent), for workers started later; a reload
        # applies the file's again.
        self._fault_overrides: dict[str, object] = {}
        # The counters of worker runs that have ended (as last reported), so totals never go back.
        self._retired: dict[str, dict[str, object]] = {"stats": {}, "metrics": {}}

    # -- what the daemon reads ------------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._config

    @property
    def active(self) -> int:
        return sum(worker.counts["active"] for worker in self.workers)

    @property
    def addresses(self) -> list[str]:
        """The echo addresses, as the first serving worker reports them."""
        serving = self._serving()
        return list(serving.addresses) if serving is not None else []

    def _serving(self) -> WorkerProcess | None:
        """The first worker that is up (every worker binds the same addresses)."""
        return next((worker for worker in self.workers if worker.answering), None)

    @property
    def admin_addresses(self) -> list[str]:
        value = self.supervisor.value(ADMIN_CHILD)
        return list(value) if isinstance(value, list) else []

    def healthy(self) -> bool:
        """Every worker answers its heartbeat (the systemd watchdog is petted only then)."""
        return all(worker.answering for worker in self.workers)

    def agent_status(self) -> AgentStatus:
        """The HAProxy agent check's view: the workers' load against the configured cap, stopping,
        or maint (a failed reload, a worker that is not answering or is being restarted)."""
        return AgentStatus(
            active=self.active,
            max_connections=self._config.limits.max_connections or 0,
            draining=self.draining,
            maint=self.reload_failed or not self.healthy(),
        )

    def status(self) -> str:
        running = sum(worker.answering for worker in self.workers)
        total = sum(worker.counts["total"] for worker in self.workers)
        return (
            f"{running}/{len(self.workers)} workers, {self.active} active, {total} total; "
            f"listening on {', '.join(self.addresses) or 'nothing yet'}"
        )

    # -- the admin port's view ------------------------------------------------------------------------

    def listener_descriptions(self) -> list[dict[str, str]]:
        serving = self._serving()
        return list(serving.descriptions) if serving is not None else []

    async def stats_snapshot(self) -> dict[str, object]:
        await self._ask_all(lambda _: {"type": "stats"})
        rows = [self._row(worker) for worker in self.workers]
        reports = [self._retired["stats"], *(w.last_report["stats"] for w in self.workers if w.last_report)]
        merged = merge_stats(reports, uptime=trio.current_time() - self.started, workers=rows)
        return {**merged, **self._faults_in_force()}

    def _faults_in_force(self) -> dict[str, object]:
        """As ``EchoServer.faults_in_force``: what the master set on every worker, or the file's."""
        in_force: dict[str, object] = {}
        for entry in self._config.server.listen:
            spec: object = self._fault_overrides.get(entry.label, entry.faults or None)
            plan = plan_for(fault_spec(spec), self._config.faults)
            in_force[entry.label] = plan.describe() if plan is not None else None
        profiles = {name: profile.to_dict() for name, profile in self._config.faults.items()}
        return {"faults": in_force, "fault_profiles": profiles}

    async def set_faults(
        self, spec: str | FaultProfile | None, *, listener: str | None, conn_id: int | None
    ) -> dict[str, object] | None:
        plan = plan_for(spec, self._config.faults)  # an unknown name: nothing is sent anywhere
        sent = fault_spec_json(spec)
        if conn_id is not None:
            run = run_of(conn_id)
            owner = next((worker for worker in self.workers if worker.run_number == run), None)
            reply = (
                await owner.request({"type": "set_faults", "conn": conn_id, "faults": sent})
                if owner
                else None
            )
            if reply is None or reply.get("ok") is not True:
                raise LookupError(f"no open connection with id {conn_id}")
        else:
            replies = await self._ask_all(
                lambda _: {"type": "set_faults", "listener": listener, "faults": sent}
            )
            answered = [reply for reply in replies if reply is not None]
            refused = next((reply for reply in answered if reply.get("ok") is not True), None)
            if refused is not None or not answered:
                raise LookupError(str(refused.get("error")) if refused else "no worker is answering")
            self._fault_overrides[str(answered[0]["listener"])] = sent
        return plan.describe() if plan is not None else None

    async def metrics_snapshot(self) -> MetricsSnapshot:
        await self._ask_all(lambda _: {"type": "stats"})
        reports = [
            self._retired["metrics"],
            *(w.last_report["metrics"] for w in self.workers if w.last_report),
        ]
        return merge_metrics(
            reports,
            version=__version__,
            uptime=trio.current_time() - self.started,
            restarts=self.supervisor.restarts,
            trace_dropped=self.tracer.dropped,
            states=[worker.state for worker in self.workers],
        )

    async def connections(self, query: ListConnections) -> tuple[int, list[dict[str, object]]]:
        ranked = await self._ask_all(lambda _: {"type": "rank", "query": attrs.asdict(query)})
        total = sum(int(str(reply["total"])) for reply in ranked if reply is not None)
        candidates = [
            [(value, conn_id) for value, conn_id in reply["ranked"]] if reply is not None else []  # type: ignore[attr-defined]
            for reply in ranked
        ]
        chosen = merge_ranked(candidates, query.offset, query.limit)
        wanted: dict[int, list[int]] = {}
        for index, conn_id in chosen:
            wanted.setdefault(index, []).append(conn_id)
        answers = await self._ask_all(
            lambda worker: {"type": "items", "ids": wanted[worker.index]} if worker.index in wanted else None
        )
        found: dict[int, dict[str, object]] = {}
        for worker, reply in zip(self.workers, answers, strict=True):
            for item in reply["items"] if reply is not None else []:  # type: ignore[attr-defined]
                found[item["id"]] = {**item, "worker": worker.index}
        return total, [found[conn_id] for _, conn_id in chosen if conn_id in found]

    async def close_connection(self, conn_id: int, reason: Reason = Reason.ADMIN) -> bool:
        run = run_of(conn_id)
        for worker in self.workers:
            if worker.run_number == run:
                reply = await worker.request({"type": "close", "conn": conn_id})
                return reply is not None and reply.get("ok") is True
        await trio.lowlevel.checkpoint()
        return False

    async def _ask_all(self, request: Callable[[WorkerProcess], Message | None]) -> list[Message | None]:
        """Ask every worker at once; each answer (None: no request, not up, or too slow). A worker's
        ``stats`` answer also becomes its ``last_report``."""
        answers: list[Message | None] = [None] * len(self.workers)

        async def ask(index: int, worker: WorkerProcess, message: Message) -> None:
            answers[index] = await worker.request(message)

        async with trio.open_nursery() as nursery:
            for index, worker in enumerate(self.workers):
                message = request(worker)
                if message is not None:
                    nursery.start_soon(ask, index, worker, message)
        return answers

    def _retire(self, report: dict[str, dict[str, object]]) -> None:
        self._retired = retired(self._retired, report)

    def _row(self, worker: WorkerProcess) -> dict[str, object]:
        return {
            "index": worker.index,
            "pid": worker.pid,
            "state": worker.state.value,
            "active": worker.counts["active"],
            "total": worker.counts["total"],
            "restarts": self.supervisor.restarts.get(worker.name, 0),
        }

    # -- control --------------------------------------------------------------------------------------

    def stop(self) -> None:
        # Not ready from this instant (not when the master task next runs): a probe that lands
        # right after the signal was logged must already see 503.
        self.draining = True
        self._stop.set()

    def abort(self) -> None:
        """A second SIGTERM: every worker closes its connections at once."""
        for worker in self.workers:
            worker.abort()
            if self._services is not None:
                self._services.start_soon(worker.abort_now)
        self.stop()
        self._aborted.set()

    async def reconfigure(self, config: Config, *, max_connections: int | None = None) -> list[str]:
        """SIGHUP: check ``config`` here (a bad one changes nothing anywhere), then apply it to every
        worker and to the master's own parts (trace flags, admin port)."""
        del max_connections  # each worker takes its share of limits.max_connections within its own fds
        needs_restart = restart_required(self._config, config, adopted_listeners=bool(self._inherited.echo))
        Settings.from_config(config)
        if any(entry.address.transport in TLS_TRANSPORTS for entry in config.server.listen):
            server_context(config.tls)
        if (self._unix or []) != [entry for entry in config.server.listen if entry.address.is_unix]:
            needs_restart.append(
                "server.listen's unix: entries (with workers, the master opens them at start)"
            )
        await self._prepare(config)
        message = {"type": "reconfigure", "config": config_to_toml(self._worker_config)}
        answers = await self._ask_all(
            lambda worker: {**message, "max_connections": self._shares()[worker.index]}
        )
        for worker, answer in zip(self.workers, answers, strict=True):
            if answer is not None and answer.get("ok") is False:
                logger.error("%s kept its configuration: %s", worker.name, answer.get("error"))
            elif answer is not None:
                needs_restart += [key for key in answer.get("restart", []) if key not in needs_restart]  # type: ignore[attr-defined]
        self._config = config
        self._fault_overrides.clear()  # the workers apply the file's profiles again, as the file says
        self.tracer.flags = config.trace.flags
        if self.admin is not None and "admin.listen" not in needs_restart:
            self.admin.reconfigure(config.admin)
        self._release(udp_only=True)
        return needs_restart

    # -- running --------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Master] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every worker and the admin port; serve until :meth:`stop` (then drain every worker
        within one deadline) or :meth:`abort`.

        Raises:
            SupervisorGaveUp: workers kept failing beyond the restart budget (the others were drained).
            ListenerError: a Unix listener or a port-0 reservation could not be opened.
        """
        self.started = trio.current_time()
        gave_up: SupervisorGaveUp | None = None
        try:
            await self._prepare(self._config)
            async with trio.open_nursery() as services:
                self._services = services
                if self.trace_file is not None:
                    await services.start(self.trace_file.run, self.tracer)
                try:
                    async with trio.open_nursery() as supervised:
                        await supervised.start(self.supervisor.run)
                        self._release(udp_only=True)
                        self.tracer.emit(
                            Flag.INFO, "server.ready", listeners=self.addresses, workers=len(self.workers)
                        )
                        task_status.started(self)
                        await self._stop.wait()
                        await self._drain()
                        supervised.cancel_scope.cancel()
                except* SupervisorGaveUp as group:
                    gave_up = next(e for e in leaves(group) if isinstance(e, SupervisorGaveUp))
                services.cancel_scope.cancel()
        finally:
            self._services = None
            self._release(udp_only=False)
            for sock in (*self._inherited.echo, *filter(None, [self._inherited.admin])):
                trio.lowlevel.notify_closing(sock)
                sock.close()  # our copy; systemd keeps its own
        self.tracer.emit(
            Flag.INFO, "server.stopped", connections=sum(w.counts["total"] for w in self.workers)
        )
        if gave_up is not None:
            raise gave_up

    async def _drain(self) -> None:
        """Not ready for ``limits.drain_delay`` (the workers keep accepting), then every worker
        drains at once, within one deadline; none is restarted meanwhile (``stop`` has set
        ``draining``)."""
        limits = self._config.limits
        if limits.drain_delay:
            self.tracer.emit(Flag.INFO, "server.not_ready", drain_delay=limits.drain_delay)
            with trio.move_on_after(limits.drain_delay):
                await self._aborted.wait()
        self.tracer.emit(Flag.INFO, "server.draining", active=self.active, timeout=limits.drain_timeout)
        async with trio.open_nursery() as nursery:
            for worker in self.workers:
                if worker.name in self.supervisor.names:
                    nursery.start_soon(self.supervisor.terminate_child, worker.name)

    def _drain_deadline(self) -> float:
        limits = self._config.limits
        return limits.drain_timeout + limits.linger_timeout + DRAIN_GRACE

    # -- what every worker gets -----------------------------------------------------------------------

    async def _prepare(self, config: Config) -> None:
        """The workers' configuration: port 0 resolved to a port held here, the Unix entries opened
        here at start (a reload keeps those: a running worker cannot be handed a new descriptor), no
        admin port and no trace file (the master's). Under socket activation the listen list is
        systemd's: nothing to open."""
        backlog = config.server.backlog
        listen = list(config.server.listen)
        if self._unix is None:
            self._unix = [entry for entry in listen if entry.address.is_unix]
            for entry in [] if self._inherited.echo else self._unix:
                self._shared[entry.label] = await open_listeners(
                    entry.address, backlog=entry.backlog or backlog
                )
        else:
            listen = [entry for entry in listen if not entry.address.is_unix] + self._unix
        entries = []
        for given in listen:
            address = given.address
            if address.is_unix or address.port != 0 or self._inherited.echo:
                entries.append(given)
                continue
            if given.label not in self._reserved:
                self._reserved[given.label] = await open_listeners(
                    address, backlog=backlog, reuse_port=True, listen=False
                )
            port = self._reserved[given.label][0].sock.getsockname()[1]
            # The same label, so stats and metrics name it as written; the concrete port to bind.
            entries.append(attrs.evolve(given, address=attrs.evolve(address, port=port), name=given.label))
        labels = {entry.label for entry in entries}
        for label in [name for name in self._reserved if name not in labels]:
            for item in self._reserved.pop(label):
                item.close()
        self._worker_config = attrs.evolve(
            config,
            server=attrs.evolve(config.server, listen=tuple(entries), workers=1),
            admin=attrs.evolve(config.admin, listen=""),
            trace=attrs.evolve(config.trace, file=""),
        )

    def _release(self, *, udp_only: bool) -> None:
        """Close reservations: UDP ones once the workers have bound (a bound UDP socket would take a
        share of the datagrams), all of them (and the shared Unix listeners) at the end."""
        for label, items in list(self._reserved.items()):
            if not udp_only or any(item.sock.type == socket.SOCK_DGRAM for item in items):
                for item in items:
                    item.close()
                del self._reserved[label]
        if not udp_only:
            for items in self._shared.values():
                for item in items:
                    item.close()
            self._shared.clear()

    def _pass_fds(self) -> list[int]:
        shared = [item.sock.fileno() for items in self._shared.values() for item in items]
        return shared + [sock.fileno() for sock in self._inherited.echo]

    def _shares(self) -> list[int | None]:
        return shares(self._config.limits.max_connections, len(self.workers))

    def _start_message(self, index: int, run: int) -> Message:
        return {
            "type": "start",
            "index": index,
            "first_id": first_id(run),
            "config": config_to_toml(self._worker_config),
            "faults": self._fault_overrides,
            "max_connections": self._shares()[index],
            "shared": {
                label: [item.sock.fileno() for item in items] for label, items in self._shared.items()
            },
            "inherited": [sock.fileno() for sock in self._inherited.echo],
            "wanted": int(self.tracer.wanted),
        }

    def _wanted_changed(self, flags: Flag) -> None:
        if self._services is None:
            return  # the start message carries it
        for worker in self.workers:
            self._services.start_soon(worker.notify, {"type": "wanted", "flags": int(flags)})
