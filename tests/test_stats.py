from trio_echo.stats import Stats


def test_table_counts_and_snapshot() -> None:
    stats = Stats(started=100.0)
    one = stats.open(peer="127.0.0.1:5", listener="a", now=101.0, buffer_size=8)
    two = stats.open(peer="[::1]:6", listener="b", now=102.0, buffer_size=8)
    assert (one.id, two.id) == (1, 2)
    one.received(b"abc")
    one.sent(3)
    stats.refuse("max_connections")
    assert stats.snapshot(110.0) == {
        "connections": {"active": 2, "total": 2, "refused": 1},
        "bytes": {"in": 3, "out": 3},
        "listeners": [{"address": "a", "active": 1}, {"address": "b", "active": 1}],
        "uptime": 10.0,
    }
    stats.close(one, "eof")
    stats.close(one, "eof")  # closing twice counts once
    three = stats.open(peer="x", listener="a", now=111.0, buffer_size=8)
    assert three.id == 3  # ids are never reused
    assert stats.closed == {"eof": 1}
    assert (stats.bytes_in, stats.bytes_out) == (3, 3)
    assert stats.listeners["a"].active == 1
    assert stats.listeners["a"].total == 2
    assert set(stats.connections) == {2, 3}
