"""One connection on an ``http://`` or ``https://`` listener (I/O): the WebSocket echo and the JSON
echo of every other request.

The connection was admitted like any other (``intake.py``: caps, per-IP, allow/deny, PROXY header);
here it reads requests with h11 (heads bounded by ``MAX_HEAD``, bodies by
``limits.max_message_size``), asks :mod:`trio_echo.webecho` what each one gets and answers it::

    WebConnection.run ── TLS handshake (https://), within limits.tls_handshake_timeout
      └─ _requests: keep-alive loop ── idle_timeout until a request's first byte,
           │                            request_timeout for its head and body (408 past it)
           ├─ Route.ECHO ......... ?delay=, the JSON document, send within send_timeout
           ├─ Route.PAGE ......... the page that tries the WebSocket echo
           └─ Route.WEBSOCKET .... _websocket: trio-websocket over the bytes read so far, every
                                   message sent back as it came (text as text), idle_timeout per wait

Timeouts are cancel scopes around exactly the wait they limit; the connection's own scope
(``self.scope``, which ``close`` cancels) carries the lifetime. A malformed request gets its 400
(431, 413, 426, 408) and a close; no input makes a traceback.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import math
import os
import socket
import ssl
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import attrs
import h11
import trio
import wsproto
import wsproto.frame_protocol
from wsproto import events as wsevents
from wsproto.connection import ConnectionState

from . import webecho
from ._version import __version__
from .admin.table import socket_tcp_info
from .closing import close_gracefully
from .connection import PEER_GONE_ERRNOS
from .echo import EchoSession
from .events import Flag
from .faulted import FaultedSender, FaultEnded, acknowledged, report, reset
from .faults import ConnectionFaults, Ending
from .policy import ConnectionPolicy
from .proxyproto import ProxyHeader
from .reasons import PHASE_REASON, Phase, Reason
from .stats import ConnectionInfo
from .tls import sni_of

logger = logging.getLogger("trio_echo.web")

MAX_HEAD = 16 * 1024  # bytes of request line and headers (h11 answers 431 past it)
RECEIVE_SIZE = 65536
FAIR_SHARE = 32  # WebSocket fast path: reads between forced checkpoints when data never runs out
SERVER_HEADER = f"trio-echo/{__version__}"
SERVER_BYTES = SERVER_HEADER.encode()
# Close codes (RFC 6455 section 7.4.1): ours when the server ends a WebSocket.
GOING_AWAY = 1001
TCP_FIGURES = ("rtt_us", "mss", "pmtu")
_PHRASES = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}
# Why a connection closed after an error answer, by its status (anything else: bad_request).
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
ERROR_REASONS = {408: Reason.REQUEST_TIMEOUT, 413: Reason.TOO_LARGE, 431: Reason.TOO_LARGE}


@attrs.frozen(eq=False)
class WebPolicy:
    """What every web connection of one server shares besides the ``ConnectionPolicy``.

    Args:
        max_message_size: the largest request body or WebSocket message (413 / close 1009 past it).
        request_timeout: seconds a request's head and body may take once its first byte is in.
        server: the ``server`` part of the JSON (host name, pid, worker).
        on_request: ``on_request(status)`` per answer (the requests-by-status counter).
        on_message: ``on_message(kind)`` per WebSocket message echoed (``text`` / ``binary``).
    """

    max_message_size: int = 1024 * 1024
    request_timeout: float = 30.0
    server: dict[str, object] = attrs.field(factory=dict)
    on_request: Callable[[int], None] | None = None
    on_message: Callable[[str], None] | None = None

    @staticmethod
    def identity(worker: int | None) -> dict[str, object]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "worker": worker}


class CountingStream(trio.abc.Stream):
    """What a web connection's h11 and wsproto read from and write to: adds what passes to the
    session's ``bytes_in`` / ``bytes_out`` (the connection table and the totals read them there, as
    for a TCP connection), and sends through the connection's faults when it has some (``sender``).

    With ``raw`` (plain http://) and no faults it reads and writes on the socket itself, waiting
    through trio only when the kernel says EAGAIN, with the socket pump's early read: trio's socket
    stream layer cost a fifth of the server's CPU per WebSocket message (docs/performance.md).
    """

    def __init__(
        self, inner: trio.abc.Stream, session: EchoSession, raw: socket.socket | None = None
    ) -> None:
        self.inner = inner
        self._session = session
        self._raw = raw
        self._reads = 0
        self.sender: FaultedSender | None = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._raw is not None and self.sender is None:
            self._reads += 1
            data: bytes | bytearray = await _receive_raw(
                self._raw, max_bytes or RECEIVE_SIZE, fair=self._reads % FAIR_SHARE == 0
            )
        else:
            data = await self.inner.receive_some(max_bytes)
        self._session.bytes_in += len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        sender = self.sender
        if sender is None:
            if self._raw is not None:
                await _send_raw(self._raw, data)
            else:
                await self.inner.send_all(data)
            self._session.bytes_out += len(data)
            return
        sent, ending = await sender.send_all(self.inner, data)
        self._session.bytes_out += sent
        if ending is not None:
            raise FaultEnded(ending)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Ended(Exception):
    """The request loop is over, for ``reason``."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason)
        self.reason = reason


_page_cache: dict[str, bytes] = {}


def page() -> bytes:
    """The page that tries the WebSocket echo (one file, its script inline: no CDN, no build step)."""
    if "page" not in _page_cache:
        _page_cache["page"] = (
            importlib.resources.files(__package__).joinpath("assets", "echo.html").read_bytes()
        )
    return _page_cache["page"]


class WebConnection:
    """One client of a web listener; ``run`` always closes its stream.

    Args:
        stream: the client (a ``trio.SocketStream``, or a ``trio.SSLStream`` over one for https://).
        session: its table entry (``ConnectionInfo``) or, for a load balancer's health check, a bare
            session; either way its byte counts are kept.
        policy: the timeouts, tracer and ``on_close`` every connection shares.
        web: what web connections share besides.
        listener: the listener's label (the JSON's ``connection.listener``).
        header: the PROXY header the connection came with, if any.
        faults: drawn from the listener's fault profile, if any.
        raw: on a plain http:// listener, the socket under ``stream``: without faults requests
            and messages are read and written on it directly (see ``CountingStream``).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        session: EchoSession,
        policy: ConnectionPolicy,
        web: WebPolicy,
        *,
        listener: str,
        header: ProxyHeader | None = None,
        faults: ConnectionFaults | None = None,
        raw: socket.socket | None = None,
    ) -> None:
        self.stream = stream
        self.session = session
        self.policy = policy
        self.web = web
        self.listener = listener
        self.header = header
        self.faults = faults
        self.scope = trio.CancelScope()
        self.close_reason: Reason | None = None
        self.protocol = "http"  # "websocket" once upgraded (the admin connection list shows it)
        self.requests = 0
        self._answering = False  # between a request's end and its answer sent: close waits for it
        self._between_requests = False  # waiting for a keep-alive client's next request
        self._last_request = False  # draining: this answer is the connection's last
        self._wire = CountingStream(stream, session, raw)  # what h11 and wsproto talk through
        self._ending: Ending | None = None  # how the faults ended it (RESET: close with RST)
        lifetime = policy.max_lifetime
        self._lifetime_deadline = trio.current_time() + lifetime if lifetime else math.inf
        self.scope.deadline = self._lifetime_deadline
        self._phase = Phase.IDLE  # what the connection waits for (its deadline's reason)
        self._limit: trio.CancelScope | None = None  # the request loop's scope (its deadline: _phase's)
        self._close_code: int | None = None  # the WebSocket's close frame, for ws.close
        self._close_text: str | None = None
        self.set_faults(faults)

    @property
    def info(self) -> ConnectionInfo | None:
        return self.session if isinstance(self.session, ConnectionInfo) else None

    @property
    def conn_id(self) -> int | None:
        return self.session.id if isinstance(self.session, ConnectionInfo) else None

    def close(self, reason: Reason) -> None:
        """Ask the connection to close (drain, admin): at once while it waits, after the answer it
        is sending (with ``connection: close``)."""
        if self.close_reason is None:
            self.close_reason = reason
        if not self._answering:
            self.scope.cancel()

    def end_keep_alive(self) -> None:
        """The server is draining: close now if waiting for the next request, else after the
        answer to this one (a WebSocket is not affected)."""
        if self.protocol != "http":
            return
        if self._between_requests:
            self.close(Reason.DRAIN)
        else:
            self._last_request = True

    def set_faults(self, faults: ConnectionFaults | None) -> None:
        """Send through ``faults`` from the next write on (None: no faults). ``blackhole`` and
        ``reset_after`` act from the start of a connection only."""
        self.faults = faults
        self._wire.sender = FaultedSender(faults, self.policy, self.conn_id) if faults is not None else None

    # -- the task -------------------------------------------------------------------------------------

    async def run(self) -> Reason:
        """Serve requests until the client closes, a limit ends the connection, or it is closed.
        Only cancellation from outside (a hard stop) propagates."""
        reason = Reason.ERROR
        try:
            outer = self.scope  # (the WebSocket echo puts a scope of its own in self.scope)
            with outer:
                if self.close_reason is not None:
                    reason = self.close_reason
                elif isinstance(self.stream, trio.SSLStream) and not await self._handshake(self.stream):
                    reason = Reason.TLS_HANDSHAKE
                else:
                    reason = await self._serve()
            if outer.cancelled_caught:
                reason = self.close_reason or Reason.LIFETIME
        except trio.BrokenResourceError as exc:
            tls_failure = isinstance(exc.__cause__, ssl.SSLError) and self.session.bytes_in == 0
            reason = Reason.TLS_HANDSHAKE if tls_failure else Reason.RESET
        except trio.ClosedResourceError:
            reason = self.close_reason or Reason.RESET
        except OSError as exc:  # the WebSocket fast path's own socket calls
            if exc.errno not in PEER_GONE_ERRNOS:
                raise
            reason = Reason.RESET
        except Exception:
            logger.exception("web connection %s failed", self.conn_id)
            if self.policy.tracer is not None:
                self.policy.tracer.emit(
                    Flag.ERROR, "error", conn_id=self.conn_id, message="web connection handler failed"
                )
        finally:
            try:
                await self._finish(reason)
            finally:
                if self.policy.on_close is not None:
                    self.policy.on_close(self, reason)
        return reason

    async def _serve(self) -> Reason:
        """The requests, through the faults if the connection has some."""
        faults = self.faults
        if faults is None:
            return await self._requests(self._wire)
        if faults.profile.blackhole:
            report(self.policy, faults, self.conn_id, "blackhole")
            await trio.sleep(self.policy.idle_timeout)
            return Reason.FAULT
        with trio.move_on_after(faults.profile.reset_after or math.inf) as timer:
            try:
                reason = await self._requests(self._wire)
            except FaultEnded as ended:
                return await self._fault_ended(ended.ending)
        if timer.cancelled_caught:
            report(self.policy, faults, self.conn_id, "reset_after", seconds=faults.profile.reset_after)
            self._ending = Ending.RESET
            return Reason.FAULT
        faults = self.faults or faults  # (set live meanwhile: the profile now)
        if reason is Reason.EOF and faults.profile.slow_close:
            report(self.policy, faults, self.conn_id, "slow_close", seconds=faults.profile.slow_close)
            await trio.sleep(faults.profile.slow_close)
        return reason

    async def _fault_ended(self, ending: Ending) -> Reason:
        """A byte threshold was reached: reset (once the client has every byte), close, or stall."""
        faults = self._wire.sender.faults if self._wire.sender is not None else None
        if faults is not None:
            report(self.policy, faults, self.conn_id, ending.value, bytes=faults.echoed)
        if ending is Ending.RESET:
            await acknowledged(self.stream, self.policy.send_timeout)
            self._ending = ending
        elif ending is Ending.STALL:
            await trio.sleep(self.policy.idle_timeout)  # hold it, silent, as a hung server would
        return Reason.FAULT

    async def _handshake(self, stream: trio.SSLStream[trio.abc.Stream]) -> bool:
        with trio.move_on_after(self.policy.tls_handshake_timeout) as scope:
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError:
                return False
        return not scope.cancelled_caught

    async def _finish(self, reason: Reason) -> None:
        if self._ending is Ending.RESET:
            reset(self.stream)  # SO_LINGER 0: the close sends RST (and TLS sends no close_notify first)
            await trio.aclose_forcefully(self.stream)
            return
        if reason in (Reason.TLS_HANDSHAKE, Reason.RESET) or self.protocol == "websocket":
            # (a WebSocket's closing handshake has already run, and trio-websocket closed the stream)
            await trio.aclose_forcefully(self.stream)
            return
        # A lingering close, so a 400 or a last answer reaches a client still sending.
        await close_gracefully(self.stream, linger_timeout=self.policy.linger_timeout, shut_write=True)

    # -- HTTP -----------------------------------------------------------------------------------------

    async def _requests(self, stream: CountingStream) -> Reason:
        """The keep-alive loop, in one cancel scope whose deadline is that of the current wait
        (idle_timeout between requests, request_timeout once one began, send_timeout while
        answering): three deadline moves per request cost less than two scopes (measured)."""
        self._limit = limit = trio.CancelScope()
        with limit:
            reason = await self._serve_requests(stream)
        self._limit = None
        if not limit.cancelled_caught:
            return reason
        if self._phase is Phase.REQUEST:
            await self._answer_error(
                stream,
                408,
                f"request not received within limits.request_timeout ({self.web.request_timeout:g} s)",
            )
        return PHASE_REASON[self._phase]

    def _expect(self, phase: Phase, seconds: float) -> None:
        """The request loop waits for ``phase`` now, for at most ``seconds`` (inf: only the lifetime)."""
        self._phase = phase
        assert self._limit is not None
        self._limit.deadline = trio.current_time() + seconds

    async def _serve_requests(self, stream: CountingStream) -> Reason:
        leftover = b""  # what a keep-alive client sent ahead of our answer: the next request's start
        while True:
            # A fresh h11 parser per request (cheap), fed what came ahead; answers are written by
            # webecho.response_head, so h11 only ever reads.
            connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
            if leftover:  # (receive_data(b"") would tell h11 the client closed)
                connection.receive_data(leftover)
            try:
                request, body, raw = await self._read_request(stream, connection, leftover)
            except _Ended as ended:
                return ended.reason
            except webecho.BadRequest as exc:
                await self._answer_error(stream, exc.status, str(exc), exc.headers)
                return ERROR_REASONS.get(exc.status, Reason.BAD_REQUEST)
            headers = _decoded(request.headers.raw_items())
            method = request.method.decode("ascii", "replace")
            target = request.target.decode("ascii", "replace")
            http_version = request.http_version.decode("ascii", "replace")
            path, query = webecho.split_target(target)
            kind = webecho.route(method, path, headers)
            self.requests += 1
            if kind is webecho.Route.WEBSOCKET:
                try:
                    webecho.check_websocket(method, headers)
                except webecho.BadRequest as exc:
                    await self._answer_error(stream, exc.status, str(exc), exc.headers)
                    return Reason.BAD_REQUEST
                return await self._websocket(stream, raw, body, path, headers)
            if kind is webecho.Route.PAGE:
                status, answer, content_type, interim = 200, page(), "text/html; charset=utf-8", None
            else:
                try:
                    shaped = webecho.shape(query)
                except webecho.BadRequest as exc:
                    await self._answer_error(stream, exc.status, str(exc), exc.headers)
                    return Reason.BAD_REQUEST
                if shaped.delay:
                    self._expect(Phase.DELAY, math.inf)  # (our own pause: only the lifetime limits it)
                    await trio.sleep(shaped.delay)
                status, interim, content_type = shaped.status, shaped.interim, "application/json"
                document = webecho.echo_document(
                    method=method,
                    target=target,
                    http_version=http_version,
                    headers=headers,
                    body=body,
                    connection=self._describe(),
                )
                answer = webecho.render(document)
            if not webecho.may_have_body("GET", status):
                answer = b""  # 204 and 304 have no body (HEAD keeps the length: _respond sends none)
            keep = webecho.keeps_alive(http_version, headers) and self.close_reason is None
            await self._respond(
                stream,
                status,
                answer,
                content_type,
                interim=interim,
                head=method == "HEAD",
                close=not keep or self._last_request,
            )
            self._trace_request(status, method=method, path=path)
            if self._last_request:
                return Reason.DRAIN
            if not keep:
                return self.close_reason or Reason.EOF
            leftover = connection.trailing_data[0]

    async def _read_request(
        self, stream: CountingStream, connection: h11.Connection, leftover: bytes
    ) -> tuple[h11.Request, bytes, bytes]:
        """The next request, its body and the raw bytes of it read so far (an upgrade replays them
        to wsproto). Raises ``_Ended`` when the connection is over without one, BadRequest for what
        gets an error answer."""
        raw = bytearray(leftover)
        request: h11.Request | None = None
        body = bytearray()
        started: float | None = trio.current_time() if raw else None
        continued = False
        while True:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError as exc:
                raise webecho.BadRequest(f"malformed request: {exc}", exc.error_status_hint) from None
            if event is h11.NEED_DATA:
                if connection.they_are_waiting_for_100_continue and not continued:
                    continued = True  # (curl waits a second for it before it sends a large body)
                    await self._send(stream, CONTINUE)
                data = await self._receive(stream, started)
                if started is None:
                    started = trio.current_time()
                raw += data
                connection.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Request):
                request = event
                # h11 bounds only a head still incomplete; one that came whole in a read is bounded here
                if len(raw) - len(connection.trailing_data[0]) > MAX_HEAD:
                    raise webecho.BadRequest(f"request head over {MAX_HEAD} bytes", 431)
                length = _content_length(event)
                if length is not None and length > self.web.max_message_size:
                    raise webecho.BadRequest(
                        f"request body of {length} bytes is over limits.max_message_size "
                        f"({self.web.max_message_size})",
                        413,
                    )
                if b"websocket" in _tokens(event, b"upgrade"):
                    # h11 stops at an upgrade: the head, and (as the "body") the frames behind it
                    ahead = connection.trailing_data[0]
                    return event, ahead, bytes(raw[: len(raw) - len(ahead)])
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.web.max_message_size:
                    raise webecho.BadRequest(
                        f"request body is over limits.max_message_size ({self.web.max_message_size})", 413
                    )
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body), bytes(raw)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                raise _Ended(Reason.EOF)  # (PAUSED comes only after an upgrade, handled above)

    async def _receive(self, stream: CountingStream, started: float | None) -> bytes | bytearray:
        """One read: within ``idle_timeout`` while no byte of a request is in (a keep-alive client
        may just go quiet), within ``request_timeout`` of its first byte after that (408)."""
        if started is not None:
            self._phase = Phase.REQUEST
            assert self._limit is not None
            self._limit.deadline = started + self.web.request_timeout
            return await stream.receive_some(RECEIVE_SIZE)
        self._expect(Phase.IDLE, self.policy.idle_timeout)
        self._between_requests = True
        try:
            return await stream.receive_some(RECEIVE_SIZE)
        finally:
            self._between_requests = False

    def _describe(self) -> dict[str, object]:
        """The JSON's ``connection``: who this is, how it came, what TCP says of it."""
        info = self.info
        described: dict[str, object] = {
            "id": self.conn_id,
            "peer": info.peer if info is not None else None,
            "listener": self.listener,
            "via": (info.proxy or None) if info is not None else None,
            "proxy": webecho.proxy_fields(self.header),
            "tls": _tls_fields(self.stream),
            "tcp": {key: value for key, value in socket_tcp_info(self.stream).items() if key in TCP_FIGURES}
            or None,
            "requests": self.requests,
            "server": self.web.server,
        }
        return described

    async def _respond(
        self,
        stream: CountingStream,
        status: int,
        body: bytes,
        content_type: str,
        *,
        interim: int | None = None,
        head: bool = False,
        close: bool = False,
        extra: webecho.Headers = (),
    ) -> None:
        data = webecho.response_head(interim, ()) if interim is not None else b""
        headers = [
            ("content-type", content_type),
            ("content-length", str(len(body))),
            ("server", SERVER_HEADER),
            ("cache-control", "no-store"),
            *extra,
        ]
        if close:
            headers.append(("connection", "close"))
        data += webecho.response_head(status, headers)
        if not head:
            data += body
        self._answering = True  # a close from now on waits for the answer to be out
        try:
            await self._send(stream, data)
        finally:
            self._answering = False
        if self.web.on_request is not None:
            self.web.on_request(status)

    async def _send(self, stream: CountingStream, data: bytes) -> None:
        """One write within ``send_timeout``: in the request loop its scope's deadline, outside it
        (an error answer after the loop) a scope of its own."""
        if self._limit is not None:
            self._expect(Phase.SEND, self.policy.send_timeout)
            await stream.send_all(data)
            return
        with trio.move_on_after(self.policy.send_timeout) as late:
            await stream.send_all(data)
        if late.cancelled_caught:
            raise _Ended(Reason.SEND_TIMEOUT)

    async def _answer_error(
        self, stream: CountingStream, status: int, message: str, extra: webecho.Headers = ()
    ) -> None:
        """An error answer (as JSON too) and the end of the connection (``connection: close``)."""
        self._trace_request(status, message=message)
        body = webecho.error_document(status, message)
        with contextlib.suppress(_Ended):  # (a client that does not read its 400 is gone anyway)
            await self._respond(stream, status, body, "application/json", close=True, extra=extra)

    def _trace_request(self, status: int, **fields: object) -> None:
        tracer = self.policy.tracer
        if tracer is not None and tracer.conn:
            tracer.emit(
                Flag.CONN,
                "http.request",
                conn_id=self.conn_id,
                listener=self.listener,
                status=status,
                **fields,
            )

    # -- WebSocket ------------------------------------------------------------------------------------

    async def _websocket(
        self, stream: CountingStream, head: bytes, ahead: bytes, path: str, headers: webecho.Headers
    ) -> Reason:
        """The WebSocket echo, on wsproto in this one task (no reader task, no channel: a message
        costs one read and one write): every message back whole, as it came (text as text,
        fragments reassembled), pings answered, the client's close code and reason echoed; past
        ``max_message_size`` close 1009; the server's own close (drain, admin, timeouts) is 1001
        with the reason."""
        subprotocol = webecho.first_subprotocol(headers)
        ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        ws.receive_data(head)  # the request head h11 read
        request = next(ws.events(), None)
        if not isinstance(request, wsevents.Request):  # (check_websocket already vetted the head)
            return Reason.BAD_REQUEST
        accept = wsevents.AcceptConnection(subprotocol=subprotocol, extra_headers=[(b"server", SERVER_BYTES)])
        try:
            await self._send(stream, ws.send(accept))
        except FaultEnded as ended:
            return await self._fault_ended(ended.ending)
        if ahead:
            # Frames sent right behind the handshake: fed after the accept, because wsproto's
            # server side drops what came with the head (its accept does not pass h11's trailing
            # data on, as its client side does).
            ws.receive_data(ahead)
        self.protocol = "websocket"
        if self._limit is not None:
            self._limit.deadline = math.inf  # (the echo below keeps its own deadlines)
        if self.web.on_request is not None:
            self.web.on_request(101)
        self._trace_ws("ws.open", path=path, subprotocol=subprotocol)
        # From here close() and the lifetime cancel the echo alone, so the closing handshake that
        # says why still goes out (the connection's own scope would cut it off).
        outer, self.scope = self.scope, trio.CancelScope(deadline=self.scope.deadline)
        scope = self.scope
        outer.deadline = math.inf
        self._phase = Phase.IDLE
        reason: Reason | None = self.close_reason
        if reason is None:
            with scope:
                try:
                    reason = await self._echo_messages(stream, ws, scope)
                except FaultEnded as ended:
                    return await self._fault_ended(ended.ending)
            if scope.cancelled_caught:
                reason = self.close_reason or self._expired(scope)
        assert reason is not None
        if ws.state is ConnectionState.OPEN:
            # We end it: a close frame saying why, then (bounded) the client's answer.
            await self._close_websocket(stream, ws, GOING_AWAY, str(reason))
        self._trace_ws("ws.close", code=self._close_code, close_reason=self._close_text, reason=reason)
        return reason

    def _expired(self, scope: trio.CancelScope) -> Reason:
        """Why the echo's deadline fired: the lifetime, or the limit of what it was waiting for."""
        if scope.deadline >= self._lifetime_deadline:
            return Reason.LIFETIME
        return PHASE_REASON[self._phase]

    async def _echo_messages(
        self, stream: CountingStream, ws: wsproto.WSConnection, scope: trio.CancelScope
    ) -> Reason:
        idle, patience = self.policy.idle_timeout, self.policy.send_timeout
        lifetime = self._lifetime_deadline
        assembly = _Assembly()
        while True:
            out, ended = self._answer(ws, assembly)
            if out:
                self._phase = Phase.SEND
                scope.deadline = min(trio.current_time() + patience, lifetime)
                await stream.send_all(out)
            if ended is not None:
                if ended is Reason.TOO_LARGE:
                    await self._await_close(stream, ws)
                return ended
            self._phase = Phase.IDLE
            scope.deadline = min(trio.current_time() + idle, lifetime)
            data = await stream.receive_some(RECEIVE_SIZE)
            ws.receive_data(bytes(data) if data else None)

    def _answer(self, ws: wsproto.WSConnection, assembly: _Assembly) -> tuple[bytes, Reason | None]:
        """What wsproto's events ask us to send (echoes, pongs, close frames), and the reason the
        connection ends after it, if it does."""
        out = b""
        for event in ws.events():
            if isinstance(event, wsevents.Message):
                assembly.parts.append(event.data)
                assembly.size += len(event.data)
                limit = self.web.max_message_size
                if assembly.size > limit:
                    self._close_code, self._close_text = 1009, f"message over {limit} bytes"
                    return out + ws.send(wsevents.CloseConnection(1009, self._close_text)), Reason.TOO_LARGE
                if not event.message_finished:
                    continue
                answer: wsevents.Message[Any]
                if isinstance(event, wsevents.TextMessage):
                    answer, kind = wsevents.TextMessage("".join(assembly.parts)), "text"  # type: ignore[arg-type]
                else:
                    answer, kind = wsevents.BytesMessage(b"".join(assembly.parts)), "binary"  # type: ignore[arg-type]
                assembly.parts, assembly.size = [], 0
                out += ws.send(answer)
                if self.web.on_message is not None:
                    self.web.on_message(kind)
                tracer = self.policy.tracer
                if tracer is not None and tracer.data:
                    tracer.emit(
                        Flag.DATA, "ws.message", conn_id=self.conn_id, kind=kind, size=len(answer.data)
                    )
            elif isinstance(event, wsevents.Ping):
                out += ws.send(event.response())
            elif isinstance(event, wsevents.CloseConnection):
                self._close_code, self._close_text = event.code, event.reason
                if ws.state is ConnectionState.REMOTE_CLOSING:  # the client's close: echo it
                    return out + ws.send(event.response()), Reason.EOF
                if event.code == wsproto.frame_protocol.CloseReason.ABNORMAL_CLOSURE:
                    return out, Reason.RESET  # the connection went without a close frame
                # A frame wsproto cannot parse: close with its code (1002, 1007) and reason.
                return out + ws.send(wsevents.CloseConnection(event.code, event.reason)), Reason.BAD_REQUEST
        return out, None

    async def _close_websocket(
        self, stream: CountingStream, ws: wsproto.WSConnection, code: int, text: str
    ) -> None:
        self._close_code, self._close_text = code, text
        with trio.move_on_after(self.policy.linger_timeout or 1.0):
            try:
                await stream.send_all(ws.send(wsevents.CloseConnection(code, text)))
            except (trio.BrokenResourceError, trio.ClosedResourceError, FaultEnded):
                return  # (a send cut short by the deadline broke the stream: nothing more to say)
            await self._await_close(stream, ws)

    async def _await_close(self, stream: CountingStream, ws: wsproto.WSConnection) -> None:
        """After our close frame: read (and drop) until the client's close frame or EOF, within the
        linger timeout."""
        with trio.move_on_after(self.policy.linger_timeout or 1.0):
            try:
                while ws.state is not ConnectionState.CLOSED:
                    data = await stream.receive_some(RECEIVE_SIZE)
                    ws.receive_data(bytes(data) if data else None)
                    for _ in ws.events():
                        pass
                    if not data:
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def _trace_ws(self, event: str, **fields: object) -> None:
        tracer = self.policy.tracer
        if tracer is not None and tracer.conn:
            tracer.emit(Flag.CONN, event, conn_id=self.conn_id, listener=self.listener, **fields)


@attrs.define
class _Assembly:
    """A WebSocket message arriving in fragments, until its last one."""

    parts: list[bytes | bytearray | str] = attrs.field(factory=list)
    size: int = 0


async def _send_raw(sock: socket.socket, data: bytes | bytearray | memoryview) -> None:
    """Send on the non-blocking socket itself, waiting through trio only when the kernel's buffer
    is full. (A send cancelled midway leaves the answer cut: the connection ends then anyway.)"""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


async def _receive_raw(sock: socket.socket, size: int, *, fair: bool) -> bytes:
    """Read from the socket itself. When nothing is there yet, yield once and look again before
    waiting for readability: on a busy server the next message has usually arrived while the other
    connections ran (the socket pump's early read, connection.py). ``fair``: checkpoint first even
    if data is waiting, so a flood cannot starve the other connections."""
    if fair:
        await trio.lowlevel.checkpoint()
    for attempt in range(2):
        try:
            return sock.recv(size)
        except BlockingIOError:
            if attempt == 0:
                await trio.lowlevel.checkpoint()
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return sock.recv(size)
        except BlockingIOError:
            continue


def _decoded(items: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Header names as sent (h11 keeps their case in ``raw_items``) and values, as text."""
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in items]


def _tokens(request: h11.Request, name: bytes) -> set[bytes]:
    return {
        token.strip().lower() for key, value in request.headers if key == name for token in value.split(b",")
    }


def _content_length(request: h11.Request) -> int | None:
    for key, value in request.headers:
        if key == b"content-length":
            return int(value)  # (h11 has checked it is a number)
    return None


def _tls_fields(stream: trio.abc.Stream) -> dict[str, object] | None:
    """The JSON's ``tls``: version, cipher, SNI, ALPN, the client certificate's subject."""
    if not isinstance(stream, trio.SSLStream):
        return None
    cipher = stream.cipher()
    return {
        "version": stream.version(),
        "cipher": cipher[0] if cipher else None,
        # (a server-side SSL object does not report SNI: web_context's callback kept it there)
        "sni": sni_of(stream._ssl_object),
        "alpn": stream.selected_alpn_protocol(),
        "client_certificate": webecho.certificate_subject(stream.getpeercert()),
    }
