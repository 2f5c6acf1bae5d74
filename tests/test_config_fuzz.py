"""Whatever a config file holds, both entry points (``check-config`` and ``serve``) answer with one line
and exit 2, or accept it; the loader raises ConfigError and nothing else. Hypothesis writes the files:
random text and bytes, TOML-shaped documents with real section and key names and values of every TOML
type nested at random, and nesting far deeper than any parser's recursion."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_echo import cli
from trio_echo.config import SECTIONS, Config
from trio_echo.configfile import config_from_toml
from trio_echo.errors import ConfigError

SECTION_KEYS = {name: [f.name for f in attrs.fields(cls)] for name, cls in SECTIONS.items()}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def toml_value(value: object) -> str:
    """Render a value as an inline TOML value (the test's own writer: the stdlib has none)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string for these characters
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


scalars = (
    st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=st.characters(codec="ascii", exclude_characters="\x7f"), max_size=20)
    | st.sampled_from(["tcp://:0", "127.0.0.1:0", "udp://[::1]:0", "tls://:1", "unix:/x", "0x5", "conn"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["address", "name", "proxy_protocol", "x"]), inner, max_size=3)
    ),
    max_leaves=12,
)
key_names = st.sampled_from(sorted({k for keys in SECTION_KEYS.values() for k in keys} | {"bogus"}))
documents = st.dictionaries(
    st.sampled_from([*SECTION_KEYS, "nonsense"]), st.dictionaries(key_names, values, max_size=5), max_size=4
)


def render(document: dict[str, dict[str, object]]) -> str:
    lines = []
    for section, keys in document.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in keys.items())
    return "\n".join(lines) + "\n"


def nested(depth: int, kind: str) -> str:
    if kind == "array":
        return "[limits]\nallow = " + "[" * depth + "]" * depth + "\n"
    return "x = " + "{a=" * depth + "1" + "}" * depth + "\n"


def run_cli(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(list(args))
    return code, err.getvalue()


def check_both_entry_points(path: Path) -> None:
    code, err = run_cli("check-config", str(path))
    if code == 0:
        assert err == ""
        return
    assert code == 2, err
    assert err.startswith("trio-echo: config error: ")
    assert err.count("\n") == 1, err
    assert len(err) < 1000
    # serve reads the file the same way and stops before binding anything
    assert run_cli("serve", "--config", str(path), "--admin", "off") == (2, err)


def check_loader(text: str) -> None:
    try:
        result: object = config_from_toml(text)
    except ConfigError as exc:
        result = str(exc)
    assert isinstance(result, Config) or "\n" not in str(result)


@FUZZ
@given(documents)
def test_structured_documents(tmp_path: Path, document: dict[str, dict[str, object]]) -> None:
    text = render(document)
    check_loader(text)
    path = tmp_path / "fuzz.toml"
    path.write_text(text, encoding="utf-8")
    check_both_entry_points(path)


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "junk.toml"
    path.write_bytes(data)
    check_both_entry_points(path)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(min_value=0, max_value=20000), st.sampled_from(["array", "table"]))
def test_any_nesting_depth(tmp_path: Path, depth: int, kind: str) -> None:
    text = nested(depth, kind)
    check_loader(text)
    path = tmp_path / "deep.toml"
    path.write_text(text, encoding="utf-8")
    check_both_entry_points(path)


def test_a_directory_and_a_missing_file(tmp_path: Path) -> None:
    for target in (tmp_path, tmp_path / "missing.toml"):
        check_both_entry_points(target)
        assert run_cli("check-config", str(target))[0] == 2
