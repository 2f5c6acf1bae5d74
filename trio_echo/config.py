"""Configuration: frozen attrs values and their validation (pure).

Every key is optional; every section and field below documents one key of ``configs/trio-echo.toml``.
Values are validated on construction, so a ``Config`` built in Python is as safe as one read from a file.
Reading a file, printing one and the command-line overrides are in :mod:`trio_echo.configfile`.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from collections.abc import Callable
from typing import Any, Literal

import attrs

from .addresses import TLS_TRANSPORTS, Address, parse_address
from .errors import AddressError, ConfigError
from .events import DEFAULT_FLAGS, Flag

SUPPORTED_TRANSPORTS = ("tcp", "tls", "udp", "http", "https")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
FALLBACK_MAX_CONNECTIONS = 4096  # PRODUCT.md: where there is no RLIMIT_NOFILE (Windows)
SOCKET_BUFFER_MAX = 2**31 - 1  # setsockopt(SO_RCVBUF) takes a C int
MAX_WORKERS = 1024  # far past any machine's cores; keeps a typo from forking thousands of processes


# -- validators (raise ConfigError with the field name; the loader adds the section) ------------------


def _problem(attribute: attrs.Attribute[Any], value: object, problem: str) -> ConfigError:
    return ConfigError(attribute.name, value, problem)


def _non_negative(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise _problem(attribute, value, "must be >= 0 (0 means off)")


def _positive(_: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and value <= 0:
        raise _problem(attribute, value, "must be > 0")


def _finite(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not math.isfinite(value):
        raise _problem(attribute, value, "must be a finite number")


def _at_most(limit: int) -> Callable[[object, attrs.Attribute[Any], int], None]:
    def check(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
        if value > limit:
            raise _problem(attribute, value, f"must be <= {limit}")

    return check


def _one_of(*choices: str) -> Callable[[object, attrs.Attribute[Any], str], None]:
    def check(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            raise _problem(attribute, value, f"must be one of {', '.join(map(repr, choices))}")

    return check


def _cidrs(_: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for index, item in enumerate(value):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"{attribute.name}[{index}]", item, "is not a CIDR") from None


def _probability(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:  # (NaN fails this too)
        raise _problem(attribute, value, "must be a probability from 0 to 1")


def _workers(_: object, attribute: attrs.Attribute[Any], value: int | str) -> None:
    if value == "auto":
        pass
    elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _problem(attribute, value, 'expected an integer >= 1 or "auto"')
    elif value > MAX_WORKERS:
        raise _problem(attribute, value, f"at most {MAX_WORKERS}")
    if value != 1 and not hasattr(socket, "SO_REUSEPORT"):
        # Workers each bind their own listening sockets; without SO_REUSEPORT (Windows) they cannot.
        raise _problem(attribute, value, "worker processes need SO_REUSEPORT, which this platform lacks")


def _admin_address(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value == "":
        return
    try:
        address = parse_address(value)
    except AddressError as exc:
        raise _problem(attribute, value, str(exc)) from None
    if address.transport != "tcp":
        raise _problem(attribute, value, "the admin port speaks plain HTTP over TCP")


# -- sections -----------------------------------------------------------------------------------------


@attrs.frozen
class ListenerConfig:
    """One ``server.listen`` entry: an ADDR string, or a table ``{ address = "...", ... }``."""

    address: Address
    """Where to listen (parsed ADDR)."""
    name: str = ""
    """Label for stats, metrics and trace events; defaults to the address as written."""
    backlog: int | None = attrs.field(default=None, validator=_positive)
    """Listen backlog of this entry; defaults to ``server.backlog``."""
    proxy_protocol: str = attrs.field(default="off", validator=_one_of("off", "v1", "v2", "any"))
    """Expect a PROXY protocol header (HAProxy ``send-proxy``/``send-proxy-v2``) on every connection."""
    trusted_proxies: tuple[str, ...] = attrs.field(default=(), validator=_cidrs)
    """CIDRs a PROXY header is accepted from; connections from elsewhere are refused (untrusted_proxy)."""
    faults: str = ""
    """A ``[faults.NAME]`` profile every new connection (or datagram) of this entry gets; empty = none."""

    def __attrs_post_init__(self) -> None:
        if self.proxy_protocol == "off":
            return
        if self.address.transport == "udp":
            raise ConfigError("proxy_protocol", self.proxy_protocol, "PROXY headers are for stream listeners")
        if not self.trusted_proxies and not self.address.is_unix:
            raise ConfigError(
                "trusted_proxies", [], 'a PROXY listener needs the proxies\' CIDRs, e.g. ["127.0.0.0/8"]'
            )

    @property
    def label(self) -> str:
        return self.name or str(self.address)


def _listen_list(_: object, attribute: attrs.Attribute[Any], value: tuple[ListenerConfig, ...]) -> None:
    if not value:
        raise _problem(attribute, [], "needs at least one address")
    seen: set[str] = set()
    for index, entry in enumerate(value):
        key = f"{attribute.name}[{index}]"
        if entry.address.transport not in SUPPORTED_TRANSPORTS:
            raise ConfigError(
                key, str(entry.address), f"transport {entry.address.transport!r} is not supported yet"
            )
        if entry.label in seen:
            raise ConfigError(key, entry.label, "is listed twice")
        seen.add(entry.label)


@attrs.frozen
class ServerConfig:
    """``[server]``: what to listen on and what to say."""

    listen: tuple[ListenerConfig, ...] = attrs.field(
        default=(ListenerConfig(address=Address(port=40007)),), validator=_listen_list
    )
    """Listen entries. ``":40007"`` is one IPv4 and one IPv6 socket (IPV6_V6ONLY)."""
    greeting: str = ""
    """Sent to every client on connect (UTF-8); empty = none."""
    farewell: str = ""
    """Sent after the client's half-close once its echo is complete, e.g. "bye\\n"; empty = none."""
    backlog: int = attrs.field(default=4096, validator=[_positive, _at_most(65535)])
    """listen(2) backlog (the kernel caps it at net.core.somaxconn)."""
    workers: int | Literal["auto"] = attrs.field(default=1, validator=_workers)
    """Worker processes: 1 is one process; more (or "auto": one per CPU this process may use) runs a
    master that supervises that many workers, each with its own SO_REUSEPORT sockets."""


@attrs.frozen
class LimitsConfig:
    """``[limits]``: what one client may take. Durations are seconds; 0 means off unless noted."""

    max_connections: int | None = attrs.field(default=None, validator=_positive)
    """Most client connections open at once; default: hard RLIMIT_NOFILE minus fd_reserve."""
    max_connections_per_ip: int = attrs.field(default=0, validator=_non_negative)
    """Most connections per IPv4 address or IPv6 /64."""
    idle_timeout: float = attrs.field(default=300.0, validator=[_finite, _non_negative])
    """Close a connection after this long without a byte either way (reason ``idle``)."""
    send_timeout: float = attrs.field(default=60.0, validator=[_finite, _non_negative])
    """Close a client that has not taken our echo for this long (reason ``send_timeout``)."""
    max_lifetime: float = attrs.field(default=0.0, validator=[_finite, _non_negative])
    """Close every connection after this long (reason ``lifetime``)."""
    drain_timeout: float = attrs.field(default=20.0, validator=[_finite, _non_negative])
    """On stop, how long connections may finish on their own; 0 closes them at once."""
    drain_delay: float = attrs.field(default=0.0, validator=[_finite, _non_negative])
    """On stop, how long to stay up not-ready (/readyz 503) and still accepting before the listeners
    close, so load balancers and Kubernetes endpoints stop sending first; then the drain."""
    linger_timeout: float = attrs.field(default=5.0, validator=[_finite, _non_negative])
    """Lingering close: after shutting our write side, how long to read and discard input."""
    buffer_size: int = attrs.field(default=65536, validator=[_positive, _at_most(16 * 1024 * 1024)])
    """Most bytes held per connection; reading stops while that much echo is unsent."""
    fd_reserve: int = attrs.field(default=64, validator=_non_negative)
    """File descriptors kept free for logs, the admin port and accept(2) itself."""
    refusal: str = ""
    """Text sent to a refused client before its lingering close; empty = none."""
    keepalive: bool = True
    """TCP keepalive on accepted sockets (idle 60 s, interval 10 s, 5 probes)."""
    socket_buffer: int = attrs.field(default=0, validator=[_non_negative, _at_most(SOCKET_BUFFER_MAX)])
    """SO_SNDBUF/SO_RCVBUF set on listening sockets (accepted ones inherit it); 0 = kernel default."""
    allow: tuple[str, ...] = attrs.field(default=(), validator=_cidrs)
    """CIDRs allowed to connect; empty = everyone."""
    deny: tuple[str, ...] = attrs.field(default=(), validator=_cidrs)
    """CIDRs refused (deny wins over allow)."""
    max_connect_rate_per_ip: float = attrs.field(default=0.0, validator=[_finite, _non_negative])
    """New connections per second per source address (token bucket)."""
    max_bytes_per_second: int = attrs.field(default=0, validator=_non_negative)
    """Echo bandwidth cap per connection."""
    tls_handshake_timeout: float = attrs.field(default=10.0, validator=[_finite, _positive])
    """Seconds a ``tls://`` client gets to complete the TLS handshake (reason ``tls_handshake``)."""
    max_datagrams_per_second_per_ip: float = attrs.field(default=1000.0, validator=[_finite, _non_negative])
    """UDP echo: datagrams echoed per second per source address; more are dropped (reason ``rate``)."""
    max_datagram_bytes_per_second_per_ip: int = attrs.field(default=1048576, validator=_non_negative)
    """UDP echo: bytes echoed per second per source address; more are dropped (reason ``bandwidth``)."""
    max_message_size: int = attrs.field(default=1048576, validator=[_positive, _at_most(256 * 1024 * 1024)])
    """Web echo: the largest WebSocket message (close 1009 past it) or request body (413)."""
    request_timeout: float = attrs.field(default=30.0, validator=[_finite, _positive])
    """Web echo: seconds a request's head and body may take once its first byte is in (408 past it)."""


@attrs.frozen
class TraceConfig:
    """``[trace]``: which events are emitted at all, and where they are written."""

    flags: Flag = DEFAULT_FLAGS
    """Names or number: error=0x1, info=0x2, conn=0x4, data=0x8 ("error,info", 5, "0x5")."""
    file: str = ""
    """JSON-lines file for trace events; empty = none."""
    file_max_bytes: int = attrs.field(default=0, validator=_non_negative)
    """Rotate the trace file past this size; 0 = never."""


@attrs.frozen
class LogConfig:
    """``[log]``: the human log."""

    level: str = attrs.field(default="info", validator=_one_of(*LOG_LEVELS))
    """debug, info, warning, error or critical."""
    format: str = attrs.field(default="text", validator=_one_of("text", "json"))
    """text or json (one JSON object per line)."""
    file: str = ""
    """Log file; empty = stderr."""


@attrs.frozen
class AdminConfig:
    """``[admin]``: the admin port (HTTP + WebSocket)."""

    listen: str = attrs.field(default="127.0.0.1:40008", validator=_admin_address)
    """Admin address; empty = off."""
    token_file: str = ""
    """File holding the admin token; empty = env TRIO_ECHO_ADMIN_TOKEN or a generated one."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed to use the admin port; empty = its own origin."""
    stats_interval: float = attrs.field(default=1.0, validator=[_finite, _positive])
    """Seconds between stats messages on the admin channel."""
    max_connections: int = attrs.field(default=16, validator=_positive)
    """Most admin channels (WebSocket) at once; one more gets 503. Plain HTTP requests do not count."""
    header_timeout: float = attrs.field(default=5.0, validator=[_finite, _positive])
    """Seconds a request head may take to arrive whole; past it: 408 and close."""
    agent_listen: str = attrs.field(default="", validator=_admin_address)
    """HAProxy agent-check port (``agent-check agent-port``): each connection gets one line (``ready
    up 73%``, ``drain``, ``maint``) and a close; empty = off."""
    max_pending_requests: int = attrs.field(default=256, validator=[_positive, _at_most(65536)])
    """Most connections still sending their request head; when full, the oldest is dropped so a fresh
    request (a liveness probe) always gets in."""


@attrs.frozen
class SupervisorConfig:
    """``[supervisor]``: restart intensity and backoff of long-lived tasks (listeners)."""

    max_restarts: int = attrs.field(default=5, validator=_non_negative)
    """Restarts allowed within ``period`` before the supervisor gives up (exit 1)."""
    period: float = attrs.field(default=60.0, validator=[_finite, _positive])
    """Sliding window, seconds, for ``max_restarts``."""
    backoff_initial: float = attrs.field(default=0.1, validator=[_finite, _non_negative])
    """First restart delay; doubles per restart of the same child within ``period``."""
    backoff_max: float = attrs.field(default=30.0, validator=[_finite, _non_negative])
    """Longest restart delay."""

    def __attrs_post_init__(self) -> None:
        if self.backoff_max < self.backoff_initial:
            raise ConfigError("backoff_max", self.backoff_max, "must be >= backoff_initial")


@attrs.frozen
class TlsConfig:
    """``[tls]``: certificates for ``tls://`` listeners."""

    cert_file: str = ""
    """PEM certificate chain."""
    key_file: str = ""
    """PEM private key."""
    client_ca_file: str = ""
    """PEM CA bundle; set = clients must present a certificate it signed (mutual TLS)."""
    min_version: str = attrs.field(default="1.2", validator=_one_of("1.2", "1.3"))
    """Lowest TLS version accepted."""


_seconds = [_finite, _non_negative]


@attrs.frozen
class FaultProfile:
    """One ``[faults.NAME]`` profile: a misbehaving echo on purpose (0/false = off, every key optional).

    Stream listeners (tcp, tls) use the connection keys, ``udp://`` listeners the datagram keys
    (``loss``, ``duplicate``, ``reorder``, ``latency``/``jitter``, ``corrupt``); ``probability`` and
    ``seed`` apply to both. Byte counts start when the profile is applied to a connection.
    """

    latency: float = attrs.field(default=0.0, validator=_seconds)
    """Seconds added before each echoed chunk (order always kept)."""
    jitter: float = attrs.field(default=0.0, validator=_seconds)
    """+- uniform seconds on ``latency`` (never below 0, order still kept)."""
    bandwidth: int = attrs.field(default=0, validator=_non_negative)
    """Echo bytes per second (with ``limits.max_bytes_per_second`` the lower one holds); 0 = off."""
    slice: int = attrs.field(default=0, validator=_non_negative)
    """Echo in writes of at most this many bytes ..."""
    slice_delay: float = attrs.field(default=0.0, validator=_seconds)
    """... with this pause between them."""
    reset_after_bytes: int = attrs.field(default=0, validator=_non_negative)
    """Reset (RST) once this many bytes have been echoed (and the client has them)."""
    reset_after: float = attrs.field(default=0.0, validator=_seconds)
    """Reset (RST) this many seconds after the connection opened."""
    close_after_bytes: int = attrs.field(default=0, validator=_non_negative)
    """Close gracefully (FIN, no farewell) once this many bytes have been echoed."""
    stall_after_bytes: int = attrs.field(default=0, validator=_non_negative)
    """After this many bytes stop reading and echoing, holding the connection until the idle timeout."""
    blackhole: bool = False
    """Accept, then never read or send (no greeting either) until the idle timeout."""
    slow_close: float = attrs.field(default=0.0, validator=_seconds)
    """After the client's EOF (and its echo), wait this long before our farewell and FIN."""
    corrupt: float = attrs.field(default=0.0, validator=_probability)
    """Probability per echoed chunk (or datagram) that exactly one of its bytes is changed."""
    loss: float = attrs.field(default=0.0, validator=_probability)
    """UDP: probability of dropping a datagram."""
    duplicate: float = attrs.field(default=0.0, validator=_probability)
    """UDP: probability of echoing a datagram twice."""
    reorder: float = attrs.field(default=0.0, validator=_probability)
    """UDP: probability of holding a datagram back until the next one has been echoed."""
    probability: float = attrs.field(default=1.0, validator=_probability)
    """Share of new connections (or datagrams) the profile applies to."""
    seed: int = attrs.field(default=0, validator=_non_negative)
    """0: random; set it for a reproducible run (tests)."""

    def to_dict(self) -> dict[str, object]:
        """The keys that are set (differ from off), as the admin channel shows a profile."""
        off = FaultProfile()
        return {
            field.name: getattr(self, field.name)
            for field in attrs.fields(FaultProfile)
            if getattr(self, field.name) != getattr(off, field.name)
        }


def _fault_profiles(_: object, attribute: attrs.Attribute[Any], value: dict[str, FaultProfile]) -> None:
    for name in value:
        if not name or len(name) > 64:
            raise ConfigError(attribute.name, name, "a profile name is 1 to 64 characters")


@attrs.frozen
class Config:
    """The whole configuration; every section optional."""

    server: ServerConfig = ServerConfig()
    limits: LimitsConfig = LimitsConfig()
    trace: TraceConfig = TraceConfig()
    log: LogConfig = LogConfig()
    admin: AdminConfig = AdminConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    tls: TlsConfig = TlsConfig()
    faults: dict[str, FaultProfile] = attrs.field(factory=dict, validator=_fault_profiles, hash=False)
    """``[faults.NAME]`` tables: named fault profiles for listen entries and the admin channel."""

    def __attrs_post_init__(self) -> None:
        for index, entry in enumerate(self.server.listen):
            if entry.faults and entry.faults not in self.faults:
                known = ", ".join(self.faults) or "none defined"
                raise ConfigError(
                    f"server.listen[{index}].faults",
                    entry.faults,
                    f"no [faults.NAME] profile by that name ({known})",
                )
        uses_tls = any(entry.address.transport in TLS_TRANSPORTS for entry in self.server.listen)
        if uses_tls and not (self.tls.cert_file and self.tls.key_file):
            raise ConfigError(
                "tls.cert_file",
                self.tls.cert_file,
                "a tls:// or https:// listener needs tls.cert_file and tls.key_file",
            )

    def effective_max_connections(self, nofile_limit: int | None) -> int:
        """``limits.max_connections`` with its default filled in and clamped to what fds allow.

        ``nofile_limit`` is the RLIMIT_NOFILE the process runs with (``None`` where there is none).
        """
        ceiling = (
            FALLBACK_MAX_CONNECTIONS
            if nofile_limit is None
            else max(1, nofile_limit - self.limits.fd_reserve)
        )
        configured = self.limits.max_connections
        return ceiling if configured is None else min(configured, ceiling)


# Every section, by its name in the file (and the order check-config prints them in).
SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "limits": LimitsConfig,
    "trace": TraceConfig,
    "log": LogConfig,
    "admin": AdminConfig,
    "supervisor": SupervisorConfig,
    "tls": TlsConfig,
}
