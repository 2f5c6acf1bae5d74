"""Trace event fan-out: each sink asks for its own flags, as a WPP trace session enables a provider's.

The global ``flags`` (``[trace] flags``, ``set_trace_flags``) are what the human log and the trace file
receive; a live subscriber (an admin channel) receives exactly the flags it subscribed to, whether or not
the global flags include them. An event is produced when any sink wants its flag: the union of all
sinks' flags is kept up to date as flags change and subscribers come and go, so with a flag nobody wants
the cost at the call site is one attribute test (``if tracer.data``) or one call that returns at its
first line. Subscribers and the file never block the emitter: each has a bounded queue from which the
oldest event is dropped when full, and drops are counted.
"""

from __future__ import annotations

import collections
import functools
import logging
import operator
import os
import time
from collections.abc import Callable

import trio

from .events import Event, Flag

Sink = Callable[[Event], None]

# Lifecycle (info) and error events also have a prose log line where they happen ("listening on ...",
# a traceback), so in the human log they show only at debug level; per-connection events are what an
# operator turns the conn flag on for, and the log is where they go.
_LOG_LEVELS = {Flag.ERROR: logging.DEBUG, Flag.INFO: logging.DEBUG, Flag.CONN: logging.INFO}

SUBSCRIBER_QUEUE = 1024  # events buffered per subscriber before the oldest are dropped


class Subscriber:
    """A bounded queue of events for one consumer.

    ``flags`` are the events it asked for; ``None`` follows the tracer's global flags (the trace file).
    The tracer delivers only matching events. ``put`` never blocks: a full queue drops its oldest event
    and counts it in ``dropped``.
    """

    def __init__(self, flags: Flag | None, maxlen: int = SUBSCRIBER_QUEUE) -> None:
        self.flags = flags
        self.dropped = 0
        self.delivered = 0
        self._queue: collections.deque[Event] = collections.deque(maxlen=maxlen)
        self._ready = trio.Event()

    def __call__(self, event: Event) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1  # the deque drops the oldest on append
        self._queue.append(event)
        self._ready.set()

    def __len__(self) -> int:
        return len(self._queue)

    async def get_batch(self) -> list[Event]:
        """Wait for at least one event; return (and forget) everything queued."""
        while not self._queue:
            await self._ready.wait()
            self._ready = trio.Event()
        batch = list(self._queue)
        self._queue.clear()
        self.delivered += len(batch)
        return batch


class Tracer:
    """Emits :class:`Event` objects to every sink that wants the event's flag.

    Sinks added with :meth:`add_sink` (the log) receive the global ``flags``; subscribers receive their
    own (see :class:`Subscriber`). ``flags`` can change at run time (reload, admin ``set_trace_flags``).
    ``wanted`` is the union of every sink's flags; ``conn`` and ``data`` mirror two of its bits as plain
    booleans for the per-connection and per-chunk call sites: testing a ``Flag`` bit builds a new enum
    value (several Python calls), a bool attribute costs nothing.
    A sink must not block or raise: a sink that raises is logged and removed, so a broken sink never
    takes the echo path down with it.
    """

    def __init__(self, flags: Flag, *, logger: logging.Logger | None = None) -> None:
        self._sinks: list[Sink] = []
        self._subscribers: list[Subscriber] = []
        self._logger = logger or logging.getLogger("trio_echo.trace")
        self._dropped_by_gone = 0
        self._wanted = Flag(0)
        self.on_wanted: Callable[[Flag], None] | None = None
        """Called with the new ``wanted`` whenever it changes (a worker master forwards it to its
        workers, which then build exactly the events some sink here wants)."""
        self.flags = flags
        self.add_sink(self._log)

    @property
    def flags(self) -> Flag:
        """The global flags: what the log and the trace file receive."""
        return self._flags

    @flags.setter
    def flags(self, flags: Flag) -> None:
        self._flags = flags
        self._update_wanted()

    @property
    def wanted(self) -> Flag:
        """Every flag some sink wants right now: events of other flags are not even built."""
        return self._wanted

    def _update_wanted(self) -> None:
        own = (s.flags for s in self._subscribers if s.flags is not None)
        before, self._wanted = self._wanted, functools.reduce(operator.or_, own, self._flags)
        self.conn = bool(self._wanted & Flag.CONN)
        self.data = bool(self._wanted & Flag.DATA)
        if self._wanted != before and self.on_wanted is not None:
            self.on_wanted(self._wanted)

    @property
    def dropped(self) -> int:
        """Events dropped by every subscriber so far (including ones that have unsubscribed)."""
        return self._dropped_by_gone + sum(s.dropped for s in self._subscribers)

    @property
    def subscribers(self) -> int:
        """Live subscribers (admin channels, the trace file)."""
        return len(self._subscribers)

    def add_sink(self, sink: Sink) -> None:
        """A sink that receives the events of the global flags."""
        self._sinks.append(sink)

    def remove_sink(self, sink: Sink) -> None:
        """Remove a sink or a subscriber (no error if it is already gone)."""
        if isinstance(sink, Subscriber):
            if sink in self._subscribers:
                self._subscribers.remove(sink)
                self._dropped_by_gone += sink.dropped
                self._update_wanted()
        elif sink in self._sinks:
            self._sinks.remove(sink)

    def subscribe(self, flags: Flag | None, maxlen: int = SUBSCRIBER_QUEUE) -> Subscriber:
        """A new bounded subscriber to ``flags`` (``None``: the global flags); ``remove_sink`` it when
        done."""
        subscriber = Subscriber(flags, maxlen)
        self._subscribers.append(subscriber)
        self._update_wanted()
        return subscriber

    def resubscribe(self, subscriber: Subscriber, flags: Flag | None) -> None:
        """Change what a live subscriber receives (a worker's link to its master: the master's
        ``wanted``)."""
        subscriber.flags = flags
        self._update_wanted()

    def emit(self, flag: Flag, event: str, **fields: object) -> None:
        if self._wanted & flag:
            self.relay(Event(ts=time.time(), flag=flag, event=event, fields=fields))

    def relay(self, record: Event) -> None:
        """Deliver an event built elsewhere (a worker process's) to the sinks that want its flag."""
        flag = record.flag
        globally = bool(self._flags & flag)
        if globally:
            for sink in list(self._sinks):
                self._deliver(sink, record)
        for subscriber in list(self._subscribers):
            subscribed = subscriber.flags
            if globally if subscribed is None else subscribed & flag:
                self._deliver(subscriber, record)

    def _deliver(self, sink: Sink, record: Event) -> None:
        try:
            sink(record)
        except Exception:
            self._logger.exception("trace sink %r failed and was removed", sink)
            self.remove_sink(sink)

    def _log(self, event: Event) -> None:
        self._logger.log(_LOG_LEVELS.get(event.flag, logging.DEBUG), "%s", event.describe())


class TraceFile:
    """The JSON-lines trace file: a subscriber to the global flags, drained by a task that writes in a
    worker thread, so a slow disk delays only the file. ``max_bytes`` > 0 rotates to ``PATH.1`` past
    that size; :meth:`reopen` (SIGHUP, after logrotate moved the file) starts writing a fresh file.
    """

    def __init__(self, path: str, max_bytes: int = 0) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._reopen = False
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the tracer

    def reopen(self) -> None:
        self._reopen = True

    async def run(
        self, tracer: Tracer, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        subscriber = tracer.subscribe(None, maxlen=16384)  # the global flags
        task_status.started()
        try:
            while True:
                batch = await subscriber.get_batch()
                lines = "".join(event.to_json() + "\n" for event in batch)
                await trio.to_thread.run_sync(self._write, lines)
        finally:
            tracer.remove_sink(subscriber)
            self._file.close()

    def _write(self, lines: str) -> None:
        if self._reopen:
            self._reopen = False
            self._file.close()
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._file.write(lines)
        self._file.flush()
        if self.max_bytes and self._file.tell() >= self.max_bytes:
            self._file.close()
            os.replace(self.path, self.path + ".1")
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
