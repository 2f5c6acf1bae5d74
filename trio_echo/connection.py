"""The per-connection pump: the only code that reads from or writes to a client stream.

``Connection.run`` reads, feeds the :class:`~trio_echo.echo.EchoSession`, writes what it says, and
always ends with a lingering close. Transport errors are translated into a close reason here, at this
one edge. There are two pumps with one behaviour (the same test suite runs against both):

* the **stream pump** works on any ``trio.abc.Stream`` (in-memory streams, TLS, a ``SocketStream``);
* the **socket pump** is the hot path for accepted TCP and Unix sockets. Its synchronous half
  (:mod:`trio_echo.pump`) calls ``recv_into`` on one reused buffer and ``send`` directly on the
  non-blocking socket for as long as the kernel allows, and returns what to wait for; ``run`` does that
  one await and calls it again. It checkpoints every ``FAIR_SHARE`` operations so a busy connection
  can neither starve the others nor ignore cancellation. When a read comes up short (the kernel's
  buffer is empty) it yields once and reads again before it waits: on a busy server the answer has
  usually arrived while the other connections ran, which saves trio's readiness wait (a quarter of the
  CPU per round trip with 50 connections in ping-pong); on an idle one it costs one failed read per
  message. In a server, a socket pump that has run dry does not wait itself: it parks in the event
  loop's relay (:mod:`trio_echo.relay`), which echoes for every parked connection from one epoll set
  and wakes the task for anything else (EOF, a short send, an error); the task's cancel scope still
  governs it, so every limit below works the same.

Timeouts (the rules are in :mod:`trio_echo.timeouts`): the connection runs in a cancel scope whose
deadline is what limits the current await. The stream pump re-arms the deadline before each await (a
cancelled ``send_all`` cannot be resumed, so its deadline must be exact). The socket pump keeps the
idle deadline lazily: activity only records a timestamp, the scope keeps its earlier deadline, and when
that fires early the pump (which can resume: nothing is lost at a readiness wait) carries on in a new
scope. So a busy connection touches trio's deadline heap about once per ``idle_timeout`` instead of
twice per chunk, and an idle one is still closed at exactly ``last activity + idle_timeout``.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl

import trio

from .closing import close_gracefully
from .echo import Step
from .events import Flag
from .faulted import FaultedPump, reset
from .listeners import as_stream
from .pump import SocketPump, Wait
from .reasons import Phase, Reason

logger = logging.getLogger("trio_echo.connection")

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


class Connection(SocketPump):
    """One client connection.

    Args:
        stream: the client: a ``trio.abc.Stream``, or a connected non-blocking stdlib socket (the
            fast path); ``run`` always closes it.
        session: the echo state for this connection; for a server's client connection its table
            entry (a ``ConnectionInfo`` is an ``EchoSession``), whose ``id`` names it in trace events.
        policy: limits and hooks shared with the server's other connections.
    """

    __slots__ = ()

    async def run(self) -> Reason:
        """Echo until the session is done or the connection is closed; return the close reason.

        The stream is closed on every path, after a lingering close unless the client already sent EOF.
        Only cancellation from outside (a hard stop) propagates.
        """
        reason = Reason.ERROR
        try:
            stream = self.stream
            faulted = False  # faults from the start, or set live: on as the faulted pump
            if isinstance(stream, socket.socket):
                # The socket pump, inline: an idle connection waits in this one frame (a helper
                # coroutine would cost each idle connection its frame, ~250 bytes).
                faulted = self.faults is not None
                relay = self.policy.relay  # (Wait.RELAY only when there is one)
                if not faulted:
                    self.scope.deadline = self._idle_deadline()
                while not faulted:  # resumed in a fresh scope whenever a lazy idle deadline fired early
                    with self.scope:
                        while (wait := self._advance(stream)) is not Wait.DONE:
                            if wait is Wait.READABLE:
                                await trio.lowlevel.wait_readable(stream)
                            elif wait is Wait.YIELD:
                                await trio.lowlevel.checkpoint()
                            elif wait is Wait.RELAY:
                                assert relay is not None
                                await relay.carry(self, stream)
                                self._receiving = False  # handed back: the session has its next step
                            elif wait is Wait.WRITABLE:
                                await trio.lowlevel.wait_writable(stream)
                            else:
                                await trio.sleep(self._delay)
                    if not self.scope.cancelled_caught:
                        reason = Reason.EOF
                        break
                    # set_faults interrupted a wait, where nothing is lost: on as the faulted pump
                    faulted = self.faults is not None and self.close_reason is None
                    expired = None if faulted else self._expired(lazy=True)
                    if expired is not None:
                        reason = expired
                        break
                    self.scope = trio.CancelScope(deadline=self._idle_deadline())
                if faulted:
                    self.stream = stream = as_stream(stream)
            else:
                with self.scope:
                    if isinstance(stream, trio.SSLStream) and not await self._handshake(stream):
                        reason = Reason.TLS_HANDSHAKE
                    elif await self._pump(stream):
                        reason = Reason.EOF
                    else:
                        faulted = True
                if self.scope.cancelled_caught:
                    faulted = False
                    reason = self._expired(lazy=False) or Reason.ERROR
            if faulted:
                assert not isinstance(stream, socket.socket)
                reason = await self._faulted(stream)
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

    async def _faulted(self, stream: trio.abc.Stream) -> Reason:
        """The rest of the connection through its faults (``faulted.py``), within its lifetime."""
        assert self.faults is not None
        if self.close_reason is not None:
            return self.close_reason
        self.scope = trio.CancelScope(deadline=self._lifetime_deadline)
        with self.scope:
            return await FaultedPump(stream, self.session, self.policy, self.faults, self.conn_id).run()
        return self.close_reason or Reason.LIFETIME

    def _failed(self) -> None:
        # A bug hit by one client must not take down the others: log it, close this one only.
        logger.exception("connection %d failed", self.conn_id)
        if self.policy.tracer is not None:
            self.policy.tracer.emit(
                Flag.ERROR, "error", conn_id=self.conn_id, message="connection handler failed"
            )

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

    async def _pump(self, stream: trio.abc.Stream) -> bool:
        """Echo until the session is done (True) or faults were set live (False: the faulted pump
        goes on from here)."""
        session = self.session
        while self.faults is None:
            step = session.next_step()
            if step is Step.SEND:
                self._arm(self.policy.send_timeout, Phase.SEND)
                data = session.outgoing
                await stream.send_all(data)
                session.sent(len(data))
                self._trace_data(sent=len(data))
            elif step is Step.RECEIVE:
                bucket = self._bucket
                if bucket is not None and (delay := self._pause(bucket)) > 0:
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
                return True
        return False

    # -- closing --------------------------------------------------------------------------------------

    async def _finish(self, reason: Reason) -> None:
        if reason is Reason.TLS_HANDSHAKE:
            await trio.aclose_forcefully(self.stream)  # type: ignore[arg-type]  # (never a raw socket)
            return
        session = self.session
        resetting = self.faults is not None and self.faults.reset
        linger = (
            self.policy.linger_timeout
            if reason is not Reason.RESET and not session.eof_received and not resetting
            else 0.0
        )
        if linger and not session.eof_sent:
            session.sent_eof()  # close_gracefully shuts our write side first
        self._buffer = None
        stream = self.stream
        if isinstance(stream, socket.socket):
            stream = as_stream(stream)
        if resetting:
            reset(stream)  # SO_LINGER 0: the close sends RST (and TLS sends no close_notify first)
            await trio.aclose_forcefully(stream)
            return
        await close_gracefully(stream, linger_timeout=linger, shut_write=True)
