"""``trio-echo bench`` on the command line: arguments, worker processes, the report (I/O).

The load itself (connections, ping-pong and stream modes, byte verification) is :class:`bench.Run`;
the pure parts (the byte pattern, tallies, the report) are in :mod:`trio_echo.benchmodel`.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import functools
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, TextIO

import attrs
import trio

from .addresses import Address, parse_address, parse_websocket_url
from .bench import Run, new_histogram, percentiles
from .benchloop import FastRun, eligible
from .benchmodel import PERIOD, RateSearch, Second, Tally, kept, report, second_line, summary_line
from .benchplot import percentile_points, percentile_svg
from .client import MAX_DATAGRAM, add_tls_arguments
from .errors import AddressError


async def run_in_processes(opts: argparse.Namespace, output: IntervalOutput) -> tuple[Tally, Any, float]:
    """Spread the connections over ``opts.processes`` worker processes and merge what they report."""
    share = [
        opts.connections // opts.processes + (i < opts.connections % opts.processes)
        for i in range(opts.processes)
    ]
    results: list[dict[str, Any]] = []

    async def worker(index: int, connections: int) -> None:
        argv = [sys.executable, "-m", "trio_echo", "bench", opts.address, "--connections", str(connections)]
        argv += ["--size", str(opts.size), "--mode", opts.mode, "--window", str(opts.window)]
        argv += ["--worker-seed", str(sum(share[:index]))]
        argv += ["--tls"] * opts.tls + ["--insecure"] * opts.insecure + (["--ca", opts.ca] if opts.ca else [])
        argv += ["--udp"] * opts.udp + ["--udp-timeout", str(opts.udp_timeout)]
        if opts.count is not None:
            argv += ["--count", str(max(1, opts.count * connections // opts.connections))]
        else:
            argv += ["--duration", str(opts.duration)]
        if opts.rate:
            start, end = (rate * connections / opts.connections for rate in opts.rate)
            argv += ["--rate", f"{start}:{end}"]
        if opts.ramp is not None:
            argv += ["--ramp", f"{opts.ramp[0]}:{opts.ramp[1]}"]
        argv += ["--json-stream"] * bool(opts.json_stream or opts.hdr_log)  # (its seconds, raw)
        # Read the worker's lines as they come: its seconds (--json-stream), then its result.
        run = functools.partial(trio.run_process, [*argv, "--worker"], stdout=subprocess.PIPE, check=False)
        async with trio.open_nursery() as reading:
            process: trio.Process = await reading.start(run)
            assert process.stdout is not None
            buffered = b""
            async for data in process.stdout:
                buffered += data
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    if "second" in message:
                        seconds.add(Second(**message["second"]), message["histogram"])
                    else:
                        results.append(message)

    seconds = _Seconds(len([c for c in share if c]), output)
    async with trio.open_nursery() as nursery:
        for index, connections in enumerate(share):
            if connections:
                nursery.start_soon(worker, index, connections)
    seconds.flush()
    tally, histogram, duration = Tally(), new_histogram(), 0.0
    for result in results:
        part = Tally(result["roundtrips"], result["bytes_echoed"], result["connections"])
        part.errors.update(result["errors"])
        part.lost = result["lost"]
        part.reconnects = result["reconnects"]
        tally.merge(part)
        histogram.decode_and_add(base64.b64decode(result["histogram"]))
        duration = max(duration, result["duration_s"])
    return tally, histogram, duration


class _Seconds:
    """--json-stream across worker processes: one line per second once every worker has reported
    it (the seconds some workers did not reach come at the end)."""

    def __init__(self, workers: int, output: IntervalOutput) -> None:
        self.workers = workers
        self.output = output
        self.pending: dict[int, list[tuple[Second, Any]]] = {}

    def add(self, second: Second, histogram: str) -> None:
        parts = self.pending.setdefault(second.second, [])
        parts.append((second, histogram))
        if len(parts) == self.workers:
            self._print(second.second)

    def flush(self) -> None:
        for number in sorted(self.pending):
            self._print(number)

    def _print(self, number: int) -> None:
        parts = self.pending.pop(number)
        merged, histogram = parts[0][0], new_histogram()
        for second, _ in parts[1:]:
            merged = merged.merged(second)
        for _, encoded in parts:
            histogram.decode_and_add(base64.b64decode(encoded))
        self.output(merged, histogram)


class IntervalOutput:
    """Where each second of the run goes: a ``--json-stream`` line on stdout and/or an interval of
    the ``--hdr-log`` (HdrHistogram's interval log format, latencies in µs, maxima in ms)."""

    def __init__(self, *, json_stream: bool, hdr_log: TextIO | None) -> None:
        self.json_stream = json_stream
        self.hdr_log = hdr_log
        if hdr_log is not None:
            hdr_log.write(hdr_log_header(time.time()))

    @property
    def wanted(self) -> bool:
        return self.json_stream or self.hdr_log is not None

    def __call__(self, second: Second, histogram: Any) -> None:
        if self.json_stream:
            print(json.dumps(second_line(second, percentiles(histogram))), flush=True)
        if self.hdr_log is not None:
            payload = histogram.encode().decode() if histogram.get_total_count() else ""
            max_ms = histogram.get_max_value() / 1000 if histogram.get_total_count() else 0.0
            self.hdr_log.write(f"{second.second - 1:.3f},1.000,{max_ms:.3f},{payload}\n")
            self.hdr_log.flush()


def hdr_log_header(started: float) -> str:
    """The interval log's header (HdrHistogram log format 1.3); interval start times are relative
    to the run's start."""
    stamp = datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat()
    return (
        "#[Logged with trio-echo bench: latencies in microseconds]\n"
        "#[Histogram log format version 1.3]\n"
        f"#[StartTime: {started:.3f} (seconds since epoch), {stamp}]\n"
        '"StartTimestamp","Interval_Length","Interval_Max","Interval_Compressed_Histogram"\n'
    )


def _worker_second(second: Second, histogram: Any) -> None:
    encoded = base64.b64encode(histogram.encode()).decode()
    print(json.dumps({"second": attrs.asdict(second), "histogram": encoded}), flush=True)


def measure(address: Address, args: argparse.Namespace, output: IntervalOutput) -> tuple[Tally, Any, float]:
    """One run, in this process or spread over ``--processes``."""
    if args.processes > 1:
        return trio.run(run_in_processes, args, output)
    if eligible(address, args):  # the synchronous epoll engine (benchloop.py)
        fast = FastRun(address, args, args.connections, args.worker_seed)
        duration = fast.run()
        return fast.tally, fast.histogram, duration
    run = Run(address, args, args.connections, args.worker_seed)
    if args.worker and args.json_stream:
        run.on_second = _worker_second
    elif output.wanted:
        run.on_second = output
    duration = trio.run(run.run)
    return run.tally, run.histogram, duration


def max_rate(address: Address, args: argparse.Namespace) -> int:
    """``--max-rate P99_MS``: a closed-loop trial for the ceiling, then open-loop trials of
    ``--duration`` each, bisecting for the highest rate that keeps p99 within the target."""
    quiet = IntervalOutput(json_stream=False, hdr_log=None)
    plain = argparse.Namespace(**{**vars(args), "rate": None, "progress": False, "json_stream": False})
    tally, _, duration = measure(address, plain, quiet)
    trials: list[dict[str, object]] = []
    verified = tally.verified
    ceiling = tally.roundtrips / max(duration, 1e-9)
    search = RateSearch(ceiling) if verified and ceiling > 0 else None
    while search is not None and not search.done:
        rate = search.next_rate()
        tally, histogram, duration = measure(
            address, argparse.Namespace(**{**vars(plain), "rate": (rate, rate)}), quiet
        )
        latency = percentiles(histogram)
        achieved = tally.roundtrips / max(duration, 1e-9)
        ok = kept(latency, target_ms=args.max_rate, rate=rate, achieved=achieved, verified=tally.verified)
        search.record(rate, ok)
        trials.append(
            {
                "rate": round(rate, 1),
                "achieved": round(achieved, 1),
                "p99_ms": latency["p99"] / 1000,
                "kept": ok,
            }
        )
        if not args.json:
            print(
                f"  {rate:10.1f}/s: p99 {latency['p99'] / 1000:.3f} ms, {achieved:.1f}/s"
                f"  {'kept' if ok else 'over'}",
                file=sys.stderr,
            )
        if not tally.verified:
            verified = False
            break
    best = search.best if search is not None else 0.0
    result = {
        "max_rate": round(best, 1),
        "p99_target_ms": args.max_rate,
        "ceiling": round(ceiling, 1),
        "verified": verified,
        "trials": trials,
    }
    if args.json:
        print(json.dumps(result))
    elif not verified:
        print("max rate: NOT VERIFIED: the server's echo was wrong or missing (see --json)")
    elif best:
        print(
            f"max rate {best:.1f}/s with p99 <= {args.max_rate:g} ms "
            f"(ceiling {ceiling:.1f}/s, {len(trials)} trials)"
        )
    else:
        print(f"max rate: no rate tried kept p99 <= {args.max_rate:g} ms (ceiling {ceiling:.1f}/s)")
    return 0 if verified and best > 0 else 1


def main(args: argparse.Namespace) -> int:
    """Entry point from the CLI: exit 0 only for a verified run without errors."""
    args.resource = "/"
    try:
        if args.address.startswith(("ws://", "wss://")):
            address, args.resource = parse_websocket_url(args.address)
        else:
            address = parse_address(args.address)
    except AddressError as exc:
        print(f"trio-echo bench: {exc}", file=sys.stderr)
        return 2
    if args.udp:
        address = attrs.evolve(address, transport="udp")
    problem = _usage_problem(address, args)
    if problem:
        print(f"trio-echo bench: {problem}", file=sys.stderr)
        return 2
    if args.ramp is not None and not args.worker:
        args.connections = args.ramp[0]
    elif args.connections is None:
        args.connections = DEFAULT_CONNECTIONS
    args.progress = sys.stderr.isatty() and not args.json and not args.json_stream and not args.worker
    if args.max_rate is not None:
        return max_rate(address, args)
    hdr_log = None
    if args.hdr_log and not args.worker:
        try:
            hdr_log = open(args.hdr_log, "w", encoding="ascii")  # noqa: SIM115 - closed below
        except OSError as exc:
            print(f"trio-echo bench: cannot write --hdr-log {args.hdr_log}: {exc.strerror}", file=sys.stderr)
            return 2
    output = IntervalOutput(json_stream=args.json_stream and not args.worker, hdr_log=hdr_log)
    try:
        tally, histogram, duration = measure(address, args, output)
    finally:
        if hdr_log is not None:
            hdr_log.close()
    if args.worker:
        print(
            json.dumps(
                {
                    "roundtrips": tally.roundtrips,
                    "bytes_echoed": tally.bytes_echoed,
                    "connections": tally.connections,
                    "errors": dict(tally.errors),
                    "lost": tally.lost,
                    "reconnects": tally.reconnects,
                    "duration_s": duration,
                    "histogram": base64.b64encode(histogram.encode()).decode(),
                }
            )
        )
        return 0
    mode = f"{address.transport}-{args.mode}" if address.transport in ("udp", "ws", "wss") else args.mode
    tls = address.transport in ("tls", "wss") or bool(args.tls or args.ca or args.insecure)
    result = report(tally, duration=duration, latency_us=percentiles(histogram), mode=mode, tls=tls)
    result["processes"] = args.processes
    if args.plot and histogram.get_total_count():
        title = f"trio-echo bench {args.address}: {mode}, {tally.connections} connections, {args.size} B"
        points = percentile_points(histogram.get_value_at_percentile)
        try:
            with open(args.plot, "w", encoding="utf-8") as plot:
                plot.write(percentile_svg(points, title=title))
        except OSError as exc:
            print(f"trio-echo bench: cannot write --plot {args.plot}: {exc.strerror}", file=sys.stderr)
            return 2
    if args.progress:
        sys.stderr.write("\r" + " " * 80 + "\r")
    print(json.dumps(result) if args.json or args.json_stream else summary_line(result))
    return 0 if result["verified"] else 1


def _usage_problem(address: Address, args: argparse.Namespace) -> str | None:
    if args.rate is not None and args.rate[0] != args.rate[1] and args.count is not None:
        return "--rate START:END ramps over --duration; it cannot be used with --count"
    if args.max_rate is not None and (
        args.rate is not None or args.count is not None or args.mode == "stream"
    ):
        return "--max-rate searches the open-loop rate itself: no --rate, --count or --mode stream"
    ramped = args.ramp is not None and not args.worker  # (a worker gets its share and the whole ramp)
    if ramped and args.connections is not None and args.connections != args.ramp[0]:
        return f"--ramp {args.ramp[0]}:... opens {args.ramp[0]} connections; leave out --connections"
    if address.transport in ("ws", "wss") and args.mode == "stream":
        return "a WebSocket echo is driven message by message: use --mode pingpong or connect"
    if address.transport != "udp":
        return None if 1 <= args.size <= PERIOD else f"--size must be 1..{PERIOD}"
    if args.mode != "pingpong":
        return f"UDP has no {'stream' if args.mode == 'stream' else 'connections'}: use --mode pingpong"
    if args.tls or args.ca or args.insecure:
        return "TLS needs a stream; udp:// has none"
    if address.path is not None:
        return "UDP over Unix sockets is not supported"
    return None if 8 <= args.size <= MAX_DATAGRAM else f"--size must be 8..{MAX_DATAGRAM} for UDP"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDR")
    parser.add_argument(
        "--connections", type=positive_int, metavar="N", help=f"default {DEFAULT_CONNECTIONS}"
    )
    parser.add_argument(
        "--ramp",
        type=_ramp,
        metavar="CONNS:SECONDS",
        help="open CONNS connections evenly over SECONDS instead of all at once",
    )
    parser.add_argument("--size", type=positive_int, default=1024, metavar="BYTES")
    parser.add_argument(
        "--mode",
        choices=("pingpong", "stream", "connect"),
        default="pingpong",
        help="connect: connect (TLS handshake included), echo one message, close; connections/s",
    )
    parser.add_argument(
        "--window",
        type=positive_int,
        default=262144,
        metavar="BYTES",
        help="stream mode: bytes in flight per connection",
    )
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--duration", type=_positive_float, default=10.0, metavar="S")
    limit.add_argument("--count", type=positive_int, metavar="N", help="round trips in total (pingpong)")
    parser.add_argument(
        "--rate",
        type=_rate,
        metavar="R|START:END",
        help="open loop: R messages/s in total, or a rate rising linearly from START to END over --duration",
    )
    parser.add_argument(
        "--engine",
        choices=("auto", "trio"),
        default="auto",
        help="auto: closed-loop pingpong and stream over plain TCP run on the synchronous epoll "
        "engine (several times faster), the rest on Trio; trio: always Trio (to compare them)",
    )
    parser.add_argument(
        "--reconnect",
        action="store_true",
        help="pingpong: when the server closes a connection cleanly with no echo owed (a drain, a "
        "rolling restart), open a new one and carry on; counted as reconnects, not errors",
    )
    parser.add_argument(
        "--processes",
        type=_processes,
        default=1,
        metavar="P|auto",
        help="spread the connections over P processes (auto: one per CPU this process may use)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--max-rate",
        type=_positive_float,
        metavar="P99_MS",
        help="search for the highest open-loop rate whose p99 stays within P99_MS (trials of --duration)",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.svg",
        help="draw the latency percentile distribution (log scale in nines) as an SVG file",
    )
    parser.add_argument(
        "--hdr-log",
        metavar="FILE",
        help="write each second's latency histogram to FILE (HdrHistogram interval log, microseconds)",
    )
    parser.add_argument(
        "--json-stream",
        action="store_true",
        help="one JSON object per second (elapsed, roundtrips_per_s, mb_per_s, p50_us, p99_us, errors, "
        "open), then the --json result",
    )
    parser.add_argument("--udp", action="store_true", help="UDP ping-pong (implied by a udp:// ADDR)")
    parser.add_argument(
        "--udp-timeout",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="UDP: a datagram whose echo takes longer counts as lost",
    )
    add_tls_arguments(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-seed", type=int, default=0, help=argparse.SUPPRESS)


DEFAULT_CONNECTIONS = 50


def _processes(text: str) -> int:
    """``--processes P`` or ``auto``: the CPUs in this process's affinity mask (what ``taskset`` gives)."""
    if text != "auto":
        return positive_int(text)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _rate(text: str) -> tuple[float, float]:
    """``--rate R`` (constant) or ``--rate START:END`` (a linear ramp over the run)."""
    start, sep, end = text.partition(":")
    try:
        return (_positive_float(start), _positive_float(end)) if sep else (_positive_float(text),) * 2
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not R or START:END (rates > 0)") from None


def _ramp(text: str) -> tuple[int, float]:
    """``--ramp CONNS:SECONDS``."""
    conns, sep, seconds = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not CONNS:SECONDS")
    try:
        return positive_int(conns), _positive_float(seconds)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not CONNS:SECONDS (a count >= 1, seconds > 0)"
        ) from None


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value
