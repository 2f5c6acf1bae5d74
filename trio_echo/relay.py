"""The relay: one task per event loop that echoes for every connection in the steady state (I/O).

A connection's task (``Connection.run``) owns its connection from accept to close, in its own cancel
scope. When its socket pump runs dry (the client has sent nothing new) it does not wait for
readiness itself: it parks in :meth:`Relay.carry` and the relay adds the socket to its own
level-triggered epoll set. The relay polls that one set, batch after batch of ready sockets, and
lets the other tasks run (a checkpoint) every ``BATCH`` sockets served; when nothing is ready it
lets them run and looks once more, and only if still nothing is ready does it wait, through trio,
for the set to become readable (so trio's scheduler is paid per batch or per quiet spell, not per
connection and message). For each ready socket it has the connection do one ``recv_into`` and
``send`` (``SocketPump._echo_ready``, which keeps the session's books). Whatever else the session
needs hands the connection back: the client's EOF, an echo the kernel did not take whole, an error
(raised in the task), data tracing switched on. The relay then wakes the task, which goes on with
the socket pump and, once that runs dry again, parks again.

Why: each message through a task of its own costs trio a task step and a readiness wait (an
``epoll_ctl`` to re-arm its one-shot registration, a wakeup); two thirds of the server's CPU per
1 KiB round trip with 50 connections in ping-pong. Through the relay a message costs the two syscalls
and a dict lookup (docs/performance.md has the figures).

What stays the task's: its cancel scope, so every limit works as before. Cancelling it (a deadline,
drain, an admin ``close``, faults set live) takes the socket out of the relay synchronously (the abort
callback) and the task resumes where it parked. Nothing is lost: the relay leaves a session only
between two whole steps, and it never holds bytes (an unsent echo is copied into the session before
the connection goes back). When the relay stops, every connection it carries goes back to its task.

Linux only (``select.epoll``); elsewhere the server runs without one and the tasks wait themselves.
"""

from __future__ import annotations

import select
import socket
from typing import TYPE_CHECKING

import outcome
import trio

if TYPE_CHECKING:
    from .pump import SocketPump

# Sockets served (each at most FAIR_SHARE reads) between two turns of the other tasks: a busy relay
# delays them about as much as BATCH busy connection tasks would, each taking its own turn.
BATCH = 256


class Relay:
    """Carries the steady-state echo of the connections parked in it (see the module docstring)."""

    __slots__ = ("_carried", "_epoll")

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None  # while running
        self._carried: dict[int, tuple[SocketPump, socket.socket, trio.lowlevel.Task]] = {}

    @staticmethod
    def available() -> bool:
        """Whether this platform has what the relay needs (epoll)."""
        return hasattr(select, "epoll")

    @property
    def running(self) -> bool:
        """True while :meth:`run` runs: only then may a task :meth:`carry`."""
        return self._epoll is not None

    @property
    def carrying(self) -> int:
        """Connections parked in the relay now."""
        return len(self._carried)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Carry connections until cancelled; then hand each back to its task."""
        epoll = self._epoll = select.epoll()
        fd = epoll.fileno()
        clock = trio.lowlevel.current_clock()
        carried = self._carried
        task_status.started()
        try:
            turns = 0  # sockets served since the other tasks last ran
            while True:
                events = epoll.poll(0, BATCH)
                if not events:
                    # Nothing ready: let the other tasks run, then look once more before sleeping.
                    # A client that answers at once has often answered by then, and a look costs a
                    # scheduler pass where sleeping costs trio's readiness wait and the vCPU's wake-up
                    # (with one connection in ping-pong, ~31 against ~23 us of CPU per round trip).
                    turns = 0
                    await trio.lowlevel.checkpoint()
                    events = epoll.poll(0, BATCH)
                    if not events:
                        await trio.lowlevel.wait_readable(fd)
                        continue
                # One clock read per batch: the idle timeouts' activity time.
                self._carry(events, clock.current_time())
                turns += len(events)
                if turns >= BATCH:
                    turns = 0
                    await trio.lowlevel.checkpoint()
        finally:
            for ready, (_, _, task) in list(carried.items()):
                self._release(ready)
                trio.lowlevel.reschedule(task, outcome.Value(None))  # (it runs after we are gone)
            self._epoll = None
            epoll.close()

    def _carry(self, events: list[tuple[int, int]], now: float) -> None:
        """One batch. (A method, not inline in ``run``: its locals must not keep the last connection
        alive while the relay waits, or a closed one is freed only by the garbage collector.)"""
        carried = self._carried
        for ready, _ in events:
            entry = carried[ready]  # (only this and ``abort``, never both at once, change the set)
            try:
                result = entry[0]._echo_ready(entry[1], now)
            except Exception as exc:  # a bug hit by one connection: its task reports it
                result = outcome.Error(exc)
            if result is not None:
                self._release(ready)
                trio.lowlevel.reschedule(entry[2], result)

    async def carry(self, conn: SocketPump, sock: socket.socket) -> None:
        """Park the calling task (``conn``'s) until the relay hands ``conn`` back, or the task's scope
        is cancelled (then ``conn`` is out of the relay before ``Cancelled`` is raised).

        Raises:
            OSError: what ``sock`` raised in the relay (a reset, say).
            RuntimeError: the relay is not running.
        """
        epoll = self._epoll
        if epoll is None:
            raise RuntimeError("the relay is not running")
        fd = sock.fileno()
        epoll.register(fd, select.EPOLLIN)
        self._carried[fd] = (conn, sock, trio.lowlevel.current_task())

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self._release(fd)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _release(self, fd: int) -> None:
        del self._carried[fd]
        assert self._epoll is not None  # (a connection is carried only while the relay runs)
        self._epoll.unregister(fd)
