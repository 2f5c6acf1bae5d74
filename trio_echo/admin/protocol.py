"""Admin channel messages (pure): parse what clients send, build what the server sends.

Every client message is a JSON object with a ``type``; each gets exactly one reply, its own type or
``error`` (see docs/admin-protocol.md). Parsing never raises: a malformed message becomes an
:class:`Invalid` whose text is the reply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import attrs

from trio_echo.config import FaultProfile
from trio_echo.configfile import fault_profile
from trio_echo.errors import ConfigError
from trio_echo.events import Flag, format_flags, parse_flags

SUBPROTOCOL = "trio-echo.v1"
TOKEN_PREFIX = "token."


@attrs.frozen
class Subscribe:
    flags: Flag


@attrs.frozen
class Unsubscribe:
    pass


SORT_KEYS = ("age", "bytes_in", "bytes_out", "rtt_us")
DEFAULT_LIMIT = 500
MAX_LIMIT = 5000
MAX_FILTER = 256


@attrs.frozen
class ListConnections:
    """One page of the connection table: ``limit`` items from ``offset``, of those whose peer or
    listener contains ``filter``, sorted by ``sort`` descending (``age``: the oldest first)."""

    limit: int = DEFAULT_LIMIT
    offset: int = 0
    sort: str = "age"
    filter: str = ""


@attrs.frozen
class CloseConnection:
    id: int


@attrs.frozen
class SetTraceFlags:
    flags: Flag


FaultSpec = str | FaultProfile | None  # a profile's name, an inline profile, or none


@attrs.frozen
class SetFaults:
    """Faults for a listener's new connections (``listener``), or for one open connection (``id``)."""

    faults: FaultSpec
    listener: str | None = None
    id: int | None = None


def fault_spec_json(spec: FaultSpec) -> object:
    """The spec as the message carried it (for forwarding to worker processes)."""
    return spec.to_dict() if isinstance(spec, FaultProfile) else spec


def fault_spec(value: object) -> FaultSpec:
    """A spec back from :func:`fault_spec_json` (a worker's side of the link).

    Raises:
        ConfigError: an object with a bad key or value.
    """
    if isinstance(value, Mapping):
        return fault_profile(value)
    return value if isinstance(value, str) else None


@attrs.frozen
class Invalid:
    message: str


Request = Subscribe | Unsubscribe | ListConnections | CloseConnection | SetTraceFlags | SetFaults | Invalid

KNOWN_TYPES = ("subscribe", "unsubscribe", "connections", "close", "set_trace_flags", "set_faults")


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
        return _list_connections(data)
    if kind == "close":
        conn_id = data.get("id")
        if isinstance(conn_id, bool) or not isinstance(conn_id, int):
            return Invalid("close: 'id' must be an integer connection id")
        return CloseConnection(conn_id)
    if kind == "set_faults":
        return _set_faults(data)
    return Invalid(f"unknown message type {kind!r} (known: {', '.join(KNOWN_TYPES)})")


def _list_connections(data: Mapping[str, object]) -> ListConnections | Invalid:
    limit = data.get("limit", DEFAULT_LIMIT)
    offset = data.get("offset", 0)
    sort = data.get("sort", "age")
    needle = data.get("filter", "")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        return Invalid(f"connections: 'limit' must be an integer from 1 to {MAX_LIMIT}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        return Invalid("connections: 'offset' must be an integer >= 0")
    if sort not in SORT_KEYS:
        return Invalid(f"connections: 'sort' must be one of {', '.join(SORT_KEYS)}")
    if not isinstance(needle, str) or len(needle) > MAX_FILTER:
        return Invalid(f"connections: 'filter' must be a string of at most {MAX_FILTER} characters")
    return ListConnections(limit, offset, str(sort), needle)


def _set_faults(data: Mapping[str, object]) -> SetFaults | Invalid:
    listener, conn_id = data.get("listener"), data.get("id")
    if (listener is None) == (conn_id is None):
        return Invalid("set_faults: give either 'listener' (an address or name) or 'id' (a connection id)")
    if listener is not None and (not isinstance(listener, str) or not listener):
        return Invalid("set_faults: 'listener' must be a listener's address or name")
    if conn_id is not None and (isinstance(conn_id, bool) or not isinstance(conn_id, int)):
        return Invalid("set_faults: 'id' must be an integer connection id")
    if "faults" not in data:
        return Invalid("set_faults: 'faults' is required: a profile name, an object of fault keys, or null")
    spec = data["faults"]
    if isinstance(spec, Mapping):
        try:
            spec = fault_profile(spec)
        except ConfigError as exc:
            return Invalid(f"set_faults: {exc}")
    elif spec is not None and not isinstance(spec, str):
        return Invalid("set_faults: 'faults' must be a profile name, an object of fault keys, or null")
    return SetFaults(
        spec, listener if isinstance(listener, str) else None, conn_id if isinstance(conn_id, int) else None
    )


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
