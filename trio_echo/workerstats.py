"""Many worker processes' counts as one server's (pure): what the master's admin view shows.

Workers report their own ``stats`` message fields and /metrics snapshot; the master sums them, adds
its own figures (uptime, its supervisor's restarts of workers, its trace drops) and one row per worker.
Also how the master hands out what must not overlap between workers: connection id ranges and
shares of ``limits.max_connections``.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from .admin.metrics import MetricsSnapshot

ID_BLOCK = 1 << 32
"""Connection ids per worker run: run ``n`` (counted across all workers and restarts) numbers its
connections from ``n * ID_BLOCK + 1``, so ids stay unique ints (and below JavaScript's 2**53 for two
million worker starts) and the master finds a connection's worker from its id alone."""


class WorkerState(enum.StrEnum):
    STARTING = "starting"  # spawned, not yet serving
    RUNNING = "running"  # serving and answering its heartbeat
    UNRESPONSIVE = "unresponsive"  # serving, but its heartbeat is late
    STOPPING = "stopping"  # draining at the master's request
    RESTARTING = "restarting"  # exited; the supervisor brings it back after its backoff


def first_id(run: int) -> int:
    return run * ID_BLOCK + 1


def run_of(conn_id: int) -> int:
    """Which worker run numbered ``conn_id``."""
    return (conn_id - 1) // ID_BLOCK


def shares(total: int | None, workers: int) -> list[int | None]:
    """``limits.max_connections`` split over the workers (the first ones take the remainder), so the
    workers together never exceed it; ``None`` (unset) leaves each worker its own descriptor limit."""
    if total is None:
        return [None] * workers
    base, extra = divmod(total, workers)
    return [max(1, base + (1 if index < extra else 0)) for index in range(workers)]


def merge_stats(
    reports: Sequence[Mapping[str, Any]], *, uptime: float, workers: list[dict[str, object]]
) -> dict[str, object]:
    """One ``stats`` message (without ``type``) from each worker's: counts summed, listeners merged
    by address, and ``workers``: one row per worker."""
    active = total = refused = bytes_in = bytes_out = 0
    listeners: dict[str, int] = {}
    for report in reports:
        if not report:
            continue  # no run has retired yet
        connections = report["connections"]
        active += connections["active"]
        total += connections["total"]
        refused += connections["refused"]
        bytes_in += report["bytes"]["in"]
        bytes_out += report["bytes"]["out"]
        for row in report["listeners"]:
            listeners[row["address"]] = listeners.get(row["address"], 0) + row["active"]
    return {
        "connections": {"active": active, "total": total, "refused": refused},
        "bytes": {"in": bytes_in, "out": bytes_out},
        "listeners": [{"address": name, "active": count} for name, count in listeners.items()],
        "uptime": max(0.0, uptime),
        "workers": workers,
    }


# The snapshot fields the master fills in itself rather than summing the workers'.
_OWN = ("version", "uptime", "workers")


def merge_metrics(
    reports: Iterable[Mapping[str, Any]],
    *,
    version: str,
    uptime: float,
    restarts: Mapping[str, int],
    trace_dropped: int,
    states: Iterable[WorkerState],
) -> MetricsSnapshot:
    """One /metrics snapshot: every counter summed over the workers' reports (``attrs.asdict`` of
    their snapshots), per label; the workers' own supervisor restarts (listeners) plus the master's
    (``worker N``, ``admin``); ``trio_echo_workers{state}``."""
    summed: dict[str, Any] = {}
    for field in attrs.fields(MetricsSnapshot):
        if field.name in _OWN:
            continue
        values = [report[field.name] for report in reports if field.name in report]
        if field.name == "restarts":
            values.append(restarts)
        if field.name == "trace_dropped":  # the master's subscribers' drops and the workers' links'
            values.append(trace_dropped)
        if field.type in ("int", int):
            summed[field.name] = sum(values)
        else:
            counter: collections.Counter[str] = collections.Counter()
            for value in values:
                counter.update(value)
            summed[field.name] = dict(counter)
    counts = collections.Counter(state.value for state in states)
    return MetricsSnapshot(
        version=version,
        uptime=max(0.0, uptime),
        workers={state.value: counts.get(state.value, 0) for state in WorkerState},
        **summed,
    )


def retired(
    before: Mapping[str, Mapping[str, Any]], report: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Fold the last report of a worker run that ended into the counters of runs before it: its
    counters live on in the totals, its gauges (connections open) do not."""
    stats = dict(report.get("stats", {}))
    metrics = dict(report.get("metrics", {}))
    if stats:
        stats["connections"] = {**stats["connections"], "active": 0}
        stats["listeners"] = []
    metrics["active"] = {}
    folded_stats = merge_stats([s for s in (before.get("stats"), stats) if s], uptime=0.0, workers=[])
    folded_stats.pop("workers")
    folded_metrics = merge_metrics(
        [m for m in (before.get("metrics"), metrics) if m],
        version="",
        uptime=0.0,
        restarts={},
        trace_dropped=0,
        states=[],
    )
    return {"stats": folded_stats, "metrics": attrs.asdict(folded_metrics)}
