"""Who may connect (pure): connection caps, per-source caps, allow/deny lists, connect rate.

The accept path asks :meth:`Admission.admit` about each new connection and gets ``None`` (admitted;
the connection now counts against its source) or the refusal reason PRODUCT.md names. Every admitted
connection must later be :meth:`release`\\ d. Sources are IPv4 addresses and IPv6 /64 networks (one
host commonly owns a whole /64, so per-address counting would let it open 2**64 times the cap);
IPv4-mapped IPv6 peers count as their IPv4 address. Unix-socket peers have no address and are subject
only to ``max_connections``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .config import LimitsConfig
from .ratelimit import MAX_SOURCES, SourceTable, TokenBucket
from .reasons import Reason

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

PRUNE_AT = MAX_SOURCES  # rate buckets kept before idle (full) ones are dropped


def source_of(ip: str) -> tuple[Address, str]:
    """The address and the per-source key of a peer IP: the IPv4 address, or the IPv6 /64.

    Raises ValueError for something that is not an IP address.
    """
    address = ipaddress.ip_address(ip.partition("%")[0])  # drop an IPv6 scope id
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv6Address):
        return address, str(ipaddress.IPv6Network((address, 64), strict=False))
    return address, str(address)


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def in_any(address: Address, nets: Iterable[Network]) -> bool:
    """Whether ``address`` lies in one of ``nets`` (networks of the other family never match)."""
    return any(address in net for net in nets if net.version == address.version)


class Admission:
    """Admission decisions and the per-source bookkeeping they need.

    Args:
        limits: the ``[limits]`` section (``max_connections_per_ip``, ``allow``, ``deny``,
            ``max_connect_rate_per_ip``).
        max_connections: the effective global cap.
    """

    def __init__(self, limits: LimitsConfig, max_connections: int) -> None:
        self.per_source: dict[str, int] = {}
        # Connect-rate buckets per source; burst: one second's worth, at least one connection.
        self._buckets: SourceTable[TokenBucket] = SourceTable(
            lambda now: TokenBucket(self.connect_rate, max(1.0, self.connect_rate), now),
            lambda bucket, now: bucket.is_full(now),
            PRUNE_AT,
        )
        self.configure(limits, max_connections)

    def configure(self, limits: LimitsConfig, max_connections: int) -> None:
        """Apply new limits; connections already admitted stay (a lower cap refuses new ones until
        the count is below it)."""
        self.max_connections = max_connections
        self.max_per_source = limits.max_connections_per_ip
        self.allow = networks(limits.allow)
        self.deny = networks(limits.deny)
        self.connect_rate = limits.max_connect_rate_per_ip
        self._buckets.clear()

    def full(self, held: int) -> bool:
        """Whether ``held`` connections (everything holding a descriptor: clients, PROXY headers being
        read, health checks) leave no room for one more."""
        return held >= self.max_connections

    def admit(self, ip: str | None, held: int, now: float) -> Reason | None:
        """Decide on a new connection from ``ip`` (None for a Unix peer) while ``held`` are open.

        Returns None when admitted (and counts it), else the refusal reason: ``max_connections``,
        ``denied``, ``connect_rate`` or ``per_ip``.
        """
        if self.full(held):
            return Reason.MAX_CONNECTIONS
        if ip is None:
            return None
        address, key = source_of(ip)
        if not self.permits(address):
            return Reason.DENIED
        if self.connect_rate:
            bucket = self._buckets.get(key, now)
            if bucket is None or not bucket.take(now):
                return Reason.CONNECT_RATE
        count = self.per_source.get(key, 0)
        if self.max_per_source and count >= self.max_per_source:
            return Reason.PER_IP
        self.per_source[key] = count + 1
        return None

    def permits(self, address: Address) -> bool:
        """Whether the allow/deny lists let ``address`` in (deny wins)."""
        return not in_any(address, self.deny) and (not self.allow or in_any(address, self.allow))

    def release(self, ip: str | None) -> None:
        """An admitted connection from ``ip`` closed."""
        if ip is None:
            return
        key = source_of(ip)[1]
        count = self.per_source.get(key, 0) - 1
        if count > 0:
            self.per_source[key] = count
        else:
            self.per_source.pop(key, None)
