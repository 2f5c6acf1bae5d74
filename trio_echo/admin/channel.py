"""One admin channel: a WebSocket session with one operator's dashboard or ``trio-echo admin``.

On connect the server sends ``hello``, then ``stats`` every ``stats_interval``; ``trace`` messages flow
while subscribed; every request gets one reply. A malformed or unknown message gets an ``error`` and the
channel stays open. A slow client only ever delays its own channel: its trace subscription drops the
oldest events instead of queueing without bound.
"""

from __future__ import annotations

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from trio_echo._version import __version__
from trio_echo.events import format_flags
from trio_echo.reasons import Reason
from trio_echo.trace import Subscriber

from . import protocol
from .view import ServerView


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
            snapshot = await self._server.stats_snapshot()
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
            await self._send(await self.handle(protocol.parse_request(message)))

    async def handle(self, request: protocol.Request) -> dict[str, object]:
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
                total, items = await server.connections(query)
                return protocol.reply("connections", items=items, total=total, offset=query.offset)
            case protocol.CloseConnection(id=conn_id):
                if await server.close_connection(conn_id, Reason.ADMIN):
                    return protocol.reply("close", ok=True, id=conn_id)
                return protocol.error(f"close: no open connection with id {conn_id}")
            case protocol.SetTraceFlags(flags=flags):
                server.tracer.flags = flags
                return protocol.reply("set_trace_flags", ok=True, flags=format_flags(flags))
            case protocol.SetFaults(faults=spec, listener=listener, id=conn_id):
                try:
                    in_force = await server.set_faults(spec, listener=listener, conn_id=conn_id)
                except LookupError as exc:
                    return protocol.error(f"set_faults: {exc.args[0]}")
                target: dict[str, object] = (
                    {"listener": listener} if listener is not None else {"id": conn_id}
                )
                return protocol.reply("set_faults", ok=True, **target, faults=in_force)
            case protocol.Invalid(message=message):
                return protocol.error(message)
        raise AssertionError(request)  # pragma: no cover - the match is exhaustive

    def _unsubscribe(self) -> None:
        if self._subscriber is not None:
            self._server.tracer.remove_sink(self._subscriber)
            self._subscriber = None
