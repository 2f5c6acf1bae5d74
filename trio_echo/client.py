"""``trio-echo client ADDR [--bye MESSAGE]``: an interactive echo client, and the Hyper-V handshake.

Interactive (like ``nc``): standard input goes to the server as it comes, what the server sends goes to
standard output; end of input (Ctrl-D) half-closes, and whatever the server still sends (the end of the
echo, a farewell) is printed until it closes. ``--bye MESSAGE`` sends MESSAGE plus a newline,
half-closes, checks the echo byte for byte and prints what follows it; exit 0 only for a verified echo
followed by a non-empty farewell (PRODUCT.md).
"""

from __future__ import annotations

import argparse
import ssl
import sys
from typing import BinaryIO

import trio

from .addresses import Address, parse_address
from .errors import AddressError, TrioEchoError

EXIT_OK = 0
EXIT_FAILED = 1
READ_SIZE = 65536
TLS_LAST_ECHO_WAIT = 1.0  # interactive TLS: after end of input, how long to wait for the last echo
UDP_LAST_ECHO_WAIT = 1.0  # interactive UDP: the same (no EOF will come: UDP has no connection)
MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4


class ClientError(TrioEchoError):
    """Why the client could not do its job, in one line."""


def tls_context(*, ca: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """A client context: the system's trust store, or ``ca``; ``insecure`` accepts any certificate
    (self-signed test servers)."""
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ClientError(f"cannot load the CA file {ca}: {exc}") from None
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def connect(address: Address, tls: ssl.SSLContext | None = None) -> trio.abc.Stream:
    """Open a stream to ``address`` (TCP v4/v6 by name or literal, or a Unix socket); TLS for
    ``tls://`` addresses or when a context is given (a default one for ``tls://`` without it)."""
    if address.transport == "udp":
        raise ClientError(f"{address}: UDP has no streams (use connect_datagram)")
    if address.transport == "tls" and tls is None:
        tls = tls_context()
    try:
        if address.path is not None:
            stream: trio.abc.Stream = await trio.open_unix_socket(address.path)
        else:
            stream = await trio.open_tcp_stream(address.host or "localhost", address.port)
    except OSError as exc:
        raise ClientError(f"cannot connect to {address}: {exc.strerror or exc}") from None
    if tls is None:
        return stream
    secure = trio.SSLStream(stream, tls, server_hostname=address.host or "localhost")
    try:
        await secure.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(secure)
        raise ClientError(f"TLS handshake with {address} failed: {exc.__cause__ or exc}") from None
    return secure


async def connect_datagram(address: Address) -> trio.socket.SocketType:
    """A UDP socket connected to ``address`` (``udp://HOST:PORT``): ``send``/``recv`` reach only it,
    and an ICMP port-unreachable surfaces as ConnectionRefusedError."""
    host = address.host or "localhost"
    try:
        infos = await trio.socket.getaddrinfo(host, address.port, type=trio.socket.SOCK_DGRAM)
    except OSError as exc:
        raise ClientError(f"cannot resolve {host!r}: {exc.strerror or exc}") from None
    family, kind, proto, _name, sockaddr = infos[0]
    sock = trio.socket.socket(family, kind, proto)
    try:
        await sock.connect(sockaddr)
    except OSError as exc:
        sock.close()
        raise ClientError(f"cannot connect to {address}: {exc.strerror or exc}") from None
    return sock


async def _read_to_end(stream: trio.abc.ReceiveStream, sink: BinaryIO | None = None) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(READ_SIZE):
        data += chunk
        if sink is not None:
            sink.write(chunk)
            sink.flush()
    return bytes(data)


async def bye(
    address: Address,
    message: str,
    *,
    out: BinaryIO,
    err: BinaryIO,
    within: float,
    tls: ssl.SSLContext | None = None,
) -> int:
    """The Hyper-V sample's handshake: send, half-close, verify the echo, print the farewell."""
    payload = message.encode() + b"\n"
    stream = await connect(address, tls)
    if not isinstance(stream, trio.abc.HalfCloseableStream):
        raise ClientError(f"{address}: --bye needs a half-close, which TLS streams cannot do")
    async with stream:
        with trio.move_on_after(within) as scope:
            await stream.send_all(payload)
            await stream.send_eof()
            received = await _read_to_end(stream)
    if scope.cancelled_caught:
        err.write(f"trio-echo client: no EOF from {address} within {within:g} s\n".encode())
        return EXIT_FAILED
    start = received.find(payload)  # anything before it is a greeting
    if start < 0:
        err.write(b"trio-echo client: the echo did not match what was sent\n")
        return EXIT_FAILED
    farewell = received[start + len(payload) :]
    out.write(farewell)
    out.flush()
    if not farewell:
        err.write(b"trio-echo client: the echo matched, but no farewell came before EOF\n")
        return EXIT_FAILED
    return EXIT_OK


async def interactive(
    address: Address, *, stdin: BinaryIO, out: BinaryIO, tls: ssl.SSLContext | None = None
) -> int:
    """Copy stdin to the server and the server to stdout until both directions are done."""
    stream = await connect(address, tls)
    async with stream:

        async def pump_input() -> None:
            while True:
                line = await trio.to_thread.run_sync(stdin.readline, abandon_on_cancel=True)
                if not line:
                    break
                await stream.send_all(line)
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            else:
                # TLS cannot half-close: give the last echo a moment to arrive, then hang up.
                await trio.sleep(TLS_LAST_ECHO_WAIT)
                nursery.cancel_scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump_input)
                await _read_to_end(stream, out)
                nursery.cancel_scope.cancel()  # the server closed: stop reading input too
        except* trio.BrokenResourceError:
            raise ClientError(f"{address} reset the connection") from None
    return EXIT_OK


async def interactive_datagrams(address: Address, *, stdin: BinaryIO, out: BinaryIO) -> int:
    """UDP: each line of stdin is one datagram; every reply is printed as it comes."""
    sock = await connect_datagram(address)
    with sock:

        async def pump_input() -> None:
            while line := await trio.to_thread.run_sync(stdin.readline, abandon_on_cancel=True):
                await sock.send(line[:MAX_DATAGRAM])
            await trio.sleep(UDP_LAST_ECHO_WAIT)
            nursery.cancel_scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump_input)
                while True:
                    out.write(await sock.recv(MAX_DATAGRAM))
                    out.flush()
        except* ConnectionRefusedError:
            raise ClientError(f"nothing answers at {address} (ICMP port unreachable)") from None
    return EXIT_OK


def main(args: argparse.Namespace) -> int:
    """Entry point from the CLI; one line on stderr and exit 1 when something fails."""
    try:
        address = parse_address(args.address)
        tls = (
            tls_context(ca=args.ca, insecure=args.insecure)
            if (args.tls or args.ca or args.insecure)
            else None
        )
        if address.transport == "udp":
            if args.bye is not None or tls is not None:
                raise ClientError("--bye and TLS need a stream; udp:// has none")
            return trio.run(
                lambda: interactive_datagrams(address, stdin=sys.stdin.buffer, out=sys.stdout.buffer)
            )
        if args.bye is not None:
            return trio.run(
                lambda: bye(
                    address,
                    args.bye,
                    out=sys.stdout.buffer,
                    err=sys.stderr.buffer,
                    within=args.timeout,
                    tls=tls,
                )
            )
        return trio.run(lambda: interactive(address, stdin=sys.stdin.buffer, out=sys.stdout.buffer, tls=tls))
    except (ClientError, AddressError) as exc:
        print(f"trio-echo client: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls", action="store_true", help="speak TLS (implied by a tls:// ADDR)")
    parser.add_argument("--ca", metavar="FILE", help="trust this CA bundle (PEM) instead of the system's")
    parser.add_argument(
        "--insecure", action="store_true", help="accept any server certificate (self-signed tests)"
    )
