"""Faults on purpose: the pure decisions (tables, fixed seeds) and each fault observed from outside
over real loopback sockets (TCP, TLS, UDP), live changes from the admin channel, counters and events."""

from __future__ import annotations

import random
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trustme

from tests.conftest import make_config, port_of, running_server
from tests.test_admin_port import admin_server, channel, next_of, request, runtime_dir  # noqa: F401  (autouse: the token file)
from tests.test_tls import server_pem
from trio_echo.admin.metrics import render
from trio_echo.admin.protocol import Invalid, SetFaults, parse_request
from trio_echo.config import Config, FaultProfile
from trio_echo.configfile import config_from_toml, config_to_toml
from trio_echo.errors import ConfigError
from trio_echo.events import Event, Flag
from trio_echo.faults import (
    MAX_DELAYED_DATAGRAMS,
    REORDER_WAIT,
    ConnectionFaults,
    DatagramFaults,
    Ending,
    FaultPlan,
    plan_for,
)
from trio_echo.reasons import Reason
from trio_echo.server import EchoServer
from trio_echo.trace import Tracer

# -- the profile (pure) ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[faults.a]\nlatency = -1", "faults.a.latency = -1.0: must be >= 0"),
        ("[faults.a]\nlatncy = 1", "faults.a.latncy = 1: unknown key; did you mean latency?"),
        ("[faults.a]\ncorrupt = 1.5", "faults.a.corrupt = 1.5: must be a probability from 0 to 1"),
        ("[faults.a]\nloss = -0.1", "faults.a.loss = -0.1: must be a probability from 0 to 1"),
        ("[faults.a]\nprobability = 2", "faults.a.probability = 2.0: must be a probability"),
        ("[faults.a]\nlatency = nan", "faults.a.latency = nan: must be a finite number"),
        ("[faults.a]\nblackhole = 1", "faults.a.blackhole = 1: expected true or false"),
        ("[faults.a]\nslice = 1.5", "faults.a.slice = 1.5: expected an integer"),
        ("[faults]\na = 1", "faults.a = 1: expected a table of fault keys"),
        (
            '[server]\nlisten = [{ address = ":1", faults = "nope" }]\n[faults.a]\n',
            "server.listen[0].faults = 'nope': no [faults.NAME] profile by that name (a)",
        ),
    ],
)
def test_bad_profiles_are_one_line_naming_the_key(toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_toml(toml)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_profiles_round_trip_through_check_config() -> None:
    text = (
        '[server]\nlisten = [{ address = "127.0.0.1:0", faults = "flaky" }]\n'
        "[faults.flaky]\nlatency = 0.05\njitter = 0.01\ncorrupt = 0.5\nseed = 3\n"
        "[faults.hole]\nblackhole = true\n"
    )
    config = config_from_toml(text)
    printed = config_to_toml(config)
    assert '[faults."flaky"]\nlatency = 0.05\njitter = 0.01\ncorrupt = 0.5\nseed = 3\n' in printed
    assert 'faults = "flaky"' in printed
    assert config_from_toml(printed) == config


@pytest.mark.parametrize(
    ("thresholds", "taken", "room", "limit"),
    [
        ({}, 0, 65536, 65536),
        ({"reset_after_bytes": 1000}, 0, 65536, 1000),
        ({"reset_after_bytes": 1000}, 600, 65536, 400),
        ({"reset_after_bytes": 1000}, 1000, 65536, 0),
        ({"close_after_bytes": 10, "stall_after_bytes": 5}, 0, 100, 5),
        ({"stall_after_bytes": 5000}, 0, 100, 100),
    ],
)
def test_reads_never_pass_a_byte_threshold(
    thresholds: dict[str, int], taken: int, room: int, limit: int
) -> None:
    faults = ConnectionFaults(FaultProfile(**thresholds), random.Random(1))  # type: ignore[arg-type]
    faults.took(taken)
    assert faults.read_limit(room) == limit


@pytest.mark.parametrize(
    ("thresholds", "echoes", "endings"),
    [
        ({"reset_after_bytes": 10}, [4, 4, 2], [None, None, Ending.RESET]),
        ({"close_after_bytes": 10}, [10], [Ending.CLOSE]),
        ({"stall_after_bytes": 3, "close_after_bytes": 5}, [2, 1], [None, Ending.STALL]),
        ({"reset_after_bytes": 5, "close_after_bytes": 5}, [5], [Ending.RESET]),  # reset first
        ({}, [100], [None]),
    ],
)
def test_thresholds_end_the_connection_at_their_byte(
    thresholds: dict[str, int], echoes: list[int], endings: list[Ending | None]
) -> None:
    faults = ConnectionFaults(FaultProfile(**thresholds), random.Random(1))  # type: ignore[arg-type]
    assert [faults.echoed_now(count) for count in echoes] == endings


@pytest.mark.parametrize(
    ("slice_size", "size", "pieces"),
    [(0, 5, [(0, 5)]), (2, 5, [(0, 2), (2, 4), (4, 5)]), (10, 5, [(0, 5)]), (1, 2, [(0, 1), (1, 2)])],
)
def test_slices(slice_size: int, size: int, pieces: list[tuple[int, int]]) -> None:
    assert ConnectionFaults(FaultProfile(slice=slice_size), random.Random(1)).pieces(size) == pieces


def test_latency_with_jitter_keeps_order_and_stays_in_bounds() -> None:
    faults = ConnectionFaults(FaultProfile(latency=0.1, jitter=0.05), random.Random(7))
    dues = [faults.due(now * 0.01) for now in range(200)]
    assert dues == sorted(dues)
    assert all(
        0.05 <= due - now * 0.01 <= 0.15 + 1e-9 or due == previous
        for now, due, previous in zip(range(200), dues, [0.0, *dues], strict=False)
    )
    assert ConnectionFaults(FaultProfile(), random.Random(1)).due(5.0) == 5.0  # none: at once


def test_corrupt_changes_exactly_one_byte_at_the_rate_asked() -> None:
    faults = ConnectionFaults(FaultProfile(corrupt=0.3, seed=1), random.Random(11))
    chunk = bytes(range(256)) * 4
    changed = 0
    for _ in range(2000):
        echo, index = faults.corrupt(chunk)
        differing = [i for i in range(len(chunk)) if echo[i] != chunk[i]]
        assert differing == ([index] if index >= 0 else [])
        changed += index >= 0
    assert 0.25 < changed / 2000 < 0.35
    assert ConnectionFaults(FaultProfile(corrupt=1.0), random.Random(1)).corrupt(b"")[1] == -1


def test_a_plan_spares_connections_at_its_probability_and_replays_with_its_seed() -> None:
    def draws(seed: int) -> list[bool]:
        plan = FaultPlan("p", FaultProfile(latency=1.0, probability=0.25, seed=seed))
        return [plan.draw() is not None for _ in range(4000)]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)
    assert 0.22 < sum(draws(5)) / 4000 < 0.28
    assert FaultPlan("p", FaultProfile(probability=0.0)).for_connection() is not None  # by id: always


def test_plan_for_names_inline_and_none() -> None:
    profiles = {"slow": FaultProfile(latency=0.5)}
    assert plan_for(None, profiles) is None
    slow = plan_for("slow", profiles)
    assert slow is not None
    assert slow.describe() == {"name": "slow", "latency": 0.5}
    inline = plan_for(FaultProfile(loss=0.5), profiles)
    assert inline is not None
    assert inline.describe() == {"name": "", "loss": 0.5}
    with pytest.raises(LookupError, match=r"no \[faults.fast\] profile \(slow\)"):
        plan_for("fast", profiles)


def test_becoming_another_profile_starts_its_counts_again_and_tells_the_pump() -> None:
    told = []
    faults = ConnectionFaults(FaultProfile(reset_after_bytes=10), random.Random(1))
    faults.on_change = lambda: told.append(True)
    faults.took(8)
    faults.echoed_now(8)
    assert faults.first("latency")
    faults.become(ConnectionFaults(FaultProfile(close_after_bytes=5), random.Random(2)))
    assert told == [True]
    assert faults.read_limit(100) == 5
    assert faults.first("latency")  # reported again under the new profile
    assert faults.echoed_now(5) is Ending.CLOSE


# -- datagrams (pure) -------------------------------------------------------------------------------------


def _late(numbers: list[int]) -> int:
    """How many arrive after a higher-numbered one (were held back)."""
    highest, late = -1, 0
    for number in numbers:
        late += number < highest
        highest = max(highest, number)
    return late


def _shape_all(profile: FaultProfile, count: int) -> tuple[list[int], dict[str, int]]:
    shaper = DatagramFaults(profile, random.Random(profile.seed))
    out: list[int] = []
    kinds: dict[str, int] = {}
    for index in range(count):
        for kind in shaper.shape(b"%d" % index, "peer", index * 0.001):
            kinds[kind] = kinds.get(kind, 0) + 1
        out += [int(data) for data, _ in shaper.due_now(index * 0.001)]
    out += [int(data) for data, _ in shaper.due_now(1e9)]
    return out, kinds


@pytest.mark.parametrize("key", ["loss", "duplicate", "reorder"])
def test_datagram_fault_rates_at_a_fixed_seed(key: str) -> None:
    out, kinds = _shape_all(FaultProfile(**{key: 0.2, "seed": 42}), 10000)  # type: ignore[arg-type]
    assert 0.18 < kinds[key] / 10000 < 0.22
    if key == "loss":
        assert len(out) == 10000 - kinds["loss"]
        assert len(set(out)) == len(out)
    elif key == "duplicate":
        assert len(out) == 10000 + kinds["duplicate"]
        assert len(set(out)) == 10000
    else:
        assert sorted(out) == list(range(10000))
        assert kinds["reorder"] - 3 <= _late(out) <= kinds["reorder"]  # (the last ones have no successor)


def test_datagram_latency_keeps_order_and_is_bounded() -> None:
    shaper = DatagramFaults(FaultProfile(latency=0.5), random.Random(1))
    assert shaper.shape(b"a", "p", 0.0) == []
    assert shaper.due_now(0.4) == []
    assert shaper.next_due == 0.5
    assert shaper.due_now(0.5) == [(b"a", "p")]
    for _index in range(MAX_DELAYED_DATAGRAMS):
        shaper.shape(b"x", "p", 1.0)
    assert shaper.shape(b"y", "p", 1.0) == ["overflow"]
    assert len(shaper) == MAX_DELAYED_DATAGRAMS


def test_a_held_back_datagram_goes_out_anyway_without_a_successor() -> None:
    shaper = DatagramFaults(FaultProfile(reorder=1.0), random.Random(1))
    assert shaper.shape(b"a", "p", 0.0) == ["reorder"]
    assert shaper.due_now(0.0) == []
    assert len(shaper) == 1
    assert shaper.next_due == REORDER_WAIT
    assert shaper.due_now(REORDER_WAIT) == [(b"a", "p")]


def test_corrupted_datagrams_differ_in_one_byte() -> None:
    shaper = DatagramFaults(FaultProfile(corrupt=1.0), random.Random(3))
    assert shaper.shape(b"abcdef", "p", 0.0) == ["corrupt"]
    ((data, _),) = shaper.due_now(0.0)
    assert sum(a != b for a, b in zip(data, b"abcdef", strict=True)) == 1


# -- the admin message (pure) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ('{"type":"set_faults","listener":"x","faults":"flaky"}', SetFaults("flaky", "x", None)),
        ('{"type":"set_faults","id":3,"faults":null}', SetFaults(None, None, 3)),
        (
            '{"type":"set_faults","id":3,"faults":{"latency":0.1}}',
            SetFaults(FaultProfile(latency=0.1), None, 3),
        ),
        (
            '{"type":"set_faults","faults":null}',
            Invalid("set_faults: give either 'listener' (an address or name) or 'id' (a connection id)"),
        ),
        (
            '{"type":"set_faults","id":1,"listener":"x","faults":null}',
            Invalid("set_faults: give either 'listener' (an address or name) or 'id' (a connection id)"),
        ),
        (
            '{"type":"set_faults","id":true,"faults":null}',
            Invalid("set_faults: 'id' must be an integer connection id"),
        ),
        (
            '{"type":"set_faults","listener":"","faults":null}',
            Invalid("set_faults: 'listener' must be a listener's address or name"),
        ),
        (
            '{"type":"set_faults","id":1}',
            Invalid("set_faults: 'faults' is required: a profile name, an object of fault keys, or null"),
        ),
        (
            '{"type":"set_faults","id":1,"faults":[1]}',
            Invalid("set_faults: 'faults' must be a profile name, an object of fault keys, or null"),
        ),
        (
            '{"type":"set_faults","id":1,"faults":{"loss":2}}',
            Invalid("set_faults: faults.loss = 2.0: must be a probability from 0 to 1"),
        ),
        (
            '{"type":"set_faults","id":1,"faults":{"latency":-1}}',
            Invalid("set_faults: faults.latency = -1.0: must be >= 0 (0 means off)"),
        ),
    ],
)
def test_parse_set_faults(message: str, expected: object) -> None:
    assert parse_request(message) == expected


# -- from outside: real sockets ------------------------------------------------------------------------------


def _config(profile: dict[str, object], *, transport: str = "", **sections: dict[str, object]) -> Config:
    limits = {"idle_timeout": 2.0, "linger_timeout": 1.0, **sections.pop("limits", {})}
    return make_config(
        server={
            "listen": [{"address": f"{transport}127.0.0.1:0", "faults": "p"}],
            **sections.pop("server", {}),
        },
        limits=limits,
        faults={"p": profile},
        **sections,
    )


@asynccontextmanager
async def faulted(
    profile: dict[str, object], **sections: dict[str, object]
) -> AsyncIterator[tuple[EchoServer, list[Event]]]:
    events: list[Event] = []
    tracer = Tracer(Flag.ERROR | Flag.CONN)
    tracer.add_sink(events.append)
    async with running_server(_config(profile, **sections), tracer=tracer) as server, clients_of(server):
        yield server, events


@asynccontextmanager
async def clients_of(server: EchoServer) -> AsyncIterator[None]:
    """Close the clients ``_connect`` opened to ``server`` when the block ends."""
    try:
        yield
    finally:
        for stream in _clients.pop(server, []):
            await trio.aclose_forcefully(stream)


_clients: dict[EchoServer, list[trio.abc.Stream]] = {}


async def _connect(server: EchoServer) -> trio.SocketStream:
    """A client of ``server``, closed when its ``faulted`` block ends."""
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(server.addresses[0]))
    _clients.setdefault(server, []).append(stream)
    return stream


async def _read_until_end(stream: trio.abc.Stream) -> tuple[bytes, str]:
    """Everything until EOF or a reset: (bytes, "eof" | "reset")."""
    data = b""
    with trio.fail_after(10):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError as exc:
                cause: BaseException | None = exc
                while cause is not None and not isinstance(cause, ConnectionResetError):
                    cause = cause.__cause__  # (TLS: the transport's error, caused by the reset)
                return data, "reset" if cause is not None else repr(exc)
            if not chunk:
                return data, "eof"
            data += chunk


async def _until_closed(server: EchoServer) -> None:
    """Until every connection of ``server`` has closed (woken by each trace event)."""
    subscriber = server.tracer.subscribe(Flag.CONN)
    try:
        with trio.fail_after(10):
            while server.stats.active:
                await subscriber.get_batch()
    finally:
        server.tracer.remove_sink(subscriber)


async def _echo_of(stream: trio.abc.Stream, message: bytes) -> bytes:
    await stream.send_all(message)
    got = b""
    with trio.fail_after(10):
        while len(got) < len(message):
            got += await stream.receive_some(65536)
    return got


async def test_latency_delays_every_echo_and_keeps_pipelined_ones_overlapping() -> None:
    async with faulted({"latency": 0.2}) as (server, events):
        stream = await _connect(server)
        for index in range(3):
            start = trio.current_time()
            assert await _echo_of(stream, b"%03d" % index * 30) == b"%03d" % index * 30
            assert trio.current_time() - start >= 0.2
        # Ten messages 20 ms apart: each comes back ~0.2 s after it was sent, not after the one
        # before it was echoed (which would take 2 s).
        start = trio.current_time()
        received = b""
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                for index in range(10):
                    await stream.send_all(b"m%d;" % index)
                    await trio.sleep(0.02)

            nursery.start_soon(send)
            with trio.fail_after(10):
                while received.count(b";") < 10:
                    received += await stream.receive_some(65536)
        assert received == b"".join(b"m%d;" % index for index in range(10))
        assert 0.38 <= trio.current_time() - start < 1.5
        await stream.aclose()
    assert [event.fields["kind"] for event in events if event.event == "fault.applied"] == ["latency"]


async def test_latency_with_backpressure_still_echoes_every_byte() -> None:
    async with faulted({"latency": 0.01, "jitter": 0.005, "seed": 9}, limits={"buffer_size": 4096}) as (
        server,
        _,
    ):
        stream = await _connect(server)
        payload = random.Random(1).randbytes(300_000)
        received = bytearray()
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            nursery.start_soon(send)
            data, end = await _read_until_end(stream)
            received += data
        assert (bytes(received), end) == (payload, "eof")


async def test_delayed_echo_holds_at_most_buffer_size_read_ahead() -> None:
    async with faulted({"latency": 0.5}, limits={"buffer_size": 4096}) as (server, _):
        stream = await _connect(server)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, b"m" * 400_000)
            with trio.fail_after(10):
                first = await stream.receive_some(65536)
            # The first echo left 0.5 s after its chunk was read; meanwhile the client kept sending,
            # and the server read at most buffer_size ahead (one more chunk may have come in since).
            (info,) = server.stats.connections.values()
            assert 0 < len(first) <= 4096
            assert info.bytes_in <= 2 * 4096
            nursery.cancel_scope.cancel()


async def test_bandwidth_is_the_lower_of_the_fault_and_the_limit() -> None:
    async with faulted({"bandwidth": 10_000}) as (server, events):
        stream = await _connect(server)
        start = trio.current_time()
        assert await _echo_of(stream, b"b" * 20_000) == b"b" * 20_000  # 10 kB burst, then 10 kB/s
        assert trio.current_time() - start >= 0.9
    assert any(event.fields.get("kind") == "bandwidth" for event in events)
    async with faulted({"bandwidth": 1_000_000}, limits={"max_bytes_per_second": 10_000}) as (server, _):
        stream = await _connect(server)
        start = trio.current_time()
        assert await _echo_of(stream, b"c" * 20_000) == b"c" * 20_000
        assert trio.current_time() - start >= 0.9  # the limit's 10 kB/s holds


async def test_slices_arrive_in_pieces_of_at_most_n_bytes_spaced() -> None:
    async with faulted({"slice": 100, "slice_delay": 0.05}) as (server, _):
        stream = await _connect(server)
        await stream.send_all(b"s" * 1000)
        sizes = []
        start = trio.current_time()
        with trio.fail_after(10):
            while sum(sizes) < 1000:
                sizes.append(len(await stream.receive_some(65536)))
        assert max(sizes) <= 100
        assert sum(sizes) == 1000
        assert len(sizes) >= 10
        assert trio.current_time() - start >= 0.45


@pytest.mark.parametrize(("key", "end"), [("reset_after_bytes", "reset"), ("close_after_bytes", "eof")])
async def test_reset_and_close_after_exactly_n_echoed_bytes(key: str, end: str) -> None:
    async with faulted({key: 1234}) as (server, events):
        stream = await _connect(server)
        await stream.send_all(b"r" * 5000)
        assert await _read_until_end(stream) == (b"r" * 1234, end)
        await _until_closed(server)
        assert server.stats.closed == {Reason.FAULT: 1}
        assert server.stats.faults == {key: 1}
        assert f'trio_echo_faults_applied_total{{kind="{key}"}} 1' in render(server.metrics_snapshot())
        assert 'trio_echo_connections_closed_total{reason="fault"} 1' in render(server.metrics_snapshot())
    (applied,) = [event for event in events if event.event == "fault.applied"]
    assert applied.fields["kind"] == key
    assert applied.fields["conn_id"] == 1
    assert applied.fields["bytes"] == 1234


async def test_a_reset_waits_until_a_slow_reader_has_every_echoed_byte() -> None:
    # A reset discards what the server's kernel still holds: with a client that reads slowly the
    # echo is still queued when the threshold is reached, and only waiting for its acknowledgement
    # gets all of it to the client.
    async with faulted({"reset_after_bytes": 300_000}) as (server, _):
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port_of(server.addresses[0])))
        stream = trio.SocketStream(sock)
        _clients.setdefault(server, []).append(stream)

        sender_saw: list[BaseException | None] = []

        async def send() -> None:
            try:
                await stream.send_all(b"q" * 400_000)
            except trio.BrokenResourceError as exc:  # the reset ends our sending too
                sender_saw.append(exc.__cause__)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            data, end = b"", ""
            with trio.fail_after(20):
                while not end:
                    try:
                        chunk = await stream.receive_some(4096)
                    except trio.BrokenResourceError:
                        end = "reset"
                    else:
                        data += chunk
                        end = "" if chunk else "eof"
                        await trio.sleep(0.001)  # a slow reader, on purpose
            nursery.cancel_scope.cancel()
        # The kernel reports a reset once: to the reader, or to a send under way at that moment
        # (which then leaves the reader a bare EOF).
        reset_seen = end == "reset" or any(isinstance(cause, ConnectionResetError) for cause in sender_saw)
        assert (len(data), reset_seen) == (300_000, True)


async def test_reset_after_seconds() -> None:
    async with faulted({"reset_after": 0.3}) as (server, _):
        stream = await _connect(server)
        start = trio.current_time()
        assert await _echo_of(stream, b"ping") == b"ping"
        assert (await _read_until_end(stream))[1] == "reset"
        assert 0.3 <= trio.current_time() - start < 2.0


async def test_stall_holds_the_connection_silent_until_the_idle_timeout() -> None:
    async with faulted({"stall_after_bytes": 1000}, limits={"idle_timeout": 0.5}) as (server, _):
        stream = await _connect(server)
        start = trio.current_time()
        await stream.send_all(b"t" * 3000)
        assert await _read_until_end(stream) == (b"t" * 1000, "eof")
        assert trio.current_time() - start >= 0.5
        await _until_closed(server)
        assert server.stats.closed == {Reason.FAULT: 1}
        assert server.stats.bytes_in == 1000  # the rest was never read


async def test_blackhole_never_reads_nor_greets() -> None:
    async with faulted({"blackhole": True}, server={"greeting": "hi\n"}, limits={"idle_timeout": 0.4}) as (
        server,
        _,
    ):
        stream = await _connect(server)
        start = trio.current_time()
        await stream.send_all(b"anyone there?")
        assert await _read_until_end(stream) == (b"", "eof")
        assert trio.current_time() - start >= 0.4
        await _until_closed(server)
        assert server.stats.bytes_in == 0
        assert server.stats.faults == {"blackhole": 1}


async def test_slow_close_delays_the_farewell_and_fin() -> None:
    async with faulted({"slow_close": 0.4}, server={"farewell": "bye\n"}) as (server, _):
        stream = await _connect(server)
        assert await _echo_of(stream, b"abc") == b"abc"
        start = trio.current_time()
        await stream.send_eof()
        assert await _read_until_end(stream) == (b"bye\n", "eof")
        assert trio.current_time() - start >= 0.4
        await _until_closed(server)
        assert server.stats.closed == {Reason.EOF: 1}


async def test_corrupt_changes_one_byte_per_chunk() -> None:
    async with faulted({"corrupt": 1.0, "seed": 4}) as (server, events):
        stream = await _connect(server)
        for index in range(20):
            message = bytes([index]) * 200
            echo = await _echo_of(stream, message)
            assert sum(a != b for a, b in zip(echo, message, strict=True)) == 1
    assert sum(event.fields.get("kind") == "corrupt" for event in events) == 20


async def test_probability_spares_a_share_of_connections() -> None:
    async with faulted({"latency": 0.001, "probability": 0.5, "seed": 2}) as (server, _):
        for _ in range(40):
            stream = await _connect(server)
            assert await _echo_of(stream, b"x") == b"x"
            await stream.aclose()
        assert 10 <= server.stats.faults["latency"] <= 30


def _bench(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_echo", "bench", address, "--connections", "2", "--count", "50", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_bench_reports_a_corrupting_server_and_exits_non_zero() -> None:
    async with faulted({"corrupt": 0.5, "seed": 1}) as (server, _):
        done = await trio.to_thread.run_sync(_bench, server.addresses[0], "--json")
    assert done.returncode == 1, done.stderr
    assert '"mismatch"' in done.stdout
    assert '"verified": false' in done.stdout


# -- TLS: faults act on the plaintext echo ----------------------------------------------------------------


async def _tls_client(port: int, payload: bytes) -> tuple[bytes, str]:
    # trio's TLS client reads the socket itself, so a reset reaches it as ECONNRESET (Python's ssl
    # module reports a reset and a bare FIN alike, as an EOF "in violation of protocol").
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    async with stream:
        await stream.send_all(payload)
        return await _read_until_end(stream)


async def test_faults_over_tls_act_on_the_plaintext(tmp_path: Path) -> None:
    pem = server_pem(trustme.CA(), tmp_path / "server.pem")
    tls = {"cert_file": pem, "key_file": pem}
    async with faulted({"reset_after_bytes": 1000, "slice": 300}, transport="tls://", tls=tls) as (
        server,
        _,
    ):
        port = port_of(server.addresses[0])
        assert await _tls_client(port, b"z" * 4000) == (b"z" * 1000, "reset")
        await _until_closed(server)
        assert server.stats.faults == {"slice": 1, "reset_after_bytes": 1}


# -- UDP -----------------------------------------------------------------------------------------------------


def _udp_run(port: int, count: int) -> list[int]:
    """Send ``count`` numbered datagrams in paced batches; every echo, in arrival order."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.3)
        got: list[int] = []
        for start in range(0, count, 50):
            for index in range(start, min(start + 50, count)):
                sock.sendto(b"%d" % index, ("127.0.0.1", port))
            try:
                while True:
                    got.append(int(sock.recv(100)))
                    if got[-1] == min(start + 50, count) - 1 and len(got) >= start:
                        break
            except TimeoutError:
                pass
        try:
            while True:
                got.append(int(sock.recv(100)))
        except TimeoutError:
            return got


async def test_udp_loss_duplicate_and_reorder_at_a_fixed_seed() -> None:
    profile = {"loss": 0.1, "duplicate": 0.1, "reorder": 0.1, "seed": 7}
    limits = {"max_datagrams_per_second_per_ip": 0, "max_datagram_bytes_per_second_per_ip": 0}
    async with faulted(profile, transport="udp://", limits=limits) as (server, events):
        got = await trio.to_thread.run_sync(_udp_run, port_of(server.addresses[0]), 2000)
        faults = server.stats.faults
        counts = server.stats.datagrams[server.listener_names[0]]
    assert counts.received == 2000  # nothing lost on loopback before the profile
    lost = 2000 - len(set(got))
    assert lost == faults["loss"]
    assert 0.07 < lost / 2000 < 0.13
    assert len(got) - len(set(got)) == faults["duplicate"]
    assert 0.06 < faults["duplicate"] / 2000 < 0.13
    assert 0.06 < faults["reorder"] / 2000 < 0.13
    assert _late(got) >= faults["reorder"] * 0.9  # (a duplicate of a held one can arrive late too)
    assert server.stats.dropped["fault"] == faults["loss"]
    applied = [event.fields for event in events if event.event == "fault.applied"]
    assert {fields["kind"] for fields in applied} == {"loss", "duplicate", "reorder"}
    assert all(set(fields) == {"kind", "listener", "peer"} for fields in applied)


def _udp_round_trip(port: int) -> float:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        start = time.monotonic()
        sock.sendto(b"ping", ("127.0.0.1", port))
        assert sock.recv(100) == b"ping"
        return time.monotonic() - start


async def test_udp_latency() -> None:
    async with faulted({"latency": 0.2}, transport="udp://") as (server, _):
        assert await trio.to_thread.run_sync(_udp_round_trip, port_of(server.addresses[0])) >= 0.2


# -- live, from the admin channel -----------------------------------------------------------------------


async def test_set_faults_on_a_listener_applies_to_new_connections_only() -> None:
    profiles = {"slow": {"latency": 0.3}, "cut": {"close_after_bytes": 4}}
    async with admin_server(faults=profiles) as server, channel(server) as ws, clients_of(server):
        listener = server.listener_names[0]
        before = await _connect(server)
        assert await _echo_of(before, b"x") == b"x"
        reply = await request(
            ws, {"type": "set_faults", "listener": server.addresses[0], "faults": "slow"}, "set_faults"
        )
        assert reply == {
            "type": "set_faults",
            "ok": True,
            "listener": server.addresses[0],
            "faults": {"name": "slow", "latency": 0.3},
        }
        stats = await next_of(ws, "stats", lambda m: m["faults"][listener] is not None)
        assert stats["faults"] == {listener: {"name": "slow", "latency": 0.3}}
        assert stats["fault_profiles"] == {"slow": {"latency": 0.3}, "cut": {"close_after_bytes": 4}}
        start = trio.current_time()
        assert await _echo_of(before, b"y") == b"y"  # opened before: untouched
        assert trio.current_time() - start < 0.3
        after = await _connect(server)
        start = trio.current_time()
        assert await _echo_of(after, b"z") == b"z"
        assert trio.current_time() - start >= 0.3
        # inline keys, then none again
        inline = {"type": "set_faults", "listener": listener, "faults": {"close_after_bytes": 2}}
        assert (await request(ws, inline, "set_faults"))["faults"] == {"name": "", "close_after_bytes": 2}
        cut = await _connect(server)
        await cut.send_all(b"abcdef")
        assert await _read_until_end(cut) == (b"ab", "eof")
        off = {"type": "set_faults", "listener": listener, "faults": None}
        assert (await request(ws, off, "set_faults"))["faults"] is None
        plain = await _connect(server)
        assert await _echo_of(plain, b"abcdef") == b"abcdef"


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"listener": "127.0.0.1:1", "faults": "slow"}, "set_faults: no listener '127.0.0.1:1' (listeners: "),
        ({"listener": "LISTENER", "faults": "fast"}, "set_faults: no [faults.fast] profile (slow)"),
        ({"id": 999, "faults": "slow"}, "set_faults: no open connection with id 999"),
        ({"id": 1, "faults": {"latency": -1}}, "set_faults: faults.latency = -1.0: must be >= 0"),
        ({"id": 1, "faults": {"reorder": 1.5}}, "set_faults: faults.reorder = 1.5: must be a probability"),
        (
            {"id": 1, "faults": {"latncy": 1}},
            "set_faults: faults.latncy = 1: unknown key; did you mean latency?",
        ),
    ],
)
async def test_bad_set_faults_is_an_error_and_changes_nothing(message: dict[str, object], error: str) -> None:
    async with (
        admin_server(faults={"slow": {"latency": 0.3}}) as server,
        channel(server) as ws,
        clients_of(server),
    ):
        if message.get("listener") == "LISTENER":
            message = {**message, "listener": server.listener_names[0]}
        reply = await request(ws, {"type": "set_faults", **message}, "error")
        assert str(reply["message"]).startswith(error)
        assert server.intake.fault_plans == {}
        stream = await _connect(server)
        start = trio.current_time()
        assert await _echo_of(stream, b"still plain") == b"still plain"
        assert trio.current_time() - start < 0.3


async def test_set_faults_by_id_on_open_connections_of_each_pump(tmp_path: Path) -> None:
    pem = server_pem(trustme.CA(), tmp_path / "server.pem")
    async with (
        admin_server(
            server={"listen": ["127.0.0.1:0", "tls://127.0.0.1:0"]}, tls={"cert_file": pem, "key_file": pem}
        ) as server,
        channel(server) as ws,
        clients_of(server),
    ):
        plain_port, tls_port = (port_of(address) for address in server.addresses)
        plain = await trio.open_tcp_stream("127.0.0.1", plain_port)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        tls = await trio.open_ssl_over_tcp_stream("127.0.0.1", tls_port, ssl_context=context)
        _clients.setdefault(server, []).extend([plain, tls])
        for stream in (plain, tls):
            assert await _echo_of(stream, b"before") == b"before"  # both pumps running, unfaulted
        (first, second) = sorted(server.stats.connections)
        for conn_id in (first, second):
            reply = await request(
                ws, {"type": "set_faults", "id": conn_id, "faults": {"reset_after_bytes": 5}}, "set_faults"
            )
            assert reply["id"] == conn_id
            assert reply["faults"] == {"name": "", "reset_after_bytes": 5}
        for stream in (plain, tls):
            await stream.send_all(b"0123456789")
            assert await _read_until_end(stream) == (b"01234", "reset")
        for stream in _clients.pop(server):
            await trio.aclose_forcefully(stream)
        await _until_closed(server)
        assert server.stats.closed == {Reason.FAULT: 2}
        # a connection already faulted takes the new profile from its next chunk
        async with faulted_listener(server, ws, {"latency": 0.3}):
            stream = await _connect(server)
            assert await _echo_of(stream, b"slow") == b"slow"
            (conn_id,) = server.stats.connections
            listed = await request(ws, {"type": "connections"}, "connections")
            assert listed["items"][0]["faults"] == {"latency": 0.3}  # type: ignore[index]
            await request(
                ws, {"type": "set_faults", "id": conn_id, "faults": {"close_after_bytes": 3}}, "set_faults"
            )
            start = trio.current_time()
            await stream.send_all(b"abcdef")
            assert await _read_until_end(stream) == (b"abc", "eof")
            assert trio.current_time() - start < 0.3  # the latency is gone with the old profile


@asynccontextmanager
async def faulted_listener(server: EchoServer, ws: object, profile: dict[str, object]) -> AsyncIterator[None]:
    message = {"type": "set_faults", "listener": server.listener_names[0], "faults": profile}
    await request(ws, message, "set_faults")  # type: ignore[arg-type]
    yield


async def test_a_reload_applies_the_files_profiles_again() -> None:
    async with faulted({"latency": 0.3}) as (server, _):
        listener = server.listener_names[0]
        server.set_faults(None, listener=listener)
        assert server.faults_in_force()["faults"] == {listener: None}
        assert await server.reconfigure(server.config) == []
        assert server.faults_in_force()["faults"] == {listener: {"name": "p", "latency": 0.3}}
