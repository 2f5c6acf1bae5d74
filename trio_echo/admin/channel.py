"""One admin channel: a WebSocket session with one operator's dashboard or ``trio-echo admin``.

On connect the server sends ``hello``, then ``stats`` every ``stats_interval``; ``trace`` messages flow
while subscribed; every request gets one reply. A malformed or unknown message gets an ``error`` and the
channel stays open. A slow client only ever delays its own channel: its trace subscription drops the
oldest events instead of queueing without bound.
"""

from __future__ import annotations

import socket as stdlib_socket
import sys

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from trio_echo._version import __version__
from trio_echo.events import format_flags
from trio_echo.reasons import Reason
from trio_echo.stats import ConnectionInfo
from trio_echo.trace import Subscriber

from . import protocol
from .listing import select
from .tcpinfo import SIZE, parse_tcp_info
from .view import ServerView


def _socket_of(info: ConnectionInfo) -> stdlib_socket.socket | trio.socket.SocketType | None:
    sock: object = info.handle.stream if info.handle is not None else None
    if isinstance(sock, trio.SocketStream):
        sock = sock.socket
    if isinstance(sock, stdlib_socket.socket | trio.socket.SocketType) and sock.family in (
        stdlib_socket.AF_INET,
        stdlib_socket.AF_INET6,
    ):
        return sock
    return None


def tcp_info(info: ConnectionInfo) -> dict[str, int]:
    """TCP_INFO figures of the connection's socket (Linux TCP only; ``{}`` elsewhere)."""
    sock = _socket_of(info)
    if sys.platform != "linux" or sock is None:
        return {}
    try:
        raw = sock.getsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_INFO, SIZE)
    except OSError:  # it may be closing as we ask
        return {}
    return parse_tcp_info(raw)


def rtt_of(info: ConnectionInfo) -> int:
    return tcp_info(info).get("rtt_us", -1)


def connection_item(info: ConnectionInfo, now: float) -> dict[str, object]:
    item: dict[str, object] = {
        "id": info.id,
        "peer": info.peer,
        "listener": info.listener,
        "age": round(now - info.opened, 3),
        "bytes_in": info.bytes_in,
        "bytes_out": info.bytes_out,
    }
    if info.proxy:
        item["proxy"] = info.proxy
    item.update(tcp_info(info))
    return item


class AdminChannel:
    def __init__(self, ws: WebSocketConnection, server: ServerView, stats_interval: float) -> None:
        self._ws = ws
        self._server = server
        self._interval = stats_interval
        self._subscriber: Subscriber | None = None
        self._subscribed = trio.Event()

    async def run(self) -> None:
        """Serve the channel until the client goes away."""
        try:
            await self._send(
                protocol.hello(__version__, self._server.listener_descriptions(), self._server.tracer.flags)
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stats_loop)
                nursery.start_soon(self._trace_loop)
                await self._request_loop()
                nursery.cancel_scope.cancel()
        except* ConnectionClosed:
            pass  # the client went away: the channel's normal end
        finally:
            self._unsubscribe()

    async def _send(self, message: dict[str, object]) -> None:
        await self._ws.send_message(protocol.encode(message))

    async def _stats_loop(self) -> None:
        while True:
            snapshot = self._server.stats.snapshot(trio.current_time())
            await self._send({"type": "stats", **snapshot})
            await trio.sleep(self._interval)

    async def _trace_loop(self) -> None:
        while True:
            subscriber = self._subscriber
            if subscriber is None:
                await self._subscribed.wait()
                self._subscribed = trio.Event()
                continue
            for event in await subscriber.get_batch():
                await self._send({"type": "trace", "event": event.to_dict()})

    async def _request_loop(self) -> None:
        while True:
            message = await self._ws.get_message()
            await self._send(self.handle(protocol.parse_request(message)))

    def handle(self, request: protocol.Request) -> dict[str, object]:
        """The reply to one request (and its effect)."""
        server = self._server
        match request:
            case protocol.Subscribe(flags=flags):
                self._unsubscribe()
                self._subscriber = server.tracer.subscribe(flags)
                self._subscribed.set()
                return protocol.reply("subscribe", ok=True, flags=format_flags(flags))
            case protocol.Unsubscribe():
                self._unsubscribe()
                return protocol.reply("unsubscribe", ok=True)
            case protocol.ListConnections() as query:
                now = trio.current_time()
                connections = server.stats.connections.values()
                total, page = select(connections, query, rtt=rtt_of if query.sort == "rtt_us" else None)
                items = [connection_item(info, now) for info in page]
                return protocol.reply("connections", items=items, total=total, offset=query.offset)
            case protocol.CloseConnection(id=conn_id):
                if server.close_connection(conn_id, Reason.ADMIN):
                    return protocol.reply("close", ok=True, id=conn_id)
                return protocol.error(f"close: no open connection with id {conn_id}")
            case protocol.SetTraceFlags(flags=flags):
                server.tracer.flags = flags
                return protocol.reply("set_trace_flags", ok=True, flags=format_flags(flags))
            case protocol.Invalid(message=message):
                return protocol.error(message)
        raise AssertionError(request)  # pragma: no cover - the match is exhaustive

    def _unsubscribe(self) -> None:
        if self._subscriber is not None:
            self._server.tracer.remove_sink(self._subscriber)
            self._subscriber = None
