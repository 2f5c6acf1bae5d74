"""The server over real loopback sockets (port 0), where the kernel's behaviour matters."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import trio
import trio.testing

from tests.conftest import make_config, needs_ipv6, port_of, running_server
from trio_echo.errors import SupervisorGaveUp
from trio_echo.events import Flag
from trio_echo.server import EchoServer

FAST_RESTARTS = {"backoff_initial": 0.02, "backoff_max": 0.1, "max_restarts": 1000}


async def connect(address: str) -> trio.SocketStream:
    if address.startswith("unix:"):
        return await trio.open_unix_socket(address[5:])
    host, _, port = address.rpartition(":")
    return await trio.open_tcp_stream(host.strip("[]"), int(port))


async def echo_round_trip(stream: trio.abc.Stream, payload: bytes) -> bytes:
    """Send ``payload`` while reading concurrently; half-close; return everything received."""
    received = bytearray()

    async def sender() -> None:
        view = memoryview(payload)
        for start in range(0, len(view), 100_000):
            await stream.send_all(view[start : start + 100_000])
        assert isinstance(stream, trio.abc.HalfCloseableStream)
        await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        while chunk := await stream.receive_some(65536):
            received += chunk
    return bytes(received)


@pytest.mark.parametrize("listen", ["127.0.0.1:0", pytest.param("[::1]:0", marks=needs_ipv6), "localhost:0"])
async def test_one_mebibyte_echoed_byte_identical(listen: str) -> None:
    payload = os.urandom(1 << 20)
    async with running_server(make_config(server={"listen": [listen]})) as server:
        for address in server.addresses:
            with trio.fail_after(30):
                stream = await connect(address)
                async with stream:
                    assert await echo_round_trip(stream, payload) == payload


@needs_ipv6
async def test_port_zero_gives_both_families_the_same_port() -> None:
    async with running_server(make_config(server={"listen": [":0"]})) as server:
        v4, v6 = server.addresses
        assert v4.startswith("0.0.0.0:")
        assert v6.startswith("[::]:")
        assert port_of(v4) == port_of(v6)
        for host in ("127.0.0.1", "[::1]"):
            with trio.fail_after(10):
                stream = await connect(f"{host}:{port_of(v4)}")
                async with stream:
                    assert await echo_round_trip(stream, b"both families") == b"both families"


async def test_unix_socket_stale_file_replaced_and_removed_on_stop() -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "echo.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)  # bound, never listening, then closed: a stale file like a crash leaves
        stale.close()
        async with running_server(make_config(server={"listen": [f"unix:{path}"]})) as server:
            assert server.addresses == [f"unix:{path}"]
            with trio.fail_after(10):
                stream = await connect(server.addresses[0])
                async with stream:
                    assert await echo_round_trip(stream, b"over unix") == b"over unix"
            # A second server must not steal a live socket.
            other = EchoServer(
                make_config(server={"listen": [f"unix:{path}"]}, supervisor={"max_restarts": 0})
            )
            with pytest.raises(SupervisorGaveUp, match="another process is listening there"):
                await other.run()
            assert os.path.exists(path)  # noqa: ASYNC240
        assert not os.path.exists(path)  # noqa: ASYNC240


async def test_unix_path_that_is_not_a_socket_is_left_alone() -> None:
    with tempfile.NamedTemporaryFile() as regular:
        server = EchoServer(
            make_config(server={"listen": [f"unix:{regular.name}"]}, supervisor={"max_restarts": 0})
        )
        with pytest.raises(SupervisorGaveUp, match="exists and is not a socket"):
            await server.run()
        assert os.path.isfile(regular.name)  # noqa: ASYNC240


async def test_half_close_gets_farewell_then_eof() -> None:
    config = make_config(server={"listen": ["127.0.0.1:0"], "greeting": "hi\n", "farewell": "bye\n"})
    async with running_server(config) as server:
        with trio.fail_after(10):
            stream = await connect(server.addresses[0])
            async with stream:
                assert await echo_round_trip(stream, b"ping\n") == b"hi\nping\nbye\n"


async def test_client_that_reads_only_after_half_close_gets_everything() -> None:
    """200 KB sent, nothing read until after our half-close: every byte and the farewell arrive."""
    payload = os.urandom(200_000)
    config = make_config(server={"listen": ["127.0.0.1:0"], "farewell": "bye\n"})
    async with running_server(config) as server:
        with trio.fail_after(20):
            stream = await connect(server.addresses[0])
            async with stream:
                await stream.send_all(payload)
                await stream.send_eof()
                received = bytearray()
                while chunk := await stream.receive_some(65536):
                    received += chunk
        assert bytes(received) == payload + b"bye\n"


async def test_taken_port_is_retried_until_it_frees() -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    config = make_config(server={"listen": [f"127.0.0.1:{port}", "127.0.0.1:0"]}, supervisor=FAST_RESTARTS)
    async with running_server(config) as server:
        assert len(server.addresses) == 1  # the free one serves meanwhile
        with trio.fail_after(10):
            stream = await connect(server.addresses[0])
            async with stream:
                assert await echo_round_trip(stream, b"meanwhile") == b"meanwhile"
        assert server.supervisor.restarts[f"127.0.0.1:{port}"] >= 1
        blocker.close()
        with trio.fail_after(10):
            while f"127.0.0.1:{port}" not in server.addresses:  # noqa: ASYNC110 - a real-time retry
                await trio.sleep(0.02)
            stream = await connect(f"127.0.0.1:{port}")
            async with stream:
                assert await echo_round_trip(stream, b"now") == b"now"


async def test_drain_refuses_new_connects_and_lets_open_ones_finish() -> None:
    config = make_config(server={"listen": ["127.0.0.1:0"]}, limits={"drain_timeout": 30})
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server: EchoServer = await nursery.start(EchoServer(config).run)
            address = server.addresses[0]
            stream = await connect(address)
            await stream.send_all(b"before")
            assert await stream.receive_some(100) == b"before"
            server.stop()
            with trio.fail_after(1):  # listeners close promptly; a generous bound on a busy machine
                await trio.testing.wait_all_tasks_blocked()
            assert server.addresses == []
            with pytest.raises(OSError, match=r"Connection refused|all attempts to connect"):
                await connect(address)
            await stream.send_all(b"during drain")  # the open connection is still served
            assert await stream.receive_some(100) == b"during drain"
            assert server.draining
            await stream.send_eof()
            assert await stream.receive_some(100) == b""
            await stream.aclose()
    assert server.stats.closed == {"eof": 1}


async def test_drain_deadline_closes_with_fin_not_rst() -> None:
    config = make_config(
        server={"listen": ["127.0.0.1:0"]}, limits={"drain_timeout": 0.2, "linger_timeout": 5}
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server: EchoServer = await nursery.start(EchoServer(config).run)
            stream = await connect(server.addresses[0])
            await stream.send_all(b"x" * 1000)
            server.stop()
            # The deadline passes; we get our echo and then a clean EOF (an RST would raise here).
            received = bytearray()
            while chunk := await stream.receive_some(65536):
                received += chunk
            assert bytes(received) == b"x" * 1000
            await stream.send_all(b"input after their FIN is discarded, not reset")
            await stream.aclose()
    assert server.stats.closed == {"drain": 1}


async def test_max_connections_refuses_with_text() -> None:
    config = make_config(
        server={"listen": ["127.0.0.1:0"]}, limits={"max_connections": 1, "refusal": "busy\n"}
    )
    async with running_server(config) as server:
        with trio.fail_after(10):
            first = await connect(server.addresses[0])
            await first.send_all(b"a")
            assert await first.receive_some(10) == b"a"
            second = await connect(server.addresses[0])
            await second.send_all(b"please echo")
            assert await second.receive_some(100) == b"busy\n"
            assert await second.receive_some(100) == b""
            await second.aclose()
            assert server.stats.refused == {"max_connections": 1}
            info = next(iter(server.stats.connections.values()))
            assert info.peer.startswith("127.0.0.1:")
            assert info.bytes_in == 1
            await first.aclose()


async def test_close_connection_by_id() -> None:
    async with running_server(make_config(server={"listen": ["127.0.0.1:0"]})) as server:
        with trio.fail_after(10):
            stream = await connect(server.addresses[0])
            await stream.send_all(b"a")
            assert await stream.receive_some(10) == b"a"
            (conn_id,) = server.stats.connections
            assert server.close_connection(conn_id, "admin")
            assert not server.close_connection(999)
            assert await stream.receive_some(10) == b""
            await stream.aclose()
            while server.stats.connections:  # noqa: ASYNC110 - the kernel delivers our EOF when it will
                await trio.sleep(0.01)
        assert server.stats.closed == {"admin": 1}


async def test_abort_stops_at_once() -> None:
    config = make_config(
        server={"listen": ["127.0.0.1:0"]}, limits={"drain_timeout": 60, "linger_timeout": 60}
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server: EchoServer = await nursery.start(EchoServer(config).run)
            stream = await connect(server.addresses[0])
            await stream.send_all(b"a")
            assert await stream.receive_some(10) == b"a"
            server.stop()
            server.abort()
        await stream.aclose()


async def test_drain_deadline_exactly_over_memory_streams(autojump_clock: trio.testing.MockClock) -> None:
    """drain_timeout, then every remaining connection closed gracefully, each linger bounded."""
    config = make_config(
        server={"listen": ["127.0.0.1:0"]},
        limits={"drain_timeout": 20, "linger_timeout": 5, "idle_timeout": 0},
    )
    server = EchoServer(config)
    finished = trio.Event()
    polite, polite_end = trio.testing.memory_stream_pair()
    silent, silent_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        server.serve_stream(polite_end, peer="polite")
        server.serve_stream(silent_end, peer="silent")
        await polite.send_all(b"hi")
        assert await polite.receive_some(10) == b"hi"

        async def polite_client() -> None:
            # finishes on its own during the drain: half-close at t=10, get EOF back
            await trio.sleep(10)
            await polite.send_eof()
            assert await polite.receive_some(10) == b""
            finished.set()

        nursery.start_soon(polite_client)
        server.stop()
        await finished.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == 10
        assert server.stats.active == 1
        # the silent client: FIN at the drain deadline, then we linger 5 s for its EOF, then close
        assert await silent.receive_some(10) == b""
        assert trio.current_time() == 20
    assert trio.current_time() == 25
    assert server.stats.closed == {"eof": 1, "drain": 1}


async def test_serve_stream_needs_a_running_server() -> None:
    _client, end = trio.testing.memory_stream_pair()
    with pytest.raises(RuntimeError, match="running server"):
        EchoServer(make_config()).serve_stream(end)


async def test_a_closed_connection_is_freed_at_once_not_by_the_garbage_collector() -> None:
    """The table entry and its connection point at each other; closing must break that cycle, or
    every closed connection waits for a full garbage collection (19,000 of them did)."""
    import gc

    from trio_echo.connection import Connection
    from trio_echo.stats import ConnectionInfo

    def alive() -> int:
        return sum(isinstance(obj, Connection | ConnectionInfo) for obj in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        async with running_server(make_config(server={"listen": ["127.0.0.1:0"]})) as server:
            closes = server.tracer.subscribe(Flag.CONN)
            for _ in range(20):
                stream = await connect(server.addresses[0])
                await stream.send_all(b"x")
                assert await stream.receive_some(10) == b"x"
                await stream.aclose()
            closed = 0
            with trio.fail_after(10):
                while closed < 20:
                    closed += sum(event.event == "conn.close" for event in await closes.get_batch())
            assert server.stats.active == 0
            assert alive() == 0
    finally:
        gc.enable()


def test_closing_releases_the_handle() -> None:
    from trio_echo.stats import Stats

    stats = Stats(started=0.0)
    info = stats.open(peer="p", listener="l", now=0.0, buffer_size=16)
    info.handle = object()  # type: ignore[assignment]
    stats.close(info, "eof")
    assert info.handle is None
