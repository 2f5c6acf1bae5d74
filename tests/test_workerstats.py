"""The master's arithmetic over its workers (pure), the merged connection page, and the control link's
framing (memory streams)."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from trio_echo.admin.listing import merge_ranked
from trio_echo.admin.metrics import MetricsSnapshot, render
from trio_echo.control import ControlError, ControlLink, Pending, decode, encode
from trio_echo.workerstats import (
    ID_BLOCK,
    WorkerState,
    first_id,
    merge_metrics,
    merge_stats,
    retired,
    run_of,
    shares,
)


@pytest.mark.parametrize(
    ("total", "workers", "expected"),
    [
        (None, 3, [None, None, None]),
        (10, 2, [5, 5]),
        (10, 3, [4, 3, 3]),
        (2, 4, [1, 1, 1, 1]),  # every worker may take one: a cap below the workers is rounded up
        (1000, 8, [125] * 8),
    ],
)
def test_shares_of_max_connections(total: int | None, workers: int, expected: list[int | None]) -> None:
    assert shares(total, workers) == expected
    if total is not None and total >= workers:
        assert sum(shares(total, workers)) == total  # type: ignore[arg-type]


@pytest.mark.parametrize("run", [1, 2, 7, 2**20])
def test_connection_ids_name_their_worker_run(run: int) -> None:
    start = first_id(run)
    assert run_of(start) == run
    assert run_of(start + ID_BLOCK - 1) == run
    assert run_of(start + ID_BLOCK) == run + 1
    assert first_id(2**21 - 2) + ID_BLOCK - 1 < 2**53  # still exact in JavaScript (the dashboard)


def stats(
    active: int, total: int, refused: int, bytes_in: int, listeners: dict[str, int]
) -> dict[str, object]:
    return {
        "connections": {"active": active, "total": total, "refused": refused},
        "bytes": {"in": bytes_in, "out": bytes_in},
        "listeners": [{"address": name, "active": count} for name, count in listeners.items()],
        "uptime": 99.0,
    }


def test_merge_stats_sums_and_keeps_one_row_per_worker() -> None:
    rows = [{"index": 0}, {"index": 1}]
    merged = merge_stats(
        [{}, stats(3, 10, 1, 100, {"a": 3, "b": 0}), stats(2, 5, 0, 50, {"a": 1, "b": 1})],
        uptime=12.5,
        workers=rows,
    )
    assert merged == {
        "connections": {"active": 5, "total": 15, "refused": 1},
        "bytes": {"in": 150, "out": 150},
        "listeners": [{"address": "a", "active": 4}, {"address": "b", "active": 1}],
        "uptime": 12.5,
        "workers": rows,
    }


def snapshot(**fields: object) -> dict[str, object]:
    base = MetricsSnapshot(
        version="w",
        uptime=1.0,
        active={},
        total={},
        closed={},
        refused={},
        bytes_in=0,
        bytes_out=0,
        restarts={},
        trace_dropped=7,
    )
    return attrs.asdict(attrs.evolve(base, **fields))


def test_merge_metrics_sums_every_counter_per_label() -> None:
    merged = merge_metrics(
        [
            snapshot(active={"l": 2}, total={"l": 5}, closed={"eof": 3}, bytes_in=10, restarts={"l": 1}),
            snapshot(
                active={"l": 1}, total={"l": 4}, closed={"eof": 1, "idle": 2}, bytes_in=5, restarts={"l": 0}
            ),
        ],
        version="1.2.3",
        uptime=40.0,
        restarts={"worker 0": 2, "worker 1": 0, "admin": 0},
        trace_dropped=3,
        states=[WorkerState.RUNNING, WorkerState.RESTARTING],
    )
    assert merged.active == {"l": 3}
    assert merged.total == {"l": 9}
    assert merged.closed == {"eof": 4, "idle": 2}
    assert merged.bytes_in == 15
    assert merged.restarts == {"l": 1, "worker 0": 2, "worker 1": 0, "admin": 0}
    assert (merged.version, merged.uptime) == ("1.2.3", 40.0)  # the master's own
    assert merged.trace_dropped == 3 + 7 + 7  # the master's drops and each worker's
    assert merged.workers == {"starting": 0, "running": 1, "unresponsive": 0, "stopping": 0, "restarting": 1}
    text = render(merged)
    assert 'trio_echo_workers{state="running"} 1' in text
    assert 'trio_echo_connections_total{listener="l"} 9' in text


def test_a_retired_run_keeps_its_counters_but_not_its_gauges() -> None:
    first = retired(
        {"stats": {}, "metrics": {}},
        {
            "stats": stats(4, 10, 2, 100, {"a": 4}),
            "metrics": snapshot(active={"a": 4}, total={"a": 10}, bytes_in=100),
        },
    )
    second = retired(
        first, {"stats": stats(1, 3, 0, 5, {"a": 1}), "metrics": snapshot(active={"a": 1}, total={"a": 3})}
    )
    assert second["stats"]["connections"] == {"active": 0, "total": 13, "refused": 2}
    assert second["stats"]["bytes"] == {"in": 105, "out": 105}
    assert second["metrics"]["active"] == {}
    assert second["metrics"]["total"] == {"a": 13}
    live = merge_stats([second["stats"], stats(2, 2, 0, 1, {"a": 2})], uptime=1.0, workers=[])
    assert live["connections"] == {"active": 2, "total": 15, "refused": 2}


@pytest.mark.parametrize(
    ("ranked", "offset", "limit", "expected"),
    [
        ([[], []], 0, 5, []),
        ([[(9.0, 1), (5.0, 2)], [(7.0, 11), (1.0, 12)]], 0, 10, [(0, 1), (1, 11), (0, 2), (1, 12)]),
        ([[(9.0, 1), (5.0, 2)], [(7.0, 11), (1.0, 12)]], 1, 2, [(1, 11), (0, 2)]),
        ([[(3.0, 5)], [(3.0, 4)]], 0, 2, [(1, 4), (0, 5)]),  # ties: the lower id first
        ([[(3.0, 5)], [(3.0, 4)]], 5, 2, []),
    ],
)
def test_merge_ranked_pages_across_workers(
    ranked: list[list[tuple[float, int]]], offset: int, limit: int, expected: list[tuple[int, int]]
) -> None:
    assert merge_ranked(ranked, offset, limit) == expected


@pytest.mark.parametrize(
    ("line", "problem"),
    [(b"not json", "not a JSON control message"), (b"[1, 2]", "must be a JSON object"), (b"", "not a JSON")],
)
def test_decode_rejects_what_is_not_a_message(line: bytes, problem: str) -> None:
    with pytest.raises(ControlError, match=problem):
        decode(line)


def test_encode_is_one_line_whatever_the_strings_hold() -> None:
    line = encode({"text": "a\nb", "odd": frozenset()})
    assert line.count(b"\n") == 1
    assert line.endswith(b"\n")
    assert decode(line[:-1]) == {"text": "a\nb", "odd": "frozenset()"}


async def test_control_link_frames_messages_however_the_bytes_arrive() -> None:
    left, right = trio.testing.memory_stream_pair()
    sender, receiver = ControlLink(left), ControlLink(right, max_line=1000)
    await sender.send({"n": 1})
    await sender.send({"n": 2, "s": "x" * 100})
    assert await receiver.receive() == {"n": 1}
    assert await receiver.receive() == {"n": 2, "s": "x" * 100}
    # A message split across many writes, then two in one write.
    data = encode({"n": 3}) + encode({"n": 4})
    for byte in data[:5]:
        await left.send_all(bytes([byte]))
    await left.send_all(data[5:])
    assert await receiver.receive() == {"n": 3}
    assert await receiver.receive() == {"n": 4}
    await sender.send({"big": "y" * 2000})
    with pytest.raises(ControlError, match="longer than 1000 bytes"):
        await receiver.receive()
    await sender.aclose()
    fresh_left, fresh_right = trio.testing.memory_stream_pair()
    await fresh_left.aclose()
    assert await ControlLink(fresh_right).receive() is None


async def test_pending_matches_replies_to_their_requests() -> None:
    pending = Pending()
    first, first_replies = pending.open()
    second, second_replies = pending.open()
    assert first != second
    assert pending.deliver({"re": second, "x": 2})
    assert not pending.deliver({"re": second})  # answered already
    assert not pending.deliver({"re": "nope"})
    assert await second_replies.receive() == {"re": second, "x": 2}
    pending.fail_all()
    with pytest.raises(trio.EndOfChannel):
        await first_replies.receive()


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (0, "exited with status 0"),
        (3, "exited with status 3"),
        (-9, "killed by SIGKILL"),
        (-200, "killed by signal 200"),
    ],
)
def test_describe_exit(code: int, text: str) -> None:
    from trio_echo.workerproc import describe_exit

    assert describe_exit(code) == text


def test_sort_values_compare_across_processes() -> None:
    from trio_echo.admin.listing import sort_value
    from trio_echo.stats import ConnectionInfo

    info = ConnectionInfo(1, "p", "l", 10.0, buffer_size=16)
    info.echoed(5)
    assert sort_value(info, "age", 12.5, None) == 2.5
    assert sort_value(info, "bytes_in", 0.0, None) == 5
    assert sort_value(info, "bytes_out", 0.0, None) == 5
    assert sort_value(info, "rtt_us", 0.0, lambda _: 42) == 42


def test_auto_workers_are_the_usable_cpus() -> None:
    import os

    from trio_echo.master import worker_count

    assert worker_count(3) == 3
    assert worker_count("auto") == len(os.sched_getaffinity(0))
