"""One page of the connection table (pure): filter, sort, slice.

At 20,000 connections the admin channel must not cost the server a full listing per dashboard refresh:
the page is chosen first (``heapq.nlargest`` keeps only ``offset + limit`` candidates), and the caller
reads the expensive per-socket figures (TCP_INFO) only for the items returned. Sorting by ``rtt_us``
is the exception: it needs every matching connection's round-trip time, which ``rtt`` supplies.
The connection table is kept in opening order (a dict keeps insertion order, ids and opening times
only grow), which is the default sort, oldest first: so the dashboard's unfiltered refresh is a slice
that touches ``offset + limit`` entries, however many connections there are.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Collection

from trio_echo.stats import ConnectionInfo

from .protocol import ListConnections

RttOf = Callable[[ConnectionInfo], int]
Ranked = list[tuple[float, int]]
"""``(sort value, id)`` pairs, best first: one worker's candidates for a merged page."""


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
    connections: Collection[ConnectionInfo], query: ListConnections, *, rtt: RttOf | None = None
) -> tuple[int, list[ConnectionInfo]]:
    """``(total, page)``: how many connections match ``query.filter`` (a case-insensitive substring of
    the peer or the listener), and the page of them ``query`` asks for.

    ``connections`` must be in opening order (the server's table is).

    ``rtt`` gives a connection's round-trip time in microseconds (-1 when unknown); it is needed only
    for ``sort = "rtt_us"``.
    """
    needle = query.filter.lower()
    if not needle and query.sort == "age":
        end = query.offset + query.limit
        return len(connections), list(itertools.islice(connections, query.offset, end))
    if needle:
        matching = [c for c in connections if needle in c.peer.lower() or needle in c.listener.lower()]
    else:
        matching = list(connections)
    if query.offset >= len(matching):
        return len(matching), []
    top = heapq.nlargest(query.offset + query.limit, matching, key=_sort_key(query.sort, rtt))
    return len(matching), top[query.offset :]


def sort_value(info: ConnectionInfo, sort: str, now: float, rtt: RttOf | None) -> float:
    """The number ``sort`` orders by, descending (age in seconds, so values from processes with
    different clocks compare)."""
    if sort == "age":
        return now - info.opened
    if sort == "rtt_us" and rtt is not None:
        return rtt(info)
    return getattr(info, sort)  # type: ignore[no-any-return]  # bytes_in / bytes_out (checked by the parser)


def merge_ranked(ranked: list[Ranked], offset: int, limit: int) -> list[tuple[int, int]]:
    """The merged page across workers: ``(worker index, id)`` pairs, best first, ties by lower id."""
    merged = heapq.merge(
        *([(-value, conn_id, worker) for value, conn_id in entries] for worker, entries in enumerate(ranked))
    )
    return [(worker, conn_id) for _, conn_id, worker in itertools.islice(merged, offset, offset + limit)]
