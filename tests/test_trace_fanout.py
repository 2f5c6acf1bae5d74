from __future__ import annotations

import json

import trio
import trio.testing

from trio_echo.events import Flag
from trio_echo.trace import SUBSCRIBER_QUEUE, TraceFile, Tracer


async def test_stuck_subscriber_stays_bounded_and_counts_drops() -> None:
    tracer = Tracer(Flag.ERROR | Flag.CONN)
    tracer.remove_sink(tracer._log)  # keep 10,000 lines out of the test log
    stuck = tracer.subscribe(Flag.CONN)
    reader = tracer.subscribe(Flag.CONN)
    for i in range(10_000):
        tracer.emit(Flag.CONN, "conn.open", conn_id=i)
        assert len(stuck) <= SUBSCRIBER_QUEUE
        if i == 5000:
            first = await reader.get_batch()
            assert first[-1].fields["conn_id"] == 5000
    rest = await reader.get_batch()
    assert len(stuck) == SUBSCRIBER_QUEUE
    assert stuck.dropped == 10_000 - SUBSCRIBER_QUEUE
    assert reader.delivered + reader.dropped == 10_000
    assert reader.delivered == len(first) + len(rest)
    assert rest[-1].fields["conn_id"] == 9999  # the newest survive, the oldest are dropped
    assert tracer.dropped == stuck.dropped + reader.dropped
    tracer.remove_sink(stuck)
    assert tracer.dropped == 10_000 - SUBSCRIBER_QUEUE + reader.dropped  # still counted once gone


async def test_subscriber_gets_exactly_its_own_flags() -> None:
    # PRODUCT.md (second round): each sink asks for its own flags, as in a WPP trace session.
    tracer = Tracer(Flag.ERROR | Flag.INFO)
    sub = tracer.subscribe(Flag.INFO | Flag.CONN)
    tracer.emit(Flag.CONN, "conn.open")  # globally off, but subscribed
    tracer.emit(Flag.ERROR, "error")  # globally on, but not subscribed
    tracer.emit(Flag.INFO, "server.ready")
    assert [e.event for e in await sub.get_batch()] == ["conn.open", "server.ready"]


async def test_trace_file_writes_json_lines_rotates_and_reopens(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "trace.jsonl"
    tracer = Tracer(Flag.INFO | Flag.CONN)
    trace_file = TraceFile(str(path), max_bytes=2000)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(trace_file.run, tracer)
            for i in range(40):
                tracer.emit(Flag.CONN, "conn.close", conn_id=i, reason="eof")
                await trio.sleep(0.001)
            while not (tmp_path / "trace.jsonl.1").exists():  # noqa: ASYNC110 - written by a worker thread
                await trio.sleep(0.01)
            (tmp_path / "trace.jsonl").rename(tmp_path / "moved.jsonl")  # logrotate moves it away
            trace_file.reopen()
            tracer.emit(Flag.INFO, "config.reloaded", ok=True)
            while not path.exists():  # noqa: ASYNC110
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    rotated = [json.loads(line) for line in (tmp_path / "trace.jsonl.1").read_text().splitlines()]
    assert rotated[0]["event"] == "conn.close"
    assert rotated[0]["flag"] == "conn"
    assert set(rotated[0]) == {"ts", "flag", "event", "conn_id", "reason"}
    assert json.loads(path.read_text().splitlines()[-1])["event"] == "config.reloaded"
