"""The load generator's bookkeeping (pure): verifiable payloads, error kinds, results.

Every connection sends its own pseudo-random byte stream, so an echo that is corrupted, reordered,
truncated or crossed with another connection's is caught byte for byte. Comparisons are against one
precomputed block (``bytes.startswith`` at an offset), so verifying costs a memcmp, not a Python loop.
"""

from __future__ import annotations

import collections
import math
import random

import attrs

PERIOD = 65_543  # a prime: chunk boundaries never line up with the pattern's own period
ERROR_KINDS = ("connect", "mismatch", "eof", "reset", "timeout")


class Pattern:
    """Connection ``seed``'s byte stream: byte ``k`` is ``block[k % PERIOD]``."""

    __slots__ = ("_block", "stream")

    def __init__(self, seed: int) -> None:
        block = random.Random(seed).randbytes(PERIOD)
        self.stream = block + block  # doubled, so any chunk up to PERIOD is one slice
        """The pattern twice over: the stream at ``offset`` is ``stream[offset % PERIOD:]``."""
        self._block = memoryview(self.stream)

    def chunk(self, offset: int, size: int) -> memoryview:
        """The ``size`` bytes at stream ``offset`` (``size`` <= PERIOD), without a copy (to send)."""
        if size > PERIOD:
            raise ValueError(f"chunks are at most {PERIOD} bytes")
        start = offset % PERIOD
        return self._block[start : start + size]

    def matches(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Whether ``data`` is exactly the stream at ``offset`` (any length).

        ``bytes.startswith`` at the chunk's start compares with one memcmp and no copy.
        (``memoryview ==`` compares item by item through the struct module: 137 us against 1.7 us
        for 64 KiB, measured; it made verification the load generator's bottleneck.)
        """
        view = memoryview(data)
        done, total = 0, len(view)
        while done < total:
            size = min(PERIOD, total - done)
            piece = view if size == total else view[done : done + size]
            if not self.stream.startswith(piece, (offset + done) % PERIOD):
                return False
            done += size
        return True


@attrs.define
class Tally:
    """What one worker (or the merge of several) counted."""

    roundtrips: int = 0
    bytes_echoed: int = 0
    connections: int = 0
    errors: collections.Counter[str] = attrs.field(factory=collections.Counter)
    lost: int = 0
    """UDP: datagrams whose echo did not come back in time (not an error: UDP may drop)."""
    reconnects: int = 0
    """``--reconnect``: connections the server closed cleanly between round trips (a drain), each
    replaced by a new one that carried on (not an error: what a client that retries would do)."""
    open: int = 0
    """Connections open now (``--json-stream`` reports it each second)."""

    def snapshot(self) -> Tally:
        """A copy of the counts now (the errors counter copied too)."""
        return attrs.evolve(self, errors=collections.Counter(self.errors))

    def merge(self, other: Tally) -> None:
        self.lost += other.lost
        self.reconnects += other.reconnects
        self.roundtrips += other.roundtrips
        self.bytes_echoed += other.bytes_echoed
        self.connections += other.connections
        self.errors.update(other.errors)

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    @property
    def verified(self) -> bool:
        """Every byte that came back was right, nothing was missing, and something came back."""
        return self.error_total == 0 and self.bytes_echoed > 0


def report(
    tally: Tally, *, duration: float, latency_us: dict[str, float], mode: str, tls: bool = False
) -> dict[str, object]:
    """The ``--json`` object (PRODUCT.md's fields first). ``connect`` mode adds connections/s (and
    TLS handshakes/s): each of its round trips is one whole connection."""
    seconds = max(duration, 1e-9)
    per_connection: dict[str, object] = {}
    if mode == "connect":
        per_connection["connections_per_s"] = round(tally.roundtrips / seconds, 1)
        if tls:
            per_connection["tls_handshakes_per_s"] = round(tally.roundtrips / seconds, 1)
    return {
        **per_connection,
        "verified": tally.verified,
        "roundtrips_per_s": round(tally.roundtrips / seconds, 1),
        "mb_per_s": round(tally.bytes_echoed / seconds / 1e6, 3),
        "errors": tally.error_total,
        "error_kinds": {kind: tally.errors.get(kind, 0) for kind in ERROR_KINDS},
        "latency_us": latency_us,
        "mode": mode,
        "connections": tally.connections,
        "duration_s": round(duration, 3),
        "roundtrips": tally.roundtrips,
        "bytes_echoed": tally.bytes_echoed,
        "lost": tally.lost,
        "reconnects": tally.reconnects,
        "loss_ratio": round(tally.lost / max(1, tally.lost + tally.roundtrips), 6),
    }


def summary_line(result: dict[str, object]) -> str:
    """The human one-liner."""
    latency = result["latency_us"]
    assert isinstance(latency, dict)
    status = "verified" if result["verified"] else "NOT VERIFIED"
    rates = f"{result['roundtrips_per_s']} round trips/s, "
    if "connections_per_s" in result:
        rates = f"{result['connections_per_s']} connections/s" + (
            " (TLS handshakes), " if "tls_handshakes_per_s" in result else ", "
        )
    latencies = (
        f"latency us p50 {latency['p50']} p90 {latency['p90']} p99 {latency['p99']} p99.9 {latency['p999']} "
        f"max {latency['max']}, "
    )
    if result["mode"] == "stream" and not result["roundtrips"]:
        # A closed-loop stream has no messages to time: a row of zeros would read as a measurement.
        rates, latencies = "", ""
    return (
        f"{result['mode']}: {rates}{result['mb_per_s']} MB/s, {latencies}"
        f"errors {result['errors']} {result['error_kinds']}, "
        f"{status}" + (f", lost {result['lost']} ({result['loss_ratio']:.2%})" if result.get("lost") else "")
    )


@attrs.frozen
class Second:
    """What happened in one second of a run (``--json-stream``), as counts: summable across
    processes; the interval's latency histogram travels beside it."""

    second: int  # 1 for the first second of the run
    roundtrips: int
    bytes_echoed: int
    errors: int
    open: int  # connections open at the end of the second

    def merged(self, other: Second) -> Second:
        return Second(
            self.second,
            self.roundtrips + other.roundtrips,
            self.bytes_echoed + other.bytes_echoed,
            self.errors + other.errors,
            self.open + other.open,
        )


def second_of(before: Tally, now: Tally, *, second: int, open_connections: int) -> Second:
    """The difference of two snapshots of one tally, one second apart."""
    return Second(
        second,
        now.roundtrips - before.roundtrips,
        now.bytes_echoed - before.bytes_echoed,
        now.error_total - before.error_total,
        open_connections,
    )


def second_line(second: Second, latency_us: dict[str, float]) -> dict[str, object]:
    """One ``--json-stream`` object: the second's rates, its latency percentiles (µs), errors in it
    and the connections open at its end."""
    return {
        "elapsed": second.second,
        "roundtrips_per_s": second.roundtrips,
        "mb_per_s": round(second.bytes_echoed / 1e6, 3),
        "p50_us": latency_us["p50"],
        "p99_us": latency_us["p99"],
        "errors": second.errors,
        "open": second.open,
    }


def ramp_start(index: int, connections: int, seconds: float) -> float:
    """``--ramp CONNS:SECONDS``: when connection ``index`` (0-based) opens, in seconds from the
    start: evenly spread so the last one opens at ``seconds``."""
    if connections <= 1 or seconds <= 0:
        return 0.0
    return seconds * index / (connections - 1)


def message_due(number: float, start: float, end: float, duration: float) -> float:
    """Open loop at a rate rising linearly from ``start`` to ``end`` messages/s over ``duration``
    seconds (``--rate START:END``; equal for a constant rate): when message ``number`` (0-based; a
    fraction staggers connections) is due, in seconds from the start. It solves
    ``start*t + (end-start)*t**2/(2*duration) = number``; past ``duration`` the rate stays ``end``."""
    if start == end or duration <= 0:
        return number / end
    slope = (end - start) / duration
    ramped = start * duration + slope * duration * duration / 2  # messages due within the ramp
    if number >= ramped:
        return duration + (number - ramped) / end
    return (-start + math.sqrt(start * start + 2 * slope * number)) / slope


class RateSearch:
    """``--max-rate P99_MS``: the highest open-loop rate whose p99 stays within the target, found by
    bisection below the closed-loop ceiling (the first trial's throughput).

    Ask :meth:`next_rate`, run a trial at it, tell :meth:`record` whether it kept the target; after
    ``steps`` bisections (or once the ceiling itself passes) :attr:`done` is true and :attr:`best`
    is the answer (0: not even the lowest rate tried kept it).
    """

    def __init__(self, ceiling: float, *, steps: int = 6) -> None:
        if ceiling <= 0:
            raise ValueError("the ceiling must be > 0")
        self.low, self.high = 0.0, ceiling
        self.steps = steps
        self.trials: list[tuple[float, bool]] = []
        self.done = False

    @property
    def best(self) -> float:
        return self.low

    def next_rate(self) -> float:
        """The ceiling first, then the middle of what is still open."""
        return self.high if not self.trials else (self.low + self.high) / 2

    def record(self, rate: float, ok: bool) -> None:
        first = not self.trials
        self.trials.append((rate, ok))
        if ok:
            self.low = rate
        else:
            self.high = rate
        self.done = (first and ok) or len(self.trials) > self.steps


def kept(
    latency_us: dict[str, float], *, target_ms: float, rate: float, achieved: float, verified: bool
) -> bool:
    """Whether one ``--max-rate`` trial kept the target: every byte verified, p99 within it, and the
    rate actually reached (within 5 %: a client that cannot keep up has not tested the server)."""
    return verified and latency_us["p99"] <= target_ms * 1000 and achieved >= 0.95 * rate
