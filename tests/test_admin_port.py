"""The admin port over real loopback sockets, with trio-websocket's client."""

from __future__ import annotations

import functools
import io
import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h11
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from tests.conftest import make_config, port_of
from trio_echo.admin import client as admin_client
from trio_echo.admin import port as admin_port
from trio_echo.admin import table as admin_table
from trio_echo.errors import ConfigError
from trio_echo.events import Flag
from trio_echo.server import EchoServer


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    monkeypatch.delenv("TRIO_ECHO_ADMIN_TOKEN", raising=False)
    return tmp_path


@asynccontextmanager
async def admin_server(
    admin: dict[str, object] | None = None, **sections: dict[str, object]
) -> AsyncIterator[EchoServer]:
    sections.setdefault("server", {"listen": ["127.0.0.1:0"]})
    sections.setdefault("trace", {"flags": "error,info,conn"})
    config = make_config(admin={"listen": "127.0.0.1:0", **(admin or {})}, **sections)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server: EchoServer = await nursery.start(EchoServer(config).run)
            try:
                yield server
            finally:
                server.stop()


def admin_port_of(server: EchoServer) -> int:
    return port_of(server.admin_addresses[0])


def token_of(server: EchoServer) -> str:
    assert server.admin is not None
    assert server.admin.token is not None
    return server.admin.token


async def http(
    server: EchoServer, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    port = admin_port_of(server)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        client = h11.Connection(h11.CLIENT)
        request_headers = {"host": f"127.0.0.1:{port}", **(headers or {})}
        await stream.send_all(
            client.send(h11.Request(method=method, target=path, headers=list(request_headers.items())))
        )
        await stream.send_all(client.send(h11.EndOfMessage()))
        status, response_headers, body = 0, {}, b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                response_headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, response_headers, body


def bearer(server: EchoServer) -> dict[str, str]:
    return {"authorization": f"Bearer {token_of(server)}"}


@asynccontextmanager
async def channel(
    server: EchoServer, token: str | None = None, **kw: object
) -> AsyncIterator[WebSocketConnection]:
    url = f"ws://127.0.0.1:{admin_port_of(server)}/ws"
    protocols = ["trio-echo.v1", f"token.{token or token_of(server)}"]
    async with open_websocket_url(url, subprotocols=protocols, **kw) as ws:  # type: ignore[arg-type]
        yield ws


_unread: dict[int, list[dict[str, object]]] = {}


async def next_of(ws: WebSocketConnection, kind: str, predicate=lambda m: True) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """The next message of ``kind`` matching ``predicate``; others stay unread for later calls."""
    unread = _unread.setdefault(id(ws), [])
    for index, message in enumerate(unread):
        if message["type"] == kind and predicate(message):
            return unread.pop(index)
    with trio.fail_after(10):
        while True:
            message = json.loads(await ws.get_message())
            if message["type"] == kind and predicate(message):
                return message  # type: ignore[no-any-return]
            if message["type"] != "stats":  # stats come every interval; only the newest matter
                unread.append(message)


async def request(ws: WebSocketConnection, message: dict[str, object], reply: str) -> dict[str, object]:
    await ws.send_message(json.dumps(message))
    return await next_of(ws, reply)


async def test_plain_http_endpoints(runtime_dir) -> None:  # type: ignore[no-untyped-def]
    async with admin_server() as server:
        assert (await http(server, "/healthz"))[::2] == (200, b"ok\n")
        assert (await http(server, "/readyz"))[::2] == (200, b"ready\n")
        assert (await http(server, "/auth"))[0] == 401
        assert (await http(server, "/auth", bearer(server)))[0] == 204
        assert (await http(server, "/metrics"))[0] == 401
        assert (await http(server, "/metrics", {"host": "rebind.attacker.example", **bearer(server)}))[
            0
        ] == 403
        assert (await http(server, "/metrics", {"origin": "http://evil.example", **bearer(server)}))[0] == 403
        assert (await http(server, "/nope"))[0] == 404
        assert (await http(server, "/metrics", bearer(server), method="POST"))[0] == 405
        status, headers, page = await http(server, "/")
        assert status == 200
        assert b"<title>trio-echo" in page
        assert "default-src 'self'" in headers["content-security-policy"]
        status, headers, script = await http(server, "/app.js")
        assert (status, headers["content-type"]) == (200, "text/javascript; charset=utf-8")
        assert b"WebSocket" in script
        status, headers, _ = await http(server, "/healthz", method="HEAD")
        assert (status, headers["content-length"]) == (200, "3")


async def test_generated_token_file(runtime_dir) -> None:  # type: ignore[no-untyped-def]
    async with admin_server() as server:
        assert server.admin is not None
        path = server.admin.token_path
        assert path == os.path.join(str(runtime_dir), f"admin-{admin_port_of(server)}.token")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with open(path, encoding="utf-8") as file:  # noqa: ASYNC230
            assert file.read().strip() == token_of(server)
        assert len(token_of(server)) >= 32


async def test_metrics_track_real_connections() -> None:
    async with admin_server() as server:
        echo = await trio.open_tcp_stream("127.0.0.1", port_of(server.addresses[0]))
        await echo.send_all(b"12345")
        assert await echo.receive_some(10) == b"12345"
        _, headers, body = await http(server, "/metrics", bearer(server))
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        samples = {
            (s.name, tuple(s.labels.values())): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }
        listener = server.config.server.listen[0].label
        assert samples[("trio_echo_connections_active", (listener,))] == 1
        assert samples[("trio_echo_connections_total", (listener,))] == 1
        assert samples[("trio_echo_bytes_received_total", ())] == 5
        assert samples[("trio_echo_bytes_sent_total", ())] == 5
        assert (
            "trio_echo_build_info",
            (admin_port.__package__ and __import__("trio_echo").__version__,),
        ) in samples
        await echo.aclose()


async def test_channel_counts_traces_lists_and_closes() -> None:
    async with admin_server(admin={"stats_interval": 0.05}) as server, channel(server) as ws:
        hello = await next_of(ws, "hello")
        assert hello["listeners"] == [{"address": server.addresses[0], "transport": "tcp"}]
        assert hello["trace_flags"] == "error,info,conn"
        assert ws.subprotocol == "trio-echo.v1"
        assert await request(ws, {"type": "subscribe", "flags": "conn"}, "subscribe") == {
            "type": "subscribe",
            "ok": True,
            "flags": "conn",
        }
        port = port_of(server.addresses[0])
        clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
        for client in clients:
            await client.send_all(b"hi")
            assert await client.receive_some(10) == b"hi"
        stats = await next_of(ws, "stats", lambda m: m["connections"]["active"] == 3)
        assert stats["connections"]["total"] == 3
        assert stats["bytes"] == {"in": 6, "out": 6}
        opened = [await next_of(ws, "trace", lambda m: m["event"]["event"] == "conn.open") for _ in range(3)]
        assert {m["event"]["peer"] for m in opened} == {
            f"127.0.0.1:{c.socket.getsockname()[1]}" for c in clients
        }
        listing = await request(ws, {"type": "connections"}, "connections")
        items = listing["items"]
        assert len(items) == 3
        assert {
            "id",
            "peer",
            "listener",
            "age",
            "bytes_in",
            "bytes_out",
            "rtt_us",
            "retransmits",
            "pmtu",
        } <= set(items[0])
        victim = items[0]
        assert await request(ws, {"type": "close", "id": victim["id"]}, "close") == {
            "type": "close",
            "ok": True,
            "id": victim["id"],
        }
        closed = await next_of(ws, "trace", lambda m: m["event"]["event"] == "conn.close")
        assert closed["event"]["reason"] == "admin"
        assert closed["event"]["conn_id"] == victim["id"]
        await next_of(ws, "stats", lambda m: m["connections"]["active"] == 2)
        # bad requests get an error; the channel stays open
        assert (await request(ws, {"type": "close", "id": 999999}, "error"))["message"].startswith(
            "close: no open connection"
        )
        await ws.send_message("{not json")
        assert (await next_of(ws, "error"))["message"] == "message is not valid JSON"
        assert (await request(ws, {"type": "reboot"}, "error"))["message"].startswith("unknown message type")
        reply = await request(ws, {"type": "set_trace_flags", "flags": "error"}, "set_trace_flags")
        assert reply == {"type": "set_trace_flags", "ok": True, "flags": "error"}
        assert server.tracer.flags == 1
        assert await request(ws, {"type": "unsubscribe"}, "unsubscribe") == {
            "type": "unsubscribe",
            "ok": True,
        }
        for client in clients:
            await client.aclose()


async def test_bearer_header_works_for_non_browser_clients() -> None:
    async with admin_server() as server:
        url = f"ws://127.0.0.1:{admin_port_of(server)}/ws"
        headers = [(b"authorization", f"Bearer {token_of(server)}".encode())]
        async with open_websocket_url(url, extra_headers=headers) as ws:
            assert (await next_of(ws, "hello"))["type"] == "hello"
            assert ws.subprotocol is None


def upgrade_headers(token: str, **extra: str) -> dict[str, str]:
    """A browser-style WebSocket upgrade request. (Rejections are checked over plain HTTP: trio-websocket's
    client leaves its socket open when a handshake is rejected.)"""
    return {
        "upgrade": "websocket",
        "connection": "Upgrade",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
        "sec-websocket-version": "13",
        "sec-websocket-protocol": f"trio-echo.v1, token.{token}",
        **extra,
    }


@pytest.mark.parametrize(
    ("token", "extra", "status"),
    [
        ("wrong", {}, 401),
        (None, {"origin": "http://evil.example"}, 403),
        (None, {"host": "evil.example"}, 403),
    ],
)
async def test_channel_rejections(token: str | None, extra: dict[str, str], status: int) -> None:
    async with admin_server() as server:
        code, _, body = await http(server, "/ws", upgrade_headers(token or token_of(server), **extra))
        assert code == status, body


async def test_channel_cap_is_503() -> None:
    async with admin_server(admin={"max_connections": 2}) as server:
        async with channel(server) as one, channel(server) as two:
            await next_of(one, "hello")
            await next_of(two, "hello")
            code, _, body = await http(server, "/ws", upgrade_headers(token_of(server)))
            assert (code, body) == (503, b"too many admin connections\n")
        # the slots free up when channels close
        assert server.admin is not None
        while server.admin.channels:  # noqa: ASYNC110 - the server notices the closes when it does
            await trio.sleep(0.01)
        async with channel(server) as three:
            assert (await next_of(three, "hello"))["type"] == "hello"


async def test_oversized_message_closes_with_1009() -> None:
    async with admin_server() as server, channel(server) as ws:
        await next_of(ws, "hello")
        await ws.send_message("x" * (64 * 1024 + 1))

        async def read_until_closed() -> None:
            while True:
                await ws.get_message()

        with pytest.raises(ConnectionClosed) as info:
            await read_until_closed()
        assert info.value.reason.code == 1009
        # trio-websocket's aclose() is a no-op once the peer has closed, and its reader task may be
        # cancelled before it closes the TCP stream: close it here so the test leaks nothing.
        await trio.aclose_forcefully(ws._stream)


async def test_readyz_is_503_while_draining() -> None:
    async with admin_server(limits={"drain_timeout": 30}) as server:
        echo = await trio.open_tcp_stream("127.0.0.1", port_of(server.addresses[0]))
        server.stop()
        await trio.testing.wait_all_tasks_blocked()
        assert (await http(server, "/readyz"))[::2] == (503, b"draining\n")
        assert (await http(server, "/healthz"))[0] == 200
        await echo.send_eof()
        assert await echo.receive_some(10) == b""
        await echo.aclose()


async def test_drain_delay_is_not_ready_while_still_accepting() -> None:
    async with admin_server(limits={"drain_delay": 1.0, "drain_timeout": 5}) as server:
        port = port_of(server.addresses[0])
        server.stop()
        await trio.testing.wait_all_tasks_blocked()
        started = trio.current_time()
        assert (await http(server, "/readyz"))[::2] == (503, b"draining\n")
        # Still accepting and echoing during the delay: a load balancer's stragglers are served.
        late = await trio.open_tcp_stream("127.0.0.1", port)
        await late.send_all(b"straggler")
        assert await late.receive_some(100) == b"straggler"
        assert trio.current_time() - started < 1.0
        with trio.fail_after(10):  # then the listener closes, and the drain ends the straggler
            while True:
                try:
                    probe = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    break
                await probe.aclose()
                await trio.sleep(0.05)
        assert trio.current_time() - started >= 1.0
        await late.send_eof()
        assert await late.receive_some(100) == b""
        await late.aclose()


async def test_malformed_and_slow_requests() -> None:
    async with admin_server(admin={"header_timeout": 0.3}) as server:
        async with await trio.open_tcp_stream("127.0.0.1", admin_port_of(server)) as stream:
            await stream.send_all(b"NONSENSE\r\n\r\n")
            answer = b""
            while chunk := await stream.receive_some(1000):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 400 ")
        async with await trio.open_tcp_stream("127.0.0.1", admin_port_of(server)) as slow:
            await slow.send_all(b"GET / HTTP/1.1\r\n")  # and then nothing
            answer = b""
            with trio.fail_after(5):
                while chunk := await slow.receive_some(1000):  # closed after the header timeout
                    answer += chunk
            client = h11.Connection(h11.CLIENT)
            client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            client.receive_data(answer)
            response = client.next_event()
            assert isinstance(response, h11.Response)
            assert response.status_code == 408
        assert (await http(server, "/healthz"))[0] == 200
        assert server.admin is not None
        assert server.admin.heads_timed_out == 1


async def dribbler(port: int, opened: list[trio.SocketStream], stop: trio.Event) -> None:
    """A connection that sends its request head one byte at a time and never finishes it."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    opened.append(stream)
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 10_000
    try:
        for byte in head:
            with trio.move_on_after(0.2):
                await stop.wait()
            if stop.is_set():
                return
            await stream.send_all(bytes([byte]))
    except trio.BrokenResourceError:
        pass  # the server dropped us for a newer connection: what it should do
    finally:
        await stream.aclose()


async def timed_http(server: EchoServer, path: str) -> tuple[int, float]:
    started = trio.current_time()
    with trio.fail_after(5):
        status = (await http(server, path))[0]
    return status, trio.current_time() - started


async def test_probes_answer_while_hundreds_dribble_unfinished_heads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # admin.max_connections is the cap on channels only: 320 connections that never finish a head
    # (more than max_pending_requests) must not keep liveness and readiness probes out.
    async with admin_server(admin={"max_connections": 2, "max_pending_requests": 200}) as server:
        port = admin_port_of(server)
        echo = await trio.open_tcp_stream("127.0.0.1", port_of(server.addresses[0]))
        opened: list[trio.SocketStream] = []
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(320):
                nursery.start_soon(dribbler, port, opened, stop)
            with trio.fail_after(20):
                while len(opened) < 320:  # noqa: ASYNC110 - waiting for the connects
                    await trio.sleep(0.01)
                assert server.admin is not None
                while server.admin.heads_dropped < 120:  # noqa: ASYNC110 - the server notices them
                    await trio.sleep(0.01)
            assert server.admin.pending <= 200
            for _ in range(5):
                for path in ("/healthz", "/readyz"):
                    status, took = await timed_http(server, path)
                    assert status == 200
                    assert took < 1.0
                started = trio.current_time()
                await echo.send_all(b"ping")
                with trio.fail_after(1):
                    assert await echo.receive_some(10) == b"ping"
                assert trio.current_time() - started < 1.0
                # the connects that probes made dropped dribblers too: the table keeps its size
                assert server.admin.pending <= 200
            async with channel(server) as ws:  # channels still open up to their own cap
                assert (await next_of(ws, "hello"))["type"] == "hello"
            stop.set()
        await echo.aclose()
        metrics = (await http(server, "/metrics", bearer(server)))[2].decode()
        assert 'trio_echo_admin_requests_dropped_total{reason="pending_full"}' in metrics
    warnings = [r for r in caplog.records if r.name == "trio_echo.admin"]
    assert 1 <= len(warnings) <= 1 + 20  # at most about one a second over the test's seconds
    assert not [r for r in caplog.records if r.exc_info]


def test_non_loopback_admin_needs_a_configured_token(monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(admin={"listen": ":0"})
    with pytest.raises(ConfigError, match="non-loopback admin address needs a configured token"):
        EchoServer(config)
    monkeypatch.setenv("TRIO_ECHO_ADMIN_TOKEN", "operator_token_123")
    assert EchoServer(config).admin.token == "operator_token_123"  # type: ignore[union-attr]
    monkeypatch.setenv("TRIO_ECHO_ADMIN_TOKEN", "bad token!")
    with pytest.raises(ConfigError, match="TRIO_ECHO_ADMIN_TOKEN"):
        EchoServer(config)


def test_token_file_is_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "token"
    path.write_text("from_a_file\n")
    server = EchoServer(make_config(admin={"listen": "0.0.0.0:0", "token_file": str(path)}))
    assert server.admin is not None
    assert server.admin.token == "from_a_file"
    with pytest.raises(ConfigError, match=r"admin\.token_file"):
        EchoServer(make_config(admin={"listen": "127.0.0.1:0", "token_file": str(tmp_path / "missing")}))


async def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "trio_echo", "admin", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


async def test_admin_command_line(runtime_dir) -> None:  # type: ignore[no-untyped-def]
    async with admin_server() as server:
        address = server.admin_addresses[0]
        echo = await trio.open_tcp_stream("127.0.0.1", port_of(server.addresses[0]))
        await echo.send_all(b"abc")
        assert await echo.receive_some(10) == b"abc"
        stats = await cli(address, "stats")  # finds the generated token file via $RUNTIME_DIRECTORY
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["connections"]["active"] == 1
        listing = await cli(address, "connections")
        (item,) = json.loads(listing.stdout)
        assert item["bytes_in"] == 3
        assert json.loads((await cli(address, "connections", "--filter", "no-such-peer")).stdout) == []
        assert (
            len(json.loads((await cli(address, "connections", "--limit", "1", "--sort", "rtt_us")).stdout))
            == 1
        )
        bad_limit = await cli(address, "connections", "--limit", "0")
        assert bad_limit.returncode == 2
        assert b"0 is not a positive integer" in bad_limit.stderr
        assert (
            await cli(address, "close", str(item["id"]))
        ).stdout == f"closed connection {item['id']}\n".encode()
        assert await echo.receive_some(10) == b""
        missing = await cli(address, "close", "12345")
        assert missing.returncode == 1
        assert b"no open connection with id 12345" in missing.stderr
        wrong = await cli(address, "stats", env={"RUNTIME_DIRECTORY": "/nonexistent"})
        assert wrong.returncode == 1
        assert wrong.stderr.startswith(b"trio-echo admin: no admin token: cannot read /nonexistent/")
        bad_token = await cli(
            address, "stats", env={"TRIO_ECHO_ADMIN_TOKEN": "nope", "RUNTIME_DIRECTORY": ""}
        )
        assert bad_token.returncode == 1
        assert b"wrong or missing admin token" in bad_token.stderr
        await echo.aclose()
    refused = await cli(address, "stats")
    assert refused.returncode == 1
    assert b"trio-echo admin: " in refused.stderr
    assert refused.stderr.count(b"\n") == 1


async def test_connection_list_pages_and_reads_tcp_info_only_for_the_page(
    runtime_dir, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    read_for: list[int] = []
    real_tcp_info = admin_table.tcp_info

    def counting(info):  # type: ignore[no-untyped-def]
        read_for.append(info.id)
        return real_tcp_info(info)

    monkeypatch.setattr(admin_table, "tcp_info", counting)
    async with admin_server() as server:
        port = port_of(server.addresses[0])
        clients = []
        for index in range(23):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(b"x" * (index + 1))
            assert len(await client.receive_some(100)) == index + 1
            clients.append(client)
        async with channel(server) as ws:
            first = await request(ws, {"type": "connections", "limit": 5}, "connections")
            assert first["total"] == 23
            assert [i["id"] for i in first["items"]] == sorted(
                i["id"] for i in first["items"]
            )  # oldest first
            assert len(first["items"]) == 5
            assert "rtt_us" in first["items"][0]
            assert sorted(read_for) == sorted(i["id"] for i in first["items"])  # only the page's sockets
            biggest = await request(
                ws, {"type": "connections", "limit": 3, "sort": "bytes_in"}, "connections"
            )
            assert [i["bytes_in"] for i in biggest["items"]] == [23, 22, 21]
            mine = clients[4].socket.getsockname()[1]
            found = await request(ws, {"type": "connections", "filter": f":{mine}"}, "connections")
            assert (found["total"], found["items"][0]["bytes_in"]) == (1, 5)
            bad = await request(ws, {"type": "connections", "limit": 10**6}, "error")
            assert bad["message"] == "connections: 'limit' must be an integer from 1 to 5000"
        # the command line pages through everything (small pages here, to page at all)
        monkeypatch.setattr(admin_client, "PAGE", 4)
        out = io.StringIO()
        address = server.admin_addresses[0]
        assert await admin_client.run_command(address, admin_client.Command("connections"), out=out) == 0
        listed = json.loads(out.getvalue())
        assert sorted(i["id"] for i in listed) == sorted(server.stats.connections)
        out = io.StringIO()
        command = admin_client.Command("connections", limit=6, sort="bytes_out")
        assert await admin_client.run_command(address, command, out=out) == 0
        assert [i["bytes_out"] for i in json.loads(out.getvalue())] == [23, 22, 21, 20, 19, 18]
        for client in clients:
            await client.aclose()


async def test_admin_trace_command_streams_json_lines(runtime_dir, caplog) -> None:  # type: ignore[no-untyped-def]
    # The docs' own example on a server with the default flags (error,info): the subscriber asked
    # for conn and gets it; the log, which follows the global flags, does not.
    async with admin_server(trace={"flags": "error,info"}) as server:
        out = runtime_dir / "trace.jsonl"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    trio.run_process,
                    [
                        sys.executable,
                        "-m",
                        "trio_echo",
                        "admin",
                        server.admin_addresses[0],
                        "trace",
                        "--flags",
                        "conn",
                        "-o",
                        str(out),
                    ],
                    check=False,
                )
            )
            with trio.fail_after(20):
                while not server.tracer.subscribers:  # noqa: ASYNC110 - waiting for the subprocess
                    await trio.sleep(0.05)
                echo = await trio.open_tcp_stream("127.0.0.1", port_of(server.addresses[0]))
                await echo.aclose()
                while not out.exists() or b"conn.close" not in out.read_bytes():  # noqa: ASYNC110
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        events = [json.loads(line) for line in out.read_text().splitlines()]
        assert [e["event"] for e in events][:2] == ["conn.open", "conn.close"]
        assert not [r for r in caplog.records if r.getMessage().startswith("conn.")]
        assert server.tracer.flags == Flag.ERROR | Flag.INFO
