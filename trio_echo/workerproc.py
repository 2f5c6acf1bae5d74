"""One worker slot as the master's supervisor child (I/O): spawn ``python -m trio_echo.worker``, start
it, watch its heartbeat, relay its trace events, and stop it.

A run of the child is one worker process. It reports started once the worker says ``ready``; it
raises (so the supervisor restarts it with backoff) when the process exits on its own or stops
answering its heartbeat (then it is killed: a worker whose event loop hangs, or one SIGSTOPped, never
answers again). Cancelling the child, which the master does to stop, drains the worker: ``drain``,
then up to the drain deadline for it to exit, then SIGKILL; after :meth:`WorkerProcess.abort`
(a second SIGTERM) the worker closes everything at once instead.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence

import trio

from .control import ControlError, ControlLink, Message, Pending
from .events import Event, Flag
from .trace import Tracer
from .workerstats import WorkerState

logger = logging.getLogger("trio_echo.master")

START_TIMEOUT = 30.0  # from spawn to ``ready``: imports, binding, TLS files
REQUEST_TIMEOUT = 2.0  # an admin request a worker has not answered by then gets no answer from it
ABORT_GRACE = 2.0  # after ``abort``, how long a worker may take before SIGKILL

StartMessage = Callable[[int, int], Message]  # (worker index, first connection id) -> ``start``


class WorkerExited(Exception):
    """A worker process ended without being asked to."""


class WorkerHung(Exception):
    """A worker stopped answering its heartbeat and was killed."""


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class WorkerProcess:
    """Worker ``index``: its current process (if any), what it last reported, and its link.

    Args:
        index: 0-based, stable across restarts (the ``worker`` field of items and events).
        start_message: builds the ``start`` message for a new process.
        pass_fds: descriptors every worker inherits (shared Unix listeners, systemd's sockets).
        tracer: the master's; the worker's events are relayed into it.
        heartbeat: (interval, timeout) seconds.
        drain_deadline: how long a draining worker may take before SIGKILL.
        next_run: hands out run numbers (connection id ranges) across all workers.
        on_retire: gets a finished run's last report (its counters stay in the totals).
    """

    def __init__(
        self,
        index: int,
        *,
        start_message: StartMessage,
        pass_fds: Callable[[], Sequence[int]],
        tracer: Tracer,
        heartbeat: tuple[float, float],
        drain_deadline: Callable[[], float],
        next_run: Callable[[], int],
        on_retire: Callable[[dict[str, dict[str, object]]], None],
    ) -> None:
        self.index = index
        self.name = f"worker {index}"
        self.state = WorkerState.STARTING
        self.pid: int | None = None
        self.run_number: int | None = None
        self.counts: dict[str, int] = {"active": 0, "total": 0}
        self.addresses: list[str] = []
        self.descriptions: list[dict[str, str]] = []
        self.last_report: dict[str, dict[str, object]] | None = None  # last stats + metrics it sent
        self._start_message = start_message
        self._pass_fds = pass_fds
        self._tracer = tracer
        self._interval, self._timeout = heartbeat
        self._drain_deadline = drain_deadline
        self._next_run = next_run
        self._on_retire = on_retire
        self._silent = False  # killed for not answering its heartbeat
        self._link: ControlLink | None = None
        self._pending = Pending()
        self._process: trio.Process | None = None
        self._last_pong = 0.0
        self._aborting = False
        self.stopped = trio.Event()
        self.stopped.set()  # no process yet

    @property
    def answering(self) -> bool:
        """Serving and its last heartbeat answer is recent (the systemd watchdog needs all of them)."""
        return self.state in (WorkerState.RUNNING, WorkerState.STOPPING)

    # -- the supervisor child -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[list[str]]) -> None:
        self.run_number = self._next_run()
        parent, child = socket.socketpair()
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "trio_echo.worker", str(child.fileno())],
                pass_fds=(child.fileno(), *self._pass_fds()),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        link = ControlLink(trio.SocketStream(trio.socket.from_stdlib_socket(parent)))
        self._process, self._link, self.pid = process, link, process.pid
        self._pending = Pending()
        self.state = WorkerState.STARTING
        self.stopped = trio.Event()
        self._silent = False
        try:
            async with trio.open_nursery() as nursery:
                ready = trio.Event()
                nursery.start_soon(self._read, link, process, ready)
                await link.send(self._start_message(self.index, self.run_number))
                with trio.move_on_after(START_TIMEOUT):
                    await ready.wait()
                if self.state is not WorkerState.RUNNING:
                    if process.returncode is None:
                        process.kill()
                    code = await process.wait()
                    raise WorkerExited(f"{self.name} did not start: {describe_exit(code)}")
                task_status.started(self.addresses)
                nursery.start_soon(self._heartbeat, link, process)
                code = await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            asked = await self._wind_down(process, link)
        if self._silent:
            raise WorkerHung(
                f"{self.name} (pid {process.pid}) stopped answering its heartbeat for {self._timeout:g} s"
            )
        if asked or self._aborting:
            return  # drained or aborted at the master's request (an aborted one may exit first)
        raise WorkerExited(f"{self.name} (pid {process.pid}) {describe_exit(code)}")

    async def _wind_down(self, process: trio.Process, link: ControlLink) -> bool:
        """However the run ends: the process is gone afterwards. A live one is drained first (or
        aborted), within the deadline. True if it was still running (we stopped it)."""
        with trio.CancelScope(shield=True):
            asked = process.returncode is None
            if asked:
                self.state = WorkerState.STOPPING
                await self._tell(link, {"type": "abort" if self._aborting else "drain"})
                with trio.move_on_after(ABORT_GRACE if self._aborting else self._drain_deadline()):
                    await process.wait()
                if process.returncode is None:
                    logger.error("%s (pid %d) did not stop in time: killing it", self.name, process.pid)
                    process.kill()
                await process.wait()
            else:
                self.state = (
                    WorkerState.STOPPING if self.state is WorkerState.STOPPING else WorkerState.RESTARTING
                )
            self._pending.fail_all()
            self._link = self._process = None
            if self.last_report is not None:
                self._on_retire(self.last_report)
                self.last_report = None
            self.counts = {"active": 0, "total": 0}
            await link.aclose()
            self.stopped.set()
        return asked

    async def _tell(self, link: ControlLink, message: Message) -> None:
        with trio.move_on_after(REQUEST_TIMEOUT):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await link.send(message)  # (a failure means it is exiting already)

    async def _read(self, link: ControlLink, process: trio.Process, ready: trio.Event) -> None:
        try:
            while (message := await link.receive()) is not None:
                self._dispatch(message, ready)
        except ControlError as exc:
            logger.error("%s (pid %d) sent %s: killing it", self.name, process.pid, exc)
            process.kill()
        finally:
            self._pending.fail_all()
            ready.set()

    def _dispatch(self, message: Message, ready: trio.Event) -> None:
        kind = message.get("type")
        if kind == "pong":
            self._last_pong = trio.current_time()
            if self.state is WorkerState.UNRESPONSIVE:
                self.state = WorkerState.RUNNING
            self._keep(message)
        elif "re" in message:
            if "stats" in message:
                self._keep(message)
            self._pending.deliver(message)
        elif kind == "trace":
            self._relay(message.get("events"))
        elif kind == "ready":
            self.addresses = [str(a) for a in message.get("addresses", [])]  # type: ignore[attr-defined]
            self.descriptions = list(message.get("listeners", []))  # type: ignore[call-overload]
            self._last_pong = trio.current_time()
            self.state = WorkerState.RUNNING
            logger.info("%s (pid %s) ready: %s", self.name, message.get("pid"), ", ".join(self.addresses))
            ready.set()

    def _keep(self, report: Message) -> None:
        stats, metrics = report.get("stats"), report.get("metrics")
        if isinstance(stats, dict) and isinstance(metrics, dict):
            self.last_report = {"stats": stats, "metrics": metrics}
            connections = stats.get("connections", {})
            self.counts = {key: int(connections.get(key, 0)) for key in ("active", "total")}

    def _relay(self, events: object) -> None:
        for ts, flag, name, fields in events if isinstance(events, list) else []:
            self._tracer.relay(
                Event(ts=ts, flag=Flag(flag), event=name, fields={**fields, "worker": self.index})
            )

    async def _heartbeat(self, link: ControlLink, process: trio.Process) -> None:
        while True:
            await trio.sleep(self._interval)
            late = trio.current_time() - self._last_pong
            if late > self._timeout:
                self.state = WorkerState.UNRESPONSIVE
                self._silent = True
                logger.error(
                    "%s (pid %d) has not answered its heartbeat for %.1f s: killing it",
                    self.name,
                    process.pid,
                    late,
                )
                process.kill()
                return
            if late > 2 * self._interval and self.state is WorkerState.RUNNING:
                self.state = WorkerState.UNRESPONSIVE  # late, not yet given up on
            await self._tell(link, {"type": "ping"})

    # -- what the master asks -------------------------------------------------------------------------

    async def request(self, message: Message) -> Message | None:
        """Send one request and wait (at most REQUEST_TIMEOUT) for its reply; None if the worker is not
        running or does not answer in time."""
        link = self._link
        if link is None or self.state not in (WorkerState.RUNNING, WorkerState.STOPPING):
            return None
        request_id, replies = self._pending.open()
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                try:
                    await link.send({**message, "id": request_id})
                    return await replies.receive()
                except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
            return None
        finally:
            self._pending.forget(request_id)

    async def notify(self, message: Message) -> None:
        """Send a message that has no reply (``wanted``); dropped if the worker is not up."""
        if self._link is not None:
            await self._tell(self._link, message)

    def abort(self) -> None:
        """From now on stopping this worker closes its connections at once (a second SIGTERM)."""
        self._aborting = True

    async def abort_now(self) -> None:
        """Abort a worker that is draining already: ``abort``, then SIGKILL after ABORT_GRACE."""
        self._aborting = True
        if self._link is not None:
            await self._tell(self._link, {"type": "abort"})
        with trio.move_on_after(ABORT_GRACE):
            await self.stopped.wait()
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
