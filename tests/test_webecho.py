"""The web echo's pure decisions (webecho.py): routes, the WebSocket handshake check, the query's
shaping, and the JSON document, as tables."""

from __future__ import annotations

import json

import pytest

from trio_echo import webecho
from trio_echo.proxyproto import ProxyHeader
from trio_echo.webecho import BadRequest, Route, Shape

KEY = ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")  # RFC 6455's sample: 16 bytes
UPGRADE = [
    ("Upgrade", "websocket"),
    ("Connection", "keep-alive, Upgrade"),
    ("Sec-WebSocket-Version", "13"),
    KEY,
]


@pytest.mark.parametrize(
    ("method", "path", "headers", "expected"),
    [
        ("GET", "/", UPGRADE, Route.WEBSOCKET),
        ("GET", "/any/path", [("upgrade", "WebSocket")], Route.WEBSOCKET),
        ("POST", "/x", [("Upgrade", "h2c, websocket")], Route.WEBSOCKET),  # checked afterwards
        ("GET", "/", [("Accept", "text/html,application/xhtml+xml")], Route.PAGE),
        ("HEAD", "/", [("accept", "text/html")], Route.PAGE),
        ("GET", "/", [("Accept", "*/*")], Route.ECHO),  # curl: the JSON
        ("GET", "/", [], Route.ECHO),
        ("GET", "/index.html", [("Accept", "text/html")], Route.ECHO),
        ("POST", "/", [("Accept", "text/html")], Route.ECHO),
        ("GET", "/", [("Upgrade", "h2c")], Route.ECHO),
    ],
)
def test_route(method: str, path: str, headers: webecho.Headers, expected: Route) -> None:
    assert webecho.route(method, path, headers) is expected


@pytest.mark.parametrize(
    ("method", "headers", "status", "problem"),
    [
        ("GET", UPGRADE, None, None),
        ("POST", UPGRADE, 400, "is a GET"),
        ("GET", [h for h in UPGRADE if h[0] != "Connection"], 400, "Connection: Upgrade"),
        ("GET", [*UPGRADE[:2], ("Sec-WebSocket-Version", "8"), KEY], 426, "speaks 13"),
        ("GET", UPGRADE[:3], 400, "Sec-WebSocket-Key"),
        ("GET", [*UPGRADE[:3], ("Sec-WebSocket-Key", "not base64!")], 400, "16-byte"),
        ("GET", [*UPGRADE[:3], ("Sec-WebSocket-Key", "c2hvcnQ=")], 400, "16-byte"),
        ("GET", [*UPGRADE, KEY], 400, "one base64"),
    ],
)
def test_check_websocket(
    method: str, headers: webecho.Headers, status: int | None, problem: str | None
) -> None:
    if status is None:
        webecho.check_websocket(method, headers)
        return
    with pytest.raises(BadRequest, match=problem) as caught:
        webecho.check_websocket(method, headers)
    assert caught.value.status == status
    if status == 426:
        assert ("sec-websocket-version", "13") in caught.value.headers


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], None),
        ([("Sec-WebSocket-Protocol", "chat, superchat")], "chat"),
        ([("sec-websocket-protocol", " , mqtt"), ("Sec-WebSocket-Protocol", "other")], "mqtt"),
    ],
)
def test_first_subprotocol(headers: webecho.Headers, expected: str | None) -> None:
    assert webecho.first_subprotocol(headers) == expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", Shape()),
        ("status=201", Shape(status=201)),
        ("status=599&x=1", Shape(status=599)),
        ("status=103", Shape(interim=103)),  # an interim answer, then the 200
        ("status=100", Shape(interim=100)),
        ("delay=0.25", Shape(delay=0.25)),
        ("delay=60&status=503", Shape(status=503, delay=60.0)),
        ("status=abc", "status='abc'"),
        ("status=101", "not 101"),
        ("status=99", "100 to 599"),
        ("status=600", "100 to 599"),
        ("status=-1", "100 to 599"),
        ("status=", "100 to 599"),
        ("status=٢٠٠", "100 to 599"),  # (Arabic-Indic digits are digits, not ASCII)
        ("delay=soon", "expected seconds"),
        ("delay=61", "from 0 to 60"),
        ("delay=-1", "from 0 to 60"),
        ("delay=nan", "from 0 to 60"),
        ("delay=inf", "from 0 to 60"),
    ],
)
def test_shape(query: str, expected: Shape | str) -> None:
    if isinstance(expected, Shape):
        assert webecho.shape(query) == expected
        return
    with pytest.raises(BadRequest, match=expected) as caught:
        webecho.shape(query)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("method", "status", "expected"),
    [("GET", 200, True), ("HEAD", 200, False), ("GET", 204, False), ("POST", 304, False), ("GET", 418, True)],
)
def test_may_have_body(method: str, status: int, expected: bool) -> None:
    assert webecho.may_have_body(method, status) is expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", {"body": ""}),
        ("héllo".encode(), {"body": "héllo"}),
        (b"\xff\x00", {"body_base64": "/wA="}),
    ],
)
def test_body_fields(body: bytes, expected: dict[str, str]) -> None:
    assert webecho.body_fields(body) == expected


def test_query_pairs_keep_order_and_repeats() -> None:
    assert webecho.query_pairs("b=2&a=1&b=3&empty=&sp=a%20b") == [
        ["b", "2"],
        ["a", "1"],
        ["b", "3"],
        ["empty", ""],
        ["sp", "a b"],
    ]


def test_proxy_fields() -> None:
    assert webecho.proxy_fields(None) is None
    header = ProxyHeader(
        version=2,
        local=False,
        source=("192.0.2.7", 51000),
        destination=("198.51.100.1", 80),
        tlvs=((0x02, b"example.com"), (0x05, b"\x00\x01"), (0xE0, b"custom")),
    )
    assert webecho.proxy_fields(header) == {
        "version": 2,
        "local": False,
        "source": {"ip": "192.0.2.7", "port": 51000},
        "destination": {"ip": "198.51.100.1", "port": 80},
        "tlvs": [
            {"type": 2, "name": "authority", "value": "example.com"},
            {"type": 5, "name": "unique_id", "value_base64": "AAE="},
            {"type": 224, "value": "custom"},
        ],
    }
    unix = ProxyHeader(version=2, local=False, source="/run/a", destination="/run/b", tlvs=((1, b"\xff"),))
    assert webecho.proxy_fields(unix) == {
        "version": 2,
        "local": False,
        "source": "/run/a",
        "destination": "/run/b",
        "tlvs": [{"type": 1, "name": "alpn", "value_base64": "/w=="}],
    }


@pytest.mark.parametrize(
    ("certificate", "expected"),
    [
        (None, None),
        ({}, None),
        ({"subject": ((("commonName", "alice"),), (("organizationName", "Example"),))}, "CN=alice,O=Example"),
        ({"subject": ((("emailAddress", "a@example.com"),),)}, "emailAddress=a@example.com"),
    ],
)
def test_certificate_subject(certificate: dict[str, object] | None, expected: str | None) -> None:
    assert webecho.certificate_subject(certificate) == expected


def test_echo_document_and_render() -> None:
    document = webecho.echo_document(
        method="PUT",
        target="/a%20b?x=1&x=2",
        http_version="1.1",
        headers=[("Host", "h"), ("X-Case", "Kept"), ("x-case", "again")],
        body=b"\x80",
        connection={"peer": "127.0.0.1:5"},
    )
    assert document == {
        "method": "PUT",
        "path": "/a%20b",
        "query": [["x", "1"], ["x", "2"]],
        "http_version": "1.1",
        "headers": [["Host", "h"], ["X-Case", "Kept"], ["x-case", "again"]],
        "body_base64": "gA==",
        "connection": {"peer": "127.0.0.1:5"},
    }
    rendered = webecho.render(document)
    assert rendered.endswith(b"}\n")
    assert json.loads(rendered) == document
    assert json.loads(webecho.error_document(400, "bad")) == {"error": "bad", "status": 400}


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, [("content-length", "0")], b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
        (103, [], b"HTTP/1.1 103 Early Hints\r\n\r\n"),
        (418, [("a", "b"), ("c", "d")], b"HTTP/1.1 418 I'm a Teapot\r\na: b\r\nc: d\r\n\r\n"),
        (299, [], b"HTTP/1.1 299\r\n\r\n"),  # a status without a registered phrase
    ],
)
def test_response_head(status: int, headers: webecho.Headers, expected: bytes) -> None:
    assert webecho.response_head(status, headers) == expected


@pytest.mark.parametrize(
    ("version", "headers", "expected"),
    [
        ("1.1", [], True),
        ("1.1", [("Connection", "keep-alive")], True),
        ("1.1", [("Connection", "Close")], False),
        ("1.1", [("connection", "upgrade, close")], False),
        ("1.0", [], False),
        ("1.0", [("Connection", "keep-alive")], False),  # (one answer per HTTP/1.0 connection)
    ],
)
def test_keeps_alive(version: str, headers: webecho.Headers, expected: bool) -> None:
    assert webecho.keeps_alive(version, headers) is expected
