"""The admin port: one listener (a supervisor child of the server), HTTP and WebSocket on it.

Probes must keep answering whoever else connects, so a connection passes three bounded stages:

1. **Head**: the request head must arrive whole within ``admin.header_timeout`` (408 and close past
   it). At most ``admin.max_pending_requests`` connections may be in this stage: a new one beyond that
   drops the oldest, so clients that dribble heads (or send none) cannot keep a fresh probe out.
2. **Answer**: a plain HTTP answer is sent within ``RESPONSE_TIMEOUT`` and the connection closed.
3. **Channel**: a WebSocket upgrade finishes its handshake within ``HANDSHAKE_TIMEOUT``; only these
   count against ``admin.max_connections`` (503 past it).
"""

from __future__ import annotations

import functools
import importlib.resources
import ipaddress
import logging
import os
import socket
from collections.abc import Mapping

import attrs
import trio
from trio_websocket import wrap_server_stream

from trio_echo.addresses import format_host_port, format_sockaddr, parse_address
from trio_echo.config import AdminConfig
from trio_echo.errors import ConfigError
from trio_echo.listeners import ListeningSocket, accept_loop, as_stream, open_listeners

from . import metrics, protocol
from .channel import AdminChannel
from .http import BadRequest, ReplayStream, Request, read_request, request_timeout_answer, respond
from .routing import ASSETS, AccessPolicy, decide
from .token import configured_token, generate_token_file
from .view import ServerView

logger = logging.getLogger("trio_echo.admin")

HANDSHAKE_TIMEOUT = 10.0  # seconds for the WebSocket handshake, once the head is in
RESPONSE_TIMEOUT = 10.0  # seconds to send a plain answer (a client that does not read loses it)
TIMEOUT_ANSWER_PATIENCE = 1.0  # seconds to try telling a too-slow client 408
MAX_MESSAGE = 64 * 1024  # larger admin messages close the channel with 1009
# A connect storm must not overflow the accept queue: the kernel drops a SYN it has no room for, and
# the probe behind it waits for its retransmission (1 s, then 3 s), however fast we answer.
ADMIN_BACKLOG = 1024
DROP_LOG_INTERVAL = 1.0  # at most one log line per second about dropped or timed-out heads


def is_loopback(host: str | None) -> bool:
    """True for ``localhost`` and loopback literals; ``None`` (every address) is not loopback."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


class AdminServer:
    """The admin port of ``server``.

    Raises ConfigError at construction when the configured token is unreadable or malformed, or when a
    non-loopback address has no configured token.
    """

    def __init__(
        self,
        server: ServerView,
        config: AdminConfig,
        env: Mapping[str, str] | None = None,
        *,
        inherited: socket.socket | None = None,
    ) -> None:
        self._server = server
        self.config = config
        self._inherited = inherited
        self._env = dict(os.environ if env is None else env)
        self.token = configured_token(config.token_file, self._env)
        host = str(inherited.getsockname()[0]) if inherited is not None else parse_address(config.listen).host
        if self.token is None and not is_loopback(host):
            raise ConfigError(
                "admin.listen",
                config.listen,
                "a non-loopback admin address needs a configured token "
                "(admin.token_file or TRIO_ECHO_ADMIN_TOKEN)",
            )
        self.token_path: str | None = config.token_file or None
        self.url: str | None = None
        self._channels = 0
        # The cancel scopes of connections still sending their head, oldest first (insertion order).
        self._pending: dict[trio.CancelScope, None] = {}
        self._assets: dict[str, bytes] = {}
        self.heads_dropped = 0  # pending heads dropped for a newer connection
        self.heads_timed_out = 0  # heads not complete within header_timeout
        self._last_drop_log = -DROP_LOG_INTERVAL
        self._reported = (0, 0)

    def reconfigure(self, config: AdminConfig) -> None:
        """New origins, limits, stats interval and (if one is configured now) token; same address."""
        token = configured_token(config.token_file, self._env)
        if token is not None:
            self.token = token
            self.token_path = config.token_file or None
        self.config = config

    @property
    def channels(self) -> int:
        """Admin channels (WebSocket sessions) open now."""
        return self._channels

    @property
    def pending(self) -> int:
        """Connections still sending their request head."""
        return len(self._pending)

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        if self._inherited is not None:
            name = format_sockaddr(self._inherited.getsockname())
            address = parse_address(name)
            sockets = [ListeningSocket(self._inherited, name)]
        else:
            address = parse_address(self.config.listen)
            sockets = await open_listeners(address, backlog=ADMIN_BACKLOG)
        try:
            port = int(sockets[0].sock.getsockname()[1])
            if self.token is None:
                self.token, self.token_path = generate_token_file(port, self._env)
            self.url = f"http://{format_host_port(address.host or 'localhost', port)}/"
            for item in sockets:
                logger.info("admin port on %s", item.name)
            if self.token_path:
                logger.info("admin token in %s", self.token_path)
            logger.info("dashboard: %s#token=%s", self.url, self.token)
            task_status.started([item.name for item in sockets])
            async with trio.open_nursery() as nursery:
                for item in sockets:
                    nursery.start_soon(accept_loop, item, functools.partial(self._accepted, nursery))
        finally:
            if self._inherited is None:
                for item in sockets:
                    item.close()

    def _accepted(self, nursery: trio.Nursery, sock: socket.socket, _peer: object) -> None:
        if len(self._pending) >= self.config.max_pending_requests:
            # Full of unfinished heads: the oldest has had the longest to finish and goes first.
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            oldest.cancel()
            self.heads_dropped += 1
            self._log_drops()
        head_scope = trio.CancelScope()
        self._pending[head_scope] = None
        nursery.start_soon(self._handle, as_stream(sock), head_scope)

    async def _handle(self, stream: trio.SocketStream, head_scope: trio.CancelScope) -> None:
        try:
            request = await self._read_head(stream, head_scope)
            if request is None:
                return
            assert self.token is not None
            decision = decide(
                request.method,
                request.target,
                request.headers,
                AccessPolicy(self.token, self.config.allowed_origins),
                channels_open=self._channels,
                max_channels=self.config.max_connections,
            )
            if decision.kind == "ws":
                await self._channel(stream, request.raw)
                return
            status, body, content_type = await self._answer(
                decision.kind, decision.status, decision.message, request.target
            )
            with trio.move_on_after(RESPONSE_TIMEOUT):
                await respond(
                    stream,
                    request.connection,
                    status,
                    body,
                    content_type=content_type,
                    head_only=request.method == "HEAD",
                )
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away mid-answer
        except* Exception:
            # One admin client must never take the admin port down with it.
            logger.exception("admin connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _read_head(self, stream: trio.SocketStream, scope: trio.CancelScope) -> Request | None:
        """The request head, or None when the connection was answered (400, 408) or dropped (``scope``
        cancelled for a newer connection)."""
        with scope:
            try:
                with trio.fail_after(self.config.header_timeout):
                    return await read_request(stream)
            except BadRequest as exc:
                self._pending.pop(scope, None)  # answering now: no longer a pending head
                with trio.move_on_after(TIMEOUT_ANSWER_PATIENCE):
                    await respond(stream, exc.connection, 400, f"bad request: {exc}\n".encode())
                return None
            except trio.TooSlowError:
                self._pending.pop(scope, None)
                self.heads_timed_out += 1
                self._log_drops()
                with trio.move_on_after(TIMEOUT_ANSWER_PATIENCE):
                    await stream.send_all(request_timeout_answer())
                return None
            finally:
                self._pending.pop(scope, None)
        return None  # dropped for a newer connection (the scope was cancelled)

    def _log_drops(self) -> None:
        now = trio.current_time()
        if now - self._last_drop_log < DROP_LOG_INTERVAL:
            return
        dropped = self.heads_dropped - self._reported[0]
        timed_out = self.heads_timed_out - self._reported[1]
        self._last_drop_log, self._reported = now, (self.heads_dropped, self.heads_timed_out)
        logger.warning(
            "admin port: %d connections dropped unfinished for newer ones (admin.max_pending_requests "
            "= %d), %d request heads not complete within %g s, since the last report",
            dropped,
            self.config.max_pending_requests,
            timed_out,
            self.config.header_timeout,
        )

    async def _answer(self, kind: str, status: int, message: str, target: str) -> tuple[int, bytes, str]:
        text = "text/plain; charset=utf-8"
        server = self._server
        if kind == "reject":
            return status, f"{message}\n".encode(), text
        if kind == "healthz":
            return 200, b"ok\n", text
        if kind == "readyz":
            return (503, b"draining\n", text) if server.draining else (200, b"ready\n", text)
        if kind == "auth":
            return 204, b"", text
        if kind == "metrics":
            snapshot = attrs.evolve(
                await server.metrics_snapshot(),
                admin_requests_dropped={
                    "pending_full": self.heads_dropped,
                    "header_timeout": self.heads_timed_out,
                },
            )
            return 200, metrics.render(snapshot).encode(), metrics.CONTENT_TYPE
        path = target.split("?", 1)[0]
        name, content_type = ASSETS[path]
        return 200, self._asset(name), content_type

    def _asset(self, name: str) -> bytes:
        if name not in self._assets:
            self._assets[name] = (
                importlib.resources.files(__package__).joinpath("dashboard", name).read_bytes()
            )
        return self._assets[name]

    async def _channel(self, stream: trio.SocketStream, raw: bytes) -> None:
        self._channels += 1
        try:
            async with trio.open_nursery() as nursery:
                ws = None
                with trio.move_on_after(HANDSHAKE_TIMEOUT):
                    ws_request = await wrap_server_stream(
                        nursery, ReplayStream(stream, raw), message_queue_size=4, max_message_size=MAX_MESSAGE
                    )
                    offered = ws_request.proposed_subprotocols
                    ws = await ws_request.accept(
                        subprotocol=protocol.SUBPROTOCOL if protocol.SUBPROTOCOL in offered else None
                    )
                if ws is not None:
                    await AdminChannel(ws, self._server, self.config.stats_interval).run()
                nursery.cancel_scope.cancel()
        finally:
            self._channels -= 1
