"""A worker process: one :class:`~trio_echo.server.EchoServer` on its own SO_REUSEPORT sockets,
steered by its master (:mod:`trio_echo.master`) over the control link (:mod:`trio_echo.control`).

Started by the master as ``python -m trio_echo.worker FD`` with FD one end of a socketpair. The first
message is ``start``: the configuration (as TOML, with the master's port-0 reservations filled in and
the admin port and trace file removed: those are the master's), this worker's index, its first
connection id, its share of ``limits.max_connections``, the descriptors of shared sockets and the
trace flags some sink of the master wants. The worker answers ``ready`` once its listeners are up.

Signals are the master's business: SIGINT (a terminal's Ctrl-C reaches the whole process group),
SIGTERM (systemd's control-group kill) and SIGHUP are ignored here, and the master's ``drain``,
``abort`` and ``reconfigure`` say what to do. When the link ends (the master died, even by SIGKILL)
the worker closes everything at once and exits: no orphans.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

import attrs
import trio

from .activation import Inherited
from .admin import protocol, table
from .config import Config
from .configfile import config_from_toml
from .control import ControlError, ControlLink, Message
from .daemon import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, raise_nofile_limit
from .errors import ConfigError, SupervisorGaveUp
from .events import Flag
from .logsetup import configure_logging, reopen_logs
from .reasons import Reason
from .server import EchoServer
from .trace import Tracer

logger = logging.getLogger("trio_echo.worker")

START_TIMEOUT = 30.0  # seconds the master has to send ``start``
TRACE_QUEUE = 16384  # events buffered for the master before the oldest are dropped


def _cap(config: Config, share: object) -> int:
    """This worker's connection cap: its share of the configured total, within its descriptors."""
    ceiling = config.effective_max_connections(raise_nofile_limit())
    return min(share, ceiling) if isinstance(share, int) else ceiling


def _sockets(fds: object) -> tuple[socket.socket, ...]:
    if not isinstance(fds, list):
        return ()
    socks = []
    for fd in fds:
        sock = socket.socket(fileno=int(fd))
        sock.setblocking(False)
        socks.append(sock)
    return tuple(socks)


class Worker:
    """The worker's side of the link: builds the server from ``start`` and answers the master."""

    def __init__(self, link: ControlLink, start: Message) -> None:
        self.link = link
        self.index = int(str(start["index"]))
        config = config_from_toml(str(start["config"]))
        configure_logging(config.log, worker=self.index)
        self._share = start.get("max_connections")
        # No sink of its own: every event some sink of the master wants goes to the master, which
        # logs, files and fans it out as its own (with "worker": INDEX).
        self.tracer = Tracer(Flag(0))
        self.to_master = self.tracer.subscribe(Flag(int(str(start.get("wanted", 0)))), maxlen=TRACE_QUEUE)
        shared = start.get("shared")
        self.server = EchoServer(
            config,
            max_connections=_cap(config, self._share),
            tracer=self.tracer,
            inherited=Inherited(echo=_sockets(start.get("inherited"))),
            reuse_port=True,
            shared={label: _sockets(fds) for label, fds in shared.items()}
            if isinstance(shared, dict)
            else {},
            first_id=int(str(start["first_id"])),
            worker=self.index,
        )
        overrides = start.get("faults")
        for label, spec in (overrides if isinstance(overrides, dict) else {}).items():
            self._set_faults({"listener": label, "faults": spec})  # set live before this run began
        self.aborted = False

    async def run(self) -> int:
        async with trio.open_nursery() as nursery:

            async def serve(*, task_status: trio.TaskStatus[EchoServer]) -> None:
                try:
                    await self.server.run(task_status=task_status)
                finally:
                    nursery.cancel_scope.cancel()

            await nursery.start(serve)
            await self.link.send(
                {
                    "type": "ready",
                    "pid": os.getpid(),
                    "addresses": self.server.addresses,
                    "listeners": self.server.listener_descriptions(),
                }
            )
            nursery.start_soon(self._forward_trace)
            nursery.start_soon(self._control)
        return EXIT_FAILURE if self.aborted else EXIT_OK

    async def _forward_trace(self) -> None:
        while True:
            batch = await self.to_master.get_batch()
            events = [[event.ts, int(event.flag), event.event, dict(event.fields)] for event in batch]
            await self.link.send({"type": "trace", "events": events})

    async def _control(self) -> None:
        while True:
            try:
                message = await self.link.receive()
            except ControlError as exc:
                logger.error("control link: %s; closing everything", exc)
                message = None
            if message is None:
                logger.warning("the master is gone: closing every connection and exiting")
                self.aborted = True
                self.server.abort()
                return
            reply = await self.handle(message)
            if reply is not None:
                await self.link.send({**reply, "re": message["id"]} if "id" in message else reply)

    async def handle(self, message: Message) -> Message | None:
        """Do what one master message says; the reply's fields (None: it expects none)."""
        server = self.server
        now = trio.current_time()
        match message.get("type"):
            case "ping":  # the heartbeat; its answer keeps the master's last report fresh
                return {"type": "pong", **self._report(now)}
            case "stats":
                return self._report(now)
            case "rank":
                query = _query(message)
                total, ranked = table.rank(server.stats.connections.values(), query, now)
                return {"total": total, "ranked": ranked}
            case "items":
                ids = message.get("ids")
                return {
                    "items": table.items(server.stats.connections, ids if isinstance(ids, list) else [], now)
                }
            case "close":
                return {"ok": server.close_connection(int(str(message.get("conn"))), Reason.ADMIN)}
            case "set_faults":
                return self._set_faults(message)
            case "reconfigure":
                return await self._reconfigure(message)
            case "wanted":
                self.tracer.resubscribe(self.to_master, Flag(int(str(message.get("flags", 0)))))
            case "drain":
                server.stop()
            case "abort":
                self.aborted = True
                server.abort()
            case other:
                logger.error("unknown control message %r", other)
        return None

    def _report(self, now: float) -> Message:
        return {
            "stats": self.server.stats.snapshot(now),
            "metrics": attrs.asdict(self.server.metrics_snapshot()),
        }

    def _set_faults(self, message: Message) -> Message:
        listener, conn = message.get("listener"), message.get("conn")
        try:
            spec = protocol.fault_spec(message.get("faults"))
            in_force = self.server.set_faults(
                spec,
                listener=listener if isinstance(listener, str) else None,
                conn_id=conn if isinstance(conn, int) else None,
            )
            label = self.server.listener_label(listener) if isinstance(listener, str) else None
        except (LookupError, ConfigError) as exc:
            return {"ok": False, "error": str(exc.args[0]) if isinstance(exc, LookupError) else str(exc)}
        return {"ok": True, "faults": in_force, "listener": label}

    async def _reconfigure(self, message: Message) -> Message:
        reopen_logs()
        try:
            config = config_from_toml(str(message["config"]))
            self._share = message.get("max_connections")
            needs_restart = await self.server.reconfigure(config, max_connections=_cap(config, self._share))
        except ConfigError as exc:
            return {"ok": False, "error": str(exc)}
        configure_logging(config.log, worker=self.index)
        return {"ok": True, "restart": needs_restart}


def _query(message: Message) -> protocol.ListConnections:
    """The master's ``connections`` query (it parsed and checked the operator's)."""
    query = message.get("query")
    if not isinstance(query, dict):
        return protocol.ListConnections()
    return protocol.ListConnections(
        limit=int(query["limit"]),
        offset=int(query["offset"]),
        sort=str(query["sort"]),
        filter=str(query["filter"]),
    )


async def _serve(sock: socket.socket) -> int:
    link = ControlLink(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
    start = None
    with trio.move_on_after(START_TIMEOUT):
        try:
            start = await link.receive()
        except ControlError as exc:
            print(f"trio-echo worker: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    if start is None or start.get("type") != "start":
        print("trio-echo worker: no start message from the master", file=sys.stderr)
        return EXIT_USAGE
    try:
        worker = Worker(link, start)
    except ConfigError as exc:  # the master validated it: only a file that changed under us
        print(f"trio-echo worker: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    gave_up: list[BaseException] = []
    try:
        return await worker.run()
    except* SupervisorGaveUp as group:
        gave_up.extend(group.exceptions)
    logger.critical("%s", gave_up[0])
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m trio_echo.worker FD  (started by the trio-echo master)", file=sys.stderr)
        return EXIT_USAGE
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    sock = socket.socket(fileno=int(args[0]))
    return trio.run(_serve, sock)


if __name__ == "__main__":
    sys.exit(main())
