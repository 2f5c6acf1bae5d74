"""The connection table as the admin port shows it (I/O: reads TCP_INFO from the sockets).

``page`` answers one ``connections`` request from a process's own table; a worker master asks each
worker to ``rank`` its matches and then fetches only the merged page's ``items`` (see
:func:`trio_echo.admin.listing.merge_ranked`), so TCP_INFO is still read only for what is returned.
"""

from __future__ import annotations

import socket as stdlib_socket
import sys
from collections.abc import Collection, Iterable

import trio

from trio_echo.stats import ConnectionInfo

from .listing import Ranked, select, sort_value
from .protocol import ListConnections
from .tcpinfo import SIZE, parse_tcp_info


def _socket_of(stream: object) -> stdlib_socket.socket | trio.socket.SocketType | None:
    """The TCP socket under ``stream`` (a socket, a socket stream, a TLS stream over one)."""
    sock = stream
    if isinstance(sock, trio.SSLStream):
        sock = sock.transport_stream
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
    return socket_tcp_info(info.handle.stream if info.handle is not None else None)


def socket_tcp_info(stream: object) -> dict[str, int]:
    """TCP_INFO figures of the socket under ``stream`` (Linux TCP only; ``{}`` elsewhere)."""
    sock = _socket_of(stream)
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
    protocol = getattr(info.handle, "protocol", None)  # web listeners: "http" or "websocket"
    if protocol is not None:
        item["protocol"] = protocol
    faults = info.handle.faults if info.handle is not None else None
    if faults is not None:
        item["faults"] = faults.profile.to_dict()
    item.update(tcp_info(info))
    return item


def page(
    connections: Collection[ConnectionInfo], query: ListConnections, now: float
) -> tuple[int, list[dict[str, object]]]:
    """``(total, items)`` for one ``connections`` request over one table."""
    total, chosen = select(connections, query, rtt=rtt_of if query.sort == "rtt_us" else None)
    return total, [connection_item(info, now) for info in chosen]


def rank(connections: Collection[ConnectionInfo], query: ListConnections, now: float) -> tuple[int, Ranked]:
    """``(total, [(value, id), ...])``: the first ``offset + limit`` matches with their sort values
    (ages in seconds, comparable across processes), for a master to merge."""
    top = ListConnections(limit=query.offset + query.limit, offset=0, sort=query.sort, filter=query.filter)
    rtt = rtt_of if query.sort == "rtt_us" else None
    total, chosen = select(connections, top, rtt=rtt)
    return total, [(sort_value(info, query.sort, now, rtt), info.id) for info in chosen]


def items(table: dict[int, ConnectionInfo], ids: Iterable[int], now: float) -> list[dict[str, object]]:
    """The items of the connections ``ids`` that are still open, in that order."""
    return [connection_item(table[conn_id], now) for conn_id in ids if conn_id in table]
