"""The PROXY protocol header, versions 1 and 2 (pure, incremental).

A load balancer such as HAProxy (``send-proxy``/``send-proxy-v2``) writes one header at the start of
each connection it opens to us, naming the client it accepted; everything after the header is the
client's own bytes. Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt

:class:`HeaderParser` is fed bytes as they arrive and says how many of them belong to the header, so
the caller can peek at the socket, feed what it saw, and consume exactly the header — the client's
first bytes stay in the kernel for the echo pump (or the TLS handshake) to read as usual. Every
rule that can reject a header does so as early as the bytes allow: a client that is not a proxy is
told so at its first byte, not after a timeout.
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # the whole v1 line including CRLF (spec section 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16  # signature, version/command, family/protocol, length
MODES = ("v1", "v2", "any")

# v2 address block sizes per family nibble: INET, INET6, UNIX (section 2.2).
_V2_FAMILIES = {0x1: ("inet", 12), 0x2: ("inet6", 36), 0x3: ("unix", 216)}
_V2_UNIX_PATH = 108


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header; the message is one line naming what is wrong."""


@attrs.frozen
class ProxyHeader:
    """A complete header.

    ``source``/``destination`` use socket-address shapes: ``(ip, port)`` for TCP over IPv4/IPv6, a path
    string for a Unix socket, ``None`` when the header carries no address (v2 ``LOCAL`` — the proxy's
    own health check —, v2 ``UNSPEC``, v1 ``UNKNOWN``): then the connection's own endpoints count.
    """

    version: int
    local: bool
    """v2 LOCAL: the proxy speaks for itself (health checks), not for a client."""
    source: tuple[str, int] | str | None = None
    destination: tuple[str, int] | str | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()
    """v2 type-length-value extensions, in order (not interpreted; kept for logging)."""
    length: int = 0
    """Bytes the header took on the wire."""


class HeaderParser:
    """Incremental parser for one header.

    Args:
        mode: ``"v1"``, ``"v2"`` or ``"any"`` (whichever the first byte says).

    Call :meth:`feed` with bytes in arrival order until :attr:`header` is set; it raises
    :class:`ProxyHeaderError` as soon as the bytes cannot be a valid header.
    """

    def __init__(self, mode: str = "any") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self._mode = mode
        self._version = 0  # 1 or 2 once the first byte is in
        self._buf = bytearray()
        self._total = 0  # v2: header length once the fixed part is in
        self.header: ProxyHeader | None = None

    @property
    def wanted(self) -> int:
        """At most this many further bytes can belong to the header (0 once it is complete)."""
        if self.header is not None:
            return 0
        if self._version == 2 or self._mode == "v2":
            return (self._total or V2_FIXED_LENGTH) - len(self._buf)
        return V1_MAX_LENGTH - len(self._buf)  # v1, or not known yet (v2's fixed part is shorter)

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Take the header's share of ``data``; return how many bytes that was.

        All of ``data`` is consumed unless the header completes inside it; the rest is the client's.
        """
        if self.header is not None:
            return 0
        data = bytes(data)
        used = 0
        while used < len(data) and self.header is None:
            if self._version == 0:
                self._detect(data[used])
            take = self._take_v1(data, used) if self._version == 1 else self._take_v2(data, used)
            used += take
        return used

    # -- version 1: "PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n" ---------------------------------

    def _detect(self, first: int) -> None:
        if first == V1_PREFIX[0] and self._mode in ("v1", "any"):
            self._version = 1
        elif first == V2_SIGNATURE[0] and self._mode in ("v2", "any"):
            self._version = 2
        else:
            wanted = {"v1": "a PROXY v1 line", "v2": "a PROXY v2 signature"}.get(self._mode, "a PROXY header")
            raise ProxyHeaderError(f"expected {wanted}, got {bytes([first])!r} first")

    def _take_v1(self, data: bytes, start: int) -> int:
        end = data.find(b"\n", start)
        stop = len(data) if end < 0 else end + 1
        room = V1_MAX_LENGTH - len(self._buf)
        if stop - start > room:
            raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")
        self._buf += data[start:stop]
        prefix = bytes(self._buf[: len(V1_PREFIX)])
        if not V1_PREFIX.startswith(prefix):
            raise ProxyHeaderError(f"PROXY v1 line must start with 'PROXY ', got {prefix!r}")
        if end >= 0:
            self.header = _parse_v1(bytes(self._buf))
        elif len(self._buf) == V1_MAX_LENGTH:
            raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")
        return stop - start

    # -- version 2: binary, signature + 4 bytes + address block + TLVs -------------------------------

    def _take_v2(self, data: bytes, start: int) -> int:
        need = (self._total or V2_FIXED_LENGTH) - len(self._buf)
        chunk = data[start : start + need]
        self._buf += chunk
        have = len(self._buf)
        signature = bytes(self._buf[: len(V2_SIGNATURE)])
        if not V2_SIGNATURE.startswith(signature):
            raise ProxyHeaderError("not a PROXY v2 signature")
        if have >= 13:
            _check_version_command(self._buf[12])
        if have >= 14:
            _check_family(self._buf[13])
        if not self._total and have == V2_FIXED_LENGTH:
            self._total = V2_FIXED_LENGTH + struct.unpack_from("!H", self._buf, 14)[0]
        if self._total and have == self._total:
            self.header = _parse_v2(bytes(self._buf))
        return len(chunk)


def _parse_v1(line: bytes) -> ProxyHeader:
    if not line.endswith(b"\r\n"):
        raise ProxyHeaderError("PROXY v1 line must end with CRLF")
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    fields = text.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        # The proxy does not know the client's address: the rest of the line is to be ignored.
        return ProxyHeader(version=1, local=False, length=len(line))
    if len(fields) != 6:
        raise ProxyHeaderError(f"PROXY v1 line needs 6 fields separated by single spaces, got {text!r}")
    _, protocol, source, destination, source_port, destination_port = fields
    if protocol not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN, not {protocol!r}")
    version = 4 if protocol == "TCP4" else 6
    return ProxyHeader(
        version=1,
        local=False,
        source=(_v1_ip(source, version), _v1_port(source_port)),
        destination=(_v1_ip(destination, version), _v1_port(destination_port)),
        length=len(line),
    )


def _v1_ip(text: str, version: int) -> str:
    try:
        address = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1: {text!r} is not an IPv{version} address") from None
    return str(address)


def _v1_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or int(text) > 65535:
        raise ProxyHeaderError(f"PROXY v1: port {text!r} is not a number in 0-65535")
    return int(text)


def _check_version_command(byte: int) -> None:
    if byte >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2: version {byte >> 4} is not 2")
    if byte & 0xF not in (0x0, 0x1):
        raise ProxyHeaderError(f"PROXY v2: command {byte & 0xF} is neither LOCAL (0) nor PROXY (1)")


def _check_family(byte: int) -> None:
    family, protocol = byte >> 4, byte & 0xF
    if family not in (0x0, *_V2_FAMILIES):
        raise ProxyHeaderError(f"PROXY v2: address family {family} is unknown")
    if protocol not in (0x0, 0x1, 0x2):
        raise ProxyHeaderError(f"PROXY v2: transport protocol {protocol} is unknown")


def _parse_v2(header: bytes) -> ProxyHeader:
    local = header[12] & 0xF == 0x0
    family, protocol = header[13] >> 4, header[13] & 0xF
    body = header[V2_FIXED_LENGTH:]
    if local or family == 0x0:
        # LOCAL (the proxy's own connection) and UNSPEC: the address block and TLVs are to be skipped.
        return ProxyHeader(version=2, local=local, length=len(header))
    if protocol == 0x2:
        raise ProxyHeaderError("PROXY v2: a datagram (DGRAM) header on a stream connection")
    name, size = _V2_FAMILIES[family]
    if len(body) < size:
        raise ProxyHeaderError(f"PROXY v2: {name} addresses need {size} bytes, the header has {len(body)}")
    source: tuple[str, int] | str
    destination: tuple[str, int] | str
    if name == "unix":
        source = _unix_path(body[:_V2_UNIX_PATH])
        destination = _unix_path(body[_V2_UNIX_PATH:size])
    else:
        width = 4 if name == "inet" else 16
        ip_type = ipaddress.IPv4Address if name == "inet" else ipaddress.IPv6Address
        source_port, destination_port = struct.unpack_from("!HH", body, 2 * width)
        source = (str(ip_type(body[:width])), source_port)
        destination = (str(ip_type(body[width : 2 * width])), destination_port)
    return ProxyHeader(
        version=2,
        local=False,
        source=source,
        destination=destination,
        tlvs=_tlvs(body[size:]),
        length=len(header),
    )


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def _tlvs(raw: bytes) -> tuple[tuple[int, bytes], ...]:
    items = []
    at = 0
    while at < len(raw):
        if len(raw) - at < 3:
            raise ProxyHeaderError("PROXY v2: truncated TLV after the addresses")
        kind, length = raw[at], struct.unpack_from("!H", raw, at + 1)[0]
        if at + 3 + length > len(raw):
            raise ProxyHeaderError(f"PROXY v2: TLV 0x{kind:02x} of {length} bytes overruns the header")
        items.append((kind, raw[at + 3 : at + 3 + length]))
        at += 3 + length
    return tuple(items)


def parse(data: bytes, mode: str = "any") -> ProxyHeader:
    """Parse a complete header at the start of ``data`` (convenience for tests and tools).

    Raises ProxyHeaderError when it is invalid or incomplete.
    """
    parser = HeaderParser(mode)
    parser.feed(data)
    if parser.header is None:
        raise ProxyHeaderError("PROXY header is incomplete")
    return parser.header


def encode_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v1 line (``UNKNOWN`` without addresses); the client and tests use it."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    protocol = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {protocol} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def encode_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    *,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """A v2 header: LOCAL without addresses, else PROXY over TCP; the client and tests use it."""
    extensions = b"".join(bytes([kind]) + struct.pack("!H", len(value)) + value for kind, value in tlvs)
    if source is None or destination is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(extensions)) + extensions
    ip_source = ipaddress.ip_address(source[0])
    ip_destination = ipaddress.ip_address(destination[0])
    family = 0x11 if ip_source.version == 4 else 0x21
    block = ip_source.packed + ip_destination.packed + struct.pack("!HH", source[1], destination[1])
    body = block + extensions
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body
