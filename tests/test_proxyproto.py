"""The PROXY header parser (pure): tables of valid and invalid headers, every split point, round trips
and a fuzz run (hypothesis)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_echo.proxyproto import (
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    HeaderParser,
    ProxyHeader,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
    parse,
)


def v2(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", len(body)) + body


INET_BLOCK = bytes([192, 0, 2, 1, 198, 51, 100, 7]) + struct.pack("!HH", 56324, 443)
INET6_BLOCK = bytes(15) + b"\x01" + bytes(15) + b"\x02" + struct.pack("!HH", 1, 2)
UNIX_BLOCK = b"/run/client".ljust(108, b"\0") + b"/run/server".ljust(108, b"\0")

VALID = [
    (
        b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n",
        ("192.0.2.1", 56324),
        ("198.51.100.7", 443),
        False,
    ),
    (b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n", ("2001:db8::1", 1), ("::1", 65535), False),
    (b"PROXY UNKNOWN\r\n", None, None, False),
    (b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n", None, None, False),
    (v2(0x21, 0x11, INET_BLOCK), ("192.0.2.1", 56324), ("198.51.100.7", 443), False),
    (v2(0x21, 0x21, INET6_BLOCK), ("::1", 1), ("::2", 2), False),
    (v2(0x21, 0x31, UNIX_BLOCK), "/run/client", "/run/server", False),
    (v2(0x20, 0x00, b""), None, None, True),  # LOCAL: HAProxy's health check
    (v2(0x20, 0x11, INET_BLOCK), None, None, True),  # LOCAL ignores any address block
    (v2(0x21, 0x00, b"junk"), None, None, False),  # UNSPEC: addresses skipped
    (v2(0x21, 0x10, INET_BLOCK), ("192.0.2.1", 56324), ("198.51.100.7", 443), False),  # proto UNSPEC
]


@pytest.mark.parametrize(("wire", "source", "destination", "local"), VALID)
def test_valid_headers(wire: bytes, source: object, destination: object, local: bool) -> None:
    header = parse(wire + b"client bytes")
    assert (header.source, header.destination, header.local) == (source, destination, local)
    assert header.length == len(wire)
    assert header.version == (1 if wire.startswith(b"PROXY") else 2)


@pytest.mark.parametrize(("wire", "source", "destination", "local"), VALID)
def test_every_split_point_consumes_exactly_the_header(
    wire: bytes, source: object, destination: object, local: bool
) -> None:
    data = wire + b"\r\nPROXY and more client bytes"
    for cut in range(len(data) + 1):
        parser = HeaderParser("any")
        used = parser.feed(data[:cut])
        if parser.header is None:
            assert used == cut
            assert parser.wanted > 0
            used += parser.feed(data[cut:])
        assert parser.header is not None
        assert used == len(wire), cut
        assert parser.header.source == source
        assert parser.wanted == 0
        assert parser.feed(b"more") == 0  # complete: nothing more belongs to it


def test_byte_at_a_time() -> None:
    wire = v2(0x21, 0x11, INET_BLOCK + bytes([0x04, 0x00, 0x01, 0xAA]))
    parser = HeaderParser("v2")
    for index, byte in enumerate(wire):
        assert parser.header is None
        assert parser.wanted >= len(wire) - index if index >= 16 else parser.wanted > 0
        assert parser.feed(bytes([byte])) == 1
    assert parser.header == ProxyHeader(
        version=2,
        local=False,
        source=("192.0.2.1", 56324),
        destination=("198.51.100.7", 443),
        tlvs=((0x04, b"\xaa"),),
        length=len(wire),
    )


INVALID = [
    ("any", b"GET / HTTP/1.1\r\n", "expected a PROXY header, got b'G' first"),
    ("v1", V2_SIGNATURE, "expected a PROXY v1 line"),
    ("v2", b"PROXY TCP4", "expected a PROXY v2 signature"),
    ("any", b"PROXZ", "must start with 'PROXY '"),
    ("any", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "must end with CRLF"),
    ("any", b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "6 fields"),
    ("any", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "6 fields"),
    ("any", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4, TCP6 or UNKNOWN"),
    ("any", b"PROXY TCP4 ::1 ::1 1 2\r\n", "not an IPv4 address"),
    ("any", b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "not an IPv6 address"),
    ("any", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port '65536'"),
    ("any", b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "port '-1'"),
    ("any", b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n", "not ASCII"),
    ("any", b"PROXY " + b"A" * 200, "longer than 107 bytes"),
    ("any", b"PROXY " + b"A" * (V1_MAX_LENGTH - 6), "longer than 107 bytes"),
    ("any", b"\r\n\r\n\x00\r\nQUIX", "not a PROXY v2 signature"),
    ("any", V2_SIGNATURE + b"\x11", "version 1 is not 2"),
    ("any", V2_SIGNATURE + b"\x22", "command 2"),
    ("any", V2_SIGNATURE + b"\x21\x41", "address family 4"),
    ("any", V2_SIGNATURE + b"\x21\x13", "transport protocol 3"),
    ("any", v2(0x21, 0x12, INET_BLOCK), "DGRAM"),
    ("any", v2(0x21, 0x11, INET_BLOCK[:11]), "inet addresses need 12 bytes"),
    ("any", v2(0x21, 0x21, INET_BLOCK), "inet6 addresses need 36 bytes"),
    ("any", v2(0x21, 0x11, INET_BLOCK + b"\x01\x00"), "truncated TLV"),
    ("any", v2(0x21, 0x11, INET_BLOCK + b"\x01\x00\x05abc"), "TLV 0x01 of 5 bytes overruns"),
]


@pytest.mark.parametrize(("mode", "wire", "message"), INVALID)
def test_invalid_headers_name_the_problem(mode: str, wire: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        HeaderParser(mode).feed(wire)
    assert "\n" not in str(info.value)


def test_rejection_is_as_early_as_the_bytes_allow() -> None:
    # A plain client is told at its first byte, a bad v2 version at byte 13: no waiting for more.
    with pytest.raises(ProxyHeaderError):
        HeaderParser("any").feed(b"h")
    parser = HeaderParser("v2")
    parser.feed(V2_SIGNATURE)
    with pytest.raises(ProxyHeaderError):
        parser.feed(b"\x31")


def test_incomplete_header() -> None:
    with pytest.raises(ProxyHeaderError, match="incomplete"):
        parse(b"PROXY TCP4 1.2.3.4")
    with pytest.raises(ValueError, match="mode"):
        HeaderParser("v3")


# -- property tests ------------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
port = st.integers(0, 65535)
tlv = st.tuples(st.integers(0, 255), st.binary(max_size=40))


@given(
    st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)),
    st.tuples(port, port),
    st.lists(tlv, max_size=4),
    st.binary(max_size=64),
    st.data(),
)
def test_round_trip_at_any_split(
    ips: tuple[str, str],
    ports: tuple[int, int],
    tlvs: list[tuple[int, bytes]],
    rest: bytes,
    data: st.DataObject,
) -> None:
    source, destination = (ips[0], ports[0]), (ips[1], ports[1])
    version = data.draw(st.sampled_from([1, 2]))
    wire = (
        encode_v1(source, destination) if version == 1 else encode_v2(source, destination, tlvs=tuple(tlvs))
    )
    stream = wire + rest
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    parser = HeaderParser("any")
    used = 0
    previous = 0
    for cut in [*cuts, len(stream)]:
        used += parser.feed(stream[previous:cut])
        previous = cut
    assert used == len(wire)
    assert parser.header is not None
    assert parser.header.source == source
    assert parser.header.destination == destination
    if version == 2:
        assert parser.header.tlvs == tuple(tlvs)


@settings(max_examples=500)
@given(st.sampled_from(["v1", "v2", "any"]), st.binary(max_size=300))
def test_fuzz_never_crashes_or_overreads(mode: str, blob: bytes) -> None:
    """Arbitrary bytes: either a header that consumed at most them, a clean ProxyHeaderError, or
    still waiting with every byte taken and a positive ``wanted``. Nothing else (no IndexError,
    struct.error, UnicodeDecodeError)."""
    parser = HeaderParser(mode)
    try:
        used = parser.feed(blob)
    except ProxyHeaderError as exc:
        message = str(exc)
        assert message
        assert "\n" not in message
        return
    if parser.header is None:
        assert used == len(blob)
        assert parser.wanted > 0
    else:
        assert used == parser.header.length <= len(blob)


@settings(max_examples=300)
@given(st.binary(min_size=1, max_size=200), st.sampled_from([b"PROXY ", V2_SIGNATURE]))
def test_fuzz_after_a_valid_prefix(tail: bytes, prefix: bytes) -> None:
    parser = HeaderParser("any")
    try:
        used = parser.feed(prefix + tail)
    except ProxyHeaderError:
        return
    assert used <= len(prefix + tail)
