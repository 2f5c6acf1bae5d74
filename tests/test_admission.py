from __future__ import annotations

import pytest

from trio_echo.admission import PRUNE_AT, Admission, source_of
from trio_echo.config import LimitsConfig
from trio_echo.ratelimit import TokenBucket


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::99", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::1", "::/64"),
    ],
)
def test_source_keys(ip: str, key: str) -> None:
    assert source_of(ip)[1] == key


def test_source_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        source_of("not-an-ip")


def admission(max_connections: int = 100, **limits: object) -> Admission:
    return Admission(LimitsConfig(**limits), max_connections)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("limits", "attempts", "expected"),
    [
        # (ip, active) per attempt -> reason or None
        ({}, [("1.1.1.1", 0), (None, 0)], [None, None]),
        ({}, [("1.1.1.1", 100), (None, 100)], ["max_connections", "max_connections"]),
        (
            {"max_connections_per_ip": 2},
            [("1.1.1.1", 0), ("1.1.1.1", 1), ("1.1.1.1", 2), ("1.1.1.2", 3), (None, 4)],
            [None, None, "per_ip", None, None],
        ),
        (
            {"max_connections_per_ip": 1},
            [
                ("2001:db8::1", 0),
                ("2001:db8::2", 1),
                ("2001:db8:0:1::1", 1),
                ("::ffff:1.2.3.4", 2),
                ("1.2.3.4", 3),
            ],
            [None, "per_ip", None, None, "per_ip"],
        ),
        (
            {"deny": ("10.0.0.0/8", "2001:db8::/32")},
            [("10.9.9.9", 0), ("11.0.0.1", 0), ("2001:db8::5", 0), ("::1", 0), (None, 0)],
            ["denied", None, "denied", None, None],
        ),
        (
            {"allow": ("127.0.0.0/8",)},
            [("127.0.0.2", 0), ("10.0.0.1", 0), ("::1", 0)],
            [None, "denied", "denied"],
        ),
        (
            {"allow": ("10.0.0.0/8",), "deny": ("10.0.0.0/24",)},
            [("10.0.0.1", 0), ("10.0.1.1", 0)],
            ["denied", None],
        ),
    ],
)
def test_admission_table(
    limits: dict[str, object], attempts: list[tuple[str | None, int]], expected: list[str | None]
) -> None:
    gate = admission(**limits)
    assert [gate.admit(ip, active, now=0.0) for ip, active in attempts] == expected


def test_release_frees_the_per_source_slot() -> None:
    gate = admission(max_connections_per_ip=1)
    assert gate.admit("1.1.1.1", 0, 0.0) is None
    assert gate.admit("1.1.1.1", 1, 0.0) == "per_ip"
    gate.release("1.1.1.1")
    assert gate.per_source == {}
    assert gate.admit("1.1.1.1", 0, 0.0) is None
    gate.release(None)
    gate.release("9.9.9.9")  # never admitted: nothing to release, no negative counts
    assert gate.per_source == {"1.1.1.1": 1}


def test_connect_rate_token_bucket_per_source() -> None:
    gate = admission(max_connect_rate_per_ip=2.0)
    # burst of 2 at t=0, then one every 0.5 s; other sources have their own bucket
    results = [gate.admit("1.1.1.1", 0, t) for t in (0.0, 0.0, 0.0, 0.4, 0.5, 0.6, 1.0)]
    assert results == [None, None, "connect_rate", "connect_rate", None, "connect_rate", None]
    assert gate.admit("1.1.1.2", 0, 0.0) is None


def test_connect_rate_below_one_per_second_still_admits_one() -> None:
    gate = admission(max_connect_rate_per_ip=0.1)
    assert [gate.admit("1.1.1.1", 0, t) for t in (0.0, 5.0, 10.0)] == [None, "connect_rate", None]


def test_rate_buckets_are_pruned() -> None:
    gate = admission(max_connect_rate_per_ip=1.0)
    for i in range(PRUNE_AT):
        gate.admit(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 0, 0.0)
        gate.release(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(gate._buckets) == PRUNE_AT
    gate.admit("11.0.0.1", 0, 10.0)  # every old bucket has refilled by now
    assert len(gate._buckets) == 1


def test_rate_table_full_of_active_sources_refuses_new_ones() -> None:
    gate = admission(max_connect_rate_per_ip=1.0)
    sources = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(PRUNE_AT)]
    for ip in sources:
        assert gate.admit(ip, 0, 0.0) is None
        gate.release(ip)
    assert gate.admit("11.0.0.1", 0, 0.5) == "connect_rate"  # nothing has refilled: no room
    assert gate.admit("11.0.0.2", 0, 0.6) == "connect_rate"  # (no second scan within the second)
    assert len(gate._buckets) == PRUNE_AT
    assert gate.admit("11.0.0.1", 0, 1.5) is None  # refilled a second later: pruned, room again


def test_reconfigure_keeps_counts() -> None:
    gate = admission(max_connections_per_ip=5)
    gate.admit("1.1.1.1", 0, 0.0)
    gate.configure(LimitsConfig(max_connections_per_ip=1), 100)
    assert gate.admit("1.1.1.1", 1, 0.0) == "per_ip"


@pytest.mark.parametrize(
    ("ops", "expected"),
    [
        # (time, op, amount) -> result
        ([(0, "take", 1), (0, "take", 1), (0, "take", 1)], [True, True, False]),
        ([(0, "take", 2), (0.5, "take", 1), (0.9, "take", 1)], [True, True, False]),
        ([(0, "debit", 4), (0, "delay", 0), (0.5, "delay", 0), (3, "delay", 0)], [1.0, 1.0, 0.5, 0.0]),
        ([(0, "debit", 1), (10, "take", 3)], [0.0, False]),
    ],
)
def test_token_bucket(ops: list[tuple[float, str, float]], expected: list[object]) -> None:
    bucket = TokenBucket(rate=2.0, burst=2.0, now=0.0)
    results: list[object] = []
    for now, op, amount in ops:
        if op == "take":
            results.append(bucket.take(now, amount))
        elif op == "debit":
            results.append(bucket.debit(now, amount))
        else:
            results.append(bucket.delay(now))
    assert results == pytest.approx(expected)


def test_token_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        TokenBucket(0, 1, 0)


def test_release_counts_down_one_connection_at_a_time() -> None:
    gate = admission(max_connections_per_ip=3)
    for held in range(3):
        assert gate.admit("2001:db8::1", held, 0.0) is None
    key = "2001:db8::/64"
    assert gate.per_source == {key: 3}
    gate.release("2001:db8::2")  # the same /64
    assert gate.per_source == {key: 2}
    gate.release("2001:db8::1")
    assert gate.per_source == {key: 1}
    gate.release("2001:db8::1")
    assert gate.per_source == {}
