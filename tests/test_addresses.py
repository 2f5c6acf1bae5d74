import re

import pytest

from trio_echo.addresses import Address, format_sockaddr, parse_address
from trio_echo.errors import AddressError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:40007", Address(host="127.0.0.1", port=40007)),
        ("localhost:0", Address(host="localhost", port=0)),
        (":40007", Address(port=40007)),
        ("[::1]:7", Address(host="::1", port=7)),
        ("[fe80::1%lo]:7", Address(host="fe80::1%lo", port=7)),
        ("unix:/run/echo.sock", Address(path="/run/echo.sock")),
        ("tcp://:1", Address(port=1)),
        ("tls://[::]:443", Address(transport="tls", host="::", port=443)),
        ("udp://0.0.0.0:7", Address(transport="udp", host="0.0.0.0", port=7)),
        ("tls://unix:/x", Address(transport="tls", path="/x")),
        ("http://127.0.0.1:8080", Address(transport="http", host="127.0.0.1", port=8080)),
        ("https://[::1]:8443", Address(transport="https", host="::1", port=8443)),
        ("http://unix:/run/echo.sock", Address(transport="http", path="/run/echo.sock")),
        (" :65535 ", Address(port=65535)),
    ],
)
def test_parse_valid(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "expected HOST:PORT"),
        ("40007", "expected HOST:PORT"),
        ("host:", "not a number"),
        ("host:http", "not a number"),
        ("host:70000", "out of range"),
        ("host:-1", "not a number"),
        ("::1:7", "brackets"),
        ("[::1]7", "expected [IPV6]:PORT"),
        ("[::1:7", "expected [IPV6]:PORT"),
        ("[nothex]:7", "not an IPv6 address"),
        ("bad_host:7", "not a valid host name"),
        ("unix:", "needs a path"),
        ("unix:/a\0b", "NUL"),
        ("udp://unix:/x", "UDP over Unix"),
        ("ftp://:80", "unknown scheme"),
        ("https://unix:", "needs a path"),
        ("host:٣", "not a number"),
    ],
)
def test_parse_invalid(text: str, problem: str) -> None:
    with pytest.raises(AddressError, match=re.escape(problem)):
        parse_address(text)


def test_parse_rejects_non_string() -> None:
    with pytest.raises(AddressError, match="must be a string"):
        parse_address(7)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [":40007", "127.0.0.1:1", "[::1]:2", "unix:/tmp/s", "tls://:443", "udp://[::]:7", "localhost:0"],
)
def test_str_round_trips(text: str) -> None:
    assert str(parse_address(text)) == text


@pytest.mark.parametrize(
    ("sockaddr", "expected"),
    [
        (("127.0.0.1", 80), "127.0.0.1:80"),
        (("::1", 80, 0, 0), "[::1]:80"),
        ("/tmp/s", "unix:/tmp/s"),
        (b"/tmp/s", "unix:/tmp/s"),
        ("", "unix:"),
    ],
)
def test_format_sockaddr(sockaddr: object, expected: str) -> None:
    assert format_sockaddr(sockaddr) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ws://127.0.0.1:8080/x?y=1", (Address(transport="ws", host="127.0.0.1", port=8080), "/x?y=1")),
        ("wss://localhost", (Address(transport="wss", host="localhost", port=443), "/")),
        ("ws://[::1]/", (Address(transport="ws", host="::1", port=80), "/")),
        ("ws://[::1]:9/a", (Address(transport="ws", host="::1", port=9), "/a")),
        ("http://x/", "expected ws://"),
        ("ws//x", "expected ws://"),
        ("ws://user@h:1/", "user names"),
        ("ws://:80/", "needs a host"),
        ("ws://h:99999/", "out of range"),
    ],
)
def test_parse_websocket_url(text: str, expected: tuple[Address, str] | str) -> None:
    from trio_echo.addresses import parse_websocket_url

    if isinstance(expected, tuple):
        assert parse_websocket_url(text) == expected
        return
    with pytest.raises(AddressError, match=expected):
        parse_websocket_url(text)
