"""Limits over real loopback sockets: caps, per-source rules, rates, hostile clients."""

from __future__ import annotations

import shutil
import socket
import struct

import pytest
import trio
import trio.testing

from tests.conftest import make_config, port_of, running_server
from trio_echo.server import EchoServer


async def open_from(server: EchoServer, source: str = "127.0.0.1") -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port_of(server.addresses[0]), local_address=source)


async def served(stream: trio.SocketStream) -> bool:
    """True if the stream echoes; False if it was refused (EOF, maybe after the refusal text)."""
    await stream.send_all(b"ping")
    data = b""
    while len(data) < 4:
        chunk = await stream.receive_some(100)
        if not chunk:
            return False
        data += chunk
    return data == b"ping"


def limits_config(**limits: object) -> object:
    return make_config(server={"listen": ["127.0.0.1:0"]}, limits=limits)


async def test_max_connections_exactly_then_served_again_below_the_limit() -> None:
    async with running_server(limits_config(max_connections=3, refusal="full\n")) as server:  # type: ignore[arg-type]
        with trio.fail_after(10):
            clients = [await open_from(server) for _ in range(3)]
            assert [await served(c) for c in clients] == [True] * 3
            extras = [await open_from(server) for _ in range(2)]
            for extra in extras:
                with trio.fail_after(1):  # closed promptly (the contract is 100 ms; bound generously)
                    assert await extra.receive_some(100) == b"full\n"
                    assert await extra.receive_some(100) == b""
                await extra.aclose()
            assert server.stats.refused == {"max_connections": 2}
            await clients[0].send_eof()
            assert await clients[0].receive_some(10) == b""
            await clients[0].aclose()
            while server.stats.active == 3:  # noqa: ASYNC110 - the close reaches the server when it does
                await trio.sleep(0.01)
            newcomer = await open_from(server)
            assert await served(newcomer)
            for stream in [*clients[1:], newcomer]:
                await stream.aclose()


async def test_per_ip_counts_each_source_separately() -> None:
    async with running_server(limits_config(max_connections_per_ip=2)) as server:  # type: ignore[arg-type]
        with trio.fail_after(10):
            a = [await open_from(server, "127.0.0.1") for _ in range(3)]
            b = await open_from(server, "127.0.0.2")
            assert [await served(s) for s in a] == [True, True, False]
            assert await served(b)
            assert server.stats.refused == {"per_ip": 1}
            assert server.admission.per_source == {"127.0.0.1": 2, "127.0.0.2": 1}
            for stream in [*a, b]:
                await stream.aclose()


async def test_deny_wins_over_allow() -> None:
    config = limits_config(allow=["127.0.0.0/8"], deny=["127.0.0.2/32"])
    async with running_server(config) as server:  # type: ignore[arg-type]
        with trio.fail_after(10):
            ok = await open_from(server, "127.0.0.1")
            denied = await open_from(server, "127.0.0.2")
            assert await served(ok)
            assert not await served(denied)
            assert server.stats.refused == {"denied": 1}
            await ok.aclose()
            await denied.aclose()


async def test_connect_rate_per_source() -> None:
    # one token per 10 s, burst 1: a second connect from the same source at once is refused
    async with running_server(limits_config(max_connect_rate_per_ip=0.1)) as server:  # type: ignore[arg-type]
        with trio.fail_after(10):
            first = await open_from(server, "127.0.0.3")
            second = await open_from(server, "127.0.0.3")
            other = await open_from(server, "127.0.0.4")
            assert [await served(s) for s in (first, second, other)] == [True, False, True]
            assert server.stats.refused == {"connect_rate": 1}
            for stream in (first, second, other):
                await stream.aclose()


async def test_bandwidth_cap_on_a_real_socket() -> None:
    rate = 200_000
    payload = bytes(600_000)
    async with running_server(limits_config(max_bytes_per_second=rate)) as server:  # type: ignore[arg-type]
        stream = await open_from(server)
        start = trio.current_time()
        received = 0
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, payload)
                while received < len(payload):
                    received += len(await stream.receive_some(65536))
        # a burst of up to 2 s worth, then the cap: the rest cannot come back sooner than this
        assert trio.current_time() - start >= (len(payload) - 2 * rate) / rate * 0.95
        await stream.aclose()


async def test_reset_mid_transfer_affects_only_that_connection() -> None:
    async with running_server(limits_config()) as server:  # type: ignore[arg-type]
        with trio.fail_after(10):
            bystander = await open_from(server)
            assert await served(bystander)
            rude = socket.socket()
            rude.connect(("127.0.0.1", port_of(server.addresses[0])))
            rude.sendall(b"x" * 500_000)
            # SO_LINGER with a zero timeout: close() sends RST instead of FIN
            rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            rude.close()
            while not server.stats.closed:  # noqa: ASYNC110 - the RST arrives when the kernel says
                await trio.sleep(0.01)
            assert server.stats.closed == {"reset": 1}
            assert await served(bystander)
            await bystander.aclose()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read socket timers")
@pytest.mark.parametrize("keepalive", [True, False])
async def test_keepalive_on_accepted_sockets(keepalive: bool) -> None:
    async with running_server(limits_config(keepalive=keepalive)) as server:  # type: ignore[arg-type]
        with trio.fail_after(10):
            client = await open_from(server)
            assert await served(client)
            port = port_of(server.addresses[0])
            # ss -o shows the kernel's timers; the server end of a keepalive socket has "keepalive"
            result = await trio.run_process(
                ["ss", "-tnoH", "state", "established", f"( sport = :{port} )"], capture_stdout=True
            )
            lines = result.stdout.decode().strip().splitlines()
            assert len(lines) == 1, lines
            assert ("timer:(keepalive" in lines[0]) is keepalive, lines[0]
            await client.aclose()


@pytest.mark.parametrize("idle_timeout", [0.3])
async def test_idle_timeout_on_a_real_socket(idle_timeout: float) -> None:
    async with running_server(limits_config(idle_timeout=idle_timeout, linger_timeout=0.2)) as server:  # type: ignore[arg-type]
        with trio.fail_after(10):
            client = await open_from(server)
            assert await served(client)
            assert await client.receive_some(10) == b""  # FIN after the idle timeout, not RST
            await client.aclose()
            while not server.stats.closed:  # noqa: ASYNC110
                await trio.sleep(0.01)
            assert server.stats.closed == {"idle": 1}
