"""The per-connection pump: the only code that reads from or writes to a client stream.

``Connection.run`` reads, feeds the :class:`~trio_echo.echo.EchoSession`, writes what it says, and
always ends with a lingering close. Transport errors are translated into a close reason here, at this
one edge. There are two pumps with one behaviour (the same test suite runs against both):

* the **stream pump** works on any ``trio.abc.Stream`` (in-memory streams, TLS, a ``SocketStream``);
* the **socket pump** is the hot path for accepted TCP and Unix sockets. Its synchronous half,
  :meth:`Connection._advance`, calls ``recv_into`` on one reused buffer and ``send`` directly on the
  non-blocking socket for as long as the kernel allows, and returns what to wait for (a :class:`Wait`);
  ``run`` does that one await and calls it again. So the task's only frame while it waits is ``run``
  itself (each coroutine frame in the await chain costs every idle connection a few hundred bytes).
  It checkpoints every ``FAIR_SHARE`` operations so a busy connection can neither starve the others
  nor ignore cancellation. When a read comes up short (the kernel's buffer is empty) it yields once
  and reads again before it waits: on a busy server the answer has usually arrived while the other
  connections ran, which saves trio's readiness wait (a quarter of the CPU per round trip with 50
  connections in ping-pong); on an idle one it costs one failed read per message.

Timeouts (the rules are in :mod:`trio_echo.timeouts`): the connection runs in a cancel scope whose
deadline is what limits the current await. The stream pump re-arms the deadline before each await (a
cancelled ``send_all`` cannot be resumed, so its deadline must be exact). The socket pump keeps the
idle deadline lazily: activity only records a timestamp, the scope keeps its earlier deadline, and when
that fires early the pump (which can resume: nothing is lost at a readiness wait) carries on in a new
scope. So a busy connection touches trio's deadline heap about once per ``idle_timeout`` instead of
twice per chunk, and an idle one is still closed at exactly ``last activity + idle_timeout``.
"""

from __future__ import annotations

import enum
import errno
import logging
import math
import socket
import ssl
from collections.abc import Callable

import attrs
import trio

from . import timeouts
from .closing import close_gracefully
from .config import LimitsConfig
from .echo import EchoSession, Step
from .events import Flag
from .listeners import as_stream
from .ratelimit import TokenBucket
from .reasons import Phase, Reason
from .stats import ConnectionInfo
from .trace import Tracer

logger = logging.getLogger("trio_echo.connection")

_NOTHING = memoryview(b"")
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


class Wait(enum.Enum):
    """What the socket pump waits for before it can go on."""

    READABLE = enum.auto()
    WRITABLE = enum.auto()
    YIELD = enum.auto()  # nothing: let the other tasks run (fair share, or the early read)
    THROTTLE = enum.auto()  # the bandwidth cap's pause (``Connection._delay`` seconds)
    DONE = enum.auto()  # the session is over


def _off_is_inf(value: float) -> float:
    return value or math.inf


@attrs.frozen(eq=False)
class ConnectionPolicy:
    """What every connection of one server shares: one object, not eight slots per connection.

    Args:
        idle_timeout, send_timeout, max_lifetime, linger_timeout: seconds, 0 = off.
        max_bytes_per_second: the echo bandwidth cap, 0 = off.
        tls_handshake_timeout: seconds a TLS client gets to complete its handshake.
        tracer: per-chunk ``data`` events go here when some sink wants that flag.
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
    on_close: Callable[[Connection, Reason], None] | None = None

    @classmethod
    def from_limits(
        cls,
        limits: LimitsConfig,
        *,
        tracer: Tracer | None = None,
        scratch: memoryview | None = None,
        on_close: Callable[[Connection, Reason], None] | None = None,
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
        "_delay",
        "_drained",
        "_early_read",
        "_lifetime_deadline",
        "_ops",
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
        self.close_reason: Reason | None = None
        now = trio.current_time()
        self._lifetime_deadline = now + policy.max_lifetime if policy.max_lifetime else math.inf
        self._phase = Phase.IDLE
        # Bandwidth cap: a token bucket of one second's worth; reads are capped to that size so the
        # echo flows evenly instead of in buffer-sized bursts followed by long pauses.
        rate = policy.max_bytes_per_second
        self._bucket = TokenBucket(rate, rate, now) if rate else None
        self._read_cap = min(session.buffer_size, rate or session.buffer_size)
        self._activity = now
        self._buffer: memoryview | None = None  # socket pump: allocated when the first byte arrives
        # Socket pump state between two waits:
        self._ops = 0  # operations since the last checkpoint
        # A read now would only say EAGAIN: wait (or first yield) before reading. Without a shared
        # buffer, the first read waits for readiness too, so an idle connection holds no buffer.
        self._drained = policy.scratch is None
        self._early_read = True  # after the next short read, yield and read again before waiting
        self._delay = 0.0  # the bandwidth pause Wait.THROTTLE stands for

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

    def close(self, reason: Reason) -> None:
        """Ask the connection to stop echoing and close gracefully; the first reason given wins."""
        if self.close_reason is None:
            self.close_reason = reason
        self.scope.cancel()

    async def run(self) -> Reason:
        """Echo until the session is done or the connection is closed; return the close reason.

        The stream is closed on every path, after a lingering close unless the client already sent EOF.
        Only cancellation from outside (a hard stop) propagates.
        """
        reason = Reason.ERROR
        try:
            stream = self.stream
            if isinstance(stream, socket.socket):
                self.scope.deadline = self._idle_deadline()
                while True:  # resumed in a fresh scope whenever a lazy idle deadline fired early
                    with self.scope:
                        while (wait := self._advance(stream)) is not Wait.DONE:
                            if wait is Wait.READABLE:
                                await trio.lowlevel.wait_readable(stream)
                            elif wait is Wait.YIELD:
                                await trio.lowlevel.checkpoint()
                            elif wait is Wait.WRITABLE:
                                await trio.lowlevel.wait_writable(stream)
                            else:
                                await trio.sleep(self._delay)
                    if not self.scope.cancelled_caught:
                        reason = Reason.EOF
                        break
                    expired = self._expired(lazy=True)
                    if expired is not None:
                        reason = expired
                        break
                    self.scope = trio.CancelScope(deadline=self._idle_deadline())
            else:
                with self.scope:
                    if isinstance(stream, trio.SSLStream) and not await self._handshake(stream):
                        reason = Reason.TLS_HANDSHAKE
                    else:
                        await self._pump(stream)
                        reason = Reason.EOF
                if self.scope.cancelled_caught:
                    reason = self._expired(lazy=False) or Reason.ERROR
        except trio.BrokenResourceError as exc:
            # A TLS error before any data: the handshake failed (with TLS 1.3 a rejected client
            # certificate surfaces at the first read, after do_handshake returned).
            tls_failure = isinstance(exc.__cause__, ssl.SSLError) and self.session.bytes_in == 0
            reason = Reason.TLS_HANDSHAKE if tls_failure else Reason.RESET
        except trio.ClosedResourceError:
            reason = self.close_reason or Reason.ERROR
        except OSError as exc:  # the socket pump's own calls
            if exc.errno in PEER_GONE_ERRNOS:
                reason = Reason.RESET
            else:
                self._failed()
        except Exception:
            self._failed()
        finally:
            try:
                await self._finish(reason)
            finally:
                if self.policy.on_close is not None:
                    self.policy.on_close(self, reason)
        return reason

    def _failed(self) -> None:
        # A bug hit by one client must not take down the others: log it, close this one only.
        logger.exception("connection %d failed", self.conn_id)
        if self.policy.tracer is not None:
            self.policy.tracer.emit(
                Flag.ERROR, "error", conn_id=self.conn_id, message="connection handler failed"
            )

    # -- the socket pump (synchronous half) -----------------------------------------------------------

    def _advance(self, sock: socket.socket) -> Wait:
        """Echo as far as the kernel allows without waiting; return what to wait for."""
        session = self.session
        while (step := session.next_step()) is not Step.DONE:
            self._ops += 1
            if step is Step.RECEIVE:
                wait = self._receive_and_echo(sock)
                if wait is not None:
                    return wait
            elif step is Step.SEND:
                try:
                    sent = sock.send(session.outgoing)
                except BlockingIOError:
                    # The client is not reading: from now on send_timeout limits the wait, and the
                    # unsent echo must leave the shared buffer before anyone else reads into it.
                    session.detach()
                    self._arm(self.policy.send_timeout, Phase.SEND)
                    return Wait.WRITABLE
                session.sent(sent)
                self._trace_data(sent=sent)
            else:  # Step.SEND_EOF
                sock.shutdown(socket.SHUT_WR)
                session.sent_eof()
        return Wait.DONE

    def _receive_and_echo(self, sock: socket.socket) -> Wait | None:
        """Read and echo until an echo does not go out whole or the client's EOF arrives (None: the
        session has its next step), or until the pump must wait: the steady state, with no
        ``next_step`` round between chunks."""
        session = self.session
        cap = self._read_cap
        while True:
            bucket = self._bucket
            if bucket is not None and (delay := bucket.delay(trio.current_time())) > 0:
                # Our own pause is not the client's idleness: only the lifetime limit applies meanwhile.
                self._phase = Phase.THROTTLE
                self.scope.deadline = self._lifetime_deadline
                self._delay = delay
                return Wait.THROTTLE
            if self._drained:
                # A read now would only say EAGAIN (the last one returned less than asked). Let the
                # other tasks run first: on a busy server this client has often answered by then, and
                # a read that succeeds saves trio's readiness wait (two epoll_ctl calls, a wakeup).
                # Only if that read says EAGAIN too, wait for readiness.
                self._drained = False
                self._ops = 0
                if self._phase is not Phase.IDLE:
                    self._rearm_idle()
                has_buffer = self.policy.scratch is not None or self._buffer is not None
                return Wait.YIELD if self._early_read and has_buffer else Wait.READABLE
            if self._ops >= FAIR_SHARE:  # (no echo is pending in the buffer)
                self._ops = 0
                return Wait.YIELD
            buffer = self.policy.scratch or self._buffer
            if buffer is None:  # back from the first readiness wait: bytes are there now
                buffer = self._buffer = memoryview(bytearray(cap))
            self._ops += 1
            try:
                count = sock.recv_into(buffer, cap)
            except BlockingIOError:
                self._early_read = False  # nothing yet: wait for readiness
                self._drained = True
                continue
            self._early_read = True
            self._drained = 0 < count < cap
            self._activity = now = trio.lowlevel.current_clock().current_time()
            if bucket is not None:
                bucket.debit(now, count)
            self._trace_data(received=count)
            if not count:
                session.received(_NOTHING)  # the client's EOF
                return None
            data = buffer[:count]
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent < count:
                # The rest goes through the SEND step, which waits (and first copies it out of the
                # shared buffer) on EAGAIN.
                session.received(data)
                session.sent(sent)
                if sent:
                    self._trace_data(sent=sent)
                return None
            session.echoed(count)
            self._trace_data(sent=sent)

    def _trace_data(self, **counts: int) -> None:
        """A per-chunk ``conn.data`` event, when some sink wants the ``data`` flag."""
        tracer = self.policy.tracer
        if tracer is not None and tracer.data:
            tracer.emit(Flag.DATA, "conn.data", conn_id=self.conn_id, **counts)

    # -- the stream pump ------------------------------------------------------------------------------

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

    async def _pump(self, stream: trio.abc.Stream) -> None:
        session = self.session
        while True:
            step = session.next_step()
            if step is Step.SEND:
                self._arm(self.policy.send_timeout, Phase.SEND)
                data = session.outgoing
                await stream.send_all(data)
                session.sent(len(data))
                self._trace_data(sent=len(data))
            elif step is Step.RECEIVE:
                bucket = self._bucket
                if bucket is not None and (delay := bucket.delay(trio.current_time())) > 0:
                    self._phase = Phase.THROTTLE  # our own pause: only the lifetime applies
                    self.scope.deadline = self._lifetime_deadline
                    await trio.sleep(delay)
                self._arm(self.policy.idle_timeout, Phase.IDLE)
                chunk = await stream.receive_some(self._read_cap)
                session.received(chunk)
                if bucket is not None:
                    bucket.debit(trio.current_time(), len(chunk))
                self._trace_data(received=len(chunk))
            elif step is Step.SEND_EOF:
                self._arm(self.policy.send_timeout, Phase.SEND)
                if isinstance(stream, trio.abc.HalfCloseableStream):
                    await stream.send_eof()
                session.sent_eof()
            else:
                return

    # -- deadlines ------------------------------------------------------------------------------------

    def _idle_deadline(self) -> float:
        return timeouts.deadline(self._activity, self.policy.idle_timeout, self._lifetime_deadline)

    def _arm(self, timeout: float, phase: Phase) -> None:
        self._phase = phase
        self.scope.deadline = timeouts.deadline(trio.current_time(), timeout, self._lifetime_deadline)

    def _rearm_idle(self) -> None:
        """Back from sending or throttling, before waiting for input: the idle deadline must be
        exact again."""
        self._activity = trio.current_time()
        self._arm(self.policy.idle_timeout, Phase.IDLE)

    def _expired(self, *, lazy: bool) -> Reason | None:
        """Why the scope fired, or None when a lazy idle deadline fired early (carry on)."""
        return timeouts.expired(
            trio.current_time(),
            close_reason=self.close_reason,
            lifetime_deadline=self._lifetime_deadline,
            phase=self._phase,
            idle_deadline=self._activity + self.policy.idle_timeout if lazy else None,
        )

    # -- closing --------------------------------------------------------------------------------------

    async def _finish(self, reason: Reason) -> None:
        if reason is Reason.TLS_HANDSHAKE:
            await trio.aclose_forcefully(self.stream)  # type: ignore[arg-type]  # (never a raw socket)
            return
        session = self.session
        linger = (
            self.policy.linger_timeout if reason is not Reason.RESET and not session.eof_received else 0.0
        )
        if linger and not session.eof_sent:
            session.sent_eof()  # close_gracefully shuts our write side first
        self._buffer = None
        stream = self.stream
        if isinstance(stream, socket.socket):
            stream = as_stream(stream)
        await close_gracefully(stream, linger_timeout=linger, shut_write=True)
