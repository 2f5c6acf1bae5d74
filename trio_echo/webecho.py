"""The web echo's decisions (pure): which answer a request gets, how its query shapes it, and the JSON
document that echoes it.

The I/O side (:mod:`trio_echo.web`) reads a request with h11, asks :func:`route` what it is, and for
the JSON echo hands :func:`echo_document` what it read and what it knows of the connection. Nothing
here reads a socket or a clock, so every rule is a row in a table test.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
import urllib.parse
from collections.abc import Mapping, Sequence
from http import HTTPStatus

import attrs

from .proxyproto import ProxyHeader

MAX_DELAY = 60.0  # seconds ?delay= may hold an answer (PRODUCT.md)
WEBSOCKET_VERSION = "13"  # RFC 6455; a client offering another gets 426 naming this one
# The 1xx a server may send as an interim answer before its final one (101 would switch protocols).
_INTERIM_ONLY = range(100, 200)

# PROXY v2 TLV types by name (proxy-protocol.txt, section 2.2).
TLV_NAMES = {
    0x01: "alpn",
    0x02: "authority",
    0x03: "crc32c",
    0x04: "noop",
    0x05: "unique_id",
    0x20: "ssl",
    0x30: "netns",
}

Headers = Sequence[tuple[str, str]]


class Route(enum.Enum):
    """What a request gets."""

    WEBSOCKET = "websocket"  # an upgrade: the WebSocket echo
    PAGE = "page"  # a browser asking for /: the page that tries the WebSocket echo
    ECHO = "echo"  # anything else: the request echoed as JSON


class BadRequest(ValueError):
    """The request cannot be answered as asked; ``status`` is the answer (400, 426) and the message
    one line naming the problem. ``headers`` go with the answer (426 names the version we speak)."""

    def __init__(self, message: str, status: int = 400, headers: Headers = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = tuple(headers)


@attrs.frozen
class Shape:
    """How the query shapes the JSON answer: its final status, interim 1xx answers, a delay."""

    status: int = 200
    interim: int | None = None
    delay: float = 0.0


def _values(headers: Headers, name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name]


def _tokens(headers: Headers, name: str) -> set[str]:
    """The comma-separated tokens of every ``name`` header, lowercase (``Connection: keep-alive,
    Upgrade``)."""
    return {token.strip().lower() for value in _values(headers, name) for token in value.split(",")}


def route(method: str, path: str, headers: Headers) -> Route:
    """The upgrade to a WebSocket wins on any path; ``GET /`` from a browser (it accepts text/html)
    gets the page; everything else is echoed."""
    if "websocket" in _tokens(headers, "upgrade"):
        return Route.WEBSOCKET
    if (
        method in ("GET", "HEAD")
        and path == "/"
        and any("text/html" in v for v in _values(headers, "accept"))
    ):
        return Route.PAGE
    return Route.ECHO


def check_websocket(method: str, headers: Headers) -> None:
    """Raise :class:`BadRequest` unless the request is a WebSocket opening handshake we can accept
    (RFC 6455 section 4.2.1), so the client hears what is wrong instead of a bare close."""
    if method != "GET":
        raise BadRequest(f"a WebSocket handshake is a GET, not {method}")
    if "upgrade" not in _tokens(headers, "connection"):
        raise BadRequest("a WebSocket handshake needs 'Connection: Upgrade'")
    versions = _values(headers, "sec-websocket-version")
    if versions != [WEBSOCKET_VERSION]:
        raise BadRequest(
            f"unsupported Sec-WebSocket-Version {', '.join(versions) or '(none)'}; this server speaks "
            f"{WEBSOCKET_VERSION}",
            426,
            [("sec-websocket-version", WEBSOCKET_VERSION)],
        )
    keys = _values(headers, "sec-websocket-key")
    if len(keys) != 1 or _key_length(keys[0]) != 16:
        raise BadRequest("Sec-WebSocket-Key must be one base64-encoded 16-byte value")


def _key_length(key: str) -> int:
    try:
        return len(base64.b64decode(key.strip(), validate=True))
    except (binascii.Error, ValueError):
        return -1


def first_subprotocol(headers: Headers) -> str | None:
    """The first subprotocol the client offers (``Sec-WebSocket-Protocol``), which the echo selects."""
    for value in _values(headers, "sec-websocket-protocol"):
        for token in value.split(","):
            if token.strip():
                return token.strip()
    return None


def split_target(target: str) -> tuple[str, str]:
    """``(path, query)`` of a request target as received (percent-encoding kept)."""
    path, _, query = target.partition("?")
    return path, query


def query_pairs(query: str) -> list[list[str]]:
    """The query's ``name=value`` pairs, decoded, in order, repeats kept (``[name, value]`` lists,
    like the headers)."""
    return [[name, value] for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True)]


def shape(query: str) -> Shape:
    """``?status=N`` (100-599; a 1xx other than 101 is sent as an interim answer before a 200) and
    ``?delay=S`` (0-60 seconds). Raises :class:`BadRequest` naming the bad value."""
    status, interim, delay = 200, None, 0.0
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name == "status":
            if not (value.isascii() and value.isdigit()) or not 100 <= int(value) <= 599 or value == "101":
                raise BadRequest(f"status={value!r}: expected an HTTP status from 100 to 599 (not 101)")
            if int(value) in _INTERIM_ONLY:
                interim = int(value)
            else:
                status = int(value)
        elif name == "delay":
            try:
                delay = float(value)
            except ValueError:
                raise BadRequest(f"delay={value!r}: expected seconds, e.g. delay=0.5") from None
            if not math.isfinite(delay) or not 0.0 <= delay <= MAX_DELAY:
                raise BadRequest(f"delay={value!r}: expected seconds from 0 to {MAX_DELAY:g}")
    return Shape(status=status, interim=interim, delay=delay)


PHRASES = {status.value: status.phrase for status in HTTPStatus}


def response_head(status: int, headers: Headers) -> bytes:
    """An HTTP/1.1 answer's status line and headers, ready to send. Written here rather than through
    h11, whose header validation of our own (constant) headers cost more than the whole JSON echo
    (measured, docs/performance.md); h11 still parses every request."""
    lines = [f"HTTP/1.1 {status} {PHRASES.get(status, '')}".rstrip(), *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def keeps_alive(http_version: str, headers: Headers) -> bool:
    """Whether the client wants the connection kept for another request: HTTP/1.1 without
    ``Connection: close`` (HTTP/1.0 clients get one answer, as h11 would have it)."""
    return http_version == "1.1" and "close" not in _tokens(headers, "connection")


def may_have_body(method: str, status: int) -> bool:
    """Whether the answer carries its JSON: not for HEAD, 1xx, 204 and 304 (RFC 9110)."""
    return method != "HEAD" and status >= 200 and status not in (204, 304)


def body_fields(body: bytes) -> dict[str, str]:
    """``{"body": text}`` when the body is UTF-8, else ``{"body_base64": ...}``."""
    try:
        return {"body": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"body_base64": base64.b64encode(body).decode("ascii")}


def _address(value: tuple[str, int] | str | None) -> object:
    if isinstance(value, tuple):
        return {"ip": value[0], "port": value[1]}
    return value  # a Unix path, or None


def proxy_fields(header: ProxyHeader | None) -> dict[str, object] | None:
    """The PROXY header as the JSON shows it: version, source, destination and TLVs (each with its
    type, its name when the spec names it, and its value as text or base64)."""
    if header is None:
        return None
    tlvs = []
    for kind, value in header.tlvs:
        tlv: dict[str, object] = {"type": kind}
        if kind in TLV_NAMES:
            tlv["name"] = TLV_NAMES[kind]
        try:
            text = value.decode("utf-8")
            tlv.update({"value": text} if text.isprintable() else {"value_base64": _b64(value)})
        except UnicodeDecodeError:
            tlv["value_base64"] = _b64(value)
        tlvs.append(tlv)
    return {
        "version": header.version,
        "local": header.local,
        "source": _address(header.source),
        "destination": _address(header.destination),
        "tlvs": tlvs,
    }


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def certificate_subject(certificate: Mapping[str, object] | None) -> str | None:
    """A client certificate's subject as ``CN=alice,O=example`` (``getpeercert()``'s nested tuples)."""
    if not certificate:
        return None
    subject = certificate.get("subject", ())
    parts = [
        f"{_SUBJECT_KEYS.get(key, key)}={value}"
        for rdn in subject  # type: ignore[attr-defined]
        for key, value in rdn
    ]
    return ",".join(parts) or None


_SUBJECT_KEYS = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
}


def echo_document(
    *,
    method: str,
    target: str,
    http_version: str,
    headers: Headers,
    body: bytes,
    connection: Mapping[str, object],
) -> dict[str, object]:
    """The JSON echo of one request: what was asked, exactly as received, and what the server knows
    of the connection it came on."""
    path, query = split_target(target)
    return {
        "method": method,
        "path": path,
        "query": query_pairs(query),
        "http_version": http_version,
        "headers": [[name, value] for name, value in headers],
        **body_fields(body),
        "connection": dict(connection),
    }


def render(document: Mapping[str, object]) -> bytes:
    """The answer's body: compact JSON (``| jq`` shows it indented) and a final newline. Not
    indented here: an ``indent`` makes the json module use its pure-Python encoder, which cost a
    third of the server's CPU per request (measured, docs/performance.md)."""
    return json.dumps(document, ensure_ascii=False).encode("utf-8") + b"\n"


def error_document(status: int, message: str) -> bytes:
    """The body of an error answer: JSON too, so a client parsing every answer gets the reason."""
    return render({"error": message, "status": status})
