"""Pure parts of the admin port: channel messages, routing decisions, metrics text, TCP_INFO."""

from __future__ import annotations

import json
import struct

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trio_echo.admin import protocol
from trio_echo.admin.listing import select
from trio_echo.admin.metrics import MetricsSnapshot, render
from trio_echo.admin.routing import AccessPolicy, decide, host_allowed, origin_allowed, presented_token
from trio_echo.admin.tcpinfo import SIZE, parse_tcp_info
from trio_echo.events import Flag
from trio_echo.stats import ConnectionInfo


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type":"subscribe","flags":"info,conn"}', protocol.Subscribe(Flag.INFO | Flag.CONN)),
        ('{"type":"subscribe"}', protocol.Subscribe(Flag.ERROR | Flag.INFO | Flag.CONN)),
        ('{"type":"subscribe","flags":5}', protocol.Subscribe(Flag.ERROR | Flag.CONN)),
        ('{"type":"unsubscribe"}', protocol.Unsubscribe()),
        ('{"type":"connections"}', protocol.ListConnections()),
        (
            '{"type":"connections","limit":5000,"offset":10,"sort":"rtt_us","filter":"127.0.0.2"}',
            protocol.ListConnections(5000, 10, "rtt_us", "127.0.0.2"),
        ),
        (
            '{"type":"connections","limit":0}',
            protocol.Invalid("connections: 'limit' must be an integer from 1 to 5000"),
        ),
        (
            '{"type":"connections","limit":5001}',
            protocol.Invalid("connections: 'limit' must be an integer from 1 to 5000"),
        ),
        (
            '{"type":"connections","limit":true}',
            protocol.Invalid("connections: 'limit' must be an integer from 1 to 5000"),
        ),
        (
            '{"type":"connections","offset":-1}',
            protocol.Invalid("connections: 'offset' must be an integer >= 0"),
        ),
        (
            '{"type":"connections","offset":1.5}',
            protocol.Invalid("connections: 'offset' must be an integer >= 0"),
        ),
        (
            '{"type":"connections","sort":"peer"}',
            protocol.Invalid("connections: 'sort' must be one of age, bytes_in, bytes_out, rtt_us"),
        ),
        (
            '{"type":"connections","sort":["age"]}',
            protocol.Invalid("connections: 'sort' must be one of age, bytes_in, bytes_out, rtt_us"),
        ),
        (
            '{"type":"connections","filter":7}',
            protocol.Invalid("connections: 'filter' must be a string of at most 256 characters"),
        ),
        ('{"type":"close","id":7}', protocol.CloseConnection(7)),
        ('{"type":"set_trace_flags","flags":"0x3"}', protocol.SetTraceFlags(Flag.ERROR | Flag.INFO)),
        ('{"type":"set_trace_flags","flags":""}', protocol.SetTraceFlags(Flag(0))),
        (b'{"type":"connections"}', protocol.ListConnections()),
        ("not json", protocol.Invalid("message is not valid JSON")),
        (b"\xff\xfe", protocol.Invalid("message is not valid JSON")),
        ("[1,2]", protocol.Invalid("message must be a JSON object")),
        ('{"kind":"x"}', protocol.Invalid("message needs a string 'type'")),
        ('{"type":7}', protocol.Invalid("message needs a string 'type'")),
        ('{"type":"close"}', protocol.Invalid("close: 'id' must be an integer connection id")),
        ('{"type":"close","id":"7"}', protocol.Invalid("close: 'id' must be an integer connection id")),
        ('{"type":"close","id":true}', protocol.Invalid("close: 'id' must be an integer connection id")),
        (
            '{"type":"set_trace_flags"}',
            protocol.Invalid("set_trace_flags: bad flags: expected flag names or a number, not NoneType"),
        ),
        (
            '{"type":"subscribe","flags":"loud"}',
            protocol.Invalid(
                "subscribe: bad flags: unknown trace flag 'loud' (known: error, info, conn, data, all)"
            ),
        ),
        (
            '{"type":"reboot"}',
            protocol.Invalid(
                "unknown message type 'reboot' "
                "(known: subscribe, unsubscribe, connections, close, set_trace_flags, set_faults)"
            ),
        ),
    ],
)
def test_parse_request(text: str | bytes, expected: protocol.Request) -> None:
    assert protocol.parse_request(text) == expected


def test_server_messages() -> None:
    hello = protocol.hello("1.0", [{"address": "127.0.0.1:1", "transport": "tcp"}], Flag.ERROR | Flag.INFO)
    assert json.loads(protocol.encode(hello)) == {
        "type": "hello",
        "version": "1.0",
        "listeners": [{"address": "127.0.0.1:1", "transport": "tcp"}],
        "trace_flags": "error,info",
    }
    assert protocol.error("boom") == {"type": "error", "message": "boom"}
    assert protocol.reply("close", ok=True) == {"type": "close", "ok": True}
    assert protocol.token_from_subprotocols(["trio-echo.v1", "token.abc_-1"]) == "abc_-1"
    assert protocol.token_from_subprotocols(["trio-echo.v1"]) is None


TOKEN = "s3cret_TOKEN-value"
POLICY = AccessPolicy(TOKEN, ("https://ops.example.com",))
AUTH = {"host": "127.0.0.1:40008", "authorization": f"Bearer {TOKEN}"}
WS = {**AUTH, "upgrade": "websocket"}


@pytest.mark.parametrize(
    ("method", "target", "headers", "channels", "expected"),
    [
        ("GET", "/healthz", {}, 0, ("healthz", 200)),
        ("GET", "/readyz", {"host": "evil.example"}, 0, ("readyz", 200)),
        ("HEAD", "/healthz", {}, 0, ("healthz", 200)),
        ("GET", "/nope", AUTH, 0, ("reject", 404)),
        ("POST", "/metrics", AUTH, 0, ("reject", 405)),
        ("GET", "/", {"host": "127.0.0.1:40008"}, 0, ("asset", 200)),
        ("GET", "/app.js?v=1", {"host": "localhost:40008"}, 0, ("asset", 200)),
        ("GET", "/", {"host": "evil.example:40008"}, 0, ("reject", 403)),
        ("GET", "/", {}, 0, ("reject", 403)),
        ("GET", "/", {"host": "ops.example.com"}, 0, ("asset", 200)),
        ("GET", "/metrics", AUTH, 0, ("metrics", 200)),
        ("GET", "/metrics", {"host": "127.0.0.1:40008"}, 0, ("reject", 401)),
        ("GET", "/metrics", {**AUTH, "authorization": "Bearer wrong"}, 0, ("reject", 401)),
        ("GET", "/metrics", {**AUTH, "authorization": f"Basic {TOKEN}"}, 0, ("reject", 401)),
        ("GET", "/auth", AUTH, 0, ("auth", 200)),
        ("GET", "/auth", {"host": "[::1]:40008"}, 0, ("reject", 401)),
        # origin before host before token
        ("GET", "/metrics", {**AUTH, "origin": "http://evil.example"}, 0, ("reject", 403)),
        ("GET", "/metrics", {"host": "evil.example", "origin": "http://evil.example"}, 0, ("reject", 403)),
        ("GET", "/metrics", {**AUTH, "origin": "http://127.0.0.1:40008"}, 0, ("metrics", 200)),
        ("GET", "/metrics", {**AUTH, "origin": "https://ops.example.com/"}, 0, ("metrics", 200)),
        ("GET", "/ws", WS, 0, ("ws", 200)),
        (
            "GET",
            "/ws",
            {**WS, "authorization": "", "sec-websocket-protocol": f"trio-echo.v1, token.{TOKEN}"},
            0,
            ("ws", 200),
        ),
        (
            "GET",
            "/ws",
            {**WS, "authorization": "", "sec-websocket-protocol": "trio-echo.v1, token.nope"},
            0,
            ("reject", 401),
        ),
        ("GET", "/ws", AUTH, 0, ("reject", 426)),
        ("GET", "/ws", WS, 16, ("reject", 503)),
        ("GET", "/ws", {**WS, "authorization": ""}, 16, ("reject", 401)),
    ],
)
def test_routing(
    method: str, target: str, headers: dict[str, str], channels: int, expected: tuple[str, int]
) -> None:
    decision = decide(method, target, headers, POLICY, channels_open=channels, max_channels=16)
    assert (decision.kind, decision.status) == expected
    assert decision.message or decision.kind != "reject"


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:1", True),
        ("[::1]:1", True),
        ("LOCALHOST:1", True),
        ("10.0.0.5", True),
        ("attacker.example:1", False),
        ("", False),
        (None, False),
        ("ops.example.com:443", True),
    ],
)
def test_host_allowed(host: str | None, allowed: bool) -> None:
    assert host_allowed(host, ("https://ops.example.com",)) is allowed


def test_origin_and_token_helpers() -> None:
    assert origin_allowed(None, "x", ())
    assert origin_allowed("http://127.0.0.1:9", "127.0.0.1:9", ())
    assert not origin_allowed("http://127.0.0.1:10", "127.0.0.1:9", ())
    assert presented_token({"authorization": "bearer abc"}) == "abc"
    assert presented_token({"authorization": "Bearer "}) is None


def test_metrics_parse_as_prometheus_text() -> None:
    text = render(
        MetricsSnapshot(
            version="1.2.3",
            uptime=12.5,
            active={"a": 2, 'we"ird\\name': 1},
            total={"a": 5},
            closed={"eof": 3, "idle": 1},
            refused={"max_connections": 2},
            bytes_in=100,
            bytes_out=120,
            restarts={"admin": 1},
            trace_dropped=4,
        )
    )
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert samples[("trio_echo_connections_active", (("listener", "a"),))] == 2
    assert samples[("trio_echo_connections_active", (("listener", 'we"ird\\name'),))] == 1
    assert samples[("trio_echo_connections_total", (("listener", "a"),))] == 5
    assert samples[("trio_echo_connections_closed_total", (("reason", "eof"),))] == 3
    assert samples[("trio_echo_connections_refused_total", (("reason", "max_connections"),))] == 2
    assert samples[("trio_echo_bytes_received_total", ())] == 100
    assert samples[("trio_echo_bytes_sent_total", ())] == 120
    assert samples[("trio_echo_supervisor_restarts_total", (("child", "admin"),))] == 1
    assert samples[("trio_echo_trace_dropped_total", ())] == 4
    assert samples[("trio_echo_uptime_seconds", ())] == 12.5
    assert samples[("trio_echo_build_info", (("version", "1.2.3"),))] == 1
    assert families["trio_echo_connections_active"].type == "gauge"
    assert families["trio_echo_connections"].type == "counter"  # the parser strips _total


def test_tcp_info() -> None:
    fields = [0] * 24
    fields[2], fields[13], fields[15], fields[16], fields[18], fields[23] = 1448, 1500, 250, 40, 10, 3
    raw = bytes(8) + struct.pack("=24I", *fields)
    assert len(raw) == SIZE
    assert parse_tcp_info(raw) == {
        "rtt_us": 250,
        "rttvar_us": 40,
        "retransmits": 3,
        "pmtu": 1500,
        "mss": 1448,
        "snd_cwnd": 10,
    }
    assert parse_tcp_info(raw[:50]) == {}


def listing_table() -> list[ConnectionInfo]:
    """Six connections: ids 1..6 opened at t = 10, 20, ..., alternating listeners and peers."""
    infos = []
    for index in range(6):
        info = ConnectionInfo(
            index + 1,
            f"127.0.0.{1 + index % 2}:{5000 + index}",
            ":40007" if index % 3 else "unix:/run/e.sock",
            10.0 * (index + 1),
            buffer_size=16,
        )
        info.bytes_in = (index * 37) % 11
        info.bytes_out = 100 - index
        infos.append(info)
    return infos


@pytest.mark.parametrize(
    ("query", "rtts", "total", "ids"),
    [
        (protocol.ListConnections(), None, 6, [1, 2, 3, 4, 5, 6]),  # age: the oldest first
        (protocol.ListConnections(limit=2), None, 6, [1, 2]),
        (protocol.ListConnections(limit=2, offset=2), None, 6, [3, 4]),
        (protocol.ListConnections(limit=2, offset=5), None, 6, [6]),
        (protocol.ListConnections(offset=6), None, 6, []),
        (protocol.ListConnections(offset=600), None, 6, []),
        # bytes_in = 0, 4, 8, 1, 5, 9 for ids 1..6
        (protocol.ListConnections(sort="bytes_in"), None, 6, [6, 3, 5, 2, 4, 1]),
        (protocol.ListConnections(sort="bytes_out", limit=3), None, 6, [1, 2, 3]),
        (protocol.ListConnections(filter="127.0.0.2"), None, 3, [2, 4, 6]),
        (protocol.ListConnections(filter="UNIX:"), None, 2, [1, 4]),  # case-insensitive, listener too
        (protocol.ListConnections(filter=":5003"), None, 1, [4]),
        (protocol.ListConnections(filter="nothing"), None, 0, []),
        (protocol.ListConnections(filter="127.0.0.1", sort="bytes_in", limit=1), None, 3, [3]),
        # equal rtts keep id order; unknown (-1) last
        (
            protocol.ListConnections(sort="rtt_us"),
            {1: 50, 2: 900, 3: 50, 4: -1, 5: 7, 6: 900},
            6,
            [2, 6, 1, 3, 5, 4],
        ),
    ],
)
def test_connection_pages(
    query: protocol.ListConnections, rtts: dict[int, int] | None, total: int, ids: list[int]
) -> None:
    rtt = (lambda info: rtts[info.id]) if rtts is not None else None
    got_total, page = select(listing_table(), query, rtt=rtt)
    assert (got_total, [info.id for info in page]) == (total, ids)


def test_sorting_by_rtt_needs_the_rtts() -> None:
    with pytest.raises(ValueError, match="rtt_us"):
        select(listing_table(), protocol.ListConnections(sort="rtt_us"))
