"""PROXY protocol listeners over real loopback sockets: the header's client drives the table, per-IP
limits and trace events; untrusted peers, bad and late headers are refused; LOCAL is a health check."""

from __future__ import annotations

import ssl

import trio
import trio.testing
import trustme

from tests.conftest import make_config, running_server
from tests.test_server import connect
from trio_echo.admin.metrics import render
from trio_echo.admin.table import connection_item
from trio_echo.events import Event, Flag
from trio_echo.proxied import PROXY_HEADER_TIMEOUT
from trio_echo.proxyproto import encode_v1, encode_v2
from trio_echo.trace import Tracer

CLIENT = ("203.0.113.9", 50123)
SERVICE = ("198.51.100.1", 40007)


def proxy_listener(
    mode: str = "v2", trusted: tuple[str, ...] = ("127.0.0.0/8",), **extra: object
) -> dict[str, object]:
    return {"address": "127.0.0.1:0", "proxy_protocol": mode, "trusted_proxies": list(trusted), **extra}


def traced() -> tuple[Tracer, list[Event]]:
    tracer = Tracer(Flag.ERROR | Flag.INFO | Flag.CONN)
    events: list[Event] = []
    tracer.add_sink(events.append)
    return tracer, events


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, f"EOF after {bytes(data)!r}"
        data += chunk
    return bytes(data)


async def test_v2_header_names_the_client_and_its_bytes_are_echoed() -> None:
    tracer, events = traced()
    config = make_config(server={"listen": [proxy_listener("v2")]})
    async with running_server(config, tracer=tracer) as server:
        with trio.fail_after(10):
            stream = await connect(server.addresses[0])
            # Header and the client's first bytes in one segment: none of the client's may be eaten.
            await stream.send_all(encode_v2(CLIENT, SERVICE) + b"hello")
            assert await receive_exactly(stream, 5) == b"hello"
            (info,) = server.stats.connections.values()
            assert info.peer == "203.0.113.9:50123"
            assert info.proxy.startswith("127.0.0.1:")
            item = connection_item(info, trio.current_time())
            assert (item["peer"], item["proxy"]) == (info.peer, info.proxy)
            await stream.send_all(b" world")
            assert await receive_exactly(stream, 6) == b" world"
            await stream.send_eof()
            assert await stream.receive_some(10) == b""
            await stream.aclose()
    opened = next(e for e in events if e.event == "conn.open")
    assert opened.fields["peer"] == "203.0.113.9:50123"
    assert str(opened.fields["proxy"]).startswith("127.0.0.1:")
    closed = next(e for e in events if e.event == "conn.close")
    assert (closed.fields["peer"], closed.fields["bytes_in"]) == ("203.0.113.9:50123", 11)


async def test_v1_header_with_ipv6_client_in_any_mode() -> None:
    config = make_config(server={"listen": [proxy_listener("any")]})
    async with running_server(config) as server:
        with trio.fail_after(10):
            stream = await connect(server.addresses[0])
            await stream.send_all(encode_v1(("2001:db8::7", 1234), ("2001:db8::1", 40007)))
            await stream.send_all(b"ping")
            assert await receive_exactly(stream, 4) == b"ping"
            (info,) = server.stats.connections.values()
            assert info.peer == "[2001:db8::7]:1234"
            await stream.aclose()


async def test_per_ip_limit_counts_the_real_client_not_the_proxy() -> None:
    config = make_config(
        server={"listen": [proxy_listener("v2")]},
        limits={"max_connections_per_ip": 1, "refusal": "too many\n"},
    )
    async with running_server(config) as server:
        with trio.fail_after(10):
            first = await connect(server.addresses[0])
            await first.send_all(encode_v2(CLIENT, SERVICE) + b"a")
            assert await receive_exactly(first, 1) == b"a"
            # Another client through the same proxy: admitted (the proxy's address is not the source).
            other = await connect(server.addresses[0])
            await other.send_all(encode_v2(("203.0.113.10", 1), SERVICE) + b"b")
            assert await receive_exactly(other, 1) == b"b"
            # The first client again: over its own cap.
            again = await connect(server.addresses[0])
            await again.send_all(encode_v2((CLIENT[0], 2), SERVICE) + b"c")
            assert await again.receive_some(100) == b"too many\n"
            assert server.stats.refused == {"per_ip": 1}
            for stream in (first, other, again):
                await stream.aclose()


async def test_untrusted_peer_is_refused_before_anything_is_read() -> None:
    tracer, events = traced()
    config = make_config(
        server={"listen": [proxy_listener("v2", trusted=("10.0.0.0/8", "::1/128"))]},
        limits={"refusal": "no\n"},
    )
    async with running_server(config, tracer=tracer) as server:
        with trio.fail_after(10):
            stream = await connect(server.addresses[0])
            await stream.send_all(encode_v2(CLIENT, SERVICE) + b"spoofed")
            assert await stream.receive_some(100) == b"no\n"
            assert await stream.receive_some(100) == b""
            await stream.aclose()
            assert server.stats.refused == {"untrusted_proxy": 1}
            assert server.stats.total == 0
    refused = next(e for e in events if e.event == "conn.refused")
    assert refused.fields["reason"] == "untrusted_proxy"
    assert str(refused.fields["peer"]).startswith("127.0.0.1:")


async def test_a_plain_client_on_a_proxy_listener_is_refused_at_once() -> None:
    tracer, events = traced()
    config = make_config(server={"listen": [proxy_listener("v1")]})
    async with running_server(config, tracer=tracer) as server:
        with trio.fail_after(10):
            stream = await connect(server.addresses[0])
            await stream.send_all(b"hello\n")
            assert await stream.receive_some(100) == b""  # no echo: closed without waiting 3 s
            await stream.aclose()
            assert server.stats.refused == {"proxy_header": 1}
    refused = next(e for e in events if e.event == "conn.refused")
    assert refused.fields["reason"] == "proxy_header"
    assert "expected a PROXY v1 line, got b'h' first" in str(refused.fields["message"])


async def test_wrong_version_for_the_listener_is_refused() -> None:
    config = make_config(server={"listen": [proxy_listener("v2")]})
    async with running_server(config) as server:
        with trio.fail_after(10):
            stream = await connect(server.addresses[0])
            await stream.send_all(encode_v1(CLIENT, SERVICE))
            assert await stream.receive_some(100) == b""
            await stream.aclose()
            assert server.stats.refused == {"proxy_header": 1}


async def test_header_must_arrive_whole_within_three_seconds() -> None:
    tracer, events = traced()
    config = make_config(server={"listen": [proxy_listener("v2")]})
    async with running_server(config, tracer=tracer) as server:
        with trio.fail_after(PROXY_HEADER_TIMEOUT + 10):
            stream = await connect(server.addresses[0])
            start = trio.current_time()
            await stream.send_all(encode_v2(CLIENT, SERVICE)[:20])  # a proxy that stalls mid-header
            assert await stream.receive_some(100) == b""
            waited = trio.current_time() - start
            await stream.aclose()
    assert PROXY_HEADER_TIMEOUT - 0.1 <= waited < PROXY_HEADER_TIMEOUT + 5
    refused = next(e for e in events if e.event == "conn.refused")
    assert refused.fields["message"] == "no complete PROXY header within 3 s"


async def test_peer_closing_mid_header_is_refused_cleanly() -> None:
    config = make_config(server={"listen": [proxy_listener("any")]})
    async with running_server(config) as server:
        with trio.fail_after(10):
            stream = await connect(server.addresses[0])
            await stream.send_all(b"PROXY TCP4 1.2.3.4")
            await stream.send_eof()
            assert await stream.receive_some(100) == b""
            await stream.aclose()
            while not server.stats.refused:  # noqa: ASYNC110 - the refusal is counted when the task runs
                await trio.sleep(0.01)
            assert server.stats.refused == {"proxy_header": 1}


async def test_local_health_check_is_served_but_not_counted() -> None:
    config = make_config(server={"listen": [proxy_listener("v2")]})
    async with running_server(config) as server:
        with trio.fail_after(10):
            check = await connect(server.addresses[0])
            await check.send_all(encode_v2(None, None) + b"are you there")
            assert await receive_exactly(check, 13) == b"are you there"
            assert server.stats.connections == {}
            assert server.stats.total == 0
            label = server.listener_names[0]
            assert server.stats.health_checks == {label: 1}
            assert f'trio_echo_proxy_health_checks_total{{listener="{label}"}} 1' in render(
                server.metrics_snapshot()
            )
            await check.aclose()


async def test_drain_closes_an_open_health_check() -> None:
    config = make_config(server={"listen": [proxy_listener("v2")]}, limits={"drain_timeout": 0.2})
    with trio.fail_after(20):
        async with running_server(config) as server:
            check = await connect(server.addresses[0])
            await check.send_all(encode_v2(None, None) + b"x")
            assert await receive_exactly(check, 1) == b"x"
            server.stop()
            assert await check.receive_some(10) == b""
            await check.aclose()


async def test_unknown_source_falls_back_to_the_proxy_address() -> None:
    config = make_config(server={"listen": [proxy_listener("v1")]})
    async with running_server(config) as server:
        with trio.fail_after(10):
            stream = await connect(server.addresses[0])
            await stream.send_all(encode_v1(None, None) + b"z")
            assert await receive_exactly(stream, 1) == b"z"
            (info,) = server.stats.connections.values()
            assert info.peer == info.proxy
            assert info.peer.startswith("127.0.0.1:")
            await stream.aclose()


async def test_tls_behind_a_proxy_header(tmp_path: object) -> None:
    """The header comes before the TLS handshake (HAProxy in TCP mode in front of a TLS listener)."""
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    listener = proxy_listener("v2")
    listener["address"] = "tls://127.0.0.1:0"
    config = make_config(
        server={"listen": [listener]}, tls={"cert_file": str(cert_file), "key_file": str(key_file)}
    )
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with running_server(config) as server:
        with trio.fail_after(10):
            raw = await connect(server.addresses[0])
            await raw.send_all(encode_v2(CLIENT, SERVICE))
            stream = trio.SSLStream(raw, client_context, server_hostname="127.0.0.1")
            await stream.send_all(b"secret")
            assert await receive_exactly(stream, 6) == b"secret"
            (info,) = server.stats.connections.values()
            assert info.peer == "203.0.113.9:50123"
            await stream.aclose()


async def test_reload_applies_proxy_options_to_new_connections() -> None:
    plain = make_config(server={"listen": [{"address": "127.0.0.1:0", "name": "edge"}]})
    async with running_server(plain) as server:
        with trio.fail_after(10):
            address = server.addresses[0]
            port = int(address.rsplit(":", 1)[1])
            proxied = make_config(
                server={"listen": [{**proxy_listener("v2"), "address": f"127.0.0.1:{port}", "name": "edge"}]}
            )
            await server.reconfigure(proxied)
            stream = await connect(address)
            await stream.send_all(encode_v2(CLIENT, SERVICE) + b"q")
            assert await receive_exactly(stream, 1) == b"q"
            (info,) = server.stats.connections.values()
            assert info.peer == "203.0.113.9:50123"
            await stream.aclose()
