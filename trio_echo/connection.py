"""The per-connection pump: the only code that reads from or writes to a client stream.

``Connection.run`` reads, feeds the :class:`~trio_echo.echo.EchoSession`, writes what it says, and
always ends with a lingering close. Transport errors are translated into a close reason here, at this
one edge. There are two pumps with one behaviour (the same test suite runs against both):

* the **stream pump** works on any ``trio.abc.Stream`` (in-memory streams, TLS, a ``SocketStream``);
* the **socket pump** is the hot path for accepted TCP and Unix sockets: it calls ``recv_into`` on one
  reused buffer and ``send`` directly on the non-blocking socket and awaits readiness only when the
  kernel says EAGAIN, with a checkpoint every ``FAIR_SHARE`` operations so a busy connection can neither
  starve the others nor ignore cancellation. When a read comes up short (the kernel's buffer is
  empty) it yields once and reads again before it waits: on a busy server the answer has usually
  arrived while the other connections ran, which saves trio's readiness wait (a quarter of the CPU per
  round trip with 50 connections in ping-pong); on an idle one it costs one failed read per message.

Timeouts: the connection runs in a cancel scope whose deadline is what limits the current await:
``idle_timeout`` while waiting for input (nothing is unsent then, so nothing moves either way),
``send_timeout`` while our echo cannot be written, never past ``max_lifetime``. The stream pump re-arms
the deadline before each await (a cancelled ``send_all`` cannot be resumed, so its deadline must be
exact). The socket pump keeps the idle deadline lazily: activity only records a timestamp, the scope
keeps its earlier deadline, and when that fires early the pump (which can resume: nothing is lost at a
readiness wait) checks the timestamp and carries on in a new scope. So a busy connection touches trio's
deadline heap about once per ``idle_timeout`` instead of twice per chunk, and an idle one is still
closed at exactly ``last activity + idle_timeout``.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import ssl
from collections.abc import Callable

import attrs
import trio

from .config import LimitsConfig
from .echo import EchoSession, Step
from .events import Flag
from .proxyproto import HeaderParser, ProxyHeader, ProxyHeaderError
from .ratelimit import TokenBucket
from .stats import ConnectionInfo
from .trace import Tracer

logger = logging.getLogger("trio_echo.connection")

_NOTHING = memoryview(b"")
LINGER_CHUNK = 16384  # read size while discarding input during a lingering close
FAIR_SHARE = 32  # socket-pump operations between checkpoints when the kernel never says EAGAIN
# recv/send/shutdown failures that mean the peer is gone: reset, unreachable after retransmissions or
# keepalive probes, or (ENOTCONN from shutdown) torn down by a reset we had not read yet.
PEER_GONE_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ECONNABORTED,
        errno.ENOTCONN,
    }
)


def _off_is_inf(value: float) -> float:
    return value or math.inf


@attrs.frozen(eq=False)
class ConnectionPolicy:
    """What every connection of one server shares: one object, not eight slots per connection.

    Args:
        idle_timeout, send_timeout, max_lifetime, linger_timeout: seconds, 0 = off.
        max_bytes_per_second: the echo bandwidth cap, 0 = off.
        tls_handshake_timeout: seconds a TLS client gets to complete its handshake.
        tracer: per-chunk ``data`` events go here when that flag is on.
        scratch: a read buffer of at least ``session.buffer_size`` bytes shared by the socket pumps of one
            event loop. Between ``recv_into`` and ``send`` nothing awaits, so connections can share it;
            echo left unsent when the kernel says EAGAIN is copied out first (``EchoSession.detach``).
            Without it the pump allocates a private buffer when its first byte arrives.
        on_close: called as ``on_close(connection, reason)`` once the stream is closed (the server's
            bookkeeping; one function for every connection, so none holds a closure).
    """

    idle_timeout: float = attrs.field(default=0.0, converter=_off_is_inf)
    send_timeout: float = attrs.field(default=0.0, converter=_off_is_inf)
    max_lifetime: float = 0.0
    linger_timeout: float = 0.0
    max_bytes_per_second: int = 0
    tls_handshake_timeout: float = 10.0
    tracer: Tracer | None = None
    scratch: memoryview | None = None
    on_close: Callable[[Connection, str], None] | None = None

    @classmethod
    def from_limits(
        cls,
        limits: LimitsConfig,
        *,
        tracer: Tracer | None = None,
        scratch: memoryview | None = None,
        on_close: Callable[[Connection, str], None] | None = None,
    ) -> ConnectionPolicy:
        """The ``[limits]`` section's timeouts and bandwidth cap, with these hooks."""
        return cls(
            idle_timeout=limits.idle_timeout,
            send_timeout=limits.send_timeout,
            max_lifetime=limits.max_lifetime,
            linger_timeout=limits.linger_timeout,
            max_bytes_per_second=limits.max_bytes_per_second,
            tls_handshake_timeout=limits.tls_handshake_timeout,
            tracer=tracer,
            scratch=scratch,
            on_close=on_close,
        )


DEFAULT_POLICY = ConnectionPolicy()


class Connection:
    """One client connection.

    Args:
        stream: the client: a ``trio.abc.Stream``, or a connected non-blocking stdlib socket (the
            fast path); ``run`` always closes it.
        session: the echo state for this connection; for a server's client connection its table
            entry (a ``ConnectionInfo`` is an ``EchoSession``), whose ``id`` names it in trace events.
        policy: limits and hooks shared with the server's other connections.
    """

    __slots__ = (
        "_activity",
        "_bucket",
        "_buffer",
        "_lifetime_deadline",
        "_phase",
        "_read_cap",
        "close_reason",
        "policy",
        "scope",
        "session",
        "stream",
    )

    def __init__(
        self,
        stream: trio.abc.Stream | socket.socket,
        session: EchoSession,
        policy: ConnectionPolicy = DEFAULT_POLICY,
    ) -> None:
        self.stream = stream
        self.session = session
        self.policy = policy
        self.scope = trio.CancelScope()
        self.close_reason: str | None = None
        now = trio.current_time()
        self._lifetime_deadline = now + policy.max_lifetime if policy.max_lifetime else math.inf
        self._phase = "idle"
        # Bandwidth cap: a token bucket of one second's worth; reads are capped to that size so the
        # echo flows evenly instead of in buffer-sized bursts followed by long pauses.
        rate = policy.max_bytes_per_second
        self._bucket = TokenBucket(rate, rate, now) if rate else None
        self._read_cap = min(session.buffer_size, rate or session.buffer_size)
        self._activity = now
        self._buffer: memoryview | None = None  # socket pump: allocated when the first byte arrives

    @property
    def info(self) -> ConnectionInfo | None:
        """The connection's table entry, when its session is one (for ``policy.on_close``)."""
        session = self.session
        return session if isinstance(session, ConnectionInfo) else None

    @property
    def conn_id(self) -> int:
        """The table id (trace events name the connection by it); 0 outside a server's table."""
        info = self.info
        return info.id if info is not None else 0

    def close(self, reason: str) -> None:
        """Ask the connection to stop echoing and close gracefully; the first reason given wins."""
        if self.close_reason is None:
            self.close_reason = reason
        self.scope.cancel()

    async def run(self) -> str:
        """Echo until the session is done or the connection is closed; return the close reason.

        The stream is closed on every path, after a lingering close unless the client already sent EOF.
        Only cancellation from outside (a hard stop) propagates.
        """
        reason = "error"
        try:
            stream = self.stream
            if isinstance(stream, socket.socket):
                # The socket pump, resumed in a fresh scope whenever a lazy deadline fired early.
                # (All inline rather than in helper coroutines: each frame in the await chain costs
                # every idle connection a few hundred bytes.)
                session = self.session
                tracer = self.policy.tracer
                clock = trio.lowlevel.current_clock()  # clock.current_time(): trio.current_time minus 2 calls
                cap = self._read_cap
                early_read = True  # after the next short read, yield and read again before waiting
                # The idle deadline from the start; later it is moved only when it fires early.
                self.scope.deadline = min(self._activity + self.policy.idle_timeout, self._lifetime_deadline)
                while True:
                    ops = 0  # operations since the last checkpoint
                    drained = False  # the last read emptied the kernel's buffer
                    with self.scope:
                        try:
                            while (step := session.next_step()) is not Step.DONE:
                                ops += 1
                                if step is Step.RECEIVE:
                                    # Read and echo until an echo does not go out whole (or EOF):
                                    # the steady state, with no next_step round between chunks.
                                    while True:
                                        bucket = self._bucket
                                        if bucket is not None:
                                            await self._throttle(bucket)
                                        buffer = self.policy.scratch or self._buffer
                                        if drained or buffer is None:
                                            # A read now would only say EAGAIN (the last one returned
                                            # less than asked). Let the other tasks run first: on a
                                            # busy server this client has often answered by then, and
                                            # a read that succeeds saves trio's readiness wait (two
                                            # epoll_ctl calls, a wakeup). Only if that read says EAGAIN
                                            # too, wait for readiness. An idle connection without the
                                            # shared buffer gets its own only once a byte arrives.
                                            drained = False
                                            ops = 0
                                            data = _NOTHING  # (not the last chunk's view: ~180 bytes)
                                            if self._phase != "idle":
                                                self._rearm_idle()
                                            if early_read and buffer is not None:
                                                await trio.lowlevel.checkpoint()
                                            else:
                                                await trio.lowlevel.wait_readable(stream)
                                                if buffer is None:
                                                    buffer = self._buffer = memoryview(bytearray(cap))
                                        elif ops >= FAIR_SHARE:  # (no echo is pending in the buffer)
                                            ops = 0
                                            await trio.lowlevel.checkpoint()
                                        ops += 1
                                        try:
                                            count = stream.recv_into(buffer, cap)
                                        except BlockingIOError:
                                            early_read = False  # nothing yet: wait for readiness
                                            drained = True
                                            continue
                                        early_read = True
                                        drained = 0 < count < cap
                                        self._activity = clock.current_time()
                                        if bucket is not None:
                                            bucket.debit(self._activity, count)
                                        if tracer is not None and tracer.data:
                                            tracer.emit(
                                                Flag.DATA, "conn.data", conn_id=self.conn_id, received=count
                                            )
                                        if not count:
                                            session.received(_NOTHING)  # the client's EOF
                                            break
                                        data = buffer[:count]
                                        try:
                                            sent = stream.send(data)
                                        except BlockingIOError:
                                            sent = 0
                                        if sent < count:
                                            # The rest goes through the SEND step, which waits (and
                                            # first copies it out of the shared buffer) on EAGAIN.
                                            session.received(data)
                                            session.sent(sent)
                                        else:
                                            session.echoed(count)
                                        if sent and tracer is not None and tracer.data:
                                            tracer.emit(
                                                Flag.DATA, "conn.data", conn_id=self.conn_id, sent=sent
                                            )
                                        if sent < count:
                                            break
                                elif step is Step.SEND:
                                    try:
                                        sent = stream.send(session.outgoing)
                                    except BlockingIOError:
                                        # The client is not reading: from now on send_timeout limits
                                        # the wait, and the unsent echo must leave the shared buffer
                                        # before anyone else reads into it.
                                        session.detach()
                                        self._arm(self.policy.send_timeout, "send_timeout")
                                        await trio.lowlevel.wait_writable(stream)
                                        continue
                                    session.sent(sent)
                                    if tracer is not None and tracer.data:
                                        tracer.emit(Flag.DATA, "conn.data", conn_id=self.conn_id, sent=sent)
                                else:  # Step.SEND_EOF
                                    stream.shutdown(socket.SHUT_WR)
                                    session.sent_eof()
                        except OSError as exc:
                            if exc.errno not in PEER_GONE_ERRNOS:
                                raise
                            reason = "reset"
                            break
                    if not self.scope.cancelled_caught:
                        reason = "eof"
                        break
                    expired = self._socket_timeout_reason()
                    if expired is not None:
                        reason = expired
                        break
                    self.scope = trio.CancelScope(
                        deadline=min(self._activity + self.policy.idle_timeout, self._lifetime_deadline)
                    )
            else:
                with self.scope:
                    if isinstance(stream, trio.SSLStream) and not await self._handshake(stream):
                        reason = "tls_handshake"
                    else:
                        await self._pump()
                        reason = "eof"
                if self.scope.cancelled_caught:
                    reason = self.close_reason or self._timeout_reason()
        except trio.BrokenResourceError as exc:
            # A TLS error before any data: the handshake failed (with TLS 1.3 a rejected client
            # certificate surfaces at the first read, after do_handshake returned).
            tls_failure = isinstance(exc.__cause__, ssl.SSLError) and self.session.bytes_in == 0
            reason = "tls_handshake" if tls_failure else "reset"
        except trio.ClosedResourceError:
            reason = self.close_reason or "error"
        except Exception:
            # A bug hit by one client must not take down the others: log it, close this one only.
            logger.exception("connection %d failed", self.conn_id)
            if self.policy.tracer is not None:
                self.policy.tracer.emit(
                    Flag.ERROR, "error", conn_id=self.conn_id, message="connection handler failed"
                )
        finally:
            try:
                await self._finish(reason)
            finally:
                if self.policy.on_close is not None:
                    self.policy.on_close(self, reason)
        return reason

    async def _handshake(self, stream: trio.SSLStream[trio.abc.Stream]) -> bool:
        """The TLS handshake, within ``policy.tls_handshake_timeout`` (the idle timeout would otherwise
        hold a silent client for minutes); False if it failed (a plain-text client, a bad certificate)
        or took too long. The connection's own scope still applies: drain, an admin close and the
        lifetime limit end it as they end any await."""
        self.scope.deadline = self._lifetime_deadline
        with trio.move_on_after(self.policy.tls_handshake_timeout) as scope:
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError:
                return False
        return not scope.cancelled_caught

    def _socket_timeout_reason(self) -> str | None:
        """Why the socket pump's scope fired, or None when a lazy idle deadline fired early (there
        was activity since it was set) and the pump should carry on."""
        if self.close_reason is not None:
            return self.close_reason
        now = trio.current_time()
        if now >= self._lifetime_deadline:
            return "lifetime"
        if self._phase != "idle" or now >= self._activity + self.policy.idle_timeout:
            return self._phase
        return None

    def _rearm_idle(self) -> None:
        """Back from sending or throttling, before waiting for input: the idle deadline must be
        exact again (a plain method, not a coroutine: no frame while the connection waits)."""
        self._activity = trio.current_time()
        self._arm(self.policy.idle_timeout, "idle")

    async def _pump(self) -> None:
        session = self.session
        stream = self.stream
        assert not isinstance(stream, socket.socket)
        tracer = self.policy.tracer
        while True:
            step = session.next_step()
            if step is Step.SEND:
                self._arm(self.policy.send_timeout, "send_timeout")
                data = session.outgoing
                await stream.send_all(data)
                session.sent(len(data))
                if tracer is not None and tracer.data:
                    tracer.emit(Flag.DATA, "conn.data", conn_id=self.conn_id, sent=len(data))
            elif step is Step.RECEIVE:
                bucket = self._bucket
                if bucket is not None:
                    await self._throttle(bucket)
                self._arm(self.policy.idle_timeout, "idle")
                chunk = await stream.receive_some(self._read_cap)
                session.received(chunk)
                if bucket is not None:
                    bucket.debit(trio.current_time(), len(chunk))
                if tracer is not None and tracer.data:
                    tracer.emit(Flag.DATA, "conn.data", conn_id=self.conn_id, received=len(chunk))
            elif step is Step.SEND_EOF:
                self._arm(self.policy.send_timeout, "send_timeout")
                if isinstance(stream, trio.abc.HalfCloseableStream):
                    await stream.send_eof()
                session.sent_eof()
            else:
                return

    async def _throttle(self, bucket: TokenBucket) -> None:
        delay = bucket.delay(trio.current_time())
        if delay > 0:
            # Our own pause is not the client's idleness: only the lifetime limit applies meanwhile.
            self._phase = "throttle"
            self.scope.deadline = self._lifetime_deadline
            await trio.sleep(delay)

    def _arm(self, timeout: float, phase: str) -> None:
        self._phase = phase
        self.scope.deadline = min(trio.current_time() + timeout, self._lifetime_deadline)

    def _timeout_reason(self) -> str:
        return "lifetime" if trio.current_time() >= self._lifetime_deadline else self._phase

    async def _finish(self, reason: str) -> None:
        if reason == "tls_handshake":
            await trio.aclose_forcefully(self.stream)  # type: ignore[arg-type]  # (never a raw socket)
            return
        session = self.session
        linger = self.policy.linger_timeout if reason != "reset" and not session.eof_received else 0.0
        if linger and not session.eof_sent:
            session.sent_eof()  # close_gracefully shuts our write side first
        self._buffer = None
        stream = self.stream
        if isinstance(stream, socket.socket):
            stream = as_stream(stream)
        await close_gracefully(stream, linger_timeout=linger, shut_write=True)


def as_stream(sock: socket.socket) -> trio.SocketStream:
    """Wrap an accepted stdlib socket for the paths that are not hot (closing, refusing, admin)."""
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def close_gracefully(
    stream: trio.abc.Stream, *, linger_timeout: float, shut_write: bool = True
) -> None:
    """Lingering close: shut our write side, read and discard until EOF or ``linger_timeout``, close.

    Closing a socket with unread input makes the kernel send RST, which can destroy data the peer has
    not read yet (our echo, a refusal text); draining first lets our FIN arrive behind the data.
    ``linger_timeout`` 0 closes at once. The stream is closed on every path, even when cancelled.
    """
    try:
        if linger_timeout:
            with trio.move_on_after(linger_timeout):
                if shut_write and isinstance(stream, trio.abc.HalfCloseableStream):
                    await stream.send_eof()
                while await stream.receive_some(LINGER_CHUNK):
                    pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
        pass  # the peer is gone or the stream is unusable: closing is all that is left
    finally:
        # aclose closes the resource even when cancelled (a hard stop), just less politely.
        with trio.move_on_after(linger_timeout):
            await stream.aclose()


async def read_proxy_header(sock: socket.socket, parser: HeaderParser) -> ProxyHeader:
    """Read exactly the PROXY header off a non-blocking socket and return it.

    Peeks, lets the parser say how many of the bytes are header, and consumes only those: the client's
    first bytes stay in the kernel for the pump or the TLS handshake. Bytes peeked before the header's
    end all belong to it, so every peek is consumed and the wait never spins on the same bytes.

    Raises:
        ProxyHeaderError: the bytes are not a valid header, or the peer closed before it was complete.
        OSError: the connection failed.
    """
    while parser.header is None:
        try:
            peeked = sock.recv(parser.wanted, socket.MSG_PEEK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not peeked:
            raise ProxyHeaderError("the connection closed before its PROXY header was complete")
        sock.recv(parser.feed(peeked))  # all there already: recv returns exactly that much
    return parser.header


async def refuse(stream: trio.abc.Stream, text: bytes, *, patience: float) -> None:
    """Send ``text`` (may be empty) to a refused client, then close it gracefully, all within about
    ``2 * patience`` seconds."""
    try:
        if text:
            with trio.move_on_after(patience):
                await stream.send_all(text)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    await close_gracefully(stream, linger_timeout=patience)
