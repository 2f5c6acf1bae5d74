"""UDP echo over loopback: exact echo on v4 and v6, per-source budgets (never more out than in),
loop ports and deny lists dropped, counts, metrics, trace events; the bench's and client's UDP modes."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import trio

from tests.conftest import HAS_IPV6, make_config, needs_ipv6, port_of, running_server
from tests.test_bench import bench
from trio_echo.admin.metrics import render
from trio_echo.config import Config
from trio_echo.events import Event, Flag
from trio_echo.ratelimit import MAX_SOURCES, SourceBudget
from trio_echo.server import EchoServer
from trio_echo.trace import Tracer

# -- the per-source budget (pure) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "volume", "sends", "expected"),
    [
        # (now, size) per datagram -> verdicts
        (2.0, 0, [(0.0, 10), (0.0, 10), (0.0, 10), (0.5, 10), (0.5, 10)], [None, None, "rate", None, "rate"]),
        (
            0.0,
            100,
            [(0.0, 60), (0.0, 60), (0.0, 40), (0.6, 60), (0.6, 1)],
            [None, "bandwidth", None, None, "bandwidth"],
        ),
        (0.0, 0, [(0.0, 65507)] * 3, [None, None, None]),  # both off
        # a datagram refused for bandwidth does not spend a datagram token
        (1.0, 10, [(0.0, 50), (0.0, 5)], ["bandwidth", None]),
    ],
)
def test_source_budget(
    rate: float, volume: int, sends: list[tuple[float, int]], expected: list[str | None]
) -> None:
    budget = SourceBudget(rate, volume)
    assert [budget.allow("192.0.2.1", size, now) for now, size in sends] == expected


def test_source_budget_table_full_of_active_sources_refuses_new_ones() -> None:
    budget = SourceBudget(1.0, 0)
    for index in range(MAX_SOURCES):
        assert budget.allow(f"busy-{index}", 1, 0.0) is None  # each bucket now empty: active
    assert budget.allow("newcomer", 1, 0.5) == "rate"  # no room, nothing idle
    assert budget.allow("another", 1, 0.6) == "rate"  # (and no second scan within the second)
    assert len(budget) == MAX_SOURCES
    assert budget.allow("newcomer", 1, 1.5) is None  # a second later the old ones are full: pruned
    assert len(budget) == 1


def test_source_budget_is_per_source_and_bounded() -> None:
    budget = SourceBudget(1.0, 0)
    assert budget.allow("a", 1, 0.0) is None
    assert budget.allow("a", 1, 0.0) == "rate"
    assert budget.allow("b", 1, 0.0) is None  # another source has its own budget
    for index in range(MAX_SOURCES * 3):  # a forged-source flood, one datagram each, seconds apart
        budget.allow(f"forged-{index}", 1, 10.0 + index)
    assert len(budget) <= MAX_SOURCES + 1


# -- the server over loopback --------------------------------------------------------------------------


def udp_config(**limits: object) -> Config:
    listen = ["udp://127.0.0.1:0"] + (["udp://[::1]:0"] if HAS_IPV6 else [])
    return make_config(server={"listen": listen}, limits=limits)


async def wait_processed(server: EchoServer, total: int) -> None:
    """Until the server has looked at ``total`` datagrams (echoed or dropped)."""
    with trio.fail_after(10):
        while sum(c.received for c in server.stats.datagrams.values()) < total:  # noqa: ASYNC110
            await trio.sleep(0.005)


def receive_all_now(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``sock`` (loopback delivers a reply before sendto returns)."""
    sock.setblocking(False)
    got = []
    while True:
        try:
            got.append(sock.recv(70000))
        except BlockingIOError:
            return got


def client(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock


@pytest.mark.parametrize("family", [socket.AF_INET, pytest.param(socket.AF_INET6, marks=needs_ipv6)])
async def test_every_datagram_comes_back_unchanged(family: int) -> None:
    tracer = Tracer(Flag.ERROR | Flag.INFO | Flag.DATA)
    events: list[Event] = []
    tracer.add_sink(events.append)
    async with running_server(udp_config(), tracer=tracer) as server:
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
        address = next(a for a in server.addresses if (host in a))
        assert address.startswith("udp://")
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        await sock.connect((host, port_of(address)))
        with sock, trio.fail_after(10):
            for size in (0, 1, 1400, 9000, 65507 if family == socket.AF_INET else 65487):
                payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
                await sock.send(payload)
                assert await sock.recv(70000) == payload
    label = server.listener_names[0 if family == socket.AF_INET else 1]
    counts = server.stats.datagrams[label]
    assert counts.received == counts.echoed == 5
    assert counts.bytes_in == counts.bytes_out
    echo = [e for e in events if e.event == "udp.echo"]
    assert len(echo) == 5
    assert echo[0].fields["listener"] == label


async def test_per_source_rate_never_more_out_than_in() -> None:
    tracer = Tracer(Flag.ERROR | Flag.INFO | Flag.CONN)
    events: list[Event] = []
    tracer.add_sink(events.append)
    async with running_server(udp_config(max_datagrams_per_second_per_ip=1), tracer=tracer) as server:
        port = port_of(server.addresses[0])
        with client() as flooder, client(host="127.0.0.2") as other:
            for _ in range(10):  # sent within far less than a second: one token, then nothing
                flooder.sendto(b"x" * 100, ("127.0.0.1", port))
            other.sendto(b"mine", ("127.0.0.1", port))
            await wait_processed(server, 11)
            assert receive_all_now(flooder) == [b"x" * 100]
            assert receive_all_now(other) == [b"mine"]  # its own budget
        counts = server.stats.datagrams[server.listener_names[0]]
        assert counts.bytes_out <= counts.bytes_in
        assert server.stats.dropped == {"rate": 9}
        metrics = render(server.metrics_snapshot())
        assert 'trio_echo_datagrams_dropped_total{reason="rate"} 9' in metrics
        assert f'trio_echo_datagrams_received_total{{listener="{server.listener_names[0]}"}} 11' in metrics
    dropped = [e for e in events if e.event == "udp.dropped"]
    assert len(dropped) == 9
    assert dropped[0].fields["reason"] == "rate"
    assert str(dropped[0].fields["peer"]).startswith("127.0.0.1:")


async def test_per_source_bandwidth() -> None:
    async with running_server(
        udp_config(max_datagrams_per_second_per_ip=0, max_datagram_bytes_per_second_per_ip=1000)
    ) as server:
        port = port_of(server.addresses[0])
        with client() as sock:
            for _ in range(3):
                sock.sendto(b"y" * 600, ("127.0.0.1", port))
            await wait_processed(server, 3)
            assert receive_all_now(sock) == [b"y" * 600]
        assert server.stats.dropped == {"bandwidth": 2}


async def test_denied_sources_and_loop_ports_get_nothing() -> None:
    async with running_server(udp_config(deny=["127.0.0.2/32"])) as server:
        port = port_of(server.addresses[0])
        # Binding port 19 (chargen's) needs privileges; the test command runs as root, as CI does.
        with client(host="127.0.0.2") as denied, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as chargen:
            chargen.bind(("127.0.0.3", 19))
            denied.sendto(b"let me in", ("127.0.0.1", port))
            chargen.sendto(b"!\"#$%&'()*+,-./0123456789", ("127.0.0.1", port))
            await wait_processed(server, 2)
            assert receive_all_now(denied) == []
            assert receive_all_now(chargen) == []
        assert server.stats.dropped == {"denied": 1, "loop_port": 1}
        assert server.stats.datagrams[server.listener_names[0]].bytes_out == 0


async def test_a_burst_is_echoed_whole_while_tcp_is_served() -> None:
    """200 datagrams at once: the loop checkpoints every few dozen, so a TCP client is served meanwhile."""
    config = make_config(
        server={"listen": ["udp://127.0.0.1:0", "127.0.0.1:0"]},
        limits={"max_datagrams_per_second_per_ip": 0, "max_datagram_bytes_per_second_per_ip": 0},
    )
    async with running_server(config) as server:
        udp, tcp = server.addresses
        with client() as sock, trio.fail_after(10):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            stream = await trio.open_tcp_stream("127.0.0.1", port_of(tcp))
            for index in range(200):
                sock.sendto(index.to_bytes(4, "big") * 25, ("127.0.0.1", port_of(udp)))
            async with stream:
                await stream.send_all(b"still here")
                assert await stream.receive_some(100) == b"still here"
            await wait_processed(server, 200)
            replies = receive_all_now(sock)
        assert sorted(replies) == [index.to_bytes(4, "big") * 25 for index in range(200)]


async def test_udp_and_tcp_side_by_side_and_described() -> None:
    config = make_config(server={"listen": ["udp://127.0.0.1:0", "127.0.0.1:0"]})
    async with running_server(config) as server:
        assert [d["transport"] for d in server.listener_descriptions()] == ["udp", "tcp"]
        udp, tcp = server.addresses
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", port_of(tcp))
            async with stream:
                await stream.send_all(b"tcp")
                assert await stream.receive_some(10) == b"tcp"
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with sock:
                await sock.connect(("127.0.0.1", port_of(udp)))
                await sock.send(b"udp")
                assert await sock.recv(10) == b"udp"
        # UDP bytes count in the byte totals like TCP's
        assert server.stats.bytes_in == server.stats.bytes_out == 6


# -- bench and client ----------------------------------------------------------------------------------


async def test_bench_udp_pingpong_verifies_and_counts_loss() -> None:
    async with running_server(udp_config()) as server:
        code, result = await bench(
            server.addresses[0], "--count", "300", "--connections", "3", "--size", "512"
        )
        assert code == 0, result
        assert result["verified"] is True
        assert result["mode"] == "udp-pingpong"
        assert result["roundtrips"] + result["lost"] == 300  # type: ignore[operator]
    # A budget of 20 datagrams/s: most are dropped on purpose and show up as loss, not errors.
    async with running_server(udp_config(max_datagrams_per_second_per_ip=20)) as server:
        code, result = await bench(
            server.addresses[0], "--count", "60", "--connections", "2", "--udp-timeout", "0.05"
        )
        assert code == 0, result
        assert result["errors"] == 0
        lost = result["lost"]
        assert isinstance(lost, int)
        assert lost > 0
        assert result["roundtrips"] + lost == 60  # type: ignore[operator]


async def test_bench_udp_catches_a_corrupting_server() -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))

    async def corrupt() -> None:
        while True:
            data, peer = await sock.recvfrom(70000)
            await sock.sendto(data[:-1] + bytes([data[-1] ^ 1]), peer)

    with sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(corrupt)
            code, result = await bench(
                f"udp://127.0.0.1:{sock.getsockname()[1]}", "--count", "10", "--connections", "2"
            )
            nursery.cancel_scope.cancel()
    assert code != 0
    assert result["verified"] is False
    assert result["error_kinds"]["mismatch"] == 2  # type: ignore[index]


async def test_bench_udp_nobody_listening() -> None:
    probe = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    code, result = await bench("--udp", f"127.0.0.1:{port}", "--count", "5", "--connections", "1")
    assert code != 0
    assert result["error_kinds"]["connect"] == 1  # type: ignore[index]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("udp://127.0.0.1:1", "--mode", "stream"), b"UDP has no stream"),
        (("udp://127.0.0.1:1", "--size", "4"), b"--size must be 8..65507 for UDP"),
        (("127.0.0.1:1", "--udp", "--tls"), b"TLS needs a stream"),
    ],
)
def test_bench_udp_bad_arguments(args: tuple[str, ...], message: bytes) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trio_echo", "bench", *args], capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert message in done.stderr


async def test_client_sends_each_line_as_a_datagram() -> None:
    async with running_server(udp_config()) as server:
        with trio.fail_after(30):
            done = await trio.run_process(
                [sys.executable, "-m", "trio_echo", "client", server.addresses[0]],
                stdin=b"one\ntwo\n",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"one\ntwo\n"
    assert server.stats.datagrams[server.listener_names[0]].received == 2
