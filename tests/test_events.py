import json
import logging

import pytest

from trio_echo.events import ALL_FLAGS, DEFAULT_FLAGS, Event, Flag, format_flags, parse_flags
from trio_echo.trace import Tracer


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("error,info", Flag.ERROR | Flag.INFO),
        ("ERROR | conn", Flag.ERROR | Flag.CONN),
        (" data ", Flag.DATA),
        ("", Flag(0)),
        ("all", ALL_FLAGS),
        (5, Flag.ERROR | Flag.CONN),
        ("0x5", Flag.ERROR | Flag.CONN),
        ("15", ALL_FLAGS),
        (0, Flag(0)),
    ],
)
def test_parse_flags(value: object, expected: Flag) -> None:
    assert parse_flags(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("errors", "unknown trace flag 'errors'"),
        (16, "out of range"),
        (-1, "out of range"),
        ("0x10", "out of range"),
        ("0xZZ", "is not a flag number"),
        (True, "not a boolean"),
        (1.5, "not float"),
    ],
)
def test_parse_flags_errors(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_flags(value)


@pytest.mark.parametrize(
    ("flags", "text"),
    [(Flag.ERROR | Flag.INFO, "error,info"), (Flag(0), ""), (ALL_FLAGS, "error,info,conn,data")],
)
def test_format_flags_round_trips(flags: Flag, text: str) -> None:
    assert format_flags(flags) == text
    assert parse_flags(text) == flags


def test_event_json_and_text() -> None:
    event = Event(ts=1.5, flag=Flag.CONN, event="conn.close", fields={"conn_id": 3, "reason": "eof"})
    assert json.loads(event.to_json()) == {
        "ts": 1.5,
        "flag": "conn",
        "event": "conn.close",
        "conn_id": 3,
        "reason": "eof",
    }
    assert event.describe() == "conn.close conn_id=3 reason=eof"
    assert Event(0, Flag.ERROR, "error", {"message": "boom", "x": 1}).describe() == "error boom x=1"


def test_tracer_filters_by_flag_and_drops_broken_sinks(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Event] = []
    tracer = Tracer(Flag.ERROR | Flag.CONN)

    def broken(_: Event) -> None:
        raise RuntimeError("sink bug")

    tracer.add_sink(seen.append)
    tracer.add_sink(broken)
    with caplog.at_level(logging.INFO, logger="trio_echo.trace"):
        tracer.emit(Flag.DATA, "conn.data")
        tracer.emit(Flag.CONN, "conn.open", conn_id=1)
        tracer.emit(Flag.CONN, "conn.close", conn_id=1)
    assert [e.event for e in seen] == ["conn.open", "conn.close"]
    assert sum("failed and was removed" in r.message for r in caplog.records) == 1
    assert [r.message for r in caplog.records if r.message.startswith("conn.")] == [
        "conn.open conn_id=1",
        "conn.close conn_id=1",
    ]
    tracer.remove_sink(seen.append)
    tracer.remove_sink(broken)  # already gone: no error
    tracer.emit(Flag.CONN, "conn.open")
    assert len(seen) == 2


def test_each_sink_gets_the_flags_it_asked_for(caplog: pytest.LogCaptureFixture) -> None:
    tracer = Tracer(DEFAULT_FLAGS)  # error,info: what the log and the trace file get
    trace_file = tracer.subscribe(None)  # follows the global flags, as the trace file does
    assert (tracer.conn, tracer.data) == (False, False)  # nobody wants them: call sites skip the work
    conn = tracer.subscribe(Flag.CONN)
    assert (tracer.conn, tracer.data) == (True, False)
    assert tracer.wanted == DEFAULT_FLAGS | Flag.CONN
    data = tracer.subscribe(Flag.DATA)
    assert tracer.data
    with caplog.at_level(logging.DEBUG, logger="trio_echo.trace"):
        tracer.emit(Flag.CONN, "conn.open", conn_id=1)
        tracer.emit(Flag.INFO, "server.ready")
        tracer.emit(Flag.DATA, "conn.data", conn_id=1)
    assert [e.event for e in conn._queue] == ["conn.open"]
    assert [e.event for e in data._queue] == ["conn.data"]
    assert [e.event for e in trace_file._queue] == ["server.ready"]
    assert [r.getMessage() for r in caplog.records] == ["server.ready"]
    tracer.remove_sink(data)
    assert not tracer.data  # the per-chunk work stops with the last data subscriber
    tracer.flags = Flag.CONN | Flag.DATA  # set_trace_flags: the log and the file follow
    tracer.emit(Flag.DATA, "conn.data")
    assert [e.event for e in trace_file._queue][-1] == "conn.data"
    assert [e.event for e in conn._queue] == ["conn.open"]  # a subscriber keeps its own flags
    tracer.remove_sink(conn)
    tracer.remove_sink(trace_file)
    tracer.flags = DEFAULT_FLAGS
    assert tracer.wanted == DEFAULT_FLAGS
    assert tracer.subscribers == 0
