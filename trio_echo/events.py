"""The trace event model (pure): WPP-style flags and the event record every sink receives.

Flags (PRODUCT.md): ``error`` = 0x1 and ``info`` = 0x2 (the seed's values), ``conn`` = 0x4 (per-connection
open/close/refused), ``data`` = 0x8 (per chunk, off by default). They combine by name or number:
``"error,conn"``, ``5``, ``"0x5"``.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping

import attrs


class Flag(enum.IntFlag):
    ERROR = 0x1
    INFO = 0x2
    CONN = 0x4
    DATA = 0x8


ALL_FLAGS = Flag.ERROR | Flag.INFO | Flag.CONN | Flag.DATA
DEFAULT_FLAGS = Flag.ERROR | Flag.INFO


def parse_flags(value: object) -> Flag:
    """Parse flags given by name (``"error,conn"``), number (``5``) or hex string (``"0x5"``).

    ``""`` and ``0`` mean no flags. Raises ``ValueError`` naming the bad part.
    """
    if isinstance(value, bool):
        raise ValueError("expected flag names or a number, not a boolean")
    if isinstance(value, int):
        return _from_int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected flag names or a number, not {type(value).__name__}")
    text = value.strip().lower()
    try:
        return _from_int(int(text, 0)) if text[:1].isdigit() else _from_names(text)
    except ValueError as exc:
        if "unknown" in str(exc) or "out of range" in str(exc):
            raise
        raise ValueError(f"{value!r} is not a flag number") from None


def _from_int(number: int) -> Flag:
    if number < 0 or number & ~int(ALL_FLAGS):
        raise ValueError(f"flag value {number:#x} out of range (known bits: {int(ALL_FLAGS):#x})")
    return Flag(number)


def _from_names(text: str) -> Flag:
    flags = Flag(0)
    for part in (p.strip() for p in text.replace("|", ",").split(",")):
        if not part:
            continue
        if part == "all":
            flags |= ALL_FLAGS
            continue
        try:
            flags |= Flag[part.upper()]
        except KeyError:
            known = ", ".join(f.name.lower() for f in Flag if f.name)
            raise ValueError(f"unknown trace flag {part!r} (known: {known}, all)") from None
    return flags


def format_flags(flags: Flag) -> str:
    """Canonical names, comma-separated, in bit order (``"error,info"``); ``""`` for none."""
    return ",".join(f.name.lower() for f in Flag if f.name and f in flags)


@attrs.frozen
class Event:
    """One trace event: when, which flag it belongs to, a dotted name and the fields that matter."""

    ts: float
    flag: Flag
    event: str
    fields: Mapping[str, object] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, object]:
        """The JSON object form PRODUCT.md fixes: ``ts``, ``flag``, ``event`` then the fields."""
        return {"ts": self.ts, "flag": format_flags(self.flag), "event": self.event, **self.fields}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)

    def describe(self) -> str:
        """A one-line human rendering for the text log: ``conn.close peer=... reason=eof``."""
        parts = [self.event]
        message = self.fields.get("message")
        if message is not None:
            parts.append(str(message))
        parts.extend(f"{k}={v}" for k, v in self.fields.items() if k != "message")
        return " ".join(parts)
