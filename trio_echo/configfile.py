"""Config files (pure): TOML -> :class:`~trio_echo.config.Config` and back, and CLI overrides.

Loading reports the first problem as a :class:`ConfigError` naming the dotted key and the bad value,
whatever the text holds. Hand-written rather than cattrs: the whole schema is scalars, lists of strings
and one list of tables, and the error we owe users is one line naming ``section.key`` and the value,
which cattrs' grouped structuring errors would need translating back into anyway.
"""

from __future__ import annotations

import difflib
import tomllib
import types
import typing
from collections.abc import Mapping
from typing import Any

import attrs

from .addresses import parse_address
from .config import SECTIONS, Config, FaultProfile, ListenerConfig
from .errors import AddressError, ConfigError
from .events import Flag, format_flags, parse_flags

# Integers beyond int64 are no setting anyone means, and some reach C APIs (setsockopt, sleep).
MAX_INTEGER = 2**63 - 1


# -- structuring: mapping -> attrs values -------------------------------------------------------------


def _listener_entry(value: object) -> ListenerConfig:
    if isinstance(value, str):
        return ListenerConfig(address=parse_address(value))
    if isinstance(value, Mapping):
        if "address" not in value:
            raise ConfigError("address", None, "a listen table needs an 'address'")
        address = value["address"]
        if not isinstance(address, str):
            raise ConfigError("address", address, "expected an ADDR string")
        rest = {k: v for k, v in value.items() if k != "address"}
        entry: ListenerConfig = _build(ListenerConfig, rest, "", {"address": parse_address(address)})
        return entry
    raise ConfigError("", value, "expected an ADDR string or a table")


def config_from_toml(text: str) -> Config:
    """Parse TOML text into a validated :class:`Config`.

    Raises:
        ConfigError: for TOML syntax errors, unknown sections or keys, wrong types and bad values,
            whatever the text holds (nesting deeper than the parser's recursion allows, integers
            past Python's digit limit, ...): never another exception.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", None, f"invalid TOML: {exc}") from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively; no setting nests this deep.
        raise ConfigError("", None, "invalid TOML: arrays or tables nested too deeply") from None
    except ValueError as exc:  # e.g. an integer past sys.get_int_max_str_digits()
        raise ConfigError("", None, f"invalid TOML: {exc}") from None
    return config_from_mapping(data)


def config_from_mapping(data: Mapping[str, object]) -> Config:
    """Build a :class:`Config` from a parsed-TOML mapping (see :func:`config_from_toml`)."""
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in SECTIONS and name != "faults":
            raise ConfigError(name, value, f"unknown section{_suggestion(name, [*SECTIONS, 'faults'])}")
        if not isinstance(value, Mapping):
            raise ConfigError(name, value, "expected a table")
        if name == "faults":
            sections[name] = {
                str(profile): fault_profile(table, f"faults.{profile}") for profile, table in value.items()
            }
        else:
            sections[name] = _build(SECTIONS[name], value, name)
    return Config(**sections)


def fault_profile(data: object, prefix: str = "faults") -> FaultProfile:
    """One fault profile from a TOML table or an admin message's JSON object.

    Raises:
        ConfigError: naming ``prefix.key`` for an unknown key, a wrong type or a bad value.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, data, "expected a table of fault keys")
    profile: FaultProfile = _build(FaultProfile, data, prefix)
    return profile


def _build(
    cls: type[Any], data: Mapping[str, object], prefix: str, given: dict[str, Any] | None = None
) -> Any:
    kwargs: dict[str, Any] = dict(given or {})
    fields = {f.name: f for f in attrs.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields or key in kwargs:
            known = [name for name in fields if name not in (given or {})]
            raise ConfigError(dotted, value, f"unknown key{_suggestion(key, known)}")
        try:
            kwargs[key] = _convert(hints[key], value)
        except ConfigError as exc:
            raise _prefixed(exc, dotted) from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(dotted, value, str(exc)) from None
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise _prefixed(exc, prefix) from None


def _suggestion(name: str, known: typing.Iterable[str]) -> str:
    """``; did you mean idle_timeout?`` for a near miss, else the list of what is known."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f"; did you mean {close[0]}?"
    return f" (known: {', '.join(known)})"


def _prefixed(exc: ConfigError, prefix: str) -> ConfigError:
    """The same error with its key placed under ``prefix`` (``limits`` + ``idle_timeout``,
    ``server.listen`` + ``[2]``)."""
    if not prefix:
        return exc
    if not exc.key:
        key = prefix
    elif exc.key.startswith("["):
        key = prefix + exc.key
    else:
        key = f"{prefix}.{exc.key}"
    return ConfigError(key, exc.value, exc.problem)


def _convert(hint: Any, value: object) -> object:
    """Check ``value`` against a field's type and convert it (list -> tuple, int -> float, ...)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        words = [
            word
            for arg in options
            if typing.get_origin(arg) is typing.Literal
            for word in typing.get_args(arg)
        ]
        if isinstance(value, str) and words:  # e.g. workers = "auto"
            if value in words:
                return value
            raise ValueError(f"expected an integer or {' or '.join(map(repr, words))}")
        return _convert(options[0], value)
    if hint is Flag:
        return parse_flags(value)
    if origin is tuple:
        (item_hint, _) = typing.get_args(hint)
        if not isinstance(value, list):
            raise TypeError(f"expected a list, not {_toml_type(value)}")
        items = []
        for index, item in enumerate(value):
            try:
                items.append(
                    _listener_entry(item) if item_hint is ListenerConfig else _convert(item_hint, item)
                )
            except ConfigError as exc:
                raise _prefixed(exc, f"[{index}]") from None
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"[{index}]", item, str(exc)) from None
        return tuple(items)
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, not {_toml_type(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, not {_toml_type(value)}")
        if abs(value) > MAX_INTEGER:
            raise ValueError(f"out of range (at most {MAX_INTEGER})")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number of seconds, not {_toml_type(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, not {_toml_type(value)}")
        return value
    raise TypeError(f"unsupported field type {hint!r}")  # pragma: no cover - schema bug


def _toml_type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}
    if isinstance(value, Mapping):
        return "a table"
    return names.get(type(value), type(value).__name__)


# -- back to TOML (check-config prints the effective config) ------------------------------------------


def config_to_toml(config: Config, *, max_connections: int | None = None) -> str:
    """Render ``config`` as TOML with every default filled in.

    ``max_connections`` replaces an unset ``limits.max_connections`` (its default depends on the
    process's fd limit, which only the caller knows).
    """
    lines: list[str] = []
    for name in SECTIONS:
        section = getattr(config, name)
        lines.append(f"[{name}]")
        for field in attrs.fields(type(section)):
            value = getattr(section, field.name)
            if name == "limits" and field.name == "max_connections" and value is None:
                value = max_connections
            if value is None:
                continue
            lines.append(f"{field.name} = {_toml_value(value)}")
        lines.append("")
    for profile_name, profile in config.faults.items():
        lines.append(f"[faults.{_toml_string(profile_name)}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in profile.to_dict().items())
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Flag):
        return _toml_string(format_flags(value))
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, ListenerConfig):
        defaults = ListenerConfig(address=value.address)
        if value == defaults:
            return _toml_string(str(value.address))
        parts = [f"address = {_toml_string(str(value.address))}"]
        for field in attrs.fields(ListenerConfig)[1:]:
            option = getattr(value, field.name)
            if option != getattr(defaults, field.name):
                parts.append(f"{field.name} = {_toml_value(option)}")
        return "{ " + ", ".join(parts) + " }"
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")  # pragma: no cover - schema bug


def _toml_string(text: str) -> str:
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


# -- command-line overrides ---------------------------------------------------------------------------


def with_overrides(
    config: Config,
    *,
    listen: list[str] | None = None,
    admin: str | None = None,
    workers: str | None = None,
) -> Config:
    """Apply ``serve`` flags: ``--listen`` (replaces the list), ``--admin ADDR|off`` and
    ``--workers N|auto``.

    Raises ConfigError naming the flag when a value is bad.
    """
    server = config.server
    if listen:
        entries = []
        for text in listen:
            try:
                entries.append(ListenerConfig(address=parse_address(text)))
            except AddressError as exc:
                raise ConfigError("--listen", text, str(exc)) from None
        try:
            server = attrs.evolve(server, listen=tuple(entries))
        except ConfigError as exc:
            raise ConfigError("--listen", exc.value, exc.problem) from None
    if workers is not None:
        count: Any = int(workers) if workers.strip().isdigit() else workers  # the validator says if not
        try:
            server = attrs.evolve(server, workers=count)
        except ConfigError as exc:
            raise ConfigError("--workers", workers, exc.problem) from None
    admin_section = config.admin
    if admin is not None:
        try:
            admin_section = attrs.evolve(admin_section, listen="" if admin == "off" else admin)
        except ConfigError as exc:
            raise ConfigError("--admin", admin, exc.problem) from None
    return attrs.evolve(config, server=server, admin=admin_section)
