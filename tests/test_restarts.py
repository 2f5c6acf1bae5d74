import pytest

from trio_echo.restarts import (
    ExitKind,
    Restart,
    RestartIntensity,
    SlidingWindow,
    backoff_delay,
    should_restart,
)


@pytest.mark.parametrize(
    ("restart", "exit_kind", "expected"),
    [
        (Restart.PERMANENT, ExitKind.NORMAL, True),
        (Restart.PERMANENT, ExitKind.ERROR, True),
        (Restart.PERMANENT, ExitKind.CANCELLED, True),
        (Restart.TRANSIENT, ExitKind.NORMAL, False),
        (Restart.TRANSIENT, ExitKind.ERROR, True),
        (Restart.TRANSIENT, ExitKind.CANCELLED, False),
        (Restart.TEMPORARY, ExitKind.NORMAL, False),
        (Restart.TEMPORARY, ExitKind.ERROR, False),
        (Restart.TEMPORARY, ExitKind.CANCELLED, False),
    ],
)
def test_should_restart(restart: Restart, exit_kind: ExitKind, expected: bool) -> None:
    assert should_restart(restart, exit_kind) is expected


@pytest.mark.parametrize(
    ("attempt", "initial", "maximum", "expected"),
    [
        (1, 0.1, 30.0, 0.1),
        (2, 0.1, 30.0, 0.2),
        (3, 0.1, 30.0, 0.4),
        (9, 0.1, 30.0, 25.6),
        (10, 0.1, 30.0, 30.0),
        (10_000, 0.1, 30.0, 30.0),
        (1, 0.0, 30.0, 0.0),
        (3, 1.0, 1.0, 1.0),
    ],
)
def test_backoff_delay(attempt: int, initial: float, maximum: float, expected: float) -> None:
    assert backoff_delay(attempt, initial, maximum) == pytest.approx(expected)


def test_backoff_attempt_is_one_based() -> None:
    with pytest.raises(ValueError, match="1-based"):
        backoff_delay(0, 1.0, 2.0)


@pytest.mark.parametrize(
    ("max_restarts", "period", "times", "expected"),
    [
        # the (max_restarts+1)th restart within period is refused
        (3, 10.0, [0, 1, 2, 3], [True, True, True, False]),
        # old restarts age out of the window
        (2, 10.0, [0, 1, 10.5, 10.8], [True, True, True, False]),
        (2, 10.0, [0, 1, 11, 12], [True, True, True, True]),
        # exactly period apart: the old one is out ((now - period, now] window)
        (1, 5.0, [0, 5], [True, True]),
        (1, 5.0, [0, 4.999], [True, False]),
        (0, 5.0, [0], [False]),
    ],
)
def test_restart_intensity(
    max_restarts: int, period: float, times: list[float], expected: list[bool]
) -> None:
    intensity = RestartIntensity(max_restarts, period)
    assert [intensity.allow(t) for t in times] == expected


def test_refused_restarts_do_not_fill_the_window() -> None:
    intensity = RestartIntensity(1, 10.0)
    assert intensity.allow(0)
    assert not intensity.allow(1)
    assert intensity.allow(10.5)


def test_sliding_window_counts() -> None:
    window = SlidingWindow(2.0)
    assert [window.add(t) for t in (0, 1, 1.5, 2.5, 10)] == [1, 2, 3, 3, 1]
    assert window.count(11.9) == 1
    assert window.count(12) == 0
