"""The pump's behaviour suite, with MockClock for every timeout, run against both pumps: the stream
pump over in-memory streams, and the socket fast path over a real kernel socket pair."""

from __future__ import annotations

import collections
import contextlib
import math
import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.lowlevel
import trio.testing

from trio_echo.closing import close_gracefully, refuse
from trio_echo.config import LimitsConfig
from trio_echo.connection import Connection
from trio_echo.echo import EchoSession
from trio_echo.events import Event, Flag
from trio_echo.policy import ConnectionPolicy
from trio_echo.relay import Relay
from trio_echo.stats import ConnectionInfo
from trio_echo.trace import Tracer


async def read_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    return bytes(data)


def connection(
    stream: trio.abc.Stream | socket.socket,
    *,
    size: int = 16,
    greeting: bytes = b"",
    farewell: bytes = b"",
    **kw: float,
) -> Connection:
    scratch = SHARED_SCRATCH if any(stream is sock for sock in _shared) else None
    relay = _relays[-1] if _relays and scratch is not None else None
    policy = ConnectionPolicy(scratch=scratch, relay=relay, **kw)  # type: ignore[arg-type]
    return Connection(stream, EchoSession(size, greeting, farewell), policy)


# "shared": the socket pump reading into one buffer shared by every connection; "relay": that, and
# the relay carrying the steady state, as the server runs it
SHARED_SCRATCH = memoryview(bytearray(1 << 16))
_shared: list[socket.socket] = []
_relays: list[Relay] = []


@pytest.fixture(params=["stream", "socket", "shared", "relay"])
async def kind(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param != "relay":
        yield str(request.param)
        return
    async with running_relay():
        yield "shared"  # make_pair's kind: the sockets share the scratch buffer, which the relay uses


@contextlib.asynccontextmanager
async def running_relay() -> AsyncIterator[Relay]:
    """A relay running for the block; connections built by ``connection`` on shared pairs use it."""
    async with trio.open_nursery() as nursery:
        relay = Relay()
        await nursery.start(relay.run, name="relay")
        _relays.append(relay)
        try:
            yield relay
        finally:
            _relays.remove(relay)
            nursery.cancel_scope.cancel()


def make_pair(
    kind: str, *, lockstep: bool = False
) -> tuple[trio.abc.Stream, trio.abc.Stream | socket.socket]:
    """(client, server end). ``lockstep``: writes complete only as the other side reads (for the
    socket pump: kernel buffers made as small as the kernel allows)."""
    if kind == "stream":
        return trio.testing.lockstep_stream_pair() if lockstep else trio.testing.memory_stream_pair()
    ours, theirs = socket.socketpair()
    if lockstep:
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    ours.setblocking(False)
    _opened.append(theirs)
    if kind == "shared":
        _shared.append(ours)
    return trio.SocketStream(trio.socket.from_stdlib_socket(theirs)), ours


_opened: list[socket.socket] = []


@pytest.fixture(autouse=True)
def close_client_sockets():  # type: ignore[no-untyped-def]
    """Tests may leave the client end open; the server end is the pump's to close."""
    yield
    while _opened:
        _opened.pop().close()
    _shared.clear()


async def test_echo_half_close_and_farewell(kind: str) -> None:
    client, server = make_pair(kind)
    conn = connection(server, greeting=b"hello\n", farewell=b"bye\n")
    async with trio.open_nursery() as nursery:
        reasons: list[str] = []

        async def run() -> None:
            reasons.append(await conn.run())

        nursery.start_soon(run)
        with trio.fail_after(5):
            for chunk in (b"one", b"two" * 20, b"3"):
                await client.send_all(chunk)
            assert isinstance(client, trio.abc.HalfCloseableStream)
            await client.send_eof()
            assert await read_until_eof(client) == b"hello\none" + b"two" * 20 + b"3bye\n"
    assert reasons == ["eof"]
    assert conn.session.bytes_in == 64
    assert conn.session.bytes_out == 6 + 64 + 4


async def test_backpressure_bounds_what_is_held(autojump_clock: trio.testing.MockClock, kind: str) -> None:
    client, server = make_pair(kind, lockstep=True)
    conn = connection(server, size=8)
    payload = bytes(range(256)) * 1024

    async def send_then_half_close() -> None:
        await client.send_all(payload)
        assert isinstance(client, trio.abc.HalfCloseableStream)
        await client.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        nursery.start_soon(send_then_half_close)
        await trio.testing.wait_all_tasks_blocked()
        # The client does not read: the pump stopped reading once its echo could not be sent (kernel
        # buffers of a real socket pair hold a little; the pump itself never holds more than 8 bytes).
        held_in = conn.session.bytes_in
        assert held_in < len(payload) // 4
        assert conn.session.unsent <= 8
        await trio.sleep(10)
        assert conn.session.bytes_in == held_in
        received = bytearray()
        while len(received) < len(payload):
            received += await client.receive_some(100)
            assert conn.session.bytes_in - conn.session.bytes_out <= 8
        assert received == payload
        assert await client.receive_some(10) == b""


@pytest.mark.parametrize(
    ("kw", "client_sends", "reason", "closed_at"),
    [
        # no byte either way for idle_timeout; then linger_timeout waiting for the silent client
        ({"idle_timeout": 10, "linger_timeout": 2}, b"", "idle", 12),
        # the lifetime cap wins over a longer idle timeout
        ({"idle_timeout": 10, "max_lifetime": 4, "linger_timeout": 2}, b"", "lifetime", 6),
        # linger 0: close at once
        ({"idle_timeout": 10}, b"", "idle", 10),
        # activity re-arms the idle timer: the client's byte at t=0 counts
        ({"idle_timeout": 10}, b"x", "idle", 10),
    ],
)
async def test_timeouts(
    autojump_clock: trio.testing.MockClock,
    kind: str,
    kw: dict[str, float],
    client_sends: bytes,
    reason: str,
    closed_at: float,
) -> None:
    client, server = make_pair(kind)
    conn = connection(server, **kw)
    if client_sends:
        await client.send_all(client_sends)
    assert await conn.run() == reason
    assert trio.current_time() == closed_at
    assert await read_until_eof(client) == client_sends


async def test_idle_timer_restarts_after_each_chunk(
    autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    client, server = make_pair(kind)
    conn = connection(server, idle_timeout=10)
    async with trio.open_nursery() as nursery:
        result: list[str] = []

        async def run() -> None:
            result.append(await conn.run())

        nursery.start_soon(run)
        for _ in range(5):
            await trio.sleep(9)
            await client.send_all(b"ping")
            assert await client.receive_some(10) == b"ping"
    assert result == ["idle"]
    assert trio.current_time() == 45 + 10


async def test_send_timeout_when_the_client_stops_reading(
    autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    client, server = make_pair(kind, lockstep=True)
    conn = connection(server, size=4, idle_timeout=100, send_timeout=7, linger_timeout=1)

    async def flood() -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # until the server closes
            await client.send_all(bytes(1 << 20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        assert await conn.run() == "send_timeout"
        # blocked for send_timeout, then lingered 1 s while the client kept sending
        assert trio.current_time() == 7 + 1
        nursery.cancel_scope.cancel()
    # memory stayed bounded while the client did not read
    assert conn.session.bytes_in - conn.session.bytes_out <= 4


async def test_close_from_outside_lingers_then_closes(
    autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    client, server = make_pair(kind)
    conn = connection(server, idle_timeout=100, linger_timeout=3)
    async with trio.open_nursery() as nursery:
        result: list[str] = []

        async def run() -> None:
            result.append(await conn.run())

        nursery.start_soon(run)
        await client.send_all(b"data")
        assert await client.receive_some(10) == b"data"
        conn.close("drain")
        conn.close("admin")  # the first reason wins
        # Our FIN arrives; input sent after it is read and discarded, not answered with RST.
        assert await client.receive_some(10) == b""
        await client.send_all(b"late input")
        assert isinstance(client, trio.abc.HalfCloseableStream)
        await client.send_eof()
    assert result == ["drain"]
    assert trio.current_time() == 0  # the client's EOF ended the linger early


async def test_peer_reset_is_reason_reset(kind: str) -> None:
    client, server = make_pair(kind)
    conn = connection(server)
    await client.send_all(b"x")
    await client.aclose()  # the echo of "x" cannot be delivered: EPIPE / BrokenResourceError
    with trio.fail_after(5):
        assert await conn.run() == "reset"


async def test_hard_cancel_still_closes_the_stream(kind: str) -> None:
    client, server = make_pair(kind)
    conn = connection(server, idle_timeout=100, linger_timeout=100)
    with trio.move_on_after(0.01):
        await conn.run()
    with trio.fail_after(5):
        assert await read_until_eof(client) == b""
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"x")
    await client.aclose()


async def test_data_events_only_when_flag_on(kind: str) -> None:
    events: list[Event] = []
    tracer = Tracer(Flag.ERROR)
    tracer.add_sink(events.append)
    client, server = make_pair(kind)
    entry = ConnectionInfo(7, "peer", "listener", 0.0, buffer_size=16)  # the id comes from the entry
    conn = Connection(server, entry, ConnectionPolicy(tracer=tracer))
    await client.send_all(b"ab")
    assert isinstance(client, trio.abc.HalfCloseableStream)
    await client.send_eof()
    tracer.flags |= Flag.DATA
    with trio.fail_after(5):
        await conn.run()
    assert [e.fields for e in events] == [
        {"conn_id": 7, "received": 2},
        {"conn_id": 7, "sent": 2},
        {"conn_id": 7, "received": 0},
    ]


async def test_refusal_text_then_lingering_close(autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"unread input")
    await refuse(server, b"busy\n", patience=1.0)
    assert await read_until_eof(client) == b"busy\n"
    assert trio.current_time() == 1.0  # waited linger for a client that never half-closed


async def test_close_gracefully_without_linger_is_immediate(autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    await close_gracefully(server, linger_timeout=0)
    assert trio.current_time() == 0
    assert await client.receive_some(1) == b""


async def test_bandwidth_cap_slows_the_echo_without_buffering(
    autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    client, server = make_pair(kind)
    conn = connection(server, size=65536, max_bytes_per_second=1000)
    payload = bytes(range(256)) * 20  # 5120 bytes
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        await client.send_all(payload)
        received = bytearray()
        while len(received) < len(payload):
            chunk = await client.receive_some(65536)
            received += chunk
            assert conn.session.bytes_in - conn.session.bytes_out <= 1000  # reads capped to 1 s worth
            # never ahead of the cap by more than its one-second burst
            assert len(received) <= 1000 * (trio.current_time() + 2)
        assert received == payload
        # a burst of 2 x 1000 at t=0, then 1000/s: the last 120 bytes go out at t=4
        assert trio.current_time() == 4
        assert isinstance(client, trio.abc.HalfCloseableStream)
        await client.send_eof()


async def test_socket_pump_shares_the_loop_and_stops_promptly() -> None:
    """A client that always has data ready never makes the kernel say EAGAIN: the fast path must still
    yield (other tasks run) and notice close() (cancellation) within its fair share of operations."""
    client, server = make_pair("socket")
    conn = connection(server, size=1024, linger_timeout=0)
    ticks = 0
    flooding = True

    async def flood() -> None:
        chunk = bytes(1024)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while flooding:
                await client.send_all(chunk)

    async def drain() -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while await client.receive_some(65536):
                pass

    async def bystander() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            nursery.start_soon(drain)
            nursery.start_soon(bystander)
            result: list[str] = []

            async def run() -> None:
                result.append(await conn.run())

            nursery.start_soon(run)
            while conn.session.bytes_out < 1 << 20:  # noqa: ASYNC110 - let a megabyte flow
                await trio.sleep(0.01)
            assert ticks > 10  # the bystander kept running meanwhile
            conn.close("admin")
            while not result:
                await trio.lowlevel.checkpoint()
            assert result == ["admin"]
            flooding = False
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("pump", ["socket", "shared"])
async def test_a_quiet_connection_waits_instead_of_polling(pump: str) -> None:
    """After a short read the socket pump yields once and reads again before it waits (the early
    read). A client that has gone quiet must then leave the pump blocked on readiness, not polling:
    every task blocks, and the pump's task takes no further steps."""
    client, server = make_pair(pump)
    conn = connection(server, size=1024, linger_timeout=0)
    steps: collections.Counter[str] = collections.Counter()

    class StepCounter(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            steps[task.name] += 1

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run, name="pump")
            for message in (b"one", b"two"):
                await client.send_all(message)
                assert await client.receive_some(10) == message
            trio.lowlevel.add_instrument(counter := StepCounter())
            try:
                await trio.testing.wait_all_tasks_blocked()  # never returns if the pump polls
                settled = steps["pump"]
                assert settled <= 2  # at most the early read's yield and the wait
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert steps["pump"] == settled  # and it stays blocked
            finally:
                trio.lowlevel.remove_instrument(counter)
            conn.close("admin")


def pattern(seed: int, size: int) -> bytes:
    """``size`` bytes no other seed produces at the same offsets (a mix-up shows as a mismatch)."""
    block = bytes((seed * 31 + i * 7) % 251 for i in range(251))
    return (block * (size // len(block) + 1))[:size]


async def test_unsent_echo_survives_other_connections_reading_into_the_shared_buffer() -> None:
    """The socket pumps read into one shared buffer; echo that the kernel would not take (EAGAIN) must
    be copied out before the pump waits, or the next connection's read overwrites it. A client that
    pauses reading gets exactly its own bytes back after another client moved 64 KiB messages."""
    stalled_client, stalled_end = make_pair("shared", lockstep=True)  # tiny kernel buffers: EAGAIN soon
    busy_client, busy_end = make_pair("shared")
    stalled = connection(stalled_end, size=1 << 16, linger_timeout=0)
    busy = connection(busy_end, size=1 << 16, linger_timeout=0)
    mine = pattern(1, 48 * 1024)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stalled.run)
            nursery.start_soon(busy.run)
            nursery.start_soon(stalled_client.send_all, mine)  # and not reading yet
            await trio.testing.wait_all_tasks_blocked()
            assert stalled.session.unsent > 0  # its echo is pending, the pump waits to write
            for round_ in range(4):
                message = pattern(100 + round_, 1 << 16)
                await busy_client.send_all(message)
                got = bytearray()
                while len(got) < len(message):
                    got += await busy_client.receive_some(1 << 16)
                assert got == message
            got = bytearray()
            while len(got) < len(mine):
                got += await stalled_client.receive_some(1 << 16)
            assert bytes(got) == mine  # its own bytes, not the busy client's
            stalled.close("admin")
            busy.close("admin")


async def test_a_connection_the_kernel_never_stalls_still_yields_and_obeys_close() -> None:
    """With input always ready and room to send, the kernel never says EAGAIN: the socket pump must
    still checkpoint every FAIR_SHARE operations, so another connection is served meanwhile and a
    close takes effect within a bounded amount of echo."""
    _hog_client, hog_end = make_pair("shared")
    raw_client = _opened[-1]  # the client's stdlib socket (trio's wrapper is non-blocking already)
    for sock in (raw_client, hog_end):  # room for megabytes each way (AF_UNIX: the sender's buffer)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    # Queue the input before the pump starts, so it is there whether or not the client task runs.
    queued = 0
    with contextlib.suppress(BlockingIOError):
        while queued < 1 << 21:
            queued += raw_client.send(bytes(16384))
    assert queued >= 1 << 18  # enough for a step without checkpoints to show
    hog = connection(hog_end, size=1024, linger_timeout=0)  # reads of at most 1 KiB
    other_client, other_end = make_pair("shared")
    other = connection(other_end, size=1024, linger_timeout=0)
    per_step: list[int] = []
    before = [0]

    class BytesPerStep(trio.abc.Instrument):
        """Bytes the hog echoes in one task step (between two checkpoints)."""

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            if task.name == "hog":
                before[0] = hog.session.bytes_out

        def after_task_step(self, task: trio.lowlevel.Task) -> None:
            if task.name == "hog":
                per_step.append(hog.session.bytes_out - before[0])

    other_served_at: list[int] = []
    closed_at: list[int] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            trio.lowlevel.add_instrument(counter := BytesPerStep())
            try:
                await other_client.send_all(b"me too")  # waiting for service before the hog starts
                nursery.start_soon(hog.run, name="hog")
                nursery.start_soon(other.run)
                assert await other_client.receive_some(100) == b"me too"
                other_served_at.append(hog.session.bytes_out)
                hog.close("admin")
                asked_at = hog.session.bytes_out
                while hog_end.fileno() >= 0:
                    await trio.lowlevel.checkpoint()
                closed_at.append(hog.session.bytes_out - asked_at)
            finally:
                trio.lowlevel.remove_instrument(counter)
            other.close("admin")
    # FAIR_SHARE (32) operations of at most 1 KiB each between checkpoints
    assert max(per_step) <= 64 * 1024, max(per_step)
    assert other_served_at[0] < queued  # served while the hog still had input
    assert closed_at[0] <= 64 * 1024  # the close took effect at the next checkpoint


def test_policy_from_limits_takes_every_limit_and_hook() -> None:
    limits = LimitsConfig(
        idle_timeout=1.5,
        send_timeout=2.5,
        max_lifetime=3.5,
        linger_timeout=4.5,
        max_bytes_per_second=6,
        tls_handshake_timeout=7.5,
    )
    tracer = Tracer(Flag.ERROR)
    scratch = memoryview(bytearray(8))

    def on_close(conn: Connection, reason: str) -> None:
        pass

    policy = ConnectionPolicy.from_limits(limits, tracer=tracer, scratch=scratch, on_close=on_close)
    assert (
        policy.idle_timeout,
        policy.send_timeout,
        policy.max_lifetime,
        policy.linger_timeout,
        policy.max_bytes_per_second,
        policy.tls_handshake_timeout,
    ) == (1.5, 2.5, 3.5, 4.5, 6, 7.5)
    assert (policy.tracer, policy.scratch, policy.on_close) == (tracer, scratch, on_close)
    off = ConnectionPolicy.from_limits(LimitsConfig(idle_timeout=0, send_timeout=0))
    assert (off.idle_timeout, off.send_timeout) == (math.inf, math.inf)  # 0 means off
