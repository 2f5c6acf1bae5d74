"""A real HAProxy (Debian's ``haproxy``, installed by scripts/test) in TCP mode in front of two
trio_echo instances with ``send-proxy-v2``, all on loopback: echo works through it, each instance's
connection table shows the original client address, and HAProxy's health checks (PROXY v2 LOCAL)
are served but not counted as clients."""

from __future__ import annotations

import functools
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import trio

from tests.conftest import make_config, port_of, running_server
from tests.test_proxy_protocol import receive_exactly
from trio_echo.server import EchoServer

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CLIENT_IP = "127.0.0.2"  # clients connect from here; HAProxy reaches the servers from 127.0.0.1

CONFIG = """\
global
    maxconn 200
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend echo
    bind 127.0.0.1:{port}
    default_backend trio_echo
backend trio_echo
    balance roundrobin
    server one 127.0.0.1:{one} send-proxy-v2 check inter 100ms fall 2 rise 1
    server two 127.0.0.1:{two} send-proxy-v2 check inter 100ms fall 2 rise 1
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_until(predicate: Callable[[], bool]) -> None:
    while not predicate():  # noqa: ASYNC110 - polled: HAProxy's own timers decide when it acts
        await trio.sleep(0.02)


def listener() -> dict[str, object]:
    return {"address": "127.0.0.1:0", "proxy_protocol": "v2", "trusted_proxies": ["127.0.0.1/32"]}


async def test_echo_through_haproxy_send_proxy_v2(tmp_path: Path) -> None:
    assert shutil.which(HAPROXY), "haproxy is missing: scripts/test installs it (apt-get install haproxy)"
    config = make_config(server={"listen": [listener()]})
    with trio.fail_after(60):
        async with running_server(config) as one, running_server(config) as two:
            port = free_port()
            haproxy_cfg = tmp_path / "haproxy.cfg"
            haproxy_cfg.write_text(
                CONFIG.format(port=port, one=port_of(one.addresses[0]), two=port_of(two.addresses[0]))
            )
            check = await trio.run_process(
                [HAPROXY, "-c", "-f", str(haproxy_cfg)], capture_stdout=True, capture_stderr=True, check=False
            )
            assert check.returncode == 0, check.stdout + check.stderr
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(
                    functools.partial(trio.run_process, [HAPROXY, "-db", "-f", str(haproxy_cfg)], check=False)
                )
                try:
                    await _exercise(port, one, two)
                finally:
                    process.terminate()


async def _exercise(port: int, one: EchoServer, two: EchoServer) -> None:
    servers = (one, two)
    # Both backends up: HAProxy has health-checked each (LOCAL headers), which must not be clients.
    await wait_until(lambda: all(server.stats.health_checks for server in servers))
    clients: list[tuple[trio.SocketStream, int]] = []
    for index in range(4):
        sock = trio.socket.socket()
        await sock.bind((CLIENT_IP, 0))
        for _ in range(200):  # HAProxy binds its frontend a moment after it starts
            try:
                await sock.connect(("127.0.0.1", port))
                break
            except ConnectionRefusedError:
                sock.close()
                sock = trio.socket.socket()
                await sock.bind((CLIENT_IP, 0))
                await trio.sleep(0.02)
        stream = trio.SocketStream(sock)
        payload = f"client {index}\n".encode()
        await stream.send_all(payload)
        assert await receive_exactly(stream, len(payload)) == payload
        clients.append((stream, sock.getsockname()[1]))
    # Round robin: two clients on each instance, each listed under its own address, not HAProxy's.
    for server in servers:
        assert server.stats.total == 2, server.stats.connections
        for info in server.stats.connections.values():
            assert info.peer.startswith(f"{CLIENT_IP}:"), info.peer
            assert info.proxy.startswith("127.0.0.1:")
    listed = sorted(
        int(info.peer.rsplit(":", 1)[1]) for s in servers for info in s.stats.connections.values()
    )
    assert listed == sorted(local_port for _, local_port in clients)
    checks_before = sum(sum(s.stats.health_checks.values()) for s in servers)
    await wait_until(lambda: sum(sum(s.stats.health_checks.values()) for s in servers) > checks_before + 2)
    for server in servers:
        assert server.stats.total == 2  # health checks kept coming; none became a client
        assert server.stats.refused == {}
    for stream, _ in clients:
        await stream.send_eof()
        assert await stream.receive_some(10) == b""
        await stream.aclose()


HTTP_CONFIG = """\
global
    maxconn 200
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout tunnel 30s
frontend web
    bind 127.0.0.1:{port}
    unique-id-format req-%{{+X}}o%ci:%cp
    option forwardfor
    default_backend trio_echo
backend trio_echo
    option httpchk GET /healthz
    server one 127.0.0.1:{one} send-proxy-v2 proxy-v2-options unique-id check inter 100ms fall 2 rise 1
"""


async def test_http_listener_behind_haproxy_shows_the_original_client(tmp_path: Path) -> None:
    """HAProxy in HTTP mode with send-proxy-v2 in front of an http:// listener: the JSON names the
    client HAProxy accepted (not HAProxy), shows the PROXY header with its unique-id TLV, and a
    WebSocket upgrade passes through; HAProxy's HTTP checks are health checks, not clients."""
    from tests.test_web import curl, documents, in_websocket

    config = make_config(
        server={
            "listen": [
                {"address": "http://127.0.0.1:0", "proxy_protocol": "v2", "trusted_proxies": ["127.0.0.1/32"]}
            ]
        }
    )
    with trio.fail_after(60):
        async with running_server(config) as one:
            port = free_port()
            haproxy_cfg = tmp_path / "haproxy.cfg"
            haproxy_cfg.write_text(HTTP_CONFIG.format(port=port, one=port_of(one.addresses[0])))
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(
                    functools.partial(trio.run_process, [HAPROXY, "-db", "-f", str(haproxy_cfg)], check=False)
                )
                try:
                    await wait_until(lambda: bool(one.stats.health_checks))
                    code, out, err = "", "", ""
                    for _ in range(200):  # HAProxy binds its frontend a moment after it starts
                        code, out, err = await curl(
                            "--interface", CLIENT_IP, f"http://127.0.0.1:{port}/behind"
                        )
                        if code != 7:  # 7: could not connect (yet)
                            break
                        await trio.sleep(0.02)
                    assert code == 0, err
                    echoed = await in_websocket(
                        f"ws://127.0.0.1:{port}/ws", lambda ws: (ws.send("through haproxy"), ws.recv())[1]
                    )
                finally:
                    process.terminate()
    [document] = documents(out)
    connection = document["connection"]
    assert connection["peer"].startswith(f"{CLIENT_IP}:")
    assert connection["via"].startswith("127.0.0.1:")
    proxy = connection["proxy"]
    assert proxy["version"] == 2
    assert proxy["source"]["ip"] == CLIENT_IP
    assert proxy["destination"] == {"ip": "127.0.0.1", "port": port}
    [unique_id] = [tlv for tlv in proxy["tlvs"] if tlv.get("name") == "unique_id"]
    assert unique_id["value"].startswith("req-")
    assert ["x-forwarded-for", CLIENT_IP] in document["headers"]
    assert echoed == "through haproxy"
    assert one.stats.total == 2  # the curl client and the WebSocket; the checks were not clients
