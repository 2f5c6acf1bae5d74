"""What every connection of one server shares: timeouts, the bandwidth cap, hooks (one object).

Rebuilt when the configuration changes; a connection keeps the policy it was accepted with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import attrs

from .config import LimitsConfig
from .echo import EchoSession
from .reasons import Reason
from .relay import Relay
from .stats import ConnectionInfo
from .trace import Tracer


class Closed(Protocol):
    """What ``on_close`` learns of the connection that closed (a ``Connection``)."""

    @property
    def session(self) -> EchoSession: ...

    @property
    def info(self) -> ConnectionInfo | None: ...


OnClose = Callable[[Closed, Reason], None]
OnFault = Callable[[int | None, str, dict[str, object]], None]


def _off_is_inf(value: float) -> float:
    return value or math.inf


@attrs.frozen(eq=False)
class ConnectionPolicy:
    """What every connection of one server shares: one object, not eight slots per connection.

    Args:
        idle_timeout, send_timeout, max_lifetime, linger_timeout: seconds, 0 = off.
        max_bytes_per_second: the echo bandwidth cap, 0 = off.
        tls_handshake_timeout: seconds a TLS client gets to complete its handshake.
        tracer: per-chunk ``data`` events go here when some sink wants that flag.
        scratch: a read buffer of at least ``session.buffer_size`` bytes shared by the socket pumps of one
            event loop. Between ``recv_into`` and ``send`` nothing awaits, so connections can share it;
            echo left unsent when the kernel says EAGAIN is copied out first (``EchoSession.detach``).
            Without it the pump allocates a private buffer when its first byte arrives.
        on_close: called as ``on_close(connection, reason)`` once the stream is closed (the server's
            bookkeeping; one function for every connection, so none holds a closure).
        on_fault: called as ``on_fault(conn_id, kind, fields)`` for each fault applied (the
            ``fault.applied`` event and the counter).
        relay: the event loop's relay (``relay.py``), which carries a socket pump's steady-state echo
            while it runs; it reads into ``scratch``, so that must be set too.
    """

    idle_timeout: float = attrs.field(default=0.0, converter=_off_is_inf)
    send_timeout: float = attrs.field(default=0.0, converter=_off_is_inf)
    max_lifetime: float = 0.0
    linger_timeout: float = 0.0
    max_bytes_per_second: int = 0
    tls_handshake_timeout: float = 10.0
    tracer: Tracer | None = None
    scratch: memoryview | None = None
    on_close: OnClose | None = None
    on_fault: OnFault | None = None
    relay: Relay | None = attrs.field(default=None)

    @relay.validator
    def _relay_needs_scratch(self, _: attrs.Attribute[Relay | None], relay: Relay | None) -> None:
        if relay is not None and self.scratch is None:
            raise ValueError("a relay reads into the shared scratch buffer: set scratch too")

    @classmethod
    def from_limits(
        cls,
        limits: LimitsConfig,
        *,
        tracer: Tracer | None = None,
        scratch: memoryview | None = None,
        on_close: OnClose | None = None,
        on_fault: OnFault | None = None,
        relay: Relay | None = None,
    ) -> ConnectionPolicy:
        """The ``[limits]`` section's timeouts and bandwidth cap, with these hooks."""
        return cls(
            idle_timeout=limits.idle_timeout,
            send_timeout=limits.send_timeout,
            max_lifetime=limits.max_lifetime,
            linger_timeout=limits.linger_timeout,
            max_bytes_per_second=limits.max_bytes_per_second,
            tls_handshake_timeout=limits.tls_handshake_timeout,
            tracer=tracer,
            scratch=scratch,
            on_close=on_close,
            on_fault=on_fault,
            relay=relay,
        )


DEFAULT_POLICY = ConnectionPolicy()
