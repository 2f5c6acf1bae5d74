"""``trio-echo client`` in a subprocess against real servers: every ADDR form and the --bye exit codes."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile

import pytest
import trio

from tests.conftest import make_config, needs_ipv6, running_server


async def client(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(
            [sys.executable, "-m", "trio_echo", "client", *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


@pytest.mark.parametrize("listen", ["127.0.0.1:0", pytest.param("[::1]:0", marks=needs_ipv6), "unix"])
async def test_interactive_echo_over_every_address_form(listen: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        if listen == "unix":
            listen = f"unix:{os.path.join(directory, 'e.sock')}"
        config = make_config(server={"listen": [listen], "farewell": "bye\n"})
        async with running_server(config) as server:
            result = await client(server.addresses[0], stdin=b"hello\nworld\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello\nworld\nbye\n"  # input echoed; the farewell after our EOF


@pytest.mark.parametrize(
    ("server_section", "code", "stdout", "stderr"),
    [
        ({"farewell": "bye\n"}, 0, b"bye\n", b""),
        ({"farewell": "bye\n", "greeting": "welcome\n"}, 0, b"bye\n", b""),
        ({}, 1, b"", b"the echo matched, but no farewell came before EOF"),
    ],
)
async def test_bye_handshake_exit_codes(
    server_section: dict[str, str], code: int, stdout: bytes, stderr: bytes
) -> None:
    config = make_config(server={"listen": ["127.0.0.1:0"], **server_section})
    async with running_server(config) as server:
        result = await client(server.addresses[0], "--bye", "hello hyper-v")
    assert (result.returncode, result.stdout) == (code, stdout), result.stderr
    assert stderr in result.stderr


async def test_bye_detects_a_corrupted_echo() -> None:
    async def flipper(stream: trio.SocketStream) -> None:
        data = bytearray()
        while chunk := await stream.receive_some(1000):
            data += chunk
        data[0] ^= 0x01
        await stream.send_all(bytes(data) + b"bye\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(functools.partial(trio.serve_tcp, flipper, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        result = await client(f"127.0.0.1:{port}", "--bye", "hello")
        nursery.cancel_scope.cancel()
    assert result.returncode == 1
    assert b"the echo did not match what was sent" in result.stderr


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:1", b"cannot connect to 127.0.0.1:1"),
        ("nonsense", b"expected HOST:PORT"),
        ("udp://127.0.0.1:1", b"--bye and TLS need a stream; udp:// has none"),
    ],
)
async def test_client_errors_are_one_line(address: str, message: bytes) -> None:
    result = await client(address, "--bye", "x")
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stderr.count(b"\n") == 1
