"""``trio-echo bench`` on the command line: arguments, worker processes, the report (I/O).

The load itself (connections, ping-pong and stream modes, byte verification) is :class:`bench.Run`;
the pure parts (the byte pattern, tallies, the report) are in :mod:`trio_echo.benchmodel`.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import sys
from typing import Any

import attrs
import trio

from .addresses import Address, parse_address
from .bench import Run, new_histogram, percentiles
from .benchmodel import PERIOD, Tally, report, summary_line
from .client import MAX_DATAGRAM, add_tls_arguments
from .errors import AddressError


async def run_in_processes(opts: argparse.Namespace) -> tuple[Tally, Any, float]:
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
            argv += ["--rate", str(opts.rate * connections / opts.connections)]
        done = await trio.run_process([*argv, "--worker"], capture_stdout=True, check=False)
        results.append(json.loads(done.stdout))

    async with trio.open_nursery() as nursery:
        for index, connections in enumerate(share):
            if connections:
                nursery.start_soon(worker, index, connections)
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


def main(args: argparse.Namespace) -> int:
    """Entry point from the CLI: exit 0 only for a verified run without errors."""
    try:
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
    args.progress = sys.stdout.isatty() and not args.json and not args.worker
    if args.processes > 1:
        tally, histogram, duration = trio.run(run_in_processes, args)
    else:
        run = Run(address, args, args.connections, args.worker_seed)
        duration = trio.run(run.run)
        tally, histogram = run.tally, run.histogram
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
    mode = f"udp-{args.mode}" if address.transport == "udp" else args.mode
    result = report(tally, duration=duration, latency_us=percentiles(histogram), mode=mode)
    if args.progress:
        sys.stdout.write("\r" + " " * 72 + "\r")
    print(json.dumps(result) if args.json else summary_line(result))
    return 0 if result["verified"] else 1


def _usage_problem(address: Address, args: argparse.Namespace) -> str | None:
    if address.transport != "udp":
        return None if 1 <= args.size <= PERIOD else f"--size must be 1..{PERIOD}"
    if args.mode != "pingpong":
        return "UDP has no stream: use --mode pingpong"
    if args.tls or args.ca or args.insecure:
        return "TLS needs a stream; udp:// has none"
    if address.path is not None:
        return "UDP over Unix sockets is not supported"
    return None if 8 <= args.size <= MAX_DATAGRAM else f"--size must be 8..{MAX_DATAGRAM} for UDP"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDR")
    parser.add_argument("--connections", type=positive_int, default=50, metavar="N")
    parser.add_argument("--size", type=positive_int, default=1024, metavar="BYTES")
    parser.add_argument("--mode", choices=("pingpong", "stream"), default="pingpong")
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
        "--rate", type=_positive_float, metavar="R", help="open loop: R messages/s in total (pingpong)"
    )
    parser.add_argument(
        "--reconnect",
        action="store_true",
        help="pingpong: when the server closes a connection cleanly with no echo owed (a drain, a "
        "rolling restart), open a new one and carry on; counted as reconnects, not errors",
    )
    parser.add_argument("--processes", type=positive_int, default=1, metavar="P")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
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
