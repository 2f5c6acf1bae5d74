"""One page of the connection table (pure): filter, sort, slice.

At 20,000 connections the admin channel must not cost the server a full listing per dashboard refresh:
the page is chosen first (``heapq.nlargest`` keeps only ``offset + limit`` candidates), and the caller
reads the expensive per-socket figures (TCP_INFO) only for the items returned. Sorting by ``rtt_us``
is the exception: it needs every matching connection's round-trip time, which ``rtt`` supplies.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

from trio_echo.stats import ConnectionInfo

from .protocol import ListConnections

RttOf = Callable[[ConnectionInfo], int]


def _sort_key(sort: str, rtt: RttOf | None) -> Callable[[ConnectionInfo], tuple[float, int]]:
    """Descending by ``sort``; ties by id, lower first (so pages do not shuffle between requests)."""
    if sort == "age":
        return lambda info: (-info.opened, -info.id)
    if sort == "bytes_in":
        return lambda info: (info.bytes_in, -info.id)
    if sort == "bytes_out":
        return lambda info: (info.bytes_out, -info.id)
    if sort == "rtt_us" and rtt is not None:
        return lambda info: (rtt(info), -info.id)
    raise ValueError(f"cannot sort by {sort!r}")


def select(
    connections: Iterable[ConnectionInfo], query: ListConnections, *, rtt: RttOf | None = None
) -> tuple[int, list[ConnectionInfo]]:
    """``(total, page)``: how many connections match ``query.filter`` (a case-insensitive substring of
    the peer or the listener), and the page of them ``query`` asks for.

    ``rtt`` gives a connection's round-trip time in microseconds (-1 when unknown); it is needed only
    for ``sort = "rtt_us"``.
    """
    needle = query.filter.lower()
    if needle:
        matching = [c for c in connections if needle in c.peer.lower() or needle in c.listener.lower()]
    else:
        matching = list(connections)
    if query.offset >= len(matching):
        return len(matching), []
    top = heapq.nlargest(query.offset + query.limit, matching, key=_sort_key(query.sort, rtt))
    return len(matching), top[query.offset :]
