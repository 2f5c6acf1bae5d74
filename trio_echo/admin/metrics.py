"""Prometheus text exposition (format 0.0.4) of the server's counters (pure)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import attrs

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@attrs.frozen
class MetricsSnapshot:
    """Everything /metrics shows, gathered by the caller at one instant."""

    version: str
    uptime: float
    active: Mapping[str, int]  # per listener
    total: Mapping[str, int]  # per listener
    closed: Mapping[str, int]  # per reason
    refused: Mapping[str, int]  # per reason
    bytes_in: int
    bytes_out: int
    restarts: Mapping[str, int]  # per supervisor child
    trace_dropped: int
    health_checks: Mapping[str, int] = attrs.field(factory=dict)  # per listener (PROXY v2 LOCAL)
    datagrams_in: Mapping[str, int] = attrs.field(factory=dict)  # per UDP listener
    datagrams_out: Mapping[str, int] = attrs.field(factory=dict)  # per UDP listener
    datagrams_dropped: Mapping[str, int] = attrs.field(factory=dict)  # per reason
    admin_requests_dropped: Mapping[str, int] = attrs.field(factory=dict)  # per reason
    workers: Mapping[str, int] = attrs.field(factory=dict)  # worker processes per state (a master only)
    faults: Mapping[str, int] = attrs.field(factory=dict)  # faults applied on purpose, per kind
    http_requests: Mapping[str, int] = attrs.field(factory=dict)  # web listeners: answers per status
    websocket_messages: Mapping[str, int] = attrs.field(factory=dict)  # web listeners: echoed, per kind


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines.extend(
        f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
        for labels, value in samples
    )
    return lines


def _labelled(label: str, values: Mapping[str, int]) -> list[tuple[str, float]]:
    return [(f'{{{label}="{_escape(key)}"}}', value) for key, value in sorted(values.items())]


Samples = Callable[[MetricsSnapshot], list[tuple[str, float]]]

# Every family /metrics shows: name (after trio_echo_), type, help, and its samples from a snapshot.
FAMILIES: tuple[tuple[str, str, str, Samples], ...] = (
    (
        "connections_active",
        "gauge",
        "Client connections open now.",
        lambda snapshot: _labelled("listener", snapshot.active),
    ),
    (
        "connections_total",
        "counter",
        "Client connections accepted since start.",
        lambda snapshot: _labelled("listener", snapshot.total),
    ),
    (
        "connections_closed_total",
        "counter",
        "Client connections closed, by reason.",
        lambda snapshot: _labelled("reason", snapshot.closed),
    ),
    (
        "connections_refused_total",
        "counter",
        "Client connections refused, by reason.",
        lambda snapshot: _labelled("reason", snapshot.refused),
    ),
    (
        "proxy_health_checks_total",
        "counter",
        "Connections a load balancer opened for itself (PROXY v2 LOCAL); not counted as clients.",
        lambda snapshot: _labelled("listener", snapshot.health_checks),
    ),
    (
        "datagrams_received_total",
        "counter",
        "UDP datagrams received.",
        lambda snapshot: _labelled("listener", snapshot.datagrams_in),
    ),
    (
        "datagrams_sent_total",
        "counter",
        "UDP datagrams echoed.",
        lambda snapshot: _labelled("listener", snapshot.datagrams_out),
    ),
    (
        "datagrams_dropped_total",
        "counter",
        "UDP datagrams received and not echoed, by reason.",
        lambda snapshot: _labelled("reason", snapshot.datagrams_dropped),
    ),
    (
        "faults_applied_total",
        "counter",
        "Faults applied on purpose ([faults.NAME] profiles, set_faults), by kind.",
        lambda snapshot: _labelled("kind", snapshot.faults),
    ),
    (
        "http_requests_total",
        "counter",
        "Web listeners: HTTP answers sent, by status (101: a WebSocket opened).",
        lambda snapshot: _labelled("status", snapshot.http_requests),
    ),
    (
        "websocket_messages_total",
        "counter",
        "Web listeners: WebSocket messages echoed, by kind (text, binary).",
        lambda snapshot: _labelled("kind", snapshot.websocket_messages),
    ),
    (
        "admin_requests_dropped_total",
        "counter",
        "Admin port connections closed before their request head was complete, by reason.",
        lambda snapshot: _labelled("reason", snapshot.admin_requests_dropped),
    ),
    (
        "bytes_received_total",
        "counter",
        "Bytes received from clients.",
        lambda snapshot: [("", snapshot.bytes_in)],
    ),
    (
        "bytes_sent_total",
        "counter",
        "Bytes sent to clients (echo, greetings, farewells).",
        lambda snapshot: [("", snapshot.bytes_out)],
    ),
    (
        "supervisor_restarts_total",
        "counter",
        "Restarts of supervised tasks, by child.",
        lambda snapshot: _labelled("child", snapshot.restarts),
    ),
    (
        "workers",
        "gauge",
        "Worker processes by state (only with [server] workers > 1).",
        lambda snapshot: _labelled("state", snapshot.workers),
    ),
    (
        "trace_dropped_total",
        "counter",
        "Trace events dropped by slow subscribers.",
        lambda snapshot: [("", snapshot.trace_dropped)],
    ),
    (
        "uptime_seconds",
        "gauge",
        "Seconds since the server started.",
        lambda snapshot: [("", float(snapshot.uptime))],
    ),
    (
        "build_info",
        "gauge",
        "Build information.",
        lambda snapshot: [(f'{{version="{_escape(snapshot.version)}"}}', 1)],
    ),
)


def render(snapshot: MetricsSnapshot) -> str:
    lines: list[str] = []
    for name, kind, help_text, samples in FAMILIES:
        lines += _family(f"trio_echo_{name}", kind, help_text, samples(snapshot))
    return "\n".join(lines) + "\n"
