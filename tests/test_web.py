"""Web echo listeners (http://, https://) against clients nobody here wrote: curl (Debian) for the JSON
echo, the ``websockets`` library (PyPI) for the WebSocket echo; raw sockets for what no polite client
sends; memory streams and a MockClock for the timeouts."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
import trustme
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.conftest import make_config, port_of, running_server
from trio_echo.admin import metrics
from trio_echo.admin.table import connection_item
from trio_echo.config import FaultProfile
from trio_echo.echo import EchoSession
from trio_echo.events import Flag
from trio_echo.policy import ConnectionPolicy
from trio_echo.reasons import Reason
from trio_echo.server import EchoServer
from trio_echo.trace import Tracer
from trio_echo.web import MAX_HEAD, WebConnection, WebPolicy

CURL = shutil.which("curl") or "/usr/bin/curl"
WEB = "http://127.0.0.1:0"


def web_config(listen: object = WEB, **limits: object) -> Any:
    return make_config(server={"listen": [listen]}, limits=limits)


async def curl(*args: str) -> tuple[int, str, str]:
    assert os.path.exists(CURL), "curl is missing: scripts/test installs it (apt-get install curl)"  # noqa: ASYNC240
    done = await trio.run_process(
        [CURL, "-sS", "--max-time", "20", *args], capture_stdout=True, capture_stderr=True, check=False
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def documents(text: str) -> list[dict[str, Any]]:
    """The JSON objects curl printed one after the other."""
    decoder, found, index = json.JSONDecoder(), [], 0
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        document, index = decoder.raw_decode(text, index)
        found.append(document)
    return found


def url(server: EchoServer, path: str = "/", scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{port_of(server.addresses[0])}{path}"


async def in_websocket(address: str, session: Callable[[ClientConnection], object], **options: Any) -> Any:
    """Run ``session`` on a ``websockets`` client connection (its sync client, in a thread)."""

    def run() -> object:
        with connect(address, open_timeout=10, close_timeout=10, **options) as ws:
            return session(ws)

    return await trio.to_thread.run_sync(run)


# -- the JSON echo, with curl ------------------------------------------------------------------------


async def test_json_echo_shows_the_request_as_received() -> None:
    async with running_server(web_config()) as server:
        code, out, err = await curl(
            "-H", "X-Mixed-Case: Value", "-H", "x-mixed-case: again", "--data-binary", "héllo",
            url(server, "/some/path?b=2&a=1&b=3"),
        )  # fmt: skip
    assert code == 0, err
    [document] = documents(out)
    assert document["method"] == "POST"
    assert document["path"] == "/some/path"
    assert document["query"] == [["b", "2"], ["a", "1"], ["b", "3"]]
    assert document["http_version"] == "1.1"
    assert ["X-Mixed-Case", "Value"] in document["headers"]  # names as sent, repeats kept, in order
    assert document["headers"].index(["X-Mixed-Case", "Value"]) + 1 == document["headers"].index(
        ["x-mixed-case", "again"]
    )
    assert document["body"] == "héllo"
    connection = document["connection"]
    assert connection["peer"].startswith("127.0.0.1:")
    assert connection["listener"] == WEB
    assert connection["proxy"] is None
    assert connection["tls"] is None
    assert set(connection["tcp"]) == {"rtt_us", "mss", "pmtu"}
    assert connection["server"] == {"host": socket.gethostname(), "pid": os.getpid(), "worker": None}


async def test_keep_alive_serves_many_requests_on_one_connection() -> None:
    async with running_server(web_config()) as server:
        code, out, err = await curl(url(server, "/one"), url(server, "/two"), url(server, "/three"))
        assert server.stats.total == 1
    assert code == 0, err
    found = documents(out)
    assert [d["path"] for d in found] == ["/one", "/two", "/three"]
    assert {d["connection"]["id"] for d in found} == {1}
    assert [d["connection"]["requests"] for d in found] == [1, 2, 3]


async def test_status_delay_head_and_binary_bodies(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(bytes(range(256)) * 8)
    async with running_server(web_config()) as server:
        code, out, _ = await curl("-o", "/dev/null", "-w", "%{http_code}", url(server, "/?status=418"))
        assert (code, out) == (0, "418")
        code, out, _ = await curl("-i", url(server, "/?status=204"))
        assert out.startswith("HTTP/1.1 204 No Content")
        assert out.rstrip().endswith("cache-control: no-store")  # no body
        code, out, _ = await curl("-i", url(server, "/?status=103"))
        assert out.startswith("HTTP/1.1 103 Early Hints")  # the interim answer ...
        assert "HTTP/1.1 200 OK" in out  # ... then the final one
        started = trio.current_time()
        code, out, _ = await curl(url(server, "/?delay=0.3"))
        assert trio.current_time() - started >= 0.3
        assert documents(out)[0]["query"] == [["delay", "0.3"]]
        code, out, _ = await curl("-I", url(server, "/head"))
        length = next(line for line in out.splitlines() if line.startswith("content-length:"))
        assert int(length.split(":")[1]) > 100  # the length of the JSON it would have sent
        code, out, _ = await curl("-H", "Expect: 100-continue", "--data-binary", f"@{blob}", url(server))
        assert code == 0
        import base64

        assert base64.b64decode(documents(out)[0]["body_base64"]) == blob.read_bytes()
        code, out, _ = await curl("-i", url(server, "/?status=600"))
        assert out.startswith("HTTP/1.1 400 Bad Request")
        assert "100 to 599" in documents(out.split("\r\n\r\n", 1)[1])[0]["error"]
        assert server.stats.http_requests["418"] == 1
    assert server.stats.closed["bad_request"] == 1


async def test_a_browser_gets_the_page() -> None:
    async with running_server(web_config()) as server:
        code, out, _ = await curl("-i", "-H", "Accept: text/html,*/*;q=0.8", url(server))
        _, curl_out, _ = await curl(url(server))
    assert code == 0
    head, page = out.split("\r\n\r\n", 1)
    assert "content-type: text/html; charset=utf-8" in head
    assert "new WebSocket(" in page
    assert "<script src" not in page  # no CDN: the page is one file ...
    assert "https://" not in page  # ... and names no other site
    assert documents(curl_out)[0]["method"] == "GET"  # curl (Accept: */*) gets the JSON


# -- what no polite client sends ---------------------------------------------------------------------


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, read until the server closes (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


HOST = b"Host: x\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "bad_request"),  # HTTP/1.1 without Host
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431, "too_large"),
        (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 1001\r\n\r\n" + b"x" * 1001, 413, "too_large"),
        (
            b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n" + b"3e9\r\n" + b"y" * 1001,
            413,
            "too_large",
        ),
        (b"GET /?delay=x HTTP/1.1\r\n" + HOST + b"\r\n", 400, "bad_request"),
        (
            b"GET / HTTP/1.1\r\n" + HOST + b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            426,
            "bad_request",
        ),
        (
            b"POST / HTTP/1.1\r\n" + HOST + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            400,
            "bad_request",
        ),
    ],
)
async def test_bad_requests_get_an_answer_and_a_close(
    request_bytes: bytes, status: int, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(web_config(max_message_size=1000)) as server:
        port = port_of(server.addresses[0])
        answer = await trio.to_thread.run_sync(exchange, port, request_bytes)
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
        assert b"connection: close" in answer.split(b"\r\n\r\n")[0]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["status"] == status
        _, out, _ = await curl(url(server, "/after"))  # nothing else fell over
        assert documents(out)[0]["path"] == "/after"
    assert server.stats.closed[reason] == 1
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]


async def serve_memory(
    policy: ConnectionPolicy, web: WebPolicy, request: bytes, *, close_after: bool = False
) -> tuple[bytes, Reason, float]:
    """One WebConnection over a memory stream: send ``request``, read everything until the server
    closes; the answer, the close reason and the (virtual) time it took."""
    client, served = trio.testing.memory_stream_pair()
    conn = WebConnection(served, EchoSession(65536), policy, web, listener="memory")
    result: list[Reason] = []
    answer = bytearray()

    async def run() -> None:
        result.append(await conn.run())

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await client.send_all(request)
        if close_after:
            await client.send_stream.aclose()
        while chunk := await client.receive_some():
            answer += chunk
        await client.aclose()
    return bytes(answer), result[0], trio.current_time() - started


async def test_request_timeout_and_idle_timeout(autojump_clock: trio.testing.MockClock) -> None:
    policy = ConnectionPolicy(idle_timeout=100.0, linger_timeout=1.0)
    web = WebPolicy(request_timeout=5.0)
    answer, reason, took = await serve_memory(policy, web, b"GET / HTTP/1.1\r\nHost: x\r\n")  # unfinished
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout")
    assert reason is Reason.REQUEST_TIMEOUT
    assert 5.0 <= took <= 6.0 + 1e-9  # the request's limit, then at most the linger
    # Between requests only the idle timeout counts: a complete request, then silence.
    answer, reason, took = await serve_memory(policy, web, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert reason is Reason.IDLE
    assert 100.0 <= took <= 101.0 + 1e-9


async def test_delay_holds_the_answer(autojump_clock: trio.testing.MockClock) -> None:
    policy = ConnectionPolicy(idle_timeout=100.0)
    answer, reason, took = await serve_memory(
        policy, WebPolicy(), b"GET /?delay=7.5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert reason is Reason.EOF
    assert took == pytest.approx(7.5)


async def test_client_eof_between_requests(autojump_clock: trio.testing.MockClock) -> None:
    answer, reason, _ = await serve_memory(
        ConnectionPolicy(idle_timeout=100.0),
        WebPolicy(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        close_after=True,
    )
    assert answer.count(b"HTTP/1.1 200 OK") == 1
    assert reason is Reason.EOF


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 100,
        b"\r\n" * 5000,
        b"GET " + b"/" * 70000,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"\xff" * 3,
    ],
)
async def test_garbage_never_raises(garbage: bytes, autojump_clock: trio.testing.MockClock) -> None:
    answer, reason, _ = await serve_memory(
        ConnectionPolicy(idle_timeout=10.0), WebPolicy(request_timeout=3.0), garbage, close_after=True
    )
    assert reason in (Reason.BAD_REQUEST, Reason.TOO_LARGE, Reason.EOF, Reason.REQUEST_TIMEOUT)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4")


# -- the WebSocket echo, with the websockets library -------------------------------------------------


async def test_websocket_echo_with_a_third_party_client() -> None:
    def session(ws: ClientConnection) -> dict[str, object]:
        seen: dict[str, object] = {"subprotocol": ws.subprotocol}
        ws.send("hello, echo")
        seen["text"] = ws.recv()
        ws.send(b"\x00\xffbinary")
        seen["binary"] = ws.recv()
        big = os.urandom(1024 * 1024)  # exactly the default max_message_size
        ws.send(big)
        seen["big"] = ws.recv() == big
        ws.send(["frag", "mented ", "text"])  # one message in three frames
        ws.send([b"\x01", b"\x02"])
        seen["fragmented"] = [ws.recv(), ws.recv()]
        for index in range(50):
            ws.send(f"message {index}")
        seen["ordered"] = [ws.recv() for _ in range(50)] == [f"message {index}" for index in range(50)]
        seen["pong"] = ws.ping(b"are you there").wait(10)
        ws.close(4001, "see you")
        assert ws.protocol.close_rcvd is not None
        seen["close"] = (ws.protocol.close_rcvd.code, ws.protocol.close_rcvd.reason)
        return seen

    async with running_server(web_config()) as server:
        seen = await in_websocket(
            url(server, "/any/path", "ws"), session, subprotocols=["chat", "superchat"], max_size=None
        )
        with trio.fail_after(10):
            while server.stats.active:  # noqa: ASYNC110 - the server's close follows the client's
                await trio.sleep(0.01)
    assert seen == {
        "subprotocol": "chat",
        "text": "hello, echo",
        "binary": b"\x00\xffbinary",
        "big": True,
        "fragmented": ["fragmented text", b"\x01\x02"],
        "ordered": True,
        "pong": True,
        "close": (4001, "see you"),
    }
    assert server.stats.closed["eof"] == 1
    assert server.stats.websocket_messages == {"text": 52, "binary": 3}
    assert server.stats.http_requests["101"] == 1


async def test_websocket_message_over_the_limit_closes_1009() -> None:
    def session(ws: ClientConnection) -> tuple[int, str]:
        ws.send("x" * 1000)
        assert ws.recv() == "x" * 1000
        ws.send("y" * 1001)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv()
        assert closed.value.rcvd is not None
        return closed.value.rcvd.code, closed.value.rcvd.reason

    async with running_server(web_config(max_message_size=1000)) as server:
        code, reason = await in_websocket(url(server, "/", "ws"), session)
        with trio.fail_after(10):
            while server.stats.active:  # noqa: ASYNC110
                await trio.sleep(0.01)
    assert code == 1009
    assert "1000" in reason
    assert server.stats.closed["too_large"] == 1


async def test_server_side_close_drain_and_admin_say_why() -> None:
    config = make_config(server={"listen": [WEB]}, trace={"flags": "error,info,conn"})
    async with running_server(config) as server:
        subscriber = server.tracer.subscribe(Flag.CONN)
        opened = trio.Event()

        def session(ws: ClientConnection) -> tuple[int, str]:
            ws.send("before")
            assert ws.recv() == "before"
            trio.from_thread.run_sync(opened.set)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=20)
            assert closed.value.rcvd is not None
            return closed.value.rcvd.code, closed.value.rcvd.reason

        async with trio.open_nursery() as nursery:
            results: list[object] = []

            async def client() -> None:
                results.append(await in_websocket(url(server, "/", "ws"), session))

            nursery.start_soon(client)
            with trio.fail_after(10):
                await opened.wait()
            [info] = server.stats.connections.values()
            item = connection_item(info, trio.current_time())
            assert item["protocol"] == "websocket"
            assert server.close_connection(info.id)
        assert results == [(1001, "admin")]
        with trio.fail_after(10):
            while server.stats.active:  # noqa: ASYNC110 - the server's close follows the client's
                await trio.sleep(0.01)
        events = [event.event for event in await subscriber.get_batch()]
        rendered = metrics.render(server.metrics_snapshot())
    assert events == ["conn.open", "ws.open", "ws.close", "conn.close"]
    assert 'trio_echo_websocket_messages_total{kind="text"} 1' in rendered
    assert 'trio_echo_http_requests_total{status="101"} 1' in rendered
    assert 'trio_echo_connections_closed_total{reason="admin"} 1' in rendered


async def test_drain_closes_websockets_with_1001() -> None:
    config = make_config(server={"listen": [WEB]}, limits={"drain_timeout": 0.2})
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server: EchoServer = await nursery.start(EchoServer(config).run)
            opened = trio.Event()

            def session(ws: ClientConnection) -> tuple[int, str]:
                ws.send("x")
                ws.recv()
                trio.from_thread.run_sync(opened.set)
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(timeout=20)
                assert closed.value.rcvd is not None
                return closed.value.rcvd.code, closed.value.rcvd.reason

            results: list[object] = []

            async def client() -> None:
                results.append(await in_websocket(url(server, "/", "ws"), session))

            nursery.start_soon(client)
            await opened.wait()
            server.stop()
    assert results == [(1001, "drain")]
    assert server.stats.closed["drain"] == 1


# -- limits apply as on TCP --------------------------------------------------------------------------


async def test_limits_apply_to_web_listeners() -> None:
    async with running_server(web_config(deny=["127.0.0.0/8"])) as server:
        code, _, _ = await curl(url(server))
        assert code != 0  # refused: the connection closes before any answer
        assert server.stats.refused["denied"] == 1
    config = make_config(server={"listen": [WEB]}, limits={"max_connections": 1})
    async with running_server(config) as server:

        def hold(ws: ClientConnection) -> int:
            ws.send("x")
            ws.recv()
            refused = trio.from_thread.run(curl, url(server))
            return refused[0]

        assert await in_websocket(url(server, "/", "ws"), hold) != 0
        assert server.stats.refused["max_connections"] == 1


# -- https:// ------------------------------------------------------------------------------------------


async def test_https_json_shows_tls_and_wss_echoes(tmp_path: Path) -> None:
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    client = ca.issue_cert("alice@example.com", common_name="alice")
    client_pem = tmp_path / "client.pem"
    client.private_key_and_cert_chain_pem.write_to_path(str(client_pem))
    config = make_config(
        server={"listen": ["https://127.0.0.1:0"]}, tls={"cert_file": str(pem), "key_file": str(pem)}
    )
    async with running_server(config) as server:
        port = port_of(server.addresses[0])
        resolve = f"localhost:{port}:127.0.0.1"
        code, out, err = await curl(
            "--cacert", str(ca_pem), "--resolve", resolve, f"https://localhost:{port}/"
        )
        assert code == 0, err
        tls = documents(out)[0]["connection"]["tls"]
        assert tls["version"] in ("TLSv1.2", "TLSv1.3")
        assert tls["cipher"]
        assert tls["sni"] == "localhost"
        assert tls["alpn"] == "http/1.1"  # curl offers h2 and http/1.1; the listener speaks 1.1
        assert tls["client_certificate"] is None
        context = ssl.create_default_context()
        ca.configure_trust(context)
        echoed = await in_websocket(
            f"wss://127.0.0.1:{port}/", lambda ws: (ws.send("over tls"), ws.recv())[1], ssl=context,
            server_hostname="localhost",
        )  # fmt: skip
        assert echoed == "over tls"
    mutual = make_config(
        server={"listen": ["https://127.0.0.1:0"]},
        tls={"cert_file": str(pem), "key_file": str(pem), "client_ca_file": str(ca_pem)},
    )
    async with running_server(mutual) as server:
        port = port_of(server.addresses[0])
        code, out, err = await curl(
            "--cacert", str(ca_pem), "--cert", str(client_pem), f"https://127.0.0.1:{port}/"
        )
        assert code == 0, err
        assert documents(out)[0]["connection"]["tls"]["client_certificate"].endswith(",CN=alice")
        assert documents(out)[0]["connection"]["tls"]["sni"] is None  # (an IP address sends no SNI)


# -- the PROXY protocol: curl's --haproxy-protocol ---------------------------------------------------


async def test_curl_haproxy_protocol_shows_in_the_json() -> None:
    listener = {"address": WEB, "proxy_protocol": "v1", "trusted_proxies": ["127.0.0.1/32"]}
    async with running_server(web_config(listener)) as server:
        port = port_of(server.addresses[0])
        code, out, err = await curl("--haproxy-protocol", url(server, "/via-proxy"))
        assert code == 0, err
        plain = await trio.to_thread.run_sync(exchange, port, b"GET / HTTP/1.0\r\n\r\n")
    connection = documents(out)[0]["connection"]
    assert connection["proxy"]["version"] == 1
    assert connection["proxy"]["source"]["ip"] == "127.0.0.1"
    assert connection["proxy"]["destination"] == {"ip": "127.0.0.1", "port": port}
    assert connection["peer"] == f"127.0.0.1:{connection['proxy']['source']['port']}"
    assert plain == b""  # no PROXY header on a PROXY listener: refused, no answer
    assert server.stats.refused["proxy_header"] == 1


# -- faults on purpose act on what the client reads ------------------------------------------------


def fault_config(**profile: object) -> Any:
    return make_config(
        server={"listen": [{"address": WEB, "faults": "bad"}]},
        limits={"idle_timeout": 0.5},
        faults={"bad": profile},
        trace={"flags": "error,info,conn"},
    )


def read_until_closed(port: int, data: bytes) -> tuple[bytes, str]:
    """Send ``data``; everything read until the server ends it, and how it ended."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            return answer, "reset"
        return answer, "eof"


GET = b"GET /faulty HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    ("profile", "expected_length", "ending"),
    [
        ({"reset_after_bytes": 100}, 100, "reset"),
        ({"close_after_bytes": 77}, 77, "eof"),
        ({"stall_after_bytes": 50}, 50, "eof"),  # held silent until the idle timeout
        ({"blackhole": True}, 0, "eof"),
    ],
)
async def test_faults_cut_the_answer_exactly(
    profile: dict[str, object], expected_length: int, ending: str
) -> None:
    async with running_server(fault_config(**profile)) as server:
        subscriber = server.tracer.subscribe(Flag.CONN)
        answer, how = await trio.to_thread.run_sync(read_until_closed, port_of(server.addresses[0]), GET)
        with trio.fail_after(10):
            while server.stats.active:  # noqa: ASYNC110 - the server's side closes after the client's
                await trio.sleep(0.01)
        events = await subscriber.get_batch()
    assert (len(answer), how) == (expected_length, ending)
    if expected_length:
        assert answer.startswith(b"HTTP/1.1 200 OK")
    assert server.stats.closed["fault"] == 1
    kinds = [event.fields["kind"] for event in events if event.event == "fault.applied"]
    assert kinds == [next(iter(profile))]


async def test_latency_and_slices_delay_the_answer_and_set_faults_reaches_a_websocket() -> None:
    async with running_server(fault_config(latency=0.3, slice=50, slice_delay=0.01)) as server:
        started = trio.current_time()
        code, out, err = await curl(url(server, "/slow"))
        assert code == 0, err
        assert trio.current_time() - started >= 0.3 + 0.01 * (len(out) // 50)
        assert documents(out)[0]["path"] == "/slow"  # shaped, not changed
        assert server.stats.faults["latency"] == 1
        assert server.stats.faults["slice"] == 1
        server.set_faults(None, listener=WEB)  # new connections: none; then one set on an open one
        opened = trio.Event()
        faults_set = threading.Event()

        def session(ws: ClientConnection) -> tuple[float, float]:
            sent = time.monotonic()
            ws.send("quick")
            assert ws.recv(timeout=10) == "quick"
            quick = time.monotonic() - sent
            trio.from_thread.run_sync(opened.set)
            assert faults_set.wait(10)
            sent = time.monotonic()
            ws.send("late")
            assert ws.recv(timeout=10) == "late"
            return quick, time.monotonic() - sent

        async with trio.open_nursery() as nursery:
            took: list[tuple[float, float]] = []

            async def client() -> None:
                took.append(await in_websocket(url(server, "/", "ws"), session))

            nursery.start_soon(client)
            with trio.fail_after(10):
                await opened.wait()
            [info] = server.stats.connections.values()
            server.set_faults(FaultProfile(latency=0.4), conn_id=info.id)
            faults_set.set()
    quick, late = took[0]
    assert quick < 0.4 <= late


async def test_drain_ends_idle_keep_alives_at_once() -> None:
    """A keep-alive client between requests does not hold the drain for drain_timeout: it is closed
    at once; a client mid-request gets its answer with ``connection: close`` first."""
    config = make_config(server={"listen": [WEB]}, limits={"drain_timeout": 30})
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server: EchoServer = await nursery.start(EchoServer(config).run)
            port = port_of(server.addresses[0])
            idle = await trio.open_tcp_stream("127.0.0.1", port)
            await idle.send_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
            busy = await trio.open_tcp_stream("127.0.0.1", port)
            await busy.send_all(b"GET /?delay=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            first = await idle.receive_some(65536)
            assert first.startswith(b"HTTP/1.1 200 OK")
            while len(server.stats.connections) < 2:  # noqa: ASYNC110 - both admitted
                await trio.sleep(0.01)
            started = trio.current_time()
            server.stop()
            assert await idle.receive_some(65536) == b""  # closed without waiting 30 s
            await idle.aclose()
            answer = b""
            while chunk := await busy.receive_some(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 OK")
            assert b"connection: close" in answer.split(b"\r\n\r\n")[0]
            await busy.aclose()
    assert trio.current_time() - started < 10
    assert server.stats.closed["drain"] == 2


async def test_a_websocket_outlives_the_request_loops_deadlines(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Only the echo's own limits apply once upgraded: a message 50 s after the last one is echoed
    although send_timeout and request_timeout are 5 s; 100 s of silence is idle."""
    import wsproto
    from wsproto import events as wsevents

    client_ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    policy = ConnectionPolicy(idle_timeout=100.0, send_timeout=5.0, linger_timeout=1.0)
    client, served = trio.testing.memory_stream_pair()
    conn = WebConnection(served, EchoSession(65536), policy, WebPolicy(request_timeout=5.0), listener="m")
    echoed: list[tuple[float, object]] = []

    async def read_events() -> None:
        while data := await client.receive_some():
            client_ws.receive_data(data)
            for event in client_ws.events():
                if isinstance(event, wsevents.TextMessage):
                    echoed.append((trio.current_time(), event.data))
                elif isinstance(event, wsevents.CloseConnection):
                    echoed.append((trio.current_time(), event.code))

    async with trio.open_nursery() as nursery:
        results: list[Reason] = []

        async def run() -> None:
            results.append(await conn.run())

        nursery.start_soon(run)
        nursery.start_soon(read_events)
        await client.send_all(client_ws.send(wsevents.Request(host="m", target="/")))
        await trio.sleep(1)
        await client.send_all(client_ws.send(wsevents.TextMessage("first")))
        await trio.sleep(50)
        await client.send_all(client_ws.send(wsevents.TextMessage("later")))
    assert [what for _, what in echoed] == ["first", "later", 1001]
    assert echoed[2][0] == pytest.approx(51 + 100)  # idle: 100 s after the last message
    assert results == [Reason.IDLE]


async def test_wrk_load_gets_only_good_answers() -> None:
    """wrk (Debian) keeps 8 keep-alive connections busy for a second: every answer is a 2xx and the
    server counted exactly the requests wrk says it made (bounded: one second, loopback)."""
    wrk = shutil.which("wrk") or "/usr/bin/wrk"
    assert os.path.exists(wrk), "wrk is missing: scripts/test installs it (apt-get install wrk)"  # noqa: ASYNC240
    async with running_server(web_config()) as server:
        with trio.fail_after(30):
            done = await trio.run_process(
                [wrk, "-t1", "-c8", "-d1s", "--latency", url(server, "/load?x=1")],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        answered = server.stats.http_requests["200"]
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert "Non-2xx" not in out
    assert "Socket errors" not in out
    made = int(out.split(" requests in ")[0].rsplit(None, 1)[1])
    assert made > 0
    assert answered >= made  # (wrk counts the answers it read; an answer in flight at the end is not)


async def websocket_session(
    policy: ConnectionPolicy, frames: list[bytes], *, web: WebPolicy | None = None, hang_up: bool = False
) -> tuple[list[object], Reason]:
    """A WebConnection over a memory stream, upgraded by wsproto's client, fed ``frames`` (raw bytes,
    so they may be broken); what the client's wsproto made of the answers, and the close reason."""
    import wsproto
    from wsproto import events as wsevents

    client_ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    client, served = trio.testing.memory_stream_pair()
    tracer = Tracer(Flag.CONN | Flag.DATA)
    subscriber = tracer.subscribe(Flag.DATA)
    conn = WebConnection(
        served, EchoSession(65536), attrs.evolve(policy, tracer=tracer), web or WebPolicy(), listener="m"
    )
    seen: list[object] = []
    results: list[Reason] = []

    async def run() -> None:
        results.append(await conn.run())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await client.send_all(client_ws.send(wsevents.Request(host="m", target="/")))
        for frame in frames:
            await client.send_all(frame)
        if hang_up:
            await client.send_stream.aclose()
        while data := await client.receive_some():
            client_ws.receive_data(data)
            for event in client_ws.events():
                if isinstance(event, wsevents.Message):
                    seen.append(event.data)
                elif isinstance(event, wsevents.CloseConnection):
                    seen.append((event.code, event.reason))
                elif isinstance(event, wsevents.Pong):
                    seen.append(("pong", event.payload))
        await client.aclose()
    if len(subscriber):
        seen.append([event.event for event in await subscriber.get_batch()])
    return seen, results[0]


def masked(opcode: int, payload: bytes) -> bytes:
    """One client frame, masked with a zero key (so the payload reads as itself)."""
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


async def test_websocket_edge_cases(autojump_clock: trio.testing.MockClock) -> None:
    policy = ConnectionPolicy(idle_timeout=100.0, linger_timeout=1.0)
    # A ping, a message (traced under the data flag), then an unmasked frame: wsproto closes 1002.
    seen, reason = await websocket_session(policy, [masked(0x9, b"p"), masked(0x1, b"hi"), b"\x81\x02hi"])

    assert seen[:3] == [("pong", b"p"), "hi", (1002, seen[2][1])]  # type: ignore[index]
    assert seen[3] == ["ws.message"]
    assert reason is Reason.BAD_REQUEST
    # The client goes away without a close frame: reset.
    seen, reason = await websocket_session(policy, [masked(0x2, b"\x01")], hang_up=True)
    assert seen[0] == b"\x01"
    assert reason is Reason.RESET
    # The connection's lifetime ends it with 1001 "lifetime".
    seen, reason = await websocket_session(
        ConnectionPolicy(idle_timeout=100.0, max_lifetime=10.0, linger_timeout=1.0), [masked(0x1, b"x")]
    )
    assert seen[:2] == ["x", (1001, "lifetime")]
    assert reason is Reason.LIFETIME


async def test_a_failed_tls_handshake_on_https(autojump_clock: trio.testing.MockClock) -> None:
    from trio_echo.config import TlsConfig
    from trio_echo.tls import web_context

    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    with cert.private_key_and_cert_chain_pem.tempfile() as pem:
        context = web_context(TlsConfig(cert_file=pem, key_file=pem))
    client, served = trio.testing.memory_stream_pair()
    conn = WebConnection(
        trio.SSLStream(served, context, server_side=True),
        EchoSession(1024),
        ConnectionPolicy(idle_timeout=100.0),
        WebPolicy(),
        listener="m",
    )
    async with trio.open_nursery() as nursery:
        results: list[Reason] = []

        async def run() -> None:
            results.append(await conn.run())

        nursery.start_soon(run)
        await client.send_all(b"GET / HTTP/1.1\r\nHost: plain\r\n\r\n")  # plain text to a TLS port
        while await client.receive_some():
            pass
    assert results == [Reason.TLS_HANDSHAKE]


@pytest.mark.parametrize("profile", [{"reset_after": 0.3}, {"slow_close": 0.3}])
async def test_per_connection_faults_on_a_web_listener(profile: dict[str, float]) -> None:
    async with running_server(fault_config(**profile)) as server:
        started = trio.current_time()
        answer, how = await trio.to_thread.run_sync(
            read_until_closed,
            port_of(server.addresses[0]),
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" if "slow_close" in profile else GET,
        )
        took = trio.current_time() - started
        with trio.fail_after(10):
            while server.stats.active:  # noqa: ASYNC110
                await trio.sleep(0.01)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert took >= 0.3
    assert how == ("reset" if "reset_after" in profile else "eof")
    assert server.stats.faults[next(iter(profile))] == 1


async def test_the_counting_stream_passes_everything_on() -> None:
    from trio_echo.web import CountingStream

    client, served = trio.testing.memory_stream_pair()
    session = EchoSession(1024)
    counting = CountingStream(served, session)
    await counting.send_all(b"abc")
    await counting.wait_send_all_might_not_block()
    assert await client.receive_some() == b"abc"
    await client.send_all(b"de")
    assert await counting.receive_some() == b"de"
    assert (session.bytes_in, session.bytes_out) == (2, 3)
    await counting.aclose()
    assert await client.receive_some() == b""


def test_an_unreadable_client_ca_is_a_config_error(tmp_path: Path) -> None:
    from trio_echo.config import TlsConfig
    from trio_echo.errors import ConfigError
    from trio_echo.tls import web_context

    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"tls\.client_ca_file"):
        web_context(TlsConfig(cert_file=str(pem), key_file=str(pem), client_ca_file=str(bad)))
