"""The socket pump's synchronous half, and the per-connection state both pumps share (I/O).

:class:`SocketPump` is the base of :class:`~trio_echo.connection.Connection`. Its :meth:`_advance` calls
``recv_into`` on one reused buffer and ``send`` directly on the non-blocking socket for as long as the
kernel allows and returns what to wait for (a :class:`Wait`); ``Connection.run`` does that one await
and calls it again, so the task's only frame while it waits is ``run`` itself. When the policy has a
relay (``relay.py``), a pump that has run dry parks there instead (:attr:`Wait.RELAY`) and the relay
calls :meth:`SocketPump._echo_ready` for it whenever its socket is readable. Synchronous methods
cost an idle connection nothing; each coroutine frame in the await chain would cost it a few hundred
bytes.
"""

from __future__ import annotations

import enum
import math
import socket

import outcome
import trio

from . import timeouts
from .buffers import page_aligned
from .echo import EchoSession, Step
from .events import Flag
from .faults import ConnectionFaults
from .policy import DEFAULT_POLICY, ConnectionPolicy
from .ratelimit import TokenBucket
from .reasons import Phase, Reason
from .stats import ConnectionInfo

_NOTHING = memoryview(b"")
FAIR_SHARE = 32  # socket-pump operations between checkpoints when the kernel never says EAGAIN


class Wait(enum.Enum):
    """What the socket pump waits for before it can go on."""

    READABLE = enum.auto()
    WRITABLE = enum.auto()
    YIELD = enum.auto()  # nothing: let the other tasks run (fair share, or the early read)
    THROTTLE = enum.auto()  # the bandwidth cap's pause (``Connection._delay`` seconds)
    RELAY = enum.auto()  # nothing to do until the client sends: park in the relay (relay.py)
    DONE = enum.auto()  # the session is over


class SocketPump:
    """One connection's state: its stream, echo session, policy, cancel scope and deadlines."""

    __slots__ = (
        "_activity",
        "_bucket",
        "_buffer",
        "_clock",
        "_delay",
        "_drained",
        "_early_read",
        "_lifetime_deadline",
        "_ops",
        "_phase",
        "_read_cap",
        "_receiving",
        "close_reason",
        "faults",
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
        faults: ConnectionFaults | None = None,
    ) -> None:
        self.stream = stream
        self.session = session
        self.policy = policy
        self.scope = trio.CancelScope()
        self.close_reason: Reason | None = None
        # Set: the connection runs the faulted pump (faulted.py); the socket pump never looks at it.
        self.faults = faults
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
        # The last wait came from the receive loop: resume it directly (nothing changed the session
        # while the task waited), without a next_step round.
        self._receiving = False
        self._clock = trio.lowlevel.current_clock()  # clock.current_time(): trio.current_time minus 2 calls

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

    def set_faults(self, faults: ConnectionFaults | None) -> None:
        """Apply ``faults`` (None: none from now on) to the open connection. The socket pump is
        interrupted at its wait (where it can resume: nothing is lost) and carries on as the faulted
        pump; the stream pump looks before each step."""
        if self.faults is not None:  # the faulted pump runs: it re-reads the profile
            self.faults.become(faults or ConnectionFaults.none())
            return
        self.faults = faults
        if isinstance(self.stream, socket.socket) and faults is not None:
            self.scope.cancel()

    # -- the socket pump (synchronous half) -----------------------------------------------------------

    def _advance(self, sock: socket.socket) -> Wait:
        """Echo as far as the kernel allows without waiting; return what to wait for."""
        if self._receiving:
            wait = self._receive_and_echo(sock)
            if wait is not None:
                return wait
            self._receiving = False
        session = self.session
        while (step := session.next_step()) is not Step.DONE:
            self._ops += 1
            if step is Step.RECEIVE:
                wait = self._receive_and_echo(sock)
                if wait is not None:
                    self._receiving = True
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
                tracer = self.policy.tracer
                if tracer is not None and tracer.data:
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
        # Read once per call, not per chunk: each call or dict built here is paid for every chunk.
        clock = self._clock
        tracer = self.policy.tracer
        traced = tracer is not None and tracer.data
        while True:
            bucket = self._bucket
            if bucket is not None and (delay := self._pause(bucket)) > 0:
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
                relay = self.policy.relay
                if relay is not None and relay.running and bucket is None and not traced:
                    return Wait.RELAY
                has_buffer = self.policy.scratch is not None or self._buffer is not None
                return Wait.YIELD if self._early_read and has_buffer else Wait.READABLE
            if self._ops >= FAIR_SHARE:  # (no echo is pending in the buffer)
                self._ops = 0
                return Wait.YIELD
            buffer = self.policy.scratch or self._buffer
            if buffer is None:  # back from the first readiness wait: bytes are there now
                buffer = self._buffer = page_aligned(cap)
            self._ops += 1
            try:
                count = sock.recv_into(buffer, cap)
            except BlockingIOError:
                self._early_read = False  # nothing yet: wait for readiness
                self._drained = True
                continue
            self._early_read = True
            self._drained = 0 < count < cap
            self._activity = now = clock.current_time()
            if bucket is not None:
                bucket.debit(now, count)
            if traced:
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
                if sent and traced:
                    self._trace_data(sent=sent)
                return None
            session.echoed(count)
            if traced:
                self._trace_data(sent=sent)

    def _echo_ready(self, sock: socket.socket, now: float) -> outcome.Outcome[None] | None:
        """The relay's step for this parked connection, whose socket is readable: read and echo while
        reads come back full (a stream: more is waiting), up to ``FAIR_SHARE`` reads. None: stay in
        the relay; else what the task resumes with (the session has its next step, or the socket
        pump must run: data tracing is on; or the socket's error)."""
        tracer = self.policy.tracer
        if tracer is not None and tracer.data:
            return outcome.Value(None)  # the socket pump traces every chunk
        buffer = self.policy.scratch
        assert buffer is not None  # (a policy with a relay has a scratch buffer)
        cap = self._read_cap
        session = self.session
        for _ in range(FAIR_SHARE):
            try:
                count = sock.recv_into(buffer, cap)
            except BlockingIOError:
                return None
            except OSError as exc:
                return outcome.Error(exc)
            self._activity = now
            if not count:
                session.received(_NOTHING)  # the client's EOF
                return outcome.Value(None)
            data = buffer[:count]
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                return outcome.Error(exc)
            if sent < count:
                # The rest goes out through the socket pump's SEND step; out of the shared buffer first.
                session.received(data)
                session.sent(sent)
                session.detach()
                return outcome.Value(None)
            session.echoed(count)
            if count < cap:  # the kernel had no more
                return None
        return None

    def _pause(self, bucket: TokenBucket) -> float:
        """Seconds the bandwidth cap wants before the next read (0: none). Our own pause is not the
        client's idleness: only the lifetime limit applies meanwhile."""
        delay = bucket.delay(trio.current_time())
        if delay > 0:
            self._phase = Phase.THROTTLE
            self.scope.deadline = self._lifetime_deadline
        return delay

    def _trace_data(self, **counts: int) -> None:
        """A per-chunk ``conn.data`` event, when some sink wants the ``data`` flag."""
        tracer = self.policy.tracer
        if tracer is not None and tracer.data:
            tracer.emit(Flag.DATA, "conn.data", conn_id=self.conn_id, **counts)

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
