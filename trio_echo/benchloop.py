"""``trio-echo bench``'s fast engine (I/O, synchronous): closed-loop ping-pong and stream over plain
TCP or a Unix socket, every byte verified, in one ``select.epoll`` loop without an event-loop library.

What a load generator must do per round trip is small: one ``recv_into`` a reused buffer, one slice
comparison with the connection's pattern, one clock read, one ``send``. Trio adds a task step, two
checkpoints and a cancel scope to each of those (about three quarters of the generator's CPU per
round trip, docs/bench.md), so for the runs where nothing else is needed this loop does them alone,
as the server's socket pump does. Latencies are kept as integers in an array during the run and
go into the HdrHistogram after it, so recording costs an append.

Everything else (TLS, UDP, WebSocket, ``--mode connect``, ``--rate``, ``--ramp``, ``--reconnect``,
per-second output) runs on the Trio engine in :mod:`trio_echo.bench`; :func:`eligible` decides.
The results are the same ``Tally`` and histogram.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import errno
import select
import socket
import sys
import time

from .addresses import Address
from .bench import DRAIN_TIMEOUT, MAX_LATENCY_US, new_histogram
from .benchmodel import PERIOD, Pattern, Tally
from .buffers import page_aligned

CONNECT_TIMEOUT = 10.0
_GONE = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT})


def eligible(address: Address, opts: argparse.Namespace) -> bool:
    """Whether this run can use the fast engine (see the module docstring)."""
    return (
        getattr(opts, "engine", "auto") == "auto"
        and address.transport == "tcp"
        and opts.mode in ("pingpong", "stream")
        and not (opts.tls or opts.ca or opts.insecure)
        and not opts.rate
        and getattr(opts, "ramp", None) is None
        and not opts.reconnect
        and not getattr(opts, "json_stream", False)
        and not getattr(opts, "hdr_log", None)
    )


class _Connection:
    __slots__ = ("done", "due", "pattern", "received", "sent", "sock", "started")

    def __init__(self, sock: socket.socket, pattern: Pattern, due: int) -> None:
        self.sock = sock
        self.pattern = pattern
        self.sent = 0  # stream offset of the next byte to send
        self.received = 0  # stream offset of the next byte expected back
        self.started = 0  # perf_counter_ns when the round trip in flight was sent
        self.done = 0  # round trips completed
        self.due = due  # round trips this connection makes (--count; without it: until the deadline)


def _connect(address: Address) -> socket.socket:
    if address.path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(address.path)
        except OSError:
            sock.close()
            raise
    else:
        sock = socket.create_connection((address.host or "localhost", address.port), timeout=CONNECT_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


class FastRun:
    """One process's share, as :class:`trio_echo.bench.Run` has it: ``connections`` connections
    with seeds from ``seed_base``."""

    def __init__(self, address: Address, opts: argparse.Namespace, connections: int, seed_base: int) -> None:
        self.address = address
        self.opts = opts
        self.tally = Tally(connections=connections)
        self.histogram = new_histogram()
        self._latencies = array.array("q")  # each round trip's latency, ns
        self._connections = connections
        self._seed_base = seed_base
        self._poll = select.epoll()
        self._open: dict[int, _Connection] = {}  # by descriptor: every connection not closed yet
        self._running: dict[int, _Connection] = {}  # ping-pong: those still making round trips
        self._connections_made: list[_Connection] = []
        # (page-aligned: see trio_echo/buffers.py; a bytearray here made every stream run slow)
        self._view = page_aligned(max(opts.size, PERIOD, opts.window if opts.mode == "stream" else 0))

    def run(self) -> float:
        """Run every connection; the measured duration in seconds."""
        opts = self.opts
        count = opts.count
        for index in range(self._connections):
            due = (
                sys.maxsize
                if count is None
                else count // self._connections + (index < count % self._connections)
            )
            try:
                sock = _connect(self.address)
            except OSError:
                self.tally.errors["connect"] += 1
                continue
            conn = _Connection(sock, Pattern(self._seed_base + index), due)
            self._open[sock.fileno()] = conn
            self._connections_made.append(conn)
            self.tally.open += 1
        started = time.perf_counter()
        deadline = started + opts.duration if count is None else float("inf")
        try:
            if opts.mode == "stream":
                self._stream(deadline)
            else:
                self._pingpong(deadline, started)
        finally:
            for conn in list(self._open.values()):
                self._close(conn)
            self._poll.close()
        elapsed = time.perf_counter() - started
        for nanos in self._latencies:  # (recorded after the run: an append was all it cost then)
            self.histogram.record_value(min(max(nanos // 1000, 1), MAX_LATENCY_US))
        if self.opts.progress:
            sys.stderr.write("\r" + " " * 80 + "\r")
        return min(elapsed, opts.duration) if count is None else elapsed

    # -- ping-pong ------------------------------------------------------------------------------------

    def _pingpong(self, deadline: float, started: float) -> None:
        size = self.opts.size
        record = self._latencies.append
        clock = time.perf_counter_ns
        running = self._running
        done: list[_Connection] = []
        for fd, conn in list(self._open.items()):
            if conn.due == 0:
                done.append(conn)
                continue
            self._poll.register(conn.sock, select.EPOLLIN)
            running[fd] = conn
            conn.started = clock()
            if self._send(conn, conn.pattern.chunk(0, size)):
                conn.sent = size
        view, tally = self._view, self.tally
        next_report = started + 1.0
        poll = self._poll.poll
        while running:
            now = time.perf_counter()
            if now >= deadline:
                break
            if self.opts.progress and now >= next_report:
                self._progress(now - started)
                next_report += 1.0
            for fd, _ in poll(min(deadline - now, 0.25)):
                if fd not in running:
                    continue
                conn = running[fd]
                want = conn.sent - conn.received
                try:
                    got = conn.sock.recv_into(view, want)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._fail(conn, "reset" if exc.errno in _GONE else "eof")
                    continue
                if not got:
                    self._fail(conn, "eof")
                    continue
                # (Pattern.matches inlined for a message: one memcmp against the pattern, no copy)
                if not conn.pattern.stream.startswith(view[:got], conn.received % PERIOD):
                    self._fail(conn, "mismatch")
                    continue
                conn.received += got
                if got < want:
                    continue
                end = clock()
                record(end - conn.started)
                conn.done += 1
                if conn.done >= conn.due:
                    del running[fd]
                    done.append(conn)
                    continue
                conn.started = end
                message = conn.pattern.chunk(conn.sent, size)
                try:
                    sent = conn.sock.send(message)
                except OSError:
                    sent = 0
                if sent != size and not self._send(conn, message[sent:]):
                    continue
                conn.sent += size
        tally.roundtrips = sum(conn.done for conn in self._connections_made)
        tally.bytes_echoed = tally.roundtrips * size
        # The deadline: a round trip in flight is not counted (nor an error); every connection then
        # half-closes and waits for the server's EOF, as the Trio engine's connections do.
        self._finish(list(self._open.values()))

    def _send(self, conn: _Connection, data: memoryview) -> bool:
        """Send all of ``data`` (a ping-pong message fits the kernel's buffer; when it does not, wait
        for room here: the connection has nothing else to do until its echo is back)."""
        while data:
            try:
                sent = conn.sock.send(data)
            except BlockingIOError:
                select.select([], [conn.sock], [], DRAIN_TIMEOUT)
                continue
            except OSError as exc:
                self._fail(conn, "reset" if exc.errno in _GONE else "eof")
                return False
            data = data[sent:]
        return True

    # -- stream ---------------------------------------------------------------------------------------

    def _stream(self, deadline: float) -> None:
        size, window = self.opts.size, self.opts.window
        view, tally, connections = self._view, self.tally, self._open
        reads = len(self._view)  # as much as a window: fewer, larger reads
        both = select.EPOLLIN | select.EPOLLOUT
        interest: dict[int, int] = {}
        for fd, conn in list(connections.items()):
            self._poll.register(conn.sock, both)
            interest[fd] = both
        stopping = False
        while connections:
            now = time.perf_counter()
            if not stopping and now >= deadline:
                stopping = True  # send no more; what was sent must come back within DRAIN_TIMEOUT
                for fd in list(connections):
                    if interest[fd] != select.EPOLLIN:
                        self._poll.modify(fd, select.EPOLLIN)
                        interest[fd] = select.EPOLLIN
                self._finish([conn for conn in connections.values() if conn.received >= conn.sent])
            if stopping and now >= deadline + DRAIN_TIMEOUT:
                for conn in list(connections.values()):
                    self._fail(conn, "timeout")
                return
            for fd, mask in self._poll.poll(0.25):
                if fd not in connections:  # (failed or finished earlier in this batch)
                    continue
                conn = connections[fd]
                if mask & ~select.EPOLLOUT:  # readable (or an error or hang-up recv will report)
                    try:
                        got = conn.sock.recv_into(view, reads)
                    except BlockingIOError:
                        got = -1
                    except OSError as exc:
                        self._fail(conn, "reset" if exc.errno in _GONE else "eof")
                        continue
                    if got == 0:
                        self._fail(conn, "eof")
                        continue
                    if got > 0:
                        if not conn.pattern.matches(conn.received, view[:got]):
                            self._fail(conn, "mismatch")
                            continue
                        conn.received += got
                        if not stopping:
                            tally.bytes_echoed += got
                        elif conn.received >= conn.sent:
                            self._finish([conn])
                            continue
                if stopping:
                    continue
                if mask & select.EPOLLOUT:
                    # Room in the kernel: send until it or the window is full.
                    while conn.sent - conn.received + size <= window:
                        try:
                            conn.sent += conn.sock.send(conn.pattern.chunk(conn.sent, size))
                        except BlockingIOError:
                            break
                        except OSError as exc:
                            self._fail(conn, "reset" if exc.errno in _GONE else "eof")
                            break
                    if fd not in connections:
                        continue
                wanted = both if conn.sent - conn.received + size <= window else select.EPOLLIN
                if interest[fd] != wanted:  # (window full: wait for echo only; room again: both)
                    self._poll.modify(fd, wanted)
                    interest[fd] = wanted

    # -- the end --------------------------------------------------------------------------------------

    def _finish(self, conns: list[_Connection]) -> None:
        """Half-close each and wait (all at once, within DRAIN_TIMEOUT) for the server's EOF; a
        farewell may come first and is not checked."""
        waiting: dict[socket.socket, _Connection] = {}
        for conn in conns:
            self._running.pop(conn.sock.fileno(), None)
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._close(conn)
                continue
            waiting[conn.sock] = conn
        end = time.perf_counter() + DRAIN_TIMEOUT
        while waiting:
            left = end - time.perf_counter()
            if left <= 0:
                for conn in waiting.values():
                    self._fail(conn, "timeout")
                return
            readable, _, _ = select.select(list(waiting), [], [], left)
            for sock in readable:
                try:
                    got = sock.recv_into(self._view, PERIOD)
                except BlockingIOError:
                    continue
                except OSError:
                    got = 0
                if not got:
                    self._close(waiting.pop(sock))

    def _fail(self, conn: _Connection, kind: str) -> None:
        self.tally.errors[kind] += 1
        self._close(conn)

    def _close(self, conn: _Connection) -> None:
        fd = conn.sock.fileno()
        self._running.pop(fd, None)
        if self._open.pop(fd, None) is None:
            return
        self.tally.open -= 1
        with contextlib.suppress(OSError, ValueError):  # (never registered: it had nothing to do)
            self._poll.unregister(fd)
        conn.sock.close()

    def _progress(self, elapsed: float) -> None:
        tally = self.tally
        roundtrips = sum(conn.done for conn in self._connections_made)  # (ping-pong counts at the end)
        sys.stderr.write(
            f"\r{elapsed:5.1f}s  {roundtrips / elapsed:10.1f} rt/s  "
            f"{roundtrips * self.opts.size / elapsed / 1e6:8.2f} MB/s  open {tally.open}  "
            f"errors {tally.error_total}"
        )
        sys.stderr.flush()
