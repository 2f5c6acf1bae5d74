"""HTTP on the admin port: read one request head with h11 (bounded size), answer it, close.

WebSocket upgrades are handed on with a stream that replays the bytes already read, so trio-websocket
sees the handshake from its first byte.
"""

from __future__ import annotations

from http import HTTPStatus

import h11
import trio

MAX_HEAD = 16 * 1024
SECURITY_HEADERS = [
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    # The dashboard loads and connects to nothing but its own origin.
    (
        "content-security-policy",
        "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; "
        "script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
]


class BadRequest(Exception):
    """The request head is malformed, too large, or the peer closed early. ``connection`` can still
    send the 400 (h11 allows a response after the peer's protocol error)."""

    def __init__(self, message: str, connection: h11.Connection) -> None:
        super().__init__(message)
        self.connection = connection


class Request:
    """A parsed request head: method, target, lowercase headers, and the raw bytes read so far."""

    def __init__(self, event: h11.Request, raw: bytes, connection: h11.Connection) -> None:
        self.method = event.method.decode("ascii", "replace")
        self.target = event.target.decode("ascii", "replace")
        self.headers = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in event.headers
        }
        self.raw = raw
        self.connection = connection


async def read_request(stream: trio.abc.Stream) -> Request:
    """Read one request head (at most MAX_HEAD bytes). Raises BadRequest."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    raw = bytearray()
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadRequest(str(exc), connection) from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            if not data:
                raise BadRequest("connection closed before the request head ended", connection)
            raw += data
            connection.receive_data(bytes(data))
        elif isinstance(event, h11.Request):
            return Request(event, bytes(raw), connection)
        else:
            raise BadRequest("expected a request", connection)


def _headers(body: bytes, content_type: str) -> list[tuple[str, str]]:
    """Every answer's headers: one response per connection, then close."""
    return [
        ("content-type", content_type),
        ("content-length", str(len(body))),
        ("connection", "close"),
        *SECURITY_HEADERS,
    ]


def request_timeout_answer() -> bytes:
    """A complete ``408 Request Timeout`` answer, for a client whose head never finished (h11 sends
    responses only to requests it has seen, so this one is written by hand)."""
    body = b"request head not received in time\n"
    head = "".join(f"{name}: {value}\r\n" for name, value in _headers(body, "text/plain; charset=utf-8"))
    return b"HTTP/1.1 408 Request Timeout\r\n" + head.encode("ascii") + b"\r\n" + body


async def respond(
    stream: trio.abc.Stream,
    connection: h11.Connection,
    status: int,
    body: bytes = b"",
    *,
    content_type: str = "text/plain; charset=utf-8",
    head_only: bool = False,
    extra_headers: list[tuple[str, str]] | None = None,
) -> None:
    """Send one complete response; the connection is closed afterwards (``connection: close``)."""
    headers = [*_headers(body, content_type), *(extra_headers or [])]
    phrase = HTTPStatus(status).phrase.encode()
    data = connection.send(h11.Response(status_code=status, headers=headers, reason=phrase)) or b""
    if body and not head_only:
        data += connection.send(h11.Data(data=body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


class ReplayStream(trio.abc.Stream):
    """A stream that first returns ``prefix`` and then reads from ``inner``."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self._inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            chunk, self._prefix = bytes(self._prefix[:size]), self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return chunk
        return await self._inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._inner.aclose()
