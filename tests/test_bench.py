"""``trio-echo bench`` against trio_echo and against test-owned broken servers (loopback, bounded)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from xml.etree import ElementTree

import pytest
import trio
import trustme

from tests.conftest import make_config, running_server
from tests.test_tls import server_pem
from trio_echo.benchmodel import PERIOD, Pattern, RateSearch, Tally, kept, message_due, report
from trio_echo.benchplot import _nice, percentile_points, percentile_svg

KEYS = {"verified", "roundtrips_per_s", "mb_per_s", "errors", "error_kinds", "latency_us"}


async def bench(*args: str) -> tuple[int, dict[str, object]]:
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-m", "trio_echo", "bench", *args, "--json"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.mark.parametrize(
    "args",
    [
        ("--count", "300", "--connections", "3"),
        (
            "--duration",
            "1",
            "--mode",
            "stream",
            "--connections",
            "2",
            "--size",
            "65536",
            "--window",
            "131072",
        ),
        ("--count", "200", "--connections", "4", "--processes", "2"),
        ("--count", "200", "--connections", "2", "--rate", "500"),
    ],
)
@pytest.mark.parametrize("engine", ["auto", "trio"])
async def test_against_trio_echo(args: tuple[str, ...], engine: str) -> None:
    async with running_server(make_config(server={"listen": ["127.0.0.1:0"]})) as server:
        code, result = await bench(server.addresses[0], *args, "--engine", engine)
    assert code == 0, result
    assert set(result) >= KEYS
    assert result["verified"] is True
    assert result["errors"] == 0
    latency = result["latency_us"]
    assert isinstance(latency, dict)
    assert set(latency) == {"p50", "p90", "p99", "p999", "max"}
    if "stream" not in args:
        assert result["roundtrips"] in (300, 200)
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p999"] <= latency["max"]
    else:
        assert isinstance(result["mb_per_s"], float)
        assert result["mb_per_s"] > 0


Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def flip_a_byte(stream: trio.SocketStream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(bytes([data[0] ^ 0x40]) + data[1:])


async def truncate(stream: trio.SocketStream) -> None:
    data = await stream.receive_some(65536)
    await stream.send_all(data[: len(data) // 2])
    await stream.aclose()


async def close_at_once(stream: trio.SocketStream) -> None:
    await stream.aclose()


async def serve(handler: Handler, nursery: trio.Nursery) -> str:
    async def wrapped(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await handler(stream)

    (listener,) = await nursery.start(functools.partial(trio.serve_tcp, wrapped, 0, host="127.0.0.1"))
    return f"127.0.0.1:{listener.socket.getsockname()[1]}"


@pytest.mark.parametrize(
    ("handler", "kinds"),
    # (a server that closes at once may be seen as an early EOF or, if our send lost the race, a reset)
    # (in stream mode our sender may hit the reset before our receiver sees the early EOF)
    [(flip_a_byte, ("mismatch",)), (truncate, ("eof", "reset")), (close_at_once, ("eof", "reset"))],
)
@pytest.mark.parametrize("mode", ["pingpong", "stream"])
@pytest.mark.parametrize("engine", ["auto", "trio"])
async def test_broken_servers_are_caught(
    handler: Handler, kinds: tuple[str, ...], mode: str, engine: str
) -> None:
    limit = ("--count", "50") if mode == "pingpong" else ("--duration", "1")
    async with trio.open_nursery() as nursery:
        address = await serve(handler, nursery)
        code, result = await bench(address, *limit, "--connections", "2", "--mode", mode, "--engine", engine)
        nursery.cancel_scope.cancel()
    assert code != 0
    assert result["verified"] is False
    error_kinds = result["error_kinds"]
    assert isinstance(error_kinds, dict)
    assert sum(error_kinds[kind] for kind in kinds) == 2  # each connection fails once and stops
    assert result["errors"] == 2


async def test_connect_failures_are_counted() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nobody listens there now
    code, result = await bench(f"127.0.0.1:{port}", "--count", "10", "--connections", "3")
    assert code != 0
    assert result["error_kinds"] == {"connect": 3, "mismatch": 0, "eof": 0, "reset": 0, "timeout": 0}


async def test_open_loop_rate_does_not_hide_a_stall() -> None:
    """One reply in a hundred comes 100 ms late. Measured from the intended send time, p99 >= 100 ms;
    a closed-loop client that only timed the messages it got around to sending would see ~0.1 ms."""
    replies = 0

    async def slow_sometimes(stream: trio.SocketStream) -> None:
        nonlocal replies
        while data := await stream.receive_some(65536):
            replies += 1
            if replies % 100 == 1:  # the 1st, 101st, 201st, ...: a little over 1 % of 350
                await trio.sleep(0.1)
            await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        address = await serve(slow_sometimes, nursery)
        code, result = await bench(
            address, "--count", "350", "--connections", "1", "--rate", "200", "--size", "64"
        )
        nursery.cancel_scope.cancel()
    assert code == 0, result
    latency = result["latency_us"]
    assert isinstance(latency, dict)
    assert latency["p99"] >= 100_000
    assert latency["p50"] < 100_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nonsense",), b"expected HOST:PORT"),
        (("127.0.0.1:1", "--size", "0"), b"argument --size: 0 is not a positive integer"),
        (("127.0.0.1:1", "--size", str(PERIOD + 1)), b"--size must be 1.."),
        (("127.0.0.1:1", "--count", "5", "--duration", "1"), b"not allowed with argument"),
    ],
)
def test_bad_arguments(args: tuple[str, ...], message: bytes) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trio_echo", "bench", *args], capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert message in done.stderr


def test_pattern_and_report_model() -> None:
    one, two = Pattern(1), Pattern(2)
    assert bytes(one.chunk(0, 100)) != bytes(two.chunk(0, 100))
    assert one.matches(PERIOD - 10, bytes(one.chunk(PERIOD - 10, 20)))  # across the wrap
    assert one.matches(5, bytes(one.chunk(5, PERIOD)) + bytes(one.chunk(5 + PERIOD, 7)))
    assert not one.matches(0, bytes(two.chunk(0, 10)))
    with pytest.raises(ValueError, match="at most"):
        one.chunk(0, PERIOD + 1)
    tally = Tally(roundtrips=10, bytes_echoed=1000, connections=1)
    assert report(tally, duration=2.0, latency_us={}, mode="pingpong")["roundtrips_per_s"] == 5.0
    assert not Tally().verified


@pytest.mark.parametrize("engine", ["auto", "trio"])
async def test_progress_line_only_on_a_terminal(engine: str) -> None:
    async with running_server(make_config(server={"listen": ["127.0.0.1:0"]})) as server:
        primary, secondary = os.openpty()
        try:
            done = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "trio_echo",
                    "bench",
                    server.addresses[0],
                    "--duration",
                    "2.5",
                    "--engine",
                    engine,
                    "--connections",
                    "2",
                ],
                stderr=secondary,
                capture_stdout=True,
                check=False,
            )
            os.close(secondary)
            output = b""
            while True:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # EIO: the terminal's other side is closed and drained
                    break
                if not chunk:
                    break
                output += chunk
        finally:
            os.close(primary)
        piped = await bench(server.addresses[0], "--duration", "1.5", "--connections", "2")
    assert done.returncode == 0
    assert b"\r" in output
    assert b"rt/s" in output  # the live line, on stderr
    assert b"open 2" in output
    assert b"verified" in done.stdout  # the summary, on stdout
    assert b"rt/s" not in done.stdout
    assert piped[0] == 0  # (--json output, not a terminal: no progress line, or json.loads would fail)


async def _bench_lines(*args: str) -> tuple[int, list[dict[str, object]]]:
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-m", "trio_echo", "bench", *args, "--json-stream"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize("processes", ["1", "2"])
async def test_json_stream_reports_each_second_then_the_result(processes: str) -> None:
    async with running_server(make_config(server={"listen": ["127.0.0.1:0"]})) as server:
        code, lines = await _bench_lines(
            server.addresses[0], "--duration", "3", "--connections", "4", "--processes", processes
        )
    *seconds, result = lines
    assert code == 0
    assert [line["elapsed"] for line in seconds] == [1, 2, 3]
    for line in seconds:
        assert set(line) == {"elapsed", "roundtrips_per_s", "mb_per_s", "p50_us", "p99_us", "errors", "open"}
        assert line["open"] == 4
        assert line["errors"] == 0
        assert int(line["roundtrips_per_s"]) > 0  # type: ignore[call-overload]
        assert 0 < float(line["p50_us"]) <= float(line["p99_us"])  # type: ignore[arg-type]
        assert line["mb_per_s"] == round(int(line["roundtrips_per_s"]) * 1024 / 1e6, 3)  # type: ignore[call-overload]
    assert result["verified"] is True
    assert sum(int(line["roundtrips_per_s"]) for line in seconds) <= int(result["roundtrips"])  # type: ignore[call-overload]


@pytest.mark.parametrize("processes", ["1", "2"])
async def test_ramp_opens_connections_evenly(processes: str) -> None:
    async with running_server(make_config(server={"listen": ["127.0.0.1:0"]})) as server:
        # 3 connections over 1.6 s: at 0, 0.8 and 1.6 s, so 2 are open after one second, 3 after two
        code, lines = await _bench_lines(
            server.addresses[0], "--duration", "2.5", "--ramp", "3:1.6", "--processes", processes
        )
    *seconds, result = lines
    assert code == 0
    assert [line["open"] for line in seconds] == [2, 3]
    assert result["connections"] == 3
    assert result["verified"] is True
    assert server.stats.total == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--ramp", "6"), "argument --ramp: '6' is not CONNS:SECONDS"),
        (("--ramp", "0:1"), "argument --ramp: '0:1' is not CONNS:SECONDS (a count >= 1, seconds > 0)"),
        (("--ramp", "3:-1"), "is not CONNS:SECONDS"),
        (
            ("--ramp", "6:1", "--connections", "5"),
            "--ramp 6:... opens 6 connections; leave out --connections",
        ),
    ],
)
def test_bad_new_flags_are_one_line_and_exit_2(args: tuple[str, ...], message: str) -> None:
    assert message in usage_error("127.0.0.1:1", *args)


def usage_error(*argv: str) -> str:
    """``trio-echo bench ARGV``'s complaint: exit 2 and exactly one line on stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "trio_echo", "bench", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    return done.stderr


async def test_connect_mode_counts_whole_connections() -> None:
    async with running_server(make_config(server={"listen": ["127.0.0.1:0"]})) as server:
        code, result = await bench(
            server.addresses[0], "--mode", "connect", "--count", "60", "--connections", "3"
        )
        assert code == 0
        assert result["verified"] is True
        assert result["roundtrips"] == 60
        assert float(result["connections_per_s"]) > 0  # type: ignore[arg-type]
        assert "tls_handshakes_per_s" not in result
        assert server.stats.total == 60  # one connection per round trip
        assert server.stats.closed["eof"] + server.stats.active == 60  # (the last may still be closing)


async def test_connect_mode_over_tls_counts_handshakes(tmp_path: Path) -> None:
    pem = server_pem(trustme.CA(), tmp_path / "server.pem")
    config = make_config(server={"listen": ["tls://127.0.0.1:0"]}, tls={"cert_file": pem, "key_file": pem})
    async with running_server(config) as server:
        address = server.addresses[0]
        code, result = await bench(
            address, "--mode", "connect", "--count", "20", "--connections", "2", "--insecure"
        )
    assert code == 0
    assert result["verified"] is True
    assert result["tls_handshakes_per_s"] == result["connections_per_s"]
    assert server.stats.total == 20


async def test_connect_mode_reports_a_corrupting_server() -> None:
    config = make_config(
        server={"listen": [{"address": "127.0.0.1:0", "faults": "bad"}]}, faults={"bad": {"corrupt": 1.0}}
    )
    async with running_server(config) as server:
        code, result = await bench(
            server.addresses[0], "--mode", "connect", "--count", "10", "--connections", "1"
        )
    assert code == 1
    assert result["error_kinds"]["mismatch"] == 1  # type: ignore[index]
    assert result["verified"] is False


@pytest.mark.parametrize(
    ("number", "start", "end", "duration", "due"),
    [
        (0, 10, 10, 5, 0.0),
        (25, 10, 10, 5, 2.5),  # constant: number / rate
        (0.5, 4, 4, 1, 0.125),  # a fraction staggers connections
        (0, 0.5, 10, 2, 0.0),
        (10.5, 0.5, 10, 2, 2.0),  # the whole ramp: 0.5*2 + 9.5*2/2 = 10.5 messages in 2 s
        (12.5, 0.5, 10, 2, 2.2),  # then at the end rate
        (100, 100, 200, 1, (-100 + (100**2 + 2 * 100 * 100) ** 0.5) / 100),
    ],
)
def test_when_a_message_is_due(number: float, start: float, end: float, duration: float, due: float) -> None:
    assert message_due(number, start, end, duration) == pytest.approx(due)


async def test_a_linear_rate_ramp() -> None:
    async with running_server(make_config(server={"listen": ["127.0.0.1:0"]})) as server:
        code, lines = await _bench_lines(
            server.addresses[0], "--duration", "2", "--connections", "4", "--rate", "200:1000"
        )
    *seconds, result = lines
    assert code == 0
    assert result["verified"] is True
    # 200 -> 1000/s over 2 s: 400 in the first second, 800 in the second (1200 in all)
    first, second = (int(line["roundtrips_per_s"]) for line in seconds)  # type: ignore[call-overload]
    assert 300 <= first <= 500
    assert 650 <= second <= 950
    assert 1100 <= int(result["roundtrips"]) <= 1210  # type: ignore[call-overload]


@pytest.mark.parametrize("processes", ["1", "2"])
async def test_hdr_log_is_an_interval_log_hdrhistograms_reader_reads(tmp_path: Path, processes: str) -> None:
    from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]
    from hdrh.log import HistogramLogReader  # type: ignore[import-untyped]

    log = tmp_path / "latency.hlog"
    async with running_server(make_config(server={"listen": ["127.0.0.1:0"]})) as server:
        code, lines = await _bench_lines(
            server.addresses[0],
            "--duration",
            "2.5",
            "--connections",
            "3",
            "--processes",
            processes,
            "--hdr-log",
            str(log),
        )
    *seconds, result = lines
    assert code == 0
    text = log.read_text()
    assert text.startswith("#[Logged with trio-echo bench")
    assert "#[Histogram log format version 1.3]" in text
    reader = HistogramLogReader(str(log), HdrHistogram(1, 3_600_000_000, 3))
    counts = []
    try:
        while (interval := reader.get_next_interval_histogram()) is not None:
            counts.append(interval.get_total_count())
    finally:
        reader.close()
    # one interval per whole second, the same counts the JSON stream gave
    assert counts == [line["roundtrips_per_s"] for line in seconds]
    assert len(counts) == 2
    assert 0 < sum(counts) <= int(result["roundtrips"])  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("value", "axis"), [(0.0, 1.0), (0.3, 0.5), (1.0, 1.0), (3.2, 5.0), (7.0, 10.0), (12, 20)]
)
def test_plot_axis_ends_on_a_round_number(value: float, axis: float) -> None:
    assert _nice(value) == axis


def test_percentile_plot_is_svg_with_the_distribution_in_nines() -> None:
    points = percentile_points(lambda percentile: 1000.0 + percentile * 10)
    assert len(points) == 121
    assert points[0] == (0.0, 1000.0)
    assert points[20][0] == pytest.approx(90.0)
    assert points[-1][0] == pytest.approx(99.9999)
    document = ElementTree.fromstring(percentile_svg(points, title="a <run> & more"))
    namespace = "{http://www.w3.org/2000/svg}"
    (line,) = document.iter(f"{namespace}polyline")
    coordinates = [tuple(map(float, pair.split(","))) for pair in line.get("points", "").split()]
    xs = [x for x, _ in coordinates]
    ys = [y for _, y in coordinates]
    assert xs == sorted(xs)
    steps = [b - a for a, b in itertools.pairwise(xs)]
    assert max(steps) - min(steps) < 0.2  # even in nines (coordinates are rounded to 0.1)
    assert ys == sorted(ys, reverse=True)  # latency rises (SVG's y grows downwards)
    texts = [text.text for text in document.iter(f"{namespace}text")]
    assert "a <run> & more" in texts
    assert {"90%", "99%", "99.9%", "99.9999%"} <= set(texts)


async def test_bench_plot_writes_the_svg(tmp_path: Path) -> None:
    plot = tmp_path / "latency.svg"
    async with running_server(make_config(server={"listen": ["127.0.0.1:0"]})) as server:
        code, _ = await bench(
            server.addresses[0], "--count", "300", "--connections", "3", "--plot", str(plot)
        )
    assert code == 0
    document = ElementTree.fromstring(plot.read_text())
    assert document.tag == "{http://www.w3.org/2000/svg}svg"
    assert "3 connections, 1024 B" in plot.read_text()


@pytest.mark.parametrize(
    ("ceiling", "outcomes", "rates", "best"),
    [
        (1000.0, [True], [1000.0], 1000.0),  # the ceiling itself keeps it: done
        (1000.0, [False, True, False, True], [1000.0, 500.0, 750.0, 625.0], 625.0),
        (800.0, [False] * 7, [800.0, 400.0, 200.0, 100.0, 50.0, 25.0, 12.5], 0.0),  # nothing keeps it
    ],
)
def test_rate_search_bisects_below_the_ceiling(
    ceiling: float, outcomes: list[bool], rates: list[float], best: float
) -> None:
    search = RateSearch(ceiling, steps=6)
    asked = []
    for ok in outcomes:
        assert not search.done
        asked.append(search.next_rate())
        search.record(asked[-1], ok)
    assert asked == rates
    assert search.best == best
    if len(outcomes) in (1, 7):
        assert search.done


@pytest.mark.parametrize(
    ("p99_us", "achieved", "verified", "ok"),
    [
        (900.0, 100.0, True, True),
        (1100.0, 100.0, True, False),
        (900.0, 90.0, True, False),
        (900.0, 100.0, False, False),
    ],
)
def test_a_trial_keeps_the_target(p99_us: float, achieved: float, verified: bool, ok: bool) -> None:
    latency = {"p50": 1.0, "p90": 1.0, "p99": p99_us, "p999": 1.0, "max": 1.0}
    assert kept(latency, target_ms=1.0, rate=100.0, achieved=achieved, verified=verified) is ok


@pytest.mark.parametrize(("target_ms", "found"), [("200", True), ("20", False)])
async def test_max_rate_against_a_server_with_50_ms_of_latency(target_ms: str, found: bool) -> None:
    config = make_config(
        server={"listen": [{"address": "127.0.0.1:0", "faults": "slow"}]}, faults={"slow": {"latency": 0.05}}
    )
    async with running_server(config) as server:
        code, result = await bench(
            server.addresses[0], "--duration", "1", "--connections", "4", "--max-rate", target_ms
        )
    trials = result["trials"]
    assert isinstance(trials, list)
    assert result["verified"] is True
    if found:
        assert code == 0
        best = float(result["max_rate"])  # type: ignore[arg-type]
        assert best > 0
        assert any(trial["kept"] and trial["rate"] == round(best, 1) for trial in trials)
        assert all(trial["p99_ms"] <= 200 for trial in trials if trial["kept"])
    else:
        assert code == 1  # every answer takes 50 ms: no rate keeps p99 under 20 ms
        assert result["max_rate"] == 0
        assert not any(trial["kept"] for trial in trials)


async def test_processes_auto_is_one_per_cpu_it_may_use() -> None:
    async with running_server(make_config(server={"listen": ["127.0.0.1:0"]})) as server:
        with trio.fail_after(60):
            done = await trio.run_process(
                [
                    *("taskset", "-c", "0", sys.executable, "-m", "trio_echo", "bench", server.addresses[0]),
                    *("--count", "40", "--connections", "4", "--processes", "auto", "--json"),
                ],
                capture_stdout=True,
                check=False,
            )
            code, wide = await bench(
                server.addresses[0], "--count", "40", "--connections", "4", "--processes", "auto"
            )
    pinned = json.loads(done.stdout)
    assert done.returncode == 0
    assert (pinned["verified"], pinned["processes"]) == (True, 1)  # taskset gave it one CPU
    assert code == 0
    assert (wide["connections"], wide["processes"]) == (4, len(os.sched_getaffinity(0)))


@pytest.mark.parametrize(
    ("args", "connections"),
    [
        (("--count", "200", "--connections", "4"), 4),
        (("--count", "30", "--connections", "3", "--mode", "connect"), 30),
        (("--count", "100", "--connections", "4", "--processes", "2", "--size", "65000"), 4),
    ],
)
async def test_websocket_bench_verifies_every_message(args: tuple[str, ...], connections: int) -> None:
    config = make_config(server={"listen": ["http://127.0.0.1:0"]})
    async with running_server(config) as server:
        port = server.addresses[0].rsplit(":", 1)[1]
        code, result = await bench(f"ws://127.0.0.1:{port}/bench?x=1", *args)
        messages = server.stats.websocket_messages["binary"]
        total = server.stats.total
    assert code == 0, result
    assert result["verified"] is True
    assert result["mode"] == f"ws-{args[args.index('--mode') + 1] if '--mode' in args else 'pingpong'}"
    assert result["roundtrips"] == messages == int(args[1])
    assert total == connections


async def test_websocket_bench_over_wss_and_against_a_corrupting_echo(tmp_path: Path) -> None:
    ca = trustme.CA()
    pem = server_pem(ca, tmp_path / "server.pem")
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    config = make_config(server={"listen": ["https://127.0.0.1:0"]}, tls={"cert_file": pem, "key_file": pem})
    async with running_server(config) as server:
        port = server.addresses[0].rsplit(":", 1)[1]
        code, result = await bench(f"wss://localhost:{port}/", "--ca", str(ca_pem), "--count", "50")
    assert (code, result["verified"], result["roundtrips"], result["mode"]) == (0, True, 50, "wss-pingpong")
    corrupting = make_config(
        server={"listen": [{"address": "http://127.0.0.1:0", "faults": "flip"}]},
        faults={"flip": {"corrupt": 1.0, "seed": 3}},
    )
    async with running_server(corrupting) as server:
        port = server.addresses[0].rsplit(":", 1)[1]
        code, result = await bench(f"ws://127.0.0.1:{port}/", "--count", "20", "--connections", "2")
    assert code == 1
    assert result["verified"] is False
    assert result["errors"] == 2  # each connection stops at its first bad message (or broken frame)


@pytest.mark.parametrize(
    ("address", "args", "message"),
    [
        ("ws://:80/", (), "the URL needs a host"),
        ("wss://h:99999/", (), "port 99999 is out of range"),
        ("ws://127.0.0.1:1/", ("--mode", "stream"), "use --mode pingpong or connect"),
    ],
)
def test_bad_websocket_targets(address: str, args: tuple[str, ...], message: str) -> None:
    assert message in usage_error(address, *args)


@pytest.mark.parametrize(
    ("address", "flags", "fast"),
    [
        ("127.0.0.1:7", {}, True),
        ("unix:/run/echo.sock", {"mode": "stream"}, True),
        ("127.0.0.1:7", {"engine": "trio"}, False),
        ("tls://127.0.0.1:7", {}, False),
        ("127.0.0.1:7", {"insecure": True}, False),
        ("udp://127.0.0.1:7", {}, False),
        ("127.0.0.1:7", {"mode": "connect"}, False),
        ("127.0.0.1:7", {"rate": (10.0, 10.0)}, False),
        ("127.0.0.1:7", {"ramp": (5, 1.0)}, False),
        ("127.0.0.1:7", {"reconnect": True}, False),
        ("127.0.0.1:7", {"json_stream": True}, False),
        ("127.0.0.1:7", {"hdr_log": "x.hlog"}, False),
    ],
)
def test_which_runs_take_the_fast_engine(address: str, flags: dict[str, object], fast: bool) -> None:
    import argparse

    from trio_echo.addresses import parse_address
    from trio_echo.benchloop import eligible

    defaults = {"engine": "auto", "mode": "pingpong", "tls": False, "ca": None, "insecure": False}
    defaults |= {"rate": None, "ramp": None, "reconnect": False, "json_stream": False, "hdr_log": None}
    assert eligible(parse_address(address), argparse.Namespace(**(defaults | flags))) is fast


async def stall(stream: trio.SocketStream) -> None:
    """Reads, never echoes, never closes."""
    while await stream.receive_some(65536):
        pass
    await trio.sleep_forever()


async def echo_then_hold(stream: trio.SocketStream) -> None:
    """Echoes, but keeps the connection open after the client's half-close."""
    while data := await stream.receive_some(65536):
        await stream.send_all(data)
    await trio.sleep_forever()


async def reset_after_first(stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


@pytest.mark.parametrize(
    ("handler", "mode", "kind"),
    [
        (stall, "stream", "timeout"),
        (echo_then_hold, "pingpong", "timeout"),
        (reset_after_first, "pingpong", "reset"),
    ],
)
async def test_the_fast_engine_reports_stalls_and_resets(
    handler: Handler, mode: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process (so the drain timeout can be short): what the fast engine makes of a server that
    never echoes what was streamed, one that never closes, one that resets."""
    import argparse

    from trio_echo import benchloop
    from trio_echo.addresses import parse_address

    monkeypatch.setattr(benchloop, "DRAIN_TIMEOUT", 0.5)
    opts = argparse.Namespace(
        mode=mode,
        size=1024,
        window=8192,
        count=20 if mode == "pingpong" else None,
        duration=0.5,
        progress=False,
    )
    async with trio.open_nursery() as nursery:
        address = await serve(handler, nursery)
        run = benchloop.FastRun(parse_address(address), opts, 2, 0)
        with trio.fail_after(20):
            await trio.to_thread.run_sync(run.run)
        nursery.cancel_scope.cancel()
    assert run.tally.errors == {kind: 2}
    assert run.tally.open == 0


async def test_the_fast_engine_over_a_unix_socket_with_more_connections_than_round_trips(
    tmp_path: Path,
) -> None:
    path = tmp_path / "echo.sock"
    async with running_server(make_config(server={"listen": [f"unix:{path}"]})) as server:
        code, result = await bench(f"unix:{path}", "--count", "3", "--connections", "5")
        total = server.stats.total
    assert code == 0, result
    assert result["roundtrips"] == 3
    assert total == 5  # every connection opened; two made no round trip and closed cleanly


def test_model_edges() -> None:
    from trio_echo.benchmodel import ramp_start, summary_line

    assert ramp_start(0, 1, 5.0) == 0.0  # one connection: at once
    assert ramp_start(3, 4, 0.0) == 0.0
    with pytest.raises(ValueError, match="ceiling"):
        RateSearch(0.0)
    tally = Tally(connections=2, roundtrips=10)
    result = report(
        tally,
        duration=1.0,
        latency_us={"p50": 1.0, "p90": 1.0, "p99": 1.0, "p999": 1.0, "max": 1.0},
        mode="connect",
        tls=True,
    )
    line = summary_line(result)
    assert "connections/s (TLS handshakes)" in line
    assert line.endswith("VERIFIED")  # (no bytes counted: not verified)
    stream = report(
        Tally(connections=1, bytes_echoed=5_000_000),
        duration=1.0,
        latency_us={"p50": 0.0, "p90": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0},
        mode="stream",
    )
    assert summary_line(stream).startswith("stream: 5.0 MB/s, errors 0 ")  # no zero rates or latencies
    assert summary_line(stream).endswith(", verified")
