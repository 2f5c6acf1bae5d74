"""Why connections end and what the pump is waiting for, as named values (pure).

``str``-valued enums: a member *is* its string (``Reason.IDLE == "idle"``), so JSON, Prometheus labels,
trace events and counters keyed by reason read exactly as the bare strings did (PRODUCT.md fixes them).
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """A close or refusal reason (the ``reason`` of ``conn.close`` / ``conn.refused``)."""

    # closes
    EOF = "eof"  # the client half-closed and got its echo, farewell and FIN
    IDLE = "idle"
    SEND_TIMEOUT = "send_timeout"
    LIFETIME = "lifetime"
    RESET = "reset"  # the peer reset or vanished
    DRAIN = "drain"
    ADMIN = "admin"  # closed by id from the admin channel
    FAULT = "fault"  # ended on purpose by its fault profile (reset, close, stall, black hole)
    TLS_HANDSHAKE = "tls_handshake"
    ERROR = "error"  # a bug, logged with its traceback
    # closes on web listeners (web.py)
    BAD_REQUEST = "bad_request"  # a malformed request or WebSocket handshake: answered 400 (426), closed
    TOO_LARGE = "too_large"  # a request head (431), body (413) or WebSocket message (1009) over its limit
    REQUEST_TIMEOUT = "request_timeout"  # a request not received within limits.request_timeout (408)
    # refusals
    MAX_CONNECTIONS = "max_connections"
    PER_IP = "per_ip"
    DENIED = "denied"
    CONNECT_RATE = "connect_rate"
    PROXY_HEADER = "proxy_header"
    UNTRUSTED_PROXY = "untrusted_proxy"


class Phase(enum.StrEnum):
    """What limits the socket pump's current wait; when that limit fires it becomes the close reason."""

    IDLE = "idle"  # waiting for input: idle_timeout
    SEND = "send_timeout"  # our echo cannot be written: send_timeout
    THROTTLE = "throttle"  # our own bandwidth pause: only the lifetime applies
    REQUEST = "request_timeout"  # web echo: the rest of a request that began: limits.request_timeout
    DELAY = "delay"  # web echo: our own ?delay= pause: only the lifetime applies


# The reason a connection closes with when the deadline of its phase fires.
PHASE_REASON = {
    Phase.IDLE: Reason.IDLE,
    Phase.SEND: Reason.SEND_TIMEOUT,
    Phase.THROTTLE: Reason.LIFETIME,
    Phase.REQUEST: Reason.REQUEST_TIMEOUT,
    Phase.DELAY: Reason.LIFETIME,
}
