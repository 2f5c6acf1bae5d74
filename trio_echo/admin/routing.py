"""HTTP routing and access decisions for the admin port (pure).

Checks, in PRODUCT.md's order, for every path that shows or changes anything (``/``, ``/auth``,
``/metrics``, ``/ws``, dashboard assets): an ``Origin`` that is neither the admin's own nor allowed ->
403; a ``Host`` that could be a DNS-rebinding name -> 403; then, where a token is needed, a missing or
wrong token -> 401; then ``/ws`` past ``admin.max_connections`` -> 503. ``/healthz`` and ``/readyz`` reveal
nothing and answer anyone (load balancers probe them with arbitrary Host headers).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit

import attrs

from .protocol import token_from_subprotocols

ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
OPEN_PATHS = ("/healthz", "/readyz")
TOKEN_PATHS = ("/auth", "/metrics", "/ws")


@attrs.frozen
class AccessPolicy:
    """What the admin port accepts: its token and the browser origins allowed besides its own."""

    token: str
    allowed_origins: tuple[str, ...] = ()


@attrs.frozen
class Decision:
    """``kind`` is the handler (``asset``, ``healthz``, ``readyz``, ``auth``, ``metrics``, ``ws``) or
    ``reject``; ``status`` the HTTP status for a reject; ``message`` a one-line reason."""

    kind: str
    status: int = 200
    message: str = ""


def _reject(status: int, message: str) -> Decision:
    return Decision("reject", status, message)


def _host_name(host: str) -> str:
    """``host[:port]`` -> host (without brackets), lowercased."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host: str | None, allowed_origins: tuple[str, ...]) -> bool:
    """A DNS-rebinding attack arrives with the attacker's host name; IP literals and ``localhost``
    cannot be rebound, and the operator's allowed origins name the others they trust."""
    if not host:
        return False
    name = _host_name(host)
    if name == "localhost" or _is_ip(name):
        return True
    return any((urlsplit(origin).hostname or "") == name for origin in allowed_origins)


def origin_allowed(origin: str | None, host: str | None, allowed_origins: tuple[str, ...]) -> bool:
    """No Origin (a non-browser client) is fine; otherwise the page must come from the admin port
    itself (``http://HOST``) or from an allowed origin."""
    if origin is None:
        return True
    origin = origin.rstrip("/").lower()
    own = f"http://{host.strip().lower()}" if host else None
    return origin == own or origin in (o.rstrip("/").lower() for o in allowed_origins)


def presented_token(headers: Mapping[str, str]) -> str | None:
    """The token from ``Authorization: Bearer TOKEN`` or the ``token.TOKEN`` WebSocket subprotocol."""
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    return token_from_subprotocols(offered)


def token_valid(presented: str | None, expected: str) -> bool:
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


def decide(
    method: str,
    target: str,
    headers: Mapping[str, str],
    policy: AccessPolicy,
    *,
    channels_open: int = 0,
    max_channels: int = 16,
) -> Decision:
    """Route one request. ``headers`` maps lowercase names to values."""
    path = urlsplit(target).path or "/"
    if path not in ASSETS and path not in OPEN_PATHS and path not in TOKEN_PATHS:
        return _reject(404, f"no such path {path}")
    if method not in ("GET", "HEAD"):
        return _reject(405, f"method {method} not allowed")
    if path in OPEN_PATHS:
        return Decision(path[1:])
    host = headers.get("host")
    if not origin_allowed(headers.get("origin"), host, policy.allowed_origins):
        return _reject(403, "origin not allowed")
    if not host_allowed(host, policy.allowed_origins):
        return _reject(403, "host not allowed")
    if path in ASSETS:
        return Decision("asset")
    if not token_valid(presented_token(headers), policy.token):
        return _reject(401, "missing or wrong admin token")
    if path == "/ws":
        if headers.get("upgrade", "").lower() != "websocket":
            return _reject(426, "the admin channel needs a WebSocket upgrade")
        if channels_open >= max_channels:
            return _reject(503, "too many admin connections")
    return Decision(path[1:])
