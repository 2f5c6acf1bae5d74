"""Admin channel messages (pure): parse what clients send, build what the server sends.

Every client message is a JSON object with a ``type``; each gets exactly one reply, its own type or
``error`` (see docs/admin-protocol.md). Parsing never raises: a malformed message becomes an
:class:`Invalid` whose text is the reply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import attrs

from trio_echo.events import Flag, format_flags, parse_flags

SUBPROTOCOL = "trio-echo.v1"
TOKEN_PREFIX = "token."


@attrs.frozen
class Subscribe:
    flags: Flag


@attrs.frozen
class Unsubscribe:
    pass


@attrs.frozen
class ListConnections:
    pass


@attrs.frozen
class CloseConnection:
    id: int


@attrs.frozen
class SetTraceFlags:
    flags: Flag


@attrs.frozen
class Invalid:
    message: str


Request = Subscribe | Unsubscribe | ListConnections | CloseConnection | SetTraceFlags | Invalid

KNOWN_TYPES = ("subscribe", "unsubscribe", "connections", "close", "set_trace_flags")


def parse_request(text: str | bytes) -> Request:
    """Turn one received message into a request (or :class:`Invalid` saying what is wrong)."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return Invalid("message is not valid JSON")
    if not isinstance(data, Mapping):
        return Invalid("message must be a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str):
        return Invalid("message needs a string 'type'")
    if kind in ("subscribe", "set_trace_flags"):
        try:
            flags = parse_flags(data.get("flags", "error,info,conn" if kind == "subscribe" else None))
        except ValueError as exc:
            return Invalid(f"{kind}: bad flags: {exc}")
        return Subscribe(flags) if kind == "subscribe" else SetTraceFlags(flags)
    if kind == "unsubscribe":
        return Unsubscribe()
    if kind == "connections":
        return ListConnections()
    if kind == "close":
        conn_id = data.get("id")
        if isinstance(conn_id, bool) or not isinstance(conn_id, int):
            return Invalid("close: 'id' must be an integer connection id")
        return CloseConnection(conn_id)
    return Invalid(f"unknown message type {kind!r} (known: {', '.join(KNOWN_TYPES)})")


def encode(message: Mapping[str, object]) -> str:
    return json.dumps(message, separators=(",", ":"), default=str)


def hello(version: str, listeners: list[dict[str, str]], trace_flags: Flag) -> dict[str, object]:
    return {
        "type": "hello",
        "version": version,
        "listeners": listeners,
        "trace_flags": format_flags(trace_flags),
    }


def error(message: str) -> dict[str, object]:
    return {"type": "error", "message": message}


def reply(kind: str, **fields: object) -> dict[str, object]:
    return {"type": kind, **fields}


def token_from_subprotocols(offered: list[str]) -> str | None:
    """The token a browser offers as the ``token.TOKEN`` subprotocol, if any."""
    for item in offered:
        if item.startswith(TOKEN_PREFIX):
            return item[len(TOKEN_PREFIX) :]
    return None
