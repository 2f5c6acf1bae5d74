"""From accepted socket to served connection (I/O): admit or refuse, then start its task.

The path of a new connection, all synchronous up to the task start so the counts the next accept sees
are exact::

    accept_loop (listeners.py) -> Intake.accepted: socket options, PROXY header? (proxied.py)
        -> _admit: Admission.admit (admission.py) -> _serve: Connection.run in the handler nursery
                                                 \\-> _refuse: refusal text, lingering close (closing.py)

Health checks (PROXY v2 LOCAL) are served like clients but neither counted nor listed. What the path
reads of the configuration is one :class:`~trio_echo.runtime.Settings`, swapped whole on reload.
"""

from __future__ import annotations

import functools
import socket as stdlib_socket
import sys

import attrs
import trio

from .addresses import WEB_TRANSPORTS, format_host_port, format_sockaddr
from .admission import Admission, in_any, source_of
from .buffers import page_aligned
from .closing import refuse
from .connection import Connection
from .echo import EchoSession
from .events import Flag
from .faults import ConnectionFaults, FaultPlan
from .listeners import ListeningSocket, as_stream
from .policy import Closed, ConnectionPolicy
from .proxied import receive_header
from .proxyproto import ProxyHeader
from .reasons import Reason
from .relay import Relay
from .runtime import Settings
from .stats import ConnectionInfo, Stats
from .tls import Contexts
from .trace import Tracer
from .web import WebConnection, WebPolicy

# TCP keepalive on accepted sockets (PRODUCT.md): first probe after 60 s idle, then every 10 s, 5 probes.
KEEPALIVE_OPTIONS = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 5))
# Every connection task's name: one shared string (trio would otherwise format a new one per task).
CONNECTION_TASK = "trio_echo.connection"

Client = trio.abc.Stream | stdlib_socket.socket


class Intake:
    """Admission and start of every connection of one server.

    Args:
        settings: what the accept path reads; replace with :meth:`configure`.
        stats: the connection table and counters.
        tracer: ``conn`` events go here.
        tls: the TLS contexts of ``tls://`` and ``https://`` listeners.
        worker: this worker's index, if a worker (the web echo names it).
    """

    def __init__(
        self,
        settings: Settings,
        stats: Stats,
        tracer: Tracer,
        tls: Contexts,
        *,
        worker: int | None = None,
        relay: Relay | None = None,
    ) -> None:
        self.stats = stats
        self.tracer = tracer
        self.admission = Admission(settings.config.limits, settings.max_connections)
        self.handlers: trio.Nursery | None = None  # the handler nursery, while the server runs
        self.draining = False
        self.quiet = trio.Event()  # set once draining and nothing is left open
        self._lingering_refusals = 0
        self._pending_headers = 0  # PROXY listeners: accepted, header not read yet
        # PROXY v2 LOCAL connections: served, but not counted as clients.
        self.health_checks: dict[EchoSession, Connection | WebConnection] = {}
        # One read buffer for every socket pump of this server (see ConnectionPolicy's ``scratch``).
        self._scratch = page_aligned(settings.config.limits.buffer_size)
        self._relay = relay
        self._identity = WebPolicy.identity(worker)
        self.configure(settings, tls)

    def configure(self, settings: Settings, tls: Contexts) -> None:
        """Use ``settings`` for connections accepted from now on; open ones keep their policy."""
        limits = settings.config.limits
        self.admission.configure(limits, settings.max_connections)
        if len(self._scratch) < limits.buffer_size:
            # Grow only: open connections may still read up to their own (older) buffer size.
            self._scratch = page_aligned(limits.buffer_size)
        client = ConnectionPolicy.from_limits(
            limits,
            tracer=self.tracer,
            scratch=self._scratch,
            on_close=self._closed,
            on_fault=self.fault_applied,
            relay=self._relay,
        )
        self._client_policy = client
        self._health_check_policy = attrs.evolve(client, on_close=self._health_check_closed)
        self._web = WebPolicy(
            max_message_size=limits.max_message_size,
            request_timeout=limits.request_timeout,
            server=self._identity,
            on_request=self._http_answered,
            on_message=self._websocket_echoed,
        )
        self._tls = tls
        self.settings = settings
        # The fault profile in force per listener: the file's, until the admin channel sets another
        # (a reload applies the file's again).
        self.fault_plans: dict[str, FaultPlan] = {
            entry.label: FaultPlan(entry.faults, settings.config.faults[entry.faults])
            for entry in settings.config.server.listen
            if entry.faults
        }

    @property
    def held(self) -> int:
        """Connections holding a descriptor: clients, PROXY headers being read, health checks."""
        return self.stats.active + self._pending_headers + len(self.health_checks)

    def end_keep_alives(self) -> None:
        """Draining: HTTP clients waiting between requests are closed now, and one mid-request
        after its answer (``connection: close``), rather than holding the drain for
        ``drain_timeout``; WebSockets, like TCP clients, get the drain timeout to finish."""
        for info in list(self.stats.connections.values()):
            if isinstance(info.handle, WebConnection):
                info.handle.end_keep_alive()

    def close_all(self, reason: Reason) -> None:
        """Ask every open connection, health checks included, to close gracefully."""
        for info in list(self.stats.connections.values()):
            if info.handle is not None:
                info.handle.close(reason)
        for conn in list(self.health_checks.values()):
            conn.close(reason)

    # -- the accept path ------------------------------------------------------------------------------

    def accepted(
        self, label: str, listener: ListeningSocket, sock: stdlib_socket.socket, peer: object
    ) -> None:
        """``accept_loop``'s callback: the server owns ``sock`` from here on."""
        ip: str | None = None
        if sock.family != stdlib_socket.AF_UNIX:
            _configure_accepted(sock, keepalive=self.settings.config.limits.keepalive)
            # Interned: every connection from one address shares one string (held until it closes).
            ip = sys.intern(str(peer[0])) if isinstance(peer, tuple) else None
        peer_name = format_sockaddr(peer) if peer else listener.name
        options = self.settings.listen_options.get(label)  # None: a socket systemd passed (plain TCP)
        if options is None or options.proxy_protocol == "off":
            self.admit(self._transport(sock, label), ip, peer_name, label)
            return
        # A PROXY listener: only trusted proxies may speak, and what they say comes first. Unix
        # peers are trusted (the socket file's permissions decide who may connect).
        if ip is not None and not in_any(source_of(ip)[0], self.settings.trusted.get(label, ())):
            self._refused(sock, Reason.UNTRUSTED_PROXY, peer_name, label)
        elif self.admission.full(self.held):  # a connection waiting for its header holds a descriptor
            self._refused(sock, Reason.MAX_CONNECTIONS, peer_name, label)
        else:
            assert self.handlers is not None
            self._pending_headers += 1
            on_header = functools.partial(self._header_received, proxy_ip=ip, proxy=peer_name, label=label)
            self.handlers.start_soon(receive_header, sock, options, on_header)

    def admit(
        self,
        stream: Client,
        ip: str | None,
        peer: str,
        listener: str,
        *,
        proxy: str = "",
        header: ProxyHeader | None = None,
    ) -> None:
        """Admit or refuse a new connection (also ``EchoServer.serve_stream``'s way in); ``header`` is
        the PROXY header it came with (the web echo shows it)."""
        reason = self.admission.admit(ip, self.held, trio.current_time())
        if reason is not None:
            self._refused(stream, reason, peer, listener)
            return
        settings = self.settings
        info = self.stats.open(
            peer=peer,
            listener=listener,
            now=trio.current_time(),
            buffer_size=settings.config.limits.buffer_size,
            greeting=settings.greeting,
            farewell=settings.farewell,
        )
        info.proxy = proxy
        info.ip = ip
        self._serve(stream, info, header)

    def fault_applied(self, conn_id: int | None, kind: str, fields: dict[str, object]) -> None:
        """``policy.on_fault``: count a fault and trace it (``fault.applied``; UDP's name no
        connection, ``conn_id`` None, but a listener and a peer)."""
        self.stats.faults[kind] += 1
        if self.tracer.conn:
            named = {"conn_id": conn_id} if conn_id is not None else {}
            self.tracer.emit(Flag.CONN, "fault.applied", kind=kind, **named, **fields)

    def _transport(self, sock: stdlib_socket.socket, label: str) -> Client:
        """What the connection talks to: the socket itself (the pump's fast path uses it directly),
        or on a ``tls://`` (``https://``) listener a TLS stream over it (the handshake runs in the
        connection's task), or on an ``http://`` listener a socket stream for h11."""
        options = self.settings.listen_options.get(label)
        transport = options.address.transport if options is not None else "tcp"
        if transport == "tls" and self._tls.stream is not None:
            return trio.SSLStream(as_stream(sock), self._tls.stream, server_side=True)
        if transport == "https" and self._tls.web is not None:
            return trio.SSLStream(as_stream(sock), self._tls.web, server_side=True)
        return sock  # (tcp, and http: the web connection wraps it, keeping the socket for its fast path)

    def _is_web(self, label: str) -> bool:
        options = self.settings.listen_options.get(label)
        return options is not None and options.address.transport in WEB_TRANSPORTS

    def _http_answered(self, status: int) -> None:
        self.stats.http_requests[str(status)] += 1

    def _websocket_echoed(self, kind: str) -> None:
        self.stats.websocket_messages[kind] += 1

    def _header_received(
        self,
        sock: stdlib_socket.socket,
        header: ProxyHeader | None,
        problem: str,
        *,
        proxy_ip: str | None,
        proxy: str,
        label: str,
    ) -> None:
        self._pending_headers -= 1
        if header is None:
            self._refused(sock, Reason.PROXY_HEADER, proxy, label, message=problem)
        elif header.local:
            self._health_check(sock, label, header)
        elif isinstance(header.source, tuple):
            self.admit(
                self._transport(sock, label),
                header.source[0],
                format_host_port(*header.source),
                label,
                proxy=proxy,
                header=header,
            )
        elif isinstance(header.source, str):
            self.admit(
                self._transport(sock, label), None, f"unix:{header.source}", label, proxy=proxy, header=header
            )
        else:  # v1 UNKNOWN, v2 UNSPEC: the proxy does not know; its own address is all we have
            self.admit(self._transport(sock, label), proxy_ip, proxy, label, proxy=proxy, header=header)

    # -- serving --------------------------------------------------------------------------------------

    def _serve(self, stream: Client, info: ConnectionInfo, header: ProxyHeader | None = None) -> None:
        """Start the connection's task: ``Connection.run`` itself (no wrapper coroutine, so an idle
        connection keeps one frame less), or on a web listener ``WebConnection.run``, with the
        bookkeeping before it here and after it in ``_closed``."""
        assert self.handlers is not None
        plan = self.fault_plans.get(info.listener)
        faults = plan.draw() if plan is not None else None
        conn: Connection | WebConnection
        if self._is_web(info.listener):
            conn = self._web_connection(
                stream, info, self._client_policy, label=info.listener, header=header, faults=faults
            )
        else:
            conn = Connection(stream, info, self._client_policy, faults)
        info.handle = conn
        if self.draining:
            conn.close(Reason.DRAIN)
        if self.tracer.conn:
            via = {"proxy": info.proxy} if info.proxy else {}
            self.tracer.emit(
                Flag.CONN, "conn.open", conn_id=info.id, peer=info.peer, listener=info.listener, **via
            )
        self.handlers.start_soon(conn.run, name=CONNECTION_TASK)

    def _health_check(self, sock: stdlib_socket.socket, label: str, header: ProxyHeader) -> None:
        """A load balancer's own connection (PROXY v2 LOCAL): echoed like any other, so a
        send/expect check (or an HTTP check on a web listener) works, but neither counted nor listed
        as a client. Drain closes it too."""
        assert self.handlers is not None
        self.stats.health_checks[label] += 1
        session = EchoSession(self.settings.config.limits.buffer_size)
        plan = self.fault_plans.get(label)  # a faulty backend fails its load balancer's checks too
        faults = plan.draw() if plan is not None else None
        policy = self._health_check_policy
        stream = self._transport(sock, label)
        conn: Connection | WebConnection
        if self._is_web(label):
            conn = self._web_connection(stream, session, policy, label=label, header=header, faults=faults)
        else:
            conn = Connection(stream, session, policy, faults)
        self.health_checks[session] = conn
        if self.draining:
            conn.close(Reason.DRAIN)
        self.handlers.start_soon(conn.run, name=CONNECTION_TASK)

    def _web_connection(
        self,
        stream: Client,
        session: EchoSession,
        policy: ConnectionPolicy,
        *,
        label: str,
        header: ProxyHeader | None,
        faults: ConnectionFaults | None,
    ) -> WebConnection:
        raw = None
        if isinstance(stream, stdlib_socket.socket):  # plain http:// (serve_stream hands in streams)
            raw, stream = stream, as_stream(stream)
        return WebConnection(
            stream, session, policy, self._web, listener=label, header=header, faults=faults, raw=raw
        )

    def _closed(self, conn: Closed, reason: Reason) -> None:
        info = conn.info
        assert info is not None
        self.stats.close(info, reason)
        self.admission.release(info.ip)
        if self.tracer.conn:
            self.tracer.emit(
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

    def _health_check_closed(self, conn: Closed, _reason: Reason) -> None:
        del self.health_checks[conn.session]
        self._check_quiet()

    def _check_quiet(self) -> None:
        if self.draining and not self.stats.connections and not self.health_checks:
            self.quiet.set()

    # -- refusing -------------------------------------------------------------------------------------

    def _refused(
        self, stream: Client, reason: Reason, peer: str, listener: str, message: str | None = None
    ) -> None:
        assert self.handlers is not None
        self.stats.refuse(reason)
        if self.tracer.conn:
            fields = {"message": message} if message else {}
            self.tracer.emit(Flag.CONN, "conn.refused", peer=peer, listener=listener, reason=reason, **fields)
        if self._lingering_refusals >= self.settings.max_lingering_refusals:
            # A flood: no descriptor may wait on a polite goodbye.
            if isinstance(stream, stdlib_socket.socket):
                stream.close()
            else:
                self.handlers.start_soon(trio.aclose_forcefully, stream)
            return
        self._lingering_refusals += 1
        self.handlers.start_soon(
            self._refuse, as_stream(stream) if isinstance(stream, stdlib_socket.socket) else stream
        )

    async def _refuse(self, stream: trio.abc.Stream) -> None:
        try:
            settings = self.settings
            await refuse(stream, settings.refusal, patience=settings.refusal_patience)
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
