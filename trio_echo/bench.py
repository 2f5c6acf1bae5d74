"""``trio-echo bench ADDR``: a byte-verifying load generator with HdrHistogram latency percentiles.

Modes: ``pingpong`` (each connection sends ``--size`` bytes and waits for them back) and ``stream``
(each connection keeps up to ``--window`` bytes in flight). ``udp://ADDR`` (or ``--udp``) runs
ping-pong over UDP: each "connection" is a socket sending one numbered datagram at a time; a reply
that does not come within ``--udp-timeout`` counts as lost (UDP may drop, and the server's per-source
budget drops on purpose), a wrong or misnumbered one as a mismatch. ``--rate R`` makes ping-pong open-loop: R
messages per second in total (``--rate START:END``: rising linearly over the run), each one's latency
measured from when it was *meant* to be sent, so a stalled server cannot hide behind the client
waiting for it (coordinated omission). ``--mode connect`` opens a connection per message. ``--processes P``
spreads the connections over P processes and merges their results.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import struct
import sys
from collections.abc import Callable, Iterator
from typing import Any

import trio
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]
from trio_websocket import ConnectionClosed, HandshakeError, connect_websocket

from .addresses import Address
from .benchmodel import PERIOD, Pattern, Second, Tally, message_due, ramp_start, second_of
from .client import MAX_DATAGRAM, ClientError, connect, connect_datagram, tls_context
from .errors import leaves

MAX_LATENCY_US = 3_600_000_000  # an hour: anything slower is recorded as this
DRAIN_TIMEOUT = 10.0  # after the run: how long to wait for the last echoes and the server's EOF


def new_histogram() -> Any:
    return HdrHistogram(1, MAX_LATENCY_US, 3)


def percentiles(histogram: Any) -> dict[str, float]:
    if histogram.get_total_count() == 0:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0}
    return {
        "p50": float(histogram.get_value_at_percentile(50)),
        "p90": float(histogram.get_value_at_percentile(90)),
        "p99": float(histogram.get_value_at_percentile(99)),
        "p999": float(histogram.get_value_at_percentile(99.9)),
        "max": float(histogram.get_max_value()),
    }


class Run:
    """One process's share of a benchmark: ``connections`` connections with seeds from ``seed_base``."""

    def __init__(self, address: Address, opts: argparse.Namespace, connections: int, seed_base: int) -> None:
        self.address = address
        self.opts = opts
        self.connections = connections
        self.seed_base = seed_base
        self.tally = Tally(connections=connections)
        self.histogram = new_histogram()
        # --json-stream: this second's latencies, and who gets each second's counts
        self.interval = new_histogram() if getattr(opts, "json_stream", False) else None
        self.on_second: Callable[[Second, Any], None] | None = None
        self.deadline = math.inf
        self.started = 0.0
        self.tls = (
            tls_context(ca=opts.ca, insecure=opts.insecure)
            if (opts.tls or opts.ca or opts.insecure or address.transport == "wss")
            else None
        )

    def _record(self, intended: float) -> None:
        micros = min(max(int((trio.current_time() - intended) * 1e6), 1), MAX_LATENCY_US)
        self.histogram.record_value(micros)
        if self.interval is not None:
            self.interval.record_value(micros)

    async def run(self) -> float:
        """Run every connection; return the measured duration in seconds."""
        opts = self.opts
        self.started = trio.current_time()
        if opts.count is None:
            self.deadline = self.started + opts.duration
        async with trio.open_nursery() as nursery:
            if opts.progress:
                nursery.start_soon(self._progress)
            if self.on_second is not None:
                nursery.start_soon(self._seconds, self.on_second)
            async with trio.open_nursery() as workers:
                for index in range(self.connections):
                    count = None
                    if opts.count is not None:
                        count = opts.count // self.connections + (index < opts.count % self.connections)
                    workers.start_soon(self._connection, index, count)
            nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - self.started
        return min(elapsed, opts.duration) if opts.count is None else elapsed

    async def _progress(self) -> None:
        """The progress line on stderr (a terminal), rewritten every second."""
        while True:
            await trio.sleep(1)
            elapsed = trio.current_time() - self.started
            line = (
                f"\r{elapsed:5.1f}s  {self.tally.roundtrips / elapsed:10.1f} rt/s  "
                f"{self.tally.bytes_echoed / elapsed / 1e6:8.2f} MB/s  open {self.tally.open}  "
                f"errors {self.tally.error_total}"
            )
            sys.stderr.write(line)
            sys.stderr.flush()

    async def _seconds(self, on_second: Callable[[Second, Any], None]) -> None:
        """--json-stream: each whole second of the run, its counts and latency histogram."""
        before = self.tally.snapshot()
        for second in itertools.count(1):
            await trio.sleep_until(self.started + second)
            now = self.tally.snapshot()
            histogram, self.interval = self.interval, new_histogram()
            on_second(second_of(before, now, second=second, open_connections=now.open), histogram)
            before = now

    async def _turn(self, index: int, done: int) -> float:
        """Wait until this connection's message ``done`` is due (open loop; closed loop: now) and
        return when it was due: latency counts from then."""
        due = self._due(index, done)
        if due is None:
            return trio.current_time()
        await trio.sleep_until(due)
        return due

    def _due(self, index: int, done: int) -> float | None:
        """Open loop (``--rate``): when this connection's message ``done`` is due; None: closed loop."""
        rate = self.opts.rate
        if not rate:
            return None
        start, end = rate
        offset = message_due(
            done + index / self.connections,
            start / self.connections,
            end / self.connections,
            self.opts.duration,
        )
        return self.started + offset

    async def _connection(self, index: int, count: int | None) -> None:
        ramp = getattr(self.opts, "ramp", None)
        if ramp is not None:  # --ramp CONNS:SECONDS: this connection's turn (numbered across processes)
            await trio.sleep_until(self.started + ramp_start(self.seed_base + index, *ramp))
        if self.address.transport == "udp":
            await self._datagrams(index, count)
            return
        if self.address.transport in ("ws", "wss"):
            await self._websocket(index, count)
            return
        if self.opts.mode == "connect":
            await self._connects(index, count)
            return
        while True:
            try:
                stream = await connect(self.address, self.tls)
            except ClientError:
                self.tally.errors["connect"] += 1
                return
            try:
                with self._open():
                    count = await self._serve_one(stream, index, count)
            except _Closed as closed:  # --reconnect: closed cleanly between round trips; carry on
                self.tally.reconnects += 1
                count = closed.remaining
                if trio.current_time() >= self.deadline:
                    return
                continue
            return

    @contextlib.contextmanager
    def _open(self) -> Iterator[None]:
        """Counts a connection as open while the block runs."""
        self.tally.open += 1
        try:
            yield
        finally:
            self.tally.open -= 1

    async def _serve_one(self, stream: trio.abc.Stream, index: int, count: int | None) -> int | None:
        """One connection's run; the round trips still to do if it is replaced (``_Closed``)."""
        pattern = Pattern(self.seed_base + index)
        try:
            async with stream:
                if self.opts.mode == "stream":
                    await self._stream(stream, pattern)
                else:
                    await self._pingpong(stream, pattern, count, index)
        # (except*: in stream mode failures come out of a nursery, wrapped in a group, and sender and
        # receiver may both fail; a connection counts one error, the most telling kind)
        except* (trio.BrokenResourceError, _Failed) as group:
            kinds = [leaf.kind if isinstance(leaf, _Failed) else "reset" for leaf in leaves(group)]
            self.tally.errors[min(kinds, key=FAILURE_PRIORITY.index)] += 1
        return count

    async def _pingpong(
        self, stream: trio.abc.Stream, pattern: Pattern, count: int | None, index: int
    ) -> None:
        size = self.opts.size
        offset = done = 0
        with trio.move_on_at(self.deadline):
            while count is None or done < count:
                intended = await self._turn(index, done)
                try:
                    await stream.send_all(pattern.chunk(offset, size))
                    await self._expect(stream, pattern, offset, size)
                except _Failed as failure:
                    # A drained server echoes what it has read, then FINs: a round trip that got
                    # nothing back was never read, and a client that retries sends it again.
                    if self.opts.reconnect and failure.kind == "eof" and not failure.partial:
                        raise _Closed(None if count is None else count - done) from None
                    raise
                self._record(intended)
                offset += size
                done += 1
                self.tally.roundtrips += 1
                self.tally.bytes_echoed += size
        await self._finish(stream)

    async def _connects(self, index: int, count: int | None) -> None:
        """--mode connect: connect (with the TLS handshake), echo one message, close cleanly; again,
        as fast as allowed (or at ``--rate``). Each one is a round trip whose latency is all of it."""
        size = self.opts.size
        pattern = Pattern(self.seed_base + index)
        done = 0
        with trio.move_on_at(self.deadline):
            while count is None or done < count:
                intended = await self._turn(index, done)
                try:
                    stream = await connect(self.address, self.tls)
                except ClientError:
                    self.tally.errors["connect"] += 1
                    return
                offset = done * size
                try:
                    with self._open():
                        async with stream:
                            await stream.send_all(pattern.chunk(offset, size))
                            await self._expect(stream, pattern, offset, size)
                            await self._finish(stream)
                except (trio.BrokenResourceError, _Failed) as exc:
                    self.tally.errors[exc.kind if isinstance(exc, _Failed) else "reset"] += 1
                    return
                self._record(intended)
                done += 1
                self.tally.roundtrips += 1
                self.tally.bytes_echoed += size

    async def _websocket(self, index: int, count: int | None) -> None:
        """ws:// and wss:// (a web echo): each round trip one binary message, the pattern at its
        offset, which must come back whole and unchanged. ``--mode connect``: a new WebSocket (its
        handshake, and TLS for wss://) per message."""
        size = self.opts.size
        pattern = Pattern(self.seed_base + index)
        per_message = self.opts.mode == "connect"
        done = 0
        with trio.move_on_at(self.deadline):
            while count is None or done < count:
                failure = ""
                try:
                    async with trio.open_nursery() as nursery:  # (trio-websocket's reader task)
                        try:
                            ws = await connect_websocket(
                                nursery,
                                self.address.host or "localhost",
                                self.address.port,
                                self.opts.resource,
                                use_ssl=self.tls or False,
                                max_message_size=max(size, 1 << 20),
                            )
                        except (OSError, HandshakeError, trio.BrokenResourceError):
                            self.tally.errors["connect"] += 1
                            return
                        with self._open():
                            while count is None or done < count:
                                intended = await self._turn(index, done)
                                offset = done * size
                                await ws.send_message(bytes(pattern.chunk(offset, size)))
                                reply = await ws.get_message()
                                if not isinstance(reply, bytes) or len(reply) != size:
                                    raise _Failed("mismatch")
                                if not pattern.matches(offset, reply):
                                    raise _Failed("mismatch")
                                self._record(intended)
                                done += 1
                                self.tally.roundtrips += 1
                                self.tally.bytes_echoed += size
                                if per_message:
                                    break
                            await ws.aclose()
                        nursery.cancel_scope.cancel()
                except* ConnectionClosed:  # (the server closed it: no echo for what we sent)
                    failure = "eof"
                except* _Failed:
                    failure = "mismatch"
                except* Exception:
                    # Bytes changed on the way break the protocol itself, and trio-websocket then
                    # fails in its own ways (a corrupted handshake answer: an h11 error in its
                    # reader): what came back was not what was sent.
                    failure = "mismatch"
                if failure:
                    self.tally.errors[failure] += 1
                    return

    async def _datagrams(self, index: int, count: int | None) -> None:
        """UDP ping-pong: datagram ``n`` is its number (8 bytes) and the pattern at ``n * size``."""
        try:
            sock = await connect_datagram(self.address)
        except ClientError:
            self.tally.errors["connect"] += 1
            return
        size, timeout = self.opts.size, self.opts.udp_timeout
        pattern = Pattern(self.seed_base + index)
        reply = bytearray(MAX_DATAGRAM + 1)  # one more: a longer reply must show as longer
        done = 0
        with sock, self._open(), trio.move_on_at(self.deadline):  # (a UDP "connection": its socket)
            while count is None or done < count:
                intended = await self._turn(index, done)
                header = struct.pack("!Q", done)
                try:
                    await sock.send(header + pattern.chunk(done * size, size - 8))
                    with trio.move_on_after(timeout) as wait:
                        while True:
                            got = await sock.recv_into(reply)
                            number = struct.unpack_from("!Q", reply)[0] if got >= 8 else -1
                            if 0 <= number < done:
                                continue  # a late reply to a datagram already counted lost
                            if got != size or number != done:
                                raise _Failed("mismatch")
                            if not pattern.matches(done * size, memoryview(reply)[8:got]):
                                raise _Failed("mismatch")
                            self._record(intended)
                            self.tally.roundtrips += 1
                            self.tally.bytes_echoed += size
                            break
                except _Failed as failed:
                    self.tally.errors[failed.kind] += 1
                    return
                except ConnectionRefusedError:
                    self.tally.errors["connect"] += 1  # ICMP port unreachable: nobody listens
                    return
                if wait.cancelled_caught:
                    self.tally.lost += 1
                done += 1

    async def _expect(self, stream: trio.abc.Stream, pattern: Pattern, offset: int, size: int) -> None:
        got = 0
        while got < size:
            data = await stream.receive_some(size - got)
            if not data:
                raise _Failed("eof", partial=got > 0)  # a truncated echo is an error, reconnect or not
            if not pattern.matches(offset + got, data):
                raise _Failed("mismatch")
            got += len(data)

    async def _stream(self, stream: trio.abc.Stream, pattern: Pattern) -> None:
        size, window = self.opts.size, self.opts.window
        sent = received = 0
        room = trio.Event()
        stop = trio.Event()

        reading = trio.CancelScope()

        async def sender() -> None:
            # The deadline is checked between writes, never inside one: a cancelled send_all leaves
            # a TLS stream broken.
            nonlocal sent, room
            while trio.current_time() < self.deadline:
                if sent - received + size > window:
                    with trio.move_on_at(self.deadline):
                        await room.wait()
                    room = trio.Event()
                    continue
                await stream.send_all(pattern.chunk(sent, size))
                sent += size
            stop.set()
            if received >= sent:
                reading.cancel()  # all echoed already: the receiver waits for bytes that will not come

        async def receiver() -> None:
            # Ends once everything sent has come back (TLS has no half-close, so no EOF to wait for).
            nonlocal received
            with reading:
                while not (stop.is_set() and received >= sent):
                    data = await stream.receive_some(PERIOD)
                    if not data:
                        raise _Failed("eof")
                    if not pattern.matches(received, data):
                        raise _Failed("mismatch")
                    received += len(data)
                    if not stop.is_set():
                        self.tally.bytes_echoed += len(data)
                    room.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            # The echo of everything sent must be back within DRAIN_TIMEOUT of the end of the run.
            with trio.move_on_at(self.deadline + DRAIN_TIMEOUT) as scope:
                await receiver()
            if scope.cancelled_caught:
                nursery.cancel_scope.cancel()
                raise _Failed("timeout")

    async def _finish(self, stream: trio.abc.Stream) -> None:
        """Half-close and wait for the server's EOF (a farewell may come first; it is not checked).
        TLS cannot half-close: the stream is simply closed."""
        if not isinstance(stream, trio.abc.HalfCloseableStream):
            return
        with trio.move_on_after(DRAIN_TIMEOUT) as scope:
            await stream.send_eof()
            while await stream.receive_some(PERIOD):
                pass
        if scope.cancelled_caught:
            raise _Failed("timeout")


FAILURE_PRIORITY = ("mismatch", "eof", "timeout", "reset")


class _Closed(Exception):
    """--reconnect: the server closed the connection with no echo owed; ``remaining`` round trips."""

    def __init__(self, remaining: int | None) -> None:
        super().__init__(remaining)
        self.remaining = remaining


class _Failed(Exception):
    def __init__(self, kind: str, *, partial: bool = False) -> None:
        super().__init__(kind)
        self.kind = kind
        self.partial = partial  # an EOF in the middle of an echo
