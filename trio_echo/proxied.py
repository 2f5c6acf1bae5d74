"""PROXY protocol listeners (I/O): read exactly the header a load balancer sends, then hand on.

The parsing is pure (:mod:`trio_echo.proxyproto`); this module only peeks at the socket, feeds the
parser and consumes what it says is header, so the client's first bytes stay in the kernel for the echo
pump or a TLS handshake.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio

from .config import ListenerConfig
from .proxyproto import HeaderParser, ProxyHeader, ProxyHeaderError

PROXY_HEADER_TIMEOUT = 3.0  # seconds a proxy gets to deliver the whole PROXY header

# Called with the socket and the header, or with None and what was wrong.
OnHeader = Callable[[socket.socket, ProxyHeader | None, str], None]


async def read_proxy_header(sock: socket.socket, parser: HeaderParser) -> ProxyHeader:
    """Read exactly the PROXY header off a non-blocking socket and return it.

    Peeks, lets the parser say how many of the bytes are header, and consumes only those. Bytes peeked
    before the header's end all belong to it, so every peek is consumed and the wait never spins on
    the same bytes.

    Raises:
        ProxyHeaderError: the bytes are not a valid header, or the peer closed before it was complete.
        OSError: the connection failed.
    """
    while parser.header is None:
        try:
            peeked = sock.recv(parser.wanted, socket.MSG_PEEK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not peeked:
            raise ProxyHeaderError("the connection closed before its PROXY header was complete")
        sock.recv(parser.feed(peeked))  # all there already: recv returns exactly that much
    return parser.header


async def receive_header(sock: socket.socket, options: ListenerConfig, on_header: OnHeader) -> None:
    """Read the header within ``PROXY_HEADER_TIMEOUT`` and pass the socket on with it (or with None and
    the problem: malformed, wrong version, truncated, late, or the connection failed). Owns ``sock``
    until ``on_header`` is called; closes it if cancelled first (a hard stop)."""
    parser = HeaderParser(options.proxy_protocol)
    problem = f"no complete PROXY header within {PROXY_HEADER_TIMEOUT:g} s"
    try:
        with trio.move_on_after(PROXY_HEADER_TIMEOUT):
            await read_proxy_header(sock, parser)
    except ProxyHeaderError as exc:
        problem = str(exc)
    except OSError as exc:
        problem = f"connection failed before its PROXY header: {exc.strerror or exc}"
    except BaseException:
        sock.close()  # cancelled: nobody else will close it
        raise
    on_header(sock, parser.header, problem)
