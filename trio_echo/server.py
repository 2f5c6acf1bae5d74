"""EchoServer: listeners as supervisor children, connections in a handler nursery, graceful drain.

Structure (accept loops and handlers live in different nurseries, so stopping closes the listeners
first and then gives handlers a deadline)::

    run()
      handler nursery ........ one task per connection (Connection.run), its own cancel scope, never
                               restarted
      services nursery
        trace file writer .... (when [trace] file is set)
        Supervisor ........... one permanent child per listen entry (bind, then accept loops) and the
                               admin port; on stop the listener children are terminated at once, the
                               admin port stays up (/readyz says draining) until the drain is over
"""

from __future__ import annotations

import functools
import logging
import socket as stdlib_socket
import ssl
import sys

import attrs
import trio

from ._version import __version__
from .activation import Inherited
from .addresses import format_host_port, format_sockaddr
from .admin.metrics import MetricsSnapshot
from .admin.port import AdminServer
from .admission import Admission, Network, in_any, networks, source_of
from .config import Config, ListenerConfig
from .connection import Connection, ConnectionPolicy, as_stream, read_proxy_header, refuse
from .datagrams import echo_datagrams
from .echo import EchoSession
from .errors import SupervisorGaveUp
from .events import Flag
from .listeners import ListeningSocket, accept_loop, open_listeners
from .proxyproto import HeaderParser, ProxyHeaderError
from .ratelimit import SourceBudget
from .restarts import Restart
from .stats import ConnectionInfo, Stats
from .supervisor import ChildSpec, Supervisor
from .tls import server_context
from .trace import TraceFile, Tracer

logger = logging.getLogger("trio_echo.server")

# TCP keepalive on accepted sockets (PRODUCT.md): first probe after 60 s idle, then every 10 s, 5 probes.
ADMIN_CHILD = "admin"
KEEPALIVE_OPTIONS = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 5))
# Every connection task's name: one shared string (trio would otherwise format a new one per task).
CONNECTION_TASK = "trio_echo.connection"
PROXY_HEADER_TIMEOUT = 3.0  # seconds a proxy gets to deliver the whole PROXY header


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
    """

    def __init__(
        self,
        config: Config,
        *,
        max_connections: int | None = None,
        tracer: Tracer | None = None,
        inherited: Inherited | None = None,
    ) -> None:
        self.config = config
        self.tracer = tracer or Tracer(config.trace.flags)
        self.max_connections = max_connections or config.limits.max_connections or sys.maxsize
        self.stats = Stats(started=0.0)
        self.draining = False
        self._inherited = inherited or Inherited()
        admin_socket = self._inherited.admin
        self.admin = (
            AdminServer(self, config.admin, inherited=admin_socket)
            if config.admin.listen or admin_socket is not None
            else None
        )
        self.trace_file = (
            TraceFile(config.trace.file, config.trace.file_max_bytes) if config.trace.file else None
        )
        if self._inherited.echo:
            adopted = [(_adopted_label(sock), sock) for sock in self._inherited.echo]
            self._listener_names = [label for label, _ in adopted]
            children = [
                ChildSpec(label, functools.partial(self._listen_adopted, label, sock), Restart.PERMANENT)
                for label, sock in adopted
            ]
        else:
            self._listener_names = [entry.label for entry in config.server.listen]
            children = [
                ChildSpec(entry.label, functools.partial(self._listen, entry), Restart.PERMANENT)
                for entry in config.server.listen
            ]
        if self.admin is not None:
            children.append(ChildSpec(ADMIN_CHILD, self.admin.run, Restart.PERMANENT))
        self.supervisor = Supervisor(
            children,
            max_restarts=config.supervisor.max_restarts,
            period=config.supervisor.period,
            backoff_initial=config.supervisor.backoff_initial,
            backoff_max=config.supervisor.backoff_max,
            tracer=self.tracer,
        )
        self.admission = Admission(config.limits, self.max_connections)
        self._budget = _budget(config)
        self._tls_context = self._tls(config)  # may raise ConfigError (unreadable certificate)
        # Refusals linger (so the refusal text survives) and each holds a descriptor meanwhile; past
        # this many at once, refuse by closing at once so a flood cannot eat the fd reserve.
        self._max_lingering_refusals = max(1, config.limits.fd_reserve // 2)
        self._lingering_refusals = 0
        self._greeting = config.server.greeting.encode()
        self._farewell = config.server.farewell.encode()
        self._refusal = config.limits.refusal.encode()
        # One read buffer for every socket pump of this server (see Connection's ``scratch``).
        self._scratch = memoryview(bytearray(config.limits.buffer_size))
        # Per-listener options by label, looked up at accept time so a reload applies them live.
        self._listen_options: dict[str, ListenerConfig] = {}
        self._trusted: dict[str, tuple[Network, ...]] = {}
        self._set_listen_options(config)
        self._pending_headers = 0  # PROXY listeners: accepted, header not read yet
        # PROXY v2 LOCAL connections: served, but not counted as clients.
        self._health_checks: dict[EchoSession, Connection] = {}
        # Limits and hooks shared by every connection (rebuilt on reload; open ones keep theirs).
        self._client_policy, self._health_check_policy = self._policies()
        self._handlers: trio.Nursery | None = None
        self._stop = trio.Event()
        self._quiet = trio.Event()
        self._hard_stop = trio.CancelScope()

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
            options = self._listen_options.get(name)
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
            admin_requests_dropped=(
                {"pending_full": self.admin.heads_dropped, "header_timeout": self.admin.heads_timed_out}
                if self.admin is not None
                else {}
            ),
        )

    def stop(self) -> None:
        """Begin the graceful drain (idempotent; safe to call before ``run`` has started)."""
        self._stop.set()

    def abort(self) -> None:
        """Close everything at once (a second signal); ``run`` returns promptly."""
        self._stop.set()
        self._hard_stop.cancel()

    def serve_stream(
        self, stream: trio.abc.Stream, *, peer: str = "memory", listener: str = "memory"
    ) -> None:
        """Serve an already-connected stream (an in-memory pair end, a wrapped socket) exactly like an
        accepted connection: same limits, table entry, drain. Only while :meth:`run` is running.
        The server owns the stream from here on and closes it."""
        if self._handlers is None:
            raise RuntimeError("serve_stream needs a running server")
        self._admit(stream, None, peer, listener)

    def _set_listen_options(self, config: Config) -> None:
        self._listen_options = {entry.label: entry for entry in config.server.listen}
        self._trusted = {entry.label: networks(entry.trusted_proxies) for entry in config.server.listen}

    @staticmethod
    def _tls(config: Config) -> ssl.SSLContext | None:
        if any(entry.address.transport == "tls" for entry in config.server.listen):
            return server_context(config.tls)
        return None

    async def reconfigure(self, config: Config, *, max_connections: int | None = None) -> list[str]:
        """Apply a new configuration live (SIGHUP); return the changed keys that need a restart.

        Live: limits and timeouts (for connections accepted from now on; open ones keep theirs),
        the connection caps and allow/deny lists, trace flags, greeting/farewell/refusal, the admin
        token, origins and channel settings, and the listen list (new entries are opened, removed ones
        closed; their open connections keep running).
        """
        old = self.config
        needs_restart = [
            key
            for key, before, after in (
                ("server.backlog", old.server.backlog, config.server.backlog),
                ("limits.socket_buffer", old.limits.socket_buffer, config.limits.socket_buffer),
                ("limits.fd_reserve", old.limits.fd_reserve, config.limits.fd_reserve),
                ("trace.file", old.trace.file, config.trace.file),
                ("trace.file_max_bytes", old.trace.file_max_bytes, config.trace.file_max_bytes),
                ("admin.listen", old.admin.listen, config.admin.listen),
                ("supervisor", old.supervisor, config.supervisor),
            )
            if before != after
        ]
        # Re-read even when the paths did not change: a renewed certificate serves new connections.
        tls_context = self._tls(config)
        if self._inherited.echo and old.server.listen != config.server.listen:
            needs_restart.append("server.listen (the listening sockets come from systemd)")
        self.config = config
        self._tls_context = tls_context
        self._set_listen_options(config)
        self.max_connections = max_connections or config.limits.max_connections or sys.maxsize
        self.admission.configure(config.limits, self.max_connections)
        self._budget = _budget(config)
        self.tracer.flags = config.trace.flags
        self._greeting = config.server.greeting.encode()
        self._farewell = config.server.farewell.encode()
        self._refusal = config.limits.refusal.encode()
        if len(self._scratch) < config.limits.buffer_size:
            # Grow only: open connections may still read up to their own (older) buffer size.
            self._scratch = memoryview(bytearray(config.limits.buffer_size))
        self._client_policy, self._health_check_policy = self._policies()
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
                await self.supervisor.start_child(
                    ChildSpec(label, functools.partial(self._listen, entry), Restart.PERMANENT)
                )

    def close_connection(self, conn_id: int, reason: str = "admin") -> bool:
        """Close one connection gracefully; False if no such connection is open."""
        info = self.stats.connections.get(conn_id)
        if info is None or info.handle is None:
            return False
        info.handle.close(reason)
        return True

    async def run(self, *, task_status: trio.TaskStatus[EchoServer] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop` (then drain) or :meth:`abort`.

        Reports started (with this server) once every listener has bound or failed its first attempt;
        :attr:`addresses` then lists what is bound.

        Raises:
            SupervisorGaveUp: listeners kept failing beyond the restart budget; open connections were
                drained first.
        """
        self.stats = Stats(started=trio.current_time())
        for name in self._listener_names:
            self.stats.listeners[name]  # every listener shows in stats and metrics, even at 0
        gave_up: SupervisorGaveUp | None = None
        with self._hard_stop:
            async with trio.open_nursery() as handlers:
                self._handlers = handlers
                try:
                    # Listeners and the admin port; the admin port outlives the listeners so that
                    # /readyz can say "draining" while connections finish.
                    async with trio.open_nursery() as services:
                        if self.trace_file is not None:
                            await services.start(self.trace_file.run, self.tracer)
                        await services.start(self.supervisor.run)
                        self.tracer.emit(Flag.INFO, "server.ready", listeners=self.addresses)
                        task_status.started(self)
                        await self._stop.wait()
                        self.draining = True
                        for name in self._listener_names:
                            await self.supervisor.terminate_child(name)
                        await self._drain()
                        services.cancel_scope.cancel()
                except* SupervisorGaveUp as group:
                    gave_up = _single(group)
                    await self._drain()
        self._handlers = None
        for sock in (*self._inherited.echo, *filter(None, [self._inherited.admin])):
            trio.lowlevel.notify_closing(sock)
            sock.close()  # our copy; systemd keeps its own, and the backlog, for the next start
        self.tracer.emit(Flag.INFO, "server.stopped", connections=self.stats.total)
        if gave_up is not None:
            raise gave_up

    async def _drain(self) -> None:
        self.draining = True
        active = self.stats.active
        self.tracer.emit(
            Flag.INFO, "server.draining", active=active, timeout=self.config.limits.drain_timeout
        )
        if active or self._health_checks:
            with trio.move_on_after(self.config.limits.drain_timeout):
                await self._quiet.wait()
        for info in list(self.stats.connections.values()):
            if info.handle is not None:
                info.handle.close("drain")
        for conn in list(self._health_checks.values()):
            conn.close("drain")
        if self.stats.active or self._health_checks:
            await self._quiet.wait()  # each close is bounded by linger_timeout

    # -- listeners (supervisor children) --------------------------------------------------------------

    async def _listen(self, entry: ListenerConfig, *, task_status: trio.TaskStatus[list[str]]) -> None:
        sockets = await open_listeners(
            entry.address,
            backlog=entry.backlog or self.config.server.backlog,
            socket_buffer=self.config.limits.socket_buffer,
        )
        try:
            udp = entry.address.transport == "udp"
            names = [f"udp://{item.name}" if udp else item.name for item in sockets]
            for name in names:
                logger.info("listening on %s (%s)", name, entry.label)
            self.tracer.emit(Flag.INFO, "listener.up", listener=entry.label, addresses=names)
            task_status.started(names)
            async with trio.open_nursery() as nursery:
                for item in sockets:
                    if udp:
                        nursery.start_soon(self._echo_datagrams, entry.label, item.sock)
                    else:
                        on_accept = functools.partial(self._accepted, entry.label, item)
                        nursery.start_soon(accept_loop, item, on_accept)
        finally:
            for item in sockets:
                item.close()
            self.tracer.emit(Flag.INFO, "listener.down", listener=entry.label)

    async def _listen_adopted(
        self, label: str, sock: stdlib_socket.socket, *, task_status: trio.TaskStatus[list[str]]
    ) -> None:
        """A listener systemd opened: accept on it; it stays open across restarts of this child (it
        is systemd's; the server closes its own copy when it stops)."""
        item = ListeningSocket(sock, label)
        logger.info("listening on %s (socket activation)", label)
        self.tracer.emit(Flag.INFO, "listener.up", listener=label, addresses=[label])
        task_status.started([label])
        try:
            if sock.type == stdlib_socket.SOCK_DGRAM:
                await self._echo_datagrams(label, sock)
            else:
                await accept_loop(item, functools.partial(self._accepted, label, item))
        finally:
            self.tracer.emit(Flag.INFO, "listener.down", listener=label)

    def _accepted(
        self, label: str, listener: ListeningSocket, sock: stdlib_socket.socket, peer: object
    ) -> None:
        ip: str | None = None
        if sock.family != stdlib_socket.AF_UNIX:
            _configure_accepted(sock, keepalive=self.config.limits.keepalive)
            # Interned: every connection from one address shares one string (held until it closes).
            ip = sys.intern(str(peer[0])) if isinstance(peer, tuple) else None
        peer_name = format_sockaddr(peer) if peer else listener.name
        options = self._listen_options.get(label)  # None: a socket systemd passed (plain TCP)
        if options is not None and options.proxy_protocol != "off":
            self._expect_proxy_header(sock, ip, peer_name, options)
            return
        self._dispatch(sock, ip, peer_name, label)

    def _dispatch(
        self, sock: stdlib_socket.socket, ip: str | None, peer: str, label: str, proxy: str = ""
    ) -> None:
        self._admit(self._transport(sock, label), ip, peer, label, proxy)

    def _transport(self, sock: stdlib_socket.socket, label: str) -> trio.abc.Stream | stdlib_socket.socket:
        """What the connection talks to: the socket itself (the pump's fast path uses it directly),
        or on a ``tls://`` listener a TLS stream over it (the handshake runs in the connection's task,
        through the generic stream pump)."""
        options = self._listen_options.get(label)
        if options is not None and options.address.transport == "tls" and self._tls_context is not None:
            return trio.SSLStream(as_stream(sock), self._tls_context, server_side=True)
        return sock

    def _admit(
        self,
        stream: trio.abc.Stream | stdlib_socket.socket,
        ip: str | None,
        peer: str,
        listener: str,
        proxy: str = "",
    ) -> None:
        """Admit or refuse a new connection, synchronously, so the counts the next accept sees are
        exact (a task started now runs later)."""
        reason = self.admission.admit(ip, self.stats.active, trio.current_time())
        if reason is None:
            info = self.stats.open(
                peer=peer,
                listener=listener,
                now=trio.current_time(),
                buffer_size=self.config.limits.buffer_size,
                greeting=self._greeting,
                farewell=self._farewell,
            )
            info.proxy = proxy
            self._serve(stream, info, ip)
            return
        self._refused(stream, reason, peer, listener)

    def _refused(
        self,
        stream: trio.abc.Stream | stdlib_socket.socket,
        reason: str,
        peer: str,
        listener: str,
        message: str | None = None,
    ) -> None:
        assert self._handlers is not None
        self.stats.refuse(reason)
        if self.tracer.conn:
            fields = {"message": message} if message else {}
            self.tracer.emit(Flag.CONN, "conn.refused", peer=peer, listener=listener, reason=reason, **fields)
        if isinstance(stream, stdlib_socket.socket):
            if self._lingering_refusals >= self._max_lingering_refusals:
                stream.close()  # a flood: no descriptor may wait on a polite goodbye
                return
            stream = as_stream(stream)
        if self._lingering_refusals < self._max_lingering_refusals:
            self._lingering_refusals += 1
            self._handlers.start_soon(self._refuse, stream)
        else:
            self._handlers.start_soon(trio.aclose_forcefully, stream)

    async def _echo_datagrams(self, label: str, sock: stdlib_socket.socket) -> None:
        await echo_datagrams(
            sock,
            verdict=self._datagram_verdict,
            counts=self.stats.datagrams[label],
            dropped=self.stats.dropped,
            tracer=self.tracer,
            listener=label,
        )

    def _datagram_verdict(self, ip: str, size: int) -> str | None:
        """UDP: whether to echo a datagram of ``size`` bytes from ``ip`` (None) or why not."""
        address, source = source_of(ip)
        if not self.admission.permits(address):
            return "denied"
        return self._budget.allow(source, size, trio.current_time())

    # -- PROXY protocol listeners ---------------------------------------------------------------------

    def _expect_proxy_header(
        self, sock: stdlib_socket.socket, ip: str | None, peer: str, options: ListenerConfig
    ) -> None:
        """A PROXY listener: only trusted proxies may speak, and what they say comes first. Unix
        peers are trusted (the socket file's permissions decide who may connect)."""
        assert self._handlers is not None
        label = options.label
        if ip is not None and not in_any(source_of(ip)[0], self._trusted.get(label, ())):
            self._refused(sock, "untrusted_proxy", peer, label)
            return
        # Connections waiting for a header or serving a health check hold descriptors too.
        if self.stats.active + self._pending_headers + len(self._health_checks) >= self.max_connections:
            self._refused(sock, "max_connections", peer, label)
            return
        self._pending_headers += 1
        self._handlers.start_soon(self._proxied, sock, ip, peer, options)

    async def _proxied(
        self, sock: stdlib_socket.socket, proxy_ip: str | None, proxy: str, options: ListenerConfig
    ) -> None:
        parser = HeaderParser(options.proxy_protocol)
        problem = f"no complete PROXY header within {PROXY_HEADER_TIMEOUT:g} s"
        try:
            with trio.move_on_after(PROXY_HEADER_TIMEOUT):
                await read_proxy_header(sock, parser)
        except ProxyHeaderError as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"connection failed before its PROXY header: {exc.strerror or exc}"
        except BaseException:
            sock.close()  # cancelled (a hard stop): nobody else will close it
            raise
        finally:
            self._pending_headers -= 1
        header = parser.header
        label = options.label
        if header is None:
            self._refused(sock, "proxy_header", proxy, label, message=problem)
        elif header.local:
            self._health_check(sock, label)
        elif isinstance(header.source, tuple):
            self._dispatch(sock, header.source[0], format_host_port(*header.source), label, proxy)
        elif isinstance(header.source, str):
            self._dispatch(sock, None, f"unix:{header.source}", label, proxy)
        else:  # v1 UNKNOWN, v2 UNSPEC: the proxy does not know; its own address is all we have
            self._dispatch(sock, proxy_ip, proxy, label, proxy)

    def _health_check(self, sock: stdlib_socket.socket, label: str) -> None:
        """A load balancer's own connection (PROXY v2 LOCAL): echoed like any other, so a
        send/expect check works, but neither counted nor listed as a client. Drain closes it too."""
        assert self._handlers is not None
        self.stats.health_checks[label] += 1
        session = EchoSession(self.config.limits.buffer_size)
        conn = Connection(self._transport(sock, label), session, self._health_check_policy)
        self._health_checks[session] = conn
        if self.draining:
            conn.close("drain")
        self._handlers.start_soon(conn.run, name=CONNECTION_TASK)

    def _health_check_closed(self, conn: Connection, _reason: str) -> None:
        del self._health_checks[conn.session]
        self._check_quiet()

    # -- connections (handler nursery) ----------------------------------------------------------------

    def _serve(
        self, stream: trio.abc.Stream | stdlib_socket.socket, info: ConnectionInfo, ip: str | None
    ) -> None:
        """Start the connection's task: ``Connection.run`` itself (no wrapper coroutine, so an idle
        connection keeps one frame less), with the bookkeeping before it here and after it in
        ``_closed``."""
        assert self._handlers is not None
        info.ip = ip
        conn = Connection(stream, info, self._client_policy)
        info.handle = conn
        if self.draining:
            conn.close("drain")
        if self.tracer.conn:
            via = {"proxy": info.proxy} if info.proxy else {}
            self.tracer.emit(
                Flag.CONN, "conn.open", conn_id=info.id, peer=info.peer, listener=info.listener, **via
            )
        self._handlers.start_soon(conn.run, name=CONNECTION_TASK)

    def _policies(self) -> tuple[ConnectionPolicy, ConnectionPolicy]:
        """The connection policies for clients and for health checks (built per configuration)."""
        client = ConnectionPolicy.from_limits(
            self.config.limits, tracer=self.tracer, scratch=self._scratch, on_close=self._closed
        )
        return client, attrs.evolve(client, on_close=self._health_check_closed)

    def _closed(self, conn: Connection, reason: str) -> None:
        info = conn.info
        assert info is not None
        self.stats.close(info, reason)
        self.admission.release(info.ip)
        tracer = self.tracer
        if tracer.conn:
            tracer.emit(
                Flag.CONN,
                "conn.close",
                conn_id=info.id,
                peer=info.peer,
                listener=info.listener,
                bytes_in=info.bytes_in,
                bytes_out=info.bytes_out,
                duration=round(trio.current_time() - info.opened, 6),
                reason=reason,
            )
        self._check_quiet()

    def _check_quiet(self) -> None:
        if self.draining and not self.stats.connections and not self._health_checks:
            self._quiet.set()

    async def _refuse(self, stream: trio.abc.Stream) -> None:
        try:
            # Bounded so refused clients cannot pin tasks and descriptors: at most ~2 s each.
            await refuse(stream, self._refusal, patience=min(self.config.limits.linger_timeout, 1.0) or 1.0)
        finally:
            self._lingering_refusals -= 1


def _configure_accepted(sock: stdlib_socket.socket, *, keepalive: bool) -> None:
    try:
        # Echo small writes at once (what trio.SocketStream would do for us).
        sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)
        if not keepalive:
            return
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_KEEPALIVE, 1)
        for name, value in KEEPALIVE_OPTIONS:
            option = getattr(stdlib_socket, name, None)
            if option is not None:
                sock.setsockopt(stdlib_socket.IPPROTO_TCP, option, value)
    except OSError:
        pass  # the peer may already be gone; the pump will find out


def _adopted_label(sock: stdlib_socket.socket) -> str:
    name = format_sockaddr(sock.getsockname())
    return f"udp://{name}" if sock.type == stdlib_socket.SOCK_DGRAM else name


def _budget(config: Config) -> SourceBudget:
    limits = config.limits
    return SourceBudget(limits.max_datagrams_per_second_per_ip, limits.max_datagram_bytes_per_second_per_ip)


def _single(group: BaseExceptionGroup[SupervisorGaveUp]) -> SupervisorGaveUp:
    for exc in group.exceptions:
        if isinstance(exc, SupervisorGaveUp):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            return _single(exc)
    raise group  # pragma: no cover - except* only passes groups holding one
