"""Supervisor over MockClock: every restart decision and every backoff wait, exactly."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import trio
import trio.testing

from trio_echo.errors import SupervisorGaveUp
from trio_echo.restarts import ExitKind, Restart, Strategy
from trio_echo.supervisor import ChildSpec, Supervisor


class Script:
    """A child that records when each run starts and ends its runs as told."""

    def __init__(self, name: str, exits: list[str | None]) -> None:
        self.name = name
        self.exits = list(exits)  # per run: "normal", "error", "wait" (cancel from outside) or None (forever)
        self.starts: list[float] = []

    async def __call__(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        self.starts.append(trio.current_time())
        run = len(self.starts) - 1
        task_status.started(f"{self.name}#{run}")
        how = self.exits[run] if run < len(self.exits) else None
        if how is None or how == "wait":
            await trio.sleep_forever()
        await trio.sleep(1)
        if how == "error":
            raise ValueError(f"{self.name} run {run} failed")


def supervisor(*specs: ChildSpec, strategy: Strategy = Strategy.ONE_FOR_ONE, **kw: float) -> Supervisor:
    options: dict[str, float] = {
        "max_restarts": 5,
        "period": 60.0,
        "backoff_initial": 0.1,
        "backoff_max": 30.0,
    }
    options.update(kw)
    return Supervisor(specs, strategy=strategy, **options)  # type: ignore[arg-type]


KINDS = {ExitKind.NORMAL: "normal", ExitKind.ERROR: "error", ExitKind.CANCELLED: "wait"}
RESTARTED = {
    (Restart.PERMANENT, ExitKind.NORMAL): True,
    (Restart.PERMANENT, ExitKind.ERROR): True,
    (Restart.PERMANENT, ExitKind.CANCELLED): True,
    (Restart.TRANSIENT, ExitKind.NORMAL): False,
    (Restart.TRANSIENT, ExitKind.ERROR): True,
    (Restart.TRANSIENT, ExitKind.CANCELLED): False,
    (Restart.TEMPORARY, ExitKind.NORMAL): False,
    (Restart.TEMPORARY, ExitKind.ERROR): False,
    (Restart.TEMPORARY, ExitKind.CANCELLED): False,
}


@pytest.mark.parametrize("strategy", list(Strategy))
@pytest.mark.parametrize(("restart", "exit_kind"), list(RESTARTED))
async def test_restart_table(
    autojump_clock: trio.testing.MockClock, strategy: Strategy, restart: Restart, exit_kind: ExitKind
) -> None:
    subject = Script("a", [KINDS[exit_kind], None])
    sibling = Script("b", [None])
    sup = supervisor(ChildSpec("a", subject, restart), ChildSpec("b", sibling), strategy=strategy)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert sup.value("a") == "a#0"
        if exit_kind is ExitKind.CANCELLED:
            await trio.sleep(1)
            sup.cancel_child("a")
        await trio.sleep(100)
        restarted = RESTARTED[restart, exit_kind]
        # exit at t=1, then exactly backoff_initial before the restart
        assert subject.starts == ([0.0, 1.1] if restarted else [0.0])
        assert sibling.starts == ([0.0, 1.1] if restarted and strategy is Strategy.ONE_FOR_ALL else [0.0])
        assert sup.restarts.get("a", 0) == (1 if restarted else 0)
        assert sup.running("b")
        assert sup.running("a") is restarted
        nursery.cancel_scope.cancel()


async def test_backoff_doubles_and_the_sixth_failure_escalates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    child = Script("flaky", ["error"] * 10)
    sup = supervisor(ChildSpec("flaky", child))
    with pytest.raises(
        SupervisorGaveUp,
        match="'flaky' needed more than 5 restarts in 60 s; last failure: ValueError: flaky run 5 failed",
    ) as info:
        await sup.run()
    # each run lasts 1 s, then waits 0.1, 0.2, 0.4, 0.8, 1.6
    assert child.starts == pytest.approx([0, 1.1, 2.3, 3.7, 5.5, 8.1])
    assert trio.current_time() == pytest.approx(9.1)
    assert isinstance(info.value.__cause__, ValueError)
    assert str(info.value.__cause__) == "flaky run 5 failed"


async def test_backoff_is_capped(autojump_clock: trio.testing.MockClock) -> None:
    child = Script("c", ["error"] * 5)
    sup = supervisor(ChildSpec("c", child), backoff_initial=1.0, backoff_max=2.5, max_restarts=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(100)
        gaps = [b - a for a, b in zip(child.starts, child.starts[1:], strict=False)]
        assert gaps == pytest.approx([2.0, 3.0, 3.5, 3.5, 3.5])
        nursery.cancel_scope.cancel()


async def test_failures_spread_beyond_the_period_never_escalate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow_failure(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep(30)
        raise ValueError("again")

    sup = supervisor(ChildSpec("slow", slow_failure), max_restarts=1, period=20.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(30 * 20)
        assert sup.restarts["slow"] >= 19
        # backoff grows only with restarts inside the period, so it stays at its initial value
        nursery.cancel_scope.cancel()


async def test_escalation_stops_every_child_first(autojump_clock: trio.testing.MockClock) -> None:
    stopped: list[float] = []

    async def bystander(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            stopped.append(trio.current_time())

    sup = supervisor(
        ChildSpec("bad", Script("bad", ["error"] * 3)), ChildSpec("ok", bystander), max_restarts=1
    )
    with pytest.raises(SupervisorGaveUp):
        await sup.run()
    assert stopped == pytest.approx([2.1])


async def test_one_for_all_drops_temporaries_and_waits_for_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    order: list[str] = []

    def slow_stopper(name: str) -> Callable[..., object]:
        async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            order.append(f"start {name} {trio.current_time():g}")
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.sleep(0.5)  # e.g. a listener closing; restarts must wait for it
                order.append(f"stop {name} {trio.current_time():g}")

        return run

    trigger = Script("trigger", ["error", None])
    sup = supervisor(
        ChildSpec("trigger", trigger),
        ChildSpec("slow", slow_stopper("slow")),
        ChildSpec("temp", slow_stopper("temp"), Restart.TEMPORARY),
        strategy=Strategy.ONE_FOR_ALL,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(10)
        # (trio does not promise an order among tasks started together)
        assert sorted(order[:2]) == ["start slow 0", "start temp 0"]
        assert sorted(order[2:4]) == ["stop slow 1.5", "stop temp 1.5"]
        assert order[4:] == ["start slow 1.6"]
        assert trigger.starts == pytest.approx([0, 1.6])
        assert sup.names == ["trigger", "slow"]
        nursery.cancel_scope.cancel()


async def test_started_waits_for_first_attempts_and_failures_do_not_block(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def late(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.sleep(2)
        task_status.started("late-value")
        await trio.sleep_forever()

    async def broken(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise OSError("port taken")

    sup = supervisor(ChildSpec("late", late), ChildSpec("broken", broken))
    async with trio.open_nursery() as nursery:
        assert await nursery.start(sup.run) is sup
        assert trio.current_time() == 2
        assert sup.value("late") == "late-value"
        assert sup.value("broken") is None
        assert not sup.running("broken")
        nursery.cancel_scope.cancel()


async def test_returns_when_no_child_is_left(autojump_clock: trio.testing.MockClock) -> None:
    sup = supervisor(
        ChildSpec("t", Script("t", ["normal"]), Restart.TRANSIENT),
        ChildSpec("o", Script("o", ["error"]), Restart.TEMPORARY),
    )
    await sup.run()
    assert trio.current_time() == 1
    assert sup.names == []


async def test_dynamic_children(autojump_clock: trio.testing.MockClock) -> None:
    extra = Script("extra", [None])
    sup = supervisor(ChildSpec("base", Script("base", [None])))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert await sup.start_child(ChildSpec("extra", extra)) == "extra#0"
        with pytest.raises(ValueError, match="exists already"):
            await sup.start_child(ChildSpec("extra", extra))
        await sup.terminate_child("extra")
        await trio.sleep(100)
        assert extra.starts == [0.0]
        assert sup.names == ["base"]
        assert sup.value("extra") is None
        nursery.cancel_scope.cancel()


async def test_outer_cancellation_is_not_a_restart(autojump_clock: trio.testing.MockClock) -> None:
    child = Script("c", [None])
    sup = supervisor(ChildSpec("c", child))
    with trio.move_on_after(5):
        await sup.run()
    assert child.starts == [0.0]
    assert sup.restarts == {"c": 0}
    assert not math.isnan(trio.current_time())
