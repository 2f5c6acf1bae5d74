"""ADDR parsing and formatting (pure).

Forms (PRODUCT.md): ``HOST:PORT``, ``[V6ADDR]:PORT``, ``:PORT`` (every family: 0.0.0.0 and ::),
``unix:/path``; an optional scheme selects the transport: ``tcp://`` (default), ``tls://``, ``udp://``,
``http://`` and ``https://`` (the web echo).
"""

from __future__ import annotations

import ipaddress
import re

import attrs

from .errors import AddressError

TRANSPORTS = ("tcp", "tls", "udp", "http", "https")
WEB_TRANSPORTS = ("http", "https")  # the web echo (web.py): WebSocket and HTTP on one port
TLS_TRANSPORTS = ("tls", "https")  # the ones with the [tls] certificate

# RFC 1123 host names; a label may start with a digit. IPv4 literals match this too.
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


@attrs.frozen
class Address:
    """A parsed ADDR.

    ``host`` is ``None`` for the ``:PORT`` form (every address family); ``path`` is set only for Unix
    sockets, whose ``port`` is 0.
    """

    transport: str = "tcp"
    host: str | None = None
    port: int = 0
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        scheme = "" if self.transport == "tcp" else f"{self.transport}://"  # (ws, wss: bench targets)
        if self.path is not None:
            return f"{scheme}unix:{self.path}"
        if self.host is None:
            return f"{scheme}:{self.port}"
        return f"{scheme}{format_host_port(self.host, self.port)}"


def format_host_port(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 literal."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_sockaddr(sockaddr: object) -> str:
    """Format a socket address as returned by ``getsockname``/``accept`` for humans and logs.

    IPv4/IPv6 tuples become ``host:port``/``[host]:port``; a Unix path becomes ``unix:PATH`` (an unnamed
    Unix peer becomes ``unix:``).
    """
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return format_host_port(str(sockaddr[0]), int(sockaddr[1]))
    if isinstance(sockaddr, bytes):
        sockaddr = sockaddr.decode("utf-8", "backslashreplace")
    return f"unix:{sockaddr}"


def parse_address(text: str) -> Address:
    """Parse one ADDR string.

    Raises:
        AddressError: with a message naming what is wrong (empty host, bad port, missing brackets, ...).
    """
    if not isinstance(text, str):
        raise AddressError(f"an address must be a string, not {type(text).__name__}")
    rest = text.strip()
    transport = "tcp"
    if "://" in rest:
        transport, _, rest = rest.partition("://")
        if transport not in TRANSPORTS:
            raise AddressError(
                f"unknown scheme {transport!r} in {text!r} (expected one of {', '.join(TRANSPORTS)})"
            )
    if rest.startswith("unix:"):
        path = rest[len("unix:") :]
        if not path:
            raise AddressError(f"{text!r}: a Unix socket address needs a path after 'unix:'")
        if "\0" in path:
            raise AddressError(f"{text!r}: a Unix socket path may not contain NUL")
        if transport == "udp":
            raise AddressError(f"{text!r}: UDP over Unix sockets is not supported")
        return Address(transport=transport, path=path)
    host: str | None
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0 or not rest[close + 1 :].startswith(":"):
            raise AddressError(f"{text!r}: expected [IPV6]:PORT")
        host = rest[1:close]
        port_text = rest[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host_text, sep, port_text = rest.rpartition(":")
        if not sep:
            raise AddressError(f"{text!r}: expected HOST:PORT, [IPV6]:PORT, :PORT or unix:/path")
        if ":" in host_text:
            raise AddressError(f"{text!r}: put IPv6 addresses in brackets, e.g. [::1]:40007")
        if host_text and not _HOSTNAME.match(host_text):
            raise AddressError(f"{text!r}: {host_text!r} is not a valid host name or IPv4 address")
        host = host_text or None
    port = _parse_port(text, port_text)
    return Address(transport=transport, host=host, port=port)


def _parse_port(text: str, port_text: str) -> int:
    if not port_text.isdigit() or not port_text.isascii():
        raise AddressError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise AddressError(f"{text!r}: port {port} is out of range 0-65535")
    return port


WEBSOCKET_SCHEMES = {"ws": 80, "wss": 443}


def parse_websocket_url(text: str) -> tuple[Address, str]:
    """A ``ws://HOST[:PORT][/PATH]`` or ``wss://...`` URL (what ``trio-echo bench`` drives a web
    echo with): the address (transport ``ws`` or ``wss``, the scheme's port by default) and the path
    with its query (``/`` by default).

    Raises:
        AddressError: naming what is wrong.
    """
    scheme, sep, rest = text.strip().partition("://")
    if not sep or scheme not in WEBSOCKET_SCHEMES:
        raise AddressError(f"{text!r}: expected ws://HOST[:PORT][/PATH] or wss://...")
    authority, slash, path = rest.partition("/")
    resource = slash + path or "/"
    if "@" in authority:
        raise AddressError(f"{text!r}: user names in the URL are not supported")
    if authority.startswith("[") and authority.endswith("]"):
        authority += f":{WEBSOCKET_SCHEMES[scheme]}"  # [V6ADDR] without a port
    elif ":" not in authority:
        authority += f":{WEBSOCKET_SCHEMES[scheme]}"
    if authority.startswith(":"):
        raise AddressError(f"{text!r}: the URL needs a host")
    try:
        address = parse_address(authority)
    except AddressError as exc:
        raise AddressError(f"{text!r}: {exc}") from None
    return attrs.evolve(address, transport=scheme), resource
