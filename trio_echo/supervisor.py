"""An OTP-style supervisor over a Trio nursery.

Children are long-lived tasks (listener accept loops, later the admin port) described by
:class:`ChildSpec`. The supervisor runs each in its own cancel scope, and when one exits decides with
:mod:`trio_echo.restarts` whether to restart it (restart type), which children to restart (strategy),
how long to wait first (exponential backoff) and whether the restart budget is spent. Past the budget it
stops every child and raises :class:`SupervisorGaveUp` to its parent, ``from`` the last failure.

Child failures never reach the nursery: they are caught at the child's edge, logged, and turned into a
restart decision. Only the supervisor's own escalation, or a cancellation from outside, ends it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import attrs
import trio

from .config import SupervisorConfig
from .errors import SupervisorGaveUp, leaves
from .events import Flag
from .restarts import (
    ExitKind,
    Restart,
    RestartIntensity,
    SlidingWindow,
    Strategy,
    backoff_delay,
    should_restart,
)
from .trace import Tracer

logger = logging.getLogger("trio_echo.supervisor")

# A child is ``async def target(*, task_status)``; it calls task_status.started(value) once ready.
Target = Callable[..., Awaitable[object]]


@attrs.frozen
class ChildSpec:
    """What to run and how to treat its exits."""

    name: str
    target: Target
    restart: Restart = Restart.PERMANENT


@attrs.define(eq=False)
class _Child:
    spec: ChildSpec
    backoff_window: SlidingWindow
    generation: int = 0
    scope: trio.CancelScope | None = None
    running: bool = False
    removed: bool = False
    value: object = None
    restarts: int = 0
    first_attempt: trio.Event = attrs.Factory(trio.Event)
    done: trio.Event = attrs.Factory(trio.Event)


class _ChildStatus(trio.TaskStatus[Any]):
    """The ``task_status`` a child gets: records its started value and unblocks the supervisor's start."""

    def __init__(self, child: _Child, generation: int) -> None:
        self._child = child
        self._generation = generation

    def started(self, value: Any = None) -> None:
        if self._child.generation == self._generation:
            self._child.value = value
        self._child.first_attempt.set()


@attrs.frozen
class _Exit:
    child: _Child
    generation: int
    kind: ExitKind
    error: BaseException | None


class Supervisor:
    """Run and restart children.

    Args:
        specs: the initial children, started in order.
        strategy: one_for_one (restart the child that exited) or one_for_all (restart them all).
        max_restarts, period: the restart budget; the (max_restarts+1)th restart within ``period``
            seconds escalates.
        backoff_initial, backoff_max: the delay before a child's n-th restart within ``period`` is
            ``backoff_initial * 2**(n-1)``, capped at ``backoff_max``.
        tracer: where restart events go (flag ``info``) besides the log.
    """

    def __init__(
        self,
        specs: Iterable[ChildSpec],
        *,
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        max_restarts: int = 5,
        period: float = 60.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 30.0,
        tracer: Tracer | None = None,
    ) -> None:
        self.strategy = strategy
        self._period = period
        self._intensity = RestartIntensity(max_restarts, period)
        self._backoff = (backoff_initial, backoff_max)
        self._tracer = tracer
        self._children: dict[str, _Child] = {}
        for spec in specs:
            self._add(spec)
        self._nursery: trio.Nursery | None = None
        self._exits_send, self._exits_recv = trio.open_memory_channel[_Exit](math.inf)

    @classmethod
    def configured(cls, specs: Iterable[ChildSpec], config: SupervisorConfig, tracer: Tracer) -> Supervisor:
        """A one_for_one supervisor with ``[supervisor]``'s budget and backoff."""
        return cls(
            specs,
            max_restarts=config.max_restarts,
            period=config.period,
            backoff_initial=config.backoff_initial,
            backoff_max=config.backoff_max,
            tracer=tracer,
        )

    # -- public ---------------------------------------------------------------------------------------

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts so far per child name (for metrics)."""
        return {name: child.restarts for name, child in self._children.items()}

    def value(self, name: str) -> object:
        """What child ``name`` passed to ``task_status.started`` in its current run, else None."""
        child = self._children.get(name)
        return child.value if child is not None and child.running else None

    def running(self, name: str) -> bool:
        child = self._children.get(name)
        return child is not None and child.running

    @property
    def names(self) -> list[str]:
        return list(self._children)

    async def run(self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every child, report started once each has started or failed its first attempt,
        then supervise until cancelled, until no child is left, or until escalation.

        Raises:
            SupervisorGaveUp: the restart budget was spent; every child has been stopped.
        """
        escalation: tuple[SupervisorGaveUp, BaseException | None] | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            children = list(self._children.values())
            for child in children:
                self._launch(child)
            for child in children:
                await child.first_attempt.wait()
            task_status.started(self)
            escalation = await self._supervise()
            nursery.cancel_scope.cancel()
        self._nursery = None
        if escalation is not None:
            raise escalation[0] from escalation[1]

    async def start_child(self, spec: ChildSpec) -> object:
        """Add and start a child while running; returns once it started or failed its first attempt
        (its started value, or None)."""
        if spec.name in self._children:
            raise ValueError(f"a child named {spec.name!r} exists already")
        child = self._add(spec)
        self._launch(child)
        await child.first_attempt.wait()
        return self.value(spec.name)

    def cancel_child(self, name: str) -> None:
        """Cancel child ``name``'s current run; it exits ``cancelled`` and its restart type decides
        (OTP's ``exit(Child, shutdown)``: a permanent child comes back, the others do not)."""
        child = self._children[name]
        if child.running and child.scope is not None:
            child.scope.cancel()

    async def terminate_child(self, name: str) -> None:
        """Stop child ``name`` for good (it is not restarted) and wait until it has exited."""
        child = self._children.pop(name)
        child.removed = True
        if child.scope is not None:
            child.scope.cancel()
        if child.running:
            await child.done.wait()

    # -- internals ------------------------------------------------------------------------------------

    def _add(self, spec: ChildSpec) -> _Child:
        child = _Child(spec=spec, backoff_window=SlidingWindow(self._period))
        self._children[spec.name] = child
        return child

    def _launch(self, child: _Child) -> None:
        assert self._nursery is not None
        child.generation += 1
        child.scope = trio.CancelScope()
        child.running = True
        child.done = trio.Event()
        child.value = None
        self._nursery.start_soon(self._run_child, child, child.generation, child.scope, child.done)

    async def _run_child(
        self, child: _Child, generation: int, scope: trio.CancelScope, done: trio.Event
    ) -> None:
        kind, error = ExitKind.NORMAL, None
        try:
            with scope:
                await child.spec.target(task_status=_ChildStatus(child, generation))
        except Exception as exc:  # a child's failure is a restart decision, not ours to crash on
            kind, error = ExitKind.ERROR, exc
        else:
            if scope.cancelled_caught:
                kind = ExitKind.CANCELLED
        finally:
            child.first_attempt.set()
            if child.generation == generation:
                child.running = False
                child.value = None
            done.set()
        self._exits_send.send_nowait(_Exit(child, generation, kind, error))

    async def _supervise(self) -> tuple[SupervisorGaveUp, BaseException | None] | None:
        async for exit_ in self._exits_recv:
            child = exit_.child
            if exit_.generation != child.generation or child.removed:
                continue  # an exit we caused (one_for_all, terminate_child): nothing to decide
            self._log_exit(exit_)
            if not should_restart(child.spec.restart, exit_.kind):
                del self._children[child.spec.name]
                if not self._children:
                    return None
                continue
            now = trio.current_time()
            if not self._intensity.allow(now):
                error = SupervisorGaveUp(
                    child.spec.name,
                    self._intensity.max_restarts,
                    self._intensity.period,
                    _describe(exit_.error) if exit_.error is not None else f"exited {exit_.kind.value}",
                )
                logger.error("%s", error)
                return error, exit_.error
            delay = backoff_delay(child.backoff_window.add(now), *self._backoff)
            if self.strategy is Strategy.ONE_FOR_ONE:
                self._note_restart(child, delay, exit_)
                assert self._nursery is not None
                self._nursery.start_soon(self._restart_later, child, child.generation, delay)
            else:
                await self._restart_all(child, delay, exit_)
        return None  # pragma: no cover - the channel is never closed

    async def _restart_later(self, child: _Child, generation: int, delay: float) -> None:
        await trio.sleep(delay)
        if not child.removed and child.generation == generation:
            self._launch(child)

    async def _restart_all(self, failed: _Child, delay: float, exit_: _Exit) -> None:
        others = [c for c in self._children.values() if c is not failed and c.running]
        for child in others:
            child.generation += 1  # their coming CANCELLED exits are ours, not news
            assert child.scope is not None
            child.scope.cancel()
        for child in others:
            await child.done.wait()
            child.running = False
        for name, child in list(self._children.items()):
            if child.spec.restart is Restart.TEMPORARY and child is not failed:
                del self._children[name]  # OTP: temporaries stopped by one_for_all are not restarted
        for child in self._children.values():
            self._note_restart(child, delay, exit_)
        await trio.sleep(delay)
        for child in list(self._children.values()):
            self._launch(child)

    def _note_restart(self, child: _Child, delay: float, cause: _Exit) -> None:
        child.restarts += 1
        logger.info("restarting %s in %.3g s", child.spec.name, delay)
        if self._tracer is not None:
            self._tracer.emit(
                Flag.INFO,
                "supervisor.restart",
                child=child.spec.name,
                delay=round(delay, 6),
                cause=cause.child.spec.name,
                exit=cause.kind.value,
                message=_describe(cause.error),
            )

    def _log_exit(self, exit_: _Exit) -> None:
        name = exit_.child.spec.name
        if exit_.kind is ExitKind.ERROR:
            logger.error("%s failed: %s", name, _describe(exit_.error))
            if self._tracer is not None:
                self._tracer.emit(Flag.ERROR, "error", child=name, message=_describe(exit_.error))
        else:
            logger.info("%s exited (%s)", name, exit_.kind.value)


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "no error"
    inner = leaves(error)
    if len(inner) == 1:  # a group of one (a nursery's wrapping): name what is inside
        error = inner[0]
    return f"{type(error).__name__}: {error}"
