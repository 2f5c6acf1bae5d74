"""tls:// listeners with trustme-made certificates: echo over v4/v6, mutual TLS, plain-text clients,
and a renewed certificate picked up by reload."""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from tests.conftest import make_config, needs_ipv6, port_of, running_server
from trio_echo.connection import Connection
from trio_echo.echo import EchoSession
from trio_echo.errors import ConfigError
from trio_echo.policy import ConnectionPolicy
from trio_echo.server import EchoServer


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def server_pem(ca: trustme.CA, path: Path) -> str:
    ca.issue_cert("127.0.0.1", "::1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(path))
    return str(path)


def tls_config(pem: str, listen: list[str], **tls: str) -> object:
    return make_config(server={"listen": listen}, tls={"cert_file": pem, "key_file": pem, **tls})


async def tls_client(
    address: str, ca: trustme.CA, client_cert: trustme.LeafCert | None = None
) -> trio.SSLStream[trio.SocketStream]:
    host = address.rsplit(":", 1)[0].strip("[]")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if client_cert is not None:
        client_cert.configure_cert(context)
    tcp = await trio.open_tcp_stream(host, port_of(address))
    return trio.SSLStream(tcp, context, server_hostname=host)


async def round_trip(stream: trio.SSLStream[trio.SocketStream], data: bytes) -> bytes:
    await stream.send_all(data)
    got = b""
    while len(got) < len(data):
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.parametrize("listen", ["tls://127.0.0.1:0", pytest.param("tls://[::1]:0", marks=needs_ipv6)])
async def test_echo_over_tls(ca: trustme.CA, tmp_path: Path, listen: str) -> None:
    async with running_server(tls_config(server_pem(ca, tmp_path / "s.pem"), [listen])) as server:  # type: ignore[arg-type]
        with trio.fail_after(10):
            stream = await tls_client(server.addresses[0], ca)
            payload = bytes(range(256)) * 1000
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, payload)
                got = b""
                while len(got) < len(payload):
                    got += await stream.receive_some(65536)
            assert got == payload
            await stream.aclose()


async def test_mutual_tls_accepts_a_client_certificate_and_rejects_none(
    ca: trustme.CA, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    config = tls_config(
        server_pem(ca, tmp_path / "s.pem"), ["tls://127.0.0.1:0"], client_ca_file=str(ca_file)
    )
    async with running_server(config) as server:  # type: ignore[arg-type]
        with trio.fail_after(10):
            good = await tls_client(server.addresses[0], ca, ca.issue_cert("client@example.test"))
            assert await round_trip(good, b"with a certificate") == b"with a certificate"
            await good.aclose()
            bad = await tls_client(server.addresses[0], ca)
            with pytest.raises(trio.BrokenResourceError):
                await round_trip(bad, b"without one")
            await trio.aclose_forcefully(bad)
            while "tls_handshake" not in server.stats.closed:  # noqa: ASYNC110 - the server side of it
                await trio.sleep(0.01)
        assert server.stats.closed["eof"] == 1


async def test_plain_text_client_is_rejected_cleanly(ca: trustme.CA, tmp_path: Path) -> None:
    async with running_server(
        tls_config(server_pem(ca, tmp_path / "s.pem"), ["tls://127.0.0.1:0"])
    ) as server:  # type: ignore[arg-type]
        with trio.fail_after(10):
            plain = await trio.open_tcp_stream("127.0.0.1", port_of(server.addresses[0]))
            await plain.send_all(b"GET / HTTP/1.0\r\n\r\n")
            with pytest.raises(trio.BrokenResourceError):  # noqa: PT012 - read until the server hangs up
                while await plain.receive_some(100):
                    pass
                raise trio.BrokenResourceError("closed")  # a clean EOF counts as rejected too
            await plain.aclose()
            while "tls_handshake" not in server.stats.closed:  # noqa: ASYNC110
                await trio.sleep(0.01)
            # and the server keeps serving TLS clients
            good = await tls_client(server.addresses[0], ca)
            assert await round_trip(good, b"still fine") == b"still fine"
            await good.aclose()


async def test_silent_client_is_closed_at_the_handshake_limit_mock_clock(
    ca: trustme.CA, autojump_clock: trio.testing.MockClock
) -> None:
    # A client that connects and never starts the handshake: closed at tls_handshake_timeout, not
    # held until the (much longer) idle timeout.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    client, server_side = trio.testing.memory_stream_pair()
    policy = ConnectionPolicy(idle_timeout=300.0, tls_handshake_timeout=10.0)
    conn = Connection(trio.SSLStream(server_side, context, server_side=True), EchoSession(1024), policy)
    reason = await conn.run()
    assert reason == "tls_handshake"
    assert trio.current_time() == pytest.approx(10.0)
    assert await client.receive_some(100) == b""  # the server end is closed


async def test_silent_client_is_closed_at_the_handshake_limit(ca: trustme.CA, tmp_path: Path) -> None:
    config = make_config(
        server={"listen": ["tls://127.0.0.1:0"]},
        tls={"cert_file": server_pem(ca, tmp_path / "s.pem"), "key_file": str(tmp_path / "s.pem")},
        limits={"tls_handshake_timeout": 0.5, "idle_timeout": 60.0},
    )
    async with running_server(config) as server:
        with trio.fail_after(10):
            silent = await trio.open_tcp_stream("127.0.0.1", port_of(server.addresses[0]))
            started = trio.current_time()
            with contextlib.suppress(trio.BrokenResourceError):
                assert await silent.receive_some(100) == b""  # closed by the server, not by us
            assert 0.4 < trio.current_time() - started < 5
            while server.stats.closed.get("tls_handshake", 0) < 1:  # noqa: ASYNC110
                await trio.sleep(0.01)
            assert "idle" not in server.stats.closed
            await silent.aclose()


async def test_reload_picks_up_a_renewed_certificate(ca: trustme.CA, tmp_path: Path) -> None:
    pem = server_pem(ca, tmp_path / "s.pem")
    config = tls_config(pem, ["tls://127.0.0.1:0"])
    async with running_server(config) as server:  # type: ignore[arg-type]
        with trio.fail_after(10):
            first = await tls_client(server.addresses[0], ca)
            assert await round_trip(first, b"a") == b"a"
            before = first.getpeercert(binary_form=True)
            server_pem(ca, tmp_path / "s.pem")  # renewed in place
            await server.reconfigure(config)  # type: ignore[arg-type]
            second = await tls_client(server.addresses[0], ca)
            assert await round_trip(second, b"b") == b"b"
            assert second.getpeercert(binary_form=True) != before
            assert await round_trip(first, b"c") == b"c"  # the open connection kept its session
            await first.aclose()
            await second.aclose()


def test_unreadable_certificate_is_a_config_error(tmp_path: Path) -> None:
    config = tls_config(str(tmp_path / "missing.pem"), ["tls://127.0.0.1:0"])
    with pytest.raises(ConfigError, match=r"tls\.cert_file = .*cannot load the certificate and key"):
        EchoServer(config)  # type: ignore[arg-type]


async def run_cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "trio_echo", *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def test_client_and_bench_speak_tls(ca: trustme.CA, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with running_server(
        tls_config(server_pem(ca, tmp_path / "s.pem"), ["tls://127.0.0.1:0"])
    ) as server:  # type: ignore[arg-type]
        address = f"tls://{server.addresses[0]}"
        client = await run_cli("client", address, "--ca", str(ca_file), stdin=b"over tls\n")
        assert (client.returncode, client.stdout) == (0, b"over tls\n"), client.stderr
        untrusted = await run_cli("client", address, stdin=b"x\n")  # the system store does not know our CA
        assert untrusted.returncode == 1
        assert b"TLS handshake with" in untrusted.stderr
        for mode in ("pingpong", "stream"):
            bench = await run_cli(
                "bench",
                address,
                "--insecure",
                "--mode",
                mode,
                "--duration",
                "1",
                "--connections",
                "2",
                "--json",
            )
            result = json.loads(bench.stdout)
            assert bench.returncode == 0, (mode, result["error_kinds"], bench.stderr)
            assert result["verified"] is True
