"""The faulted pump: one connection echoed through its fault profile (I/O).

Connections without faults never come here (the socket pump in :mod:`trio_echo.pump` knows nothing of
faults). A connection with faults runs this pump on a ``trio.abc.Stream`` (a socket wrapped, or the TLS
stream: faults act on the plaintext echo) in three tasks inside the connection's cancel scope:

* the **reader** reads what the byte thresholds and the memory bound allow, stamps each chunk with
  when it is due (latency, jitter) and queues it; while ``buffer_size`` bytes wait it stops reading
  (backpressure, as without faults);
* the **writer** takes chunks in order, waits until each is due, changes a byte (corrupt), writes it in
  slices within the bandwidth budget, and acts on a threshold (reset, close, stall);
* the **watchdog** closes the connection once nothing moved either way for ``idle_timeout`` while no
  echo was waiting (our own pauses are not the client's idleness).

``send_timeout`` bounds each write on its own. The decisions are :mod:`trio_echo.faults`'s; each applied
fault is reported through ``policy.on_fault`` (trace event and counter).
"""

from __future__ import annotations

import collections
import errno
import math
import socket
import struct

import trio

try:  # SIOCOUTQ (Linux); elsewhere a reset does not wait for the client's acknowledgement
    import fcntl
    import termios
except ImportError:  # pragma: no cover - Windows
    fcntl = termios = None  # type: ignore[assignment]

from .echo import EchoSession, Step
from .errors import leaves
from .faults import SHAPING, ConnectionFaults, Ending
from .policy import ConnectionPolicy
from .ratelimit import TokenBucket
from .reasons import Reason

_EOF = memoryview(b"")
ACK_POLL = 0.002  # seconds between checks that the client has acknowledged everything before a reset


class FaultedPump:
    """Echo ``session`` over ``stream`` through ``faults`` until it ends; :meth:`run` says why.

    Args:
        stream: the client stream (closed by the caller, :class:`~trio_echo.connection.Connection`).
        session: the echo session (its byte counts are the table's).
        policy: timeouts, the bandwidth cap and the ``on_fault`` hook.
        faults: this connection's faults.
        conn_id: the table id, for the reports.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        session: EchoSession,
        policy: ConnectionPolicy,
        faults: ConnectionFaults,
        conn_id: int,
    ) -> None:
        self.stream = stream
        self.session = session
        self.policy = policy
        self.faults = faults
        self.conn_id = conn_id
        self.activity = trio.current_time()
        self._queue: collections.deque[tuple[float, memoryview]] = collections.deque()
        self._held = 0  # bytes read and not yet echoed
        self._changed = trio.Event()  # the queue changed: a chunk arrived (writer), room freed (reader)
        self._reason: Reason | None = None
        self._scope = trio.CancelScope()
        self._bucket: TokenBucket | None = None
        self._read_cap = session.buffer_size
        self._profiled()
        faults.on_change = self._profiled

    def _profiled(self) -> None:
        """(Re)read the profile: at the start, and when ``set_faults`` replaces it live."""
        now = trio.current_time()
        profile = self.faults.profile
        # One bandwidth mechanism: the limit's token bucket, at the lower of the two rates.
        rates = [rate for rate in (self.policy.max_bytes_per_second, profile.bandwidth) if rate]
        self._bucket = TokenBucket(min(rates), min(rates), now) if rates else None
        self._read_cap = min(self.session.buffer_size, min(rates) if rates else self.session.buffer_size)
        self._scope.deadline = now + profile.reset_after if profile.reset_after else math.inf
        self._wake()

    def _report(self, kind: str, **fields: object) -> None:
        report(self.policy, self.faults, self.conn_id, kind, **fields)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- the whole ----------------------------------------------------------------------------------------

    async def run(self) -> Reason:
        """Echo until the session is done (``eof``) or a fault, a timeout or the client ends it."""
        with self._scope:  # its deadline: reset_after
            reason = await self._echo()
        if self._reason is not None:  # the idle watchdog or a write's send_timeout
            return self._reason
        if self._scope.cancelled_caught:  # reset_after
            self._report("reset_after", seconds=self.faults.profile.reset_after)
            self.faults.reset = True
            return Reason.FAULT
        return reason

    async def _echo(self) -> Reason:
        if self.faults.profile.blackhole:
            self._report("blackhole")
            await self._hold()
            return Reason.FAULT
        session = self.session
        if session.bytes_in:  # faults set live: an echo the other pump left unsent goes through them
            self._queue_chunk(session.take_unsent())
        else:
            await self._send_pending()  # the greeting
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader)
                nursery.start_soon(self._watchdog)
                ending = await self._writer()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # One task's transport error (a reset, a broken TLS stream) is the connection's: raised
            # as itself, so Connection.run translates it as it does for the other pumps.
            errors = [leaf for leaf in leaves(group) if not isinstance(leaf, trio.Cancelled)]
            if not errors:
                raise  # cancelled from outside: the enclosing scope takes it
            raise errors[0]  # noqa: B904  (its own __cause__ is what Connection.run reads)
        if ending in (Ending.STALL, Ending.BLACKHOLE):
            self._report(ending.value, bytes=self.faults.echoed)
            await self._hold()
            return Reason.FAULT
        if ending is not None:
            await self._end(ending)
            return Reason.FAULT
        await self._finish_echo()
        return Reason.EOF

    def _give_up(self, reason: Reason) -> None:
        """End the pump with ``reason`` (a timeout)."""
        self._reason = reason
        self._scope.cancel()

    async def _hold(self) -> None:
        """Stay open and silent until the idle timeout (a hung peer, a black hole)."""
        await trio.sleep_until(self.activity + self.policy.idle_timeout)

    async def _end(self, ending: Ending) -> None:
        """A byte threshold was reached: reset (once the client has every echoed byte) or close."""
        self._report(ending.value, bytes=self.faults.echoed)
        if ending is Ending.RESET:
            await acknowledged(self.stream, self.policy.send_timeout)
            self.faults.reset = True

    async def _send_pending(self) -> None:
        """What the session has to send now (the greeting, or after the client's EOF the farewell)."""
        session = self.session
        while session.next_step() is Step.SEND:
            data = session.outgoing
            await self._write(data)
            session.sent(len(data))

    async def _finish_echo(self) -> None:
        """After the client's EOF and the last echo: the slow close, the farewell, our FIN."""
        slow_close = self.faults.profile.slow_close
        if slow_close:
            self._report("slow_close", seconds=slow_close)
            await trio.sleep(slow_close)
        await self._send_pending()
        if self.session.next_step() is Step.SEND_EOF:
            with trio.move_on_after(self.policy.send_timeout):
                if isinstance(self.stream, trio.abc.HalfCloseableStream):
                    await self.stream.send_eof()
            self.session.sent_eof()

    async def _write(self, data: bytes | bytearray | memoryview) -> None:
        """One write, within ``send_timeout``."""
        with trio.move_on_after(self.policy.send_timeout) as limit:
            await self.stream.send_all(data)
        if limit.cancelled_caught:
            self._give_up(Reason.SEND_TIMEOUT)
            await trio.lowlevel.checkpoint()  # (cancelled: the pump's scope ends here)
        self.activity = trio.current_time()

    # -- the three tasks ----------------------------------------------------------------------------------

    async def _reader(self) -> None:
        faults = self.faults
        session = self.session
        while not faults.profile.blackhole:
            limit = faults.read_limit(min(self._read_cap, session.buffer_size - self._held))
            if limit == 0:
                if faults.read_limit(self._read_cap) == 0:
                    return  # a threshold: read no more (the writer acts once the echo is out)
                await self._changed.wait()  # the memory bound: wait until the writer frees room
                continue
            chunk = await self.stream.receive_some(limit)
            now = self.activity = trio.current_time()
            if not chunk:
                session.received(_EOF)
                self._queue.append((now, _EOF))
                self._wake()
                return
            session.bytes_in += len(chunk)
            self._queue_chunk(memoryview(chunk))

    def _queue_chunk(self, chunk: memoryview) -> None:
        """Queue a chunk read for echo, stamped with when it is due; never past a byte threshold
        (of an echo left over when faults were set live, the rest is not echoed)."""
        chunk = chunk[: self.faults.read_limit(len(chunk))]
        if not chunk:
            return
        self.faults.took(len(chunk))
        self._held += len(chunk)
        self._queue.append((self.faults.due(trio.current_time()), chunk))
        self._wake()

    async def _writer(self) -> Ending | None:
        faults = self.faults
        while True:
            while not self._queue and not faults.profile.blackhole:
                await self._changed.wait()
            profile = faults.profile
            if profile.blackhole:
                return Ending.BLACKHOLE
            due, chunk = self._queue[0]
            if chunk is _EOF:
                return None
            if due > trio.current_time():
                self._report("latency", seconds=profile.latency, jitter=profile.jitter)
                await trio.sleep_until(due)
            echo, index = faults.corrupt(chunk)
            if index >= 0:
                self._report("corrupt", index=index, bytes=len(chunk))
            pieces = faults.pieces(len(echo))
            if len(pieces) > 1:
                self._report("slice", size=profile.slice, delay=profile.slice_delay)
            view = memoryview(echo)
            for number, (start, end) in enumerate(pieces):
                if number and profile.slice_delay:
                    await trio.sleep(profile.slice_delay)
                await self._within_bandwidth(end - start)
                await self._write(view[start:end])
                self.session.bytes_out += end - start
            self._queue.popleft()
            self._held -= len(chunk)
            self._wake()
            ending = faults.echoed_now(len(chunk))
            if ending is not None:
                return ending

    async def _within_bandwidth(self, size: int) -> None:
        bucket = self._bucket
        if bucket is None:
            return
        # Spend first, then wait out the debt: a write goes out only once the bucket covers it.
        delay = bucket.debit(trio.current_time(), size)
        if delay > 0:
            if self.faults.profile.bandwidth:
                self._report("bandwidth", bytes_per_second=self.faults.profile.bandwidth)
            await trio.sleep(delay)

    async def _watchdog(self) -> None:
        idle = self.policy.idle_timeout
        while True:
            await trio.sleep_until(self.activity + idle)
            if trio.current_time() < self.activity + idle:
                continue  # there was activity meanwhile
            if not self._queue:
                self._give_up(Reason.IDLE)
                return
            await self._changed.wait()  # echo waits on our own pause: not the client's idleness


def report(
    policy: ConnectionPolicy, faults: ConnectionFaults, conn_id: int | None, kind: str, **fields: object
) -> None:
    """Tell ``policy.on_fault`` a fault acted (the shaping kinds once per connection)."""
    if kind in SHAPING and not faults.first(kind):
        return
    if policy.on_fault is not None:
        policy.on_fault(conn_id, kind, fields)


async def acknowledged(stream: trio.abc.Stream, patience: float) -> None:
    """Wait (at most ``patience`` seconds) until the client's kernel acknowledged every byte we sent:
    RST discards what was not delivered yet, so a reset after this loses nothing already echoed."""
    with trio.move_on_after(patience):
        # (no readiness event says "acknowledged": poll the kernel's count)
        while _unacknowledged(stream):  # noqa: ASYNC110
            await trio.sleep(ACK_POLL)


class FaultEnded(Exception):
    """A byte threshold of a :class:`FaultedSender` was reached: the connection ends as ``ending``
    says (reset, close, stall)."""

    def __init__(self, ending: Ending) -> None:
        super().__init__(ending.value)
        self.ending = ending


class FaultedSender:
    """What a web connection sends (its answers, its WebSocket frames), through its faults: latency
    and jitter before each write (order kept), one byte changed (corrupt), slices with pauses,
    ``bandwidth``, and the byte thresholds, exact: the write that reaches one is cut there, and the
    caller told which (it raises :class:`FaultEnded` once it has counted the bytes).

    Used by :class:`~trio_echo.web.WebConnection`'s stream below h11 and trio-websocket, so a fault
    acts on the bytes the client reads (on the plaintext, under TLS).
    """

    def __init__(self, faults: ConnectionFaults, policy: ConnectionPolicy, conn_id: int | None) -> None:
        self.faults = faults
        self.policy = policy
        self.conn_id = conn_id
        rate = faults.profile.bandwidth
        self._bucket = TokenBucket(rate, rate, trio.current_time()) if rate else None

    async def send_all(
        self, stream: trio.abc.Stream, data: bytes | bytearray | memoryview
    ) -> tuple[int, Ending | None]:
        """Send ``data`` (or its part up to a threshold) through the faults: the bytes sent, and the
        threshold they reached, if any."""
        faults = self.faults
        profile = faults.profile
        view = memoryview(data)[: faults.read_limit(len(data))]
        faults.took(len(view))
        due = faults.due(trio.current_time())
        if due > trio.current_time():
            report(
                self.policy, faults, self.conn_id, "latency", seconds=profile.latency, jitter=profile.jitter
            )
            await trio.sleep_until(due)
        echo, index = faults.corrupt(view)
        if index >= 0:
            report(self.policy, faults, self.conn_id, "corrupt", index=index, bytes=len(view))
        pieces = faults.pieces(len(echo))
        if len(pieces) > 1:
            report(self.policy, faults, self.conn_id, "slice", size=profile.slice, delay=profile.slice_delay)
        shaped = memoryview(echo)
        for number, (start, end) in enumerate(pieces):
            if number and profile.slice_delay:
                await trio.sleep(profile.slice_delay)
            if (
                self._bucket is not None
                and (delay := self._bucket.debit(trio.current_time(), end - start)) > 0
            ):
                report(self.policy, faults, self.conn_id, "bandwidth", bytes_per_second=profile.bandwidth)
                await trio.sleep(delay)
            await stream.send_all(shaped[start:end])
        return len(view), faults.echoed_now(len(view))


def _unacknowledged(stream: trio.abc.Stream) -> bool:
    """Whether the kernel still holds bytes the client has not acknowledged (Linux SIOCOUTQ)."""
    sock = _socket_of(stream)
    if sock is None or fcntl is None or termios is None:
        return False
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")  # SIOCOUTQ
    except OSError:
        return False
    return bool(struct.unpack("i", raw)[0])


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None


def reset(stream: trio.abc.Stream) -> None:
    """Make the close of ``stream`` send RST (SO_LINGER 0) instead of FIN."""
    sock = _socket_of(stream)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError as exc:  # pragma: no cover - the peer may already be gone
        if exc.errno not in (errno.EBADF, errno.ENOTCONN, errno.EINVAL):
            raise
