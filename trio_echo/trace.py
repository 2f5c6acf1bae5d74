"""Trace event fan-out: the global flags decide what is emitted; sinks receive what is.

With a flag off, the cost at the call site is one integer test (``if tracer.flags & Flag.CONN``) or one
call that returns at its first line. The default sink is the human log (Python logging); the JSON-lines
file and live admin subscribers attach as further sinks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .events import Event, Flag

Sink = Callable[[Event], None]

# Lifecycle (info) events also have a prose log line where they happen ("listening on ..."), so in the
# human log they show only at debug level; per-connection events are what an operator turns conn on for.
_LOG_LEVELS = {Flag.ERROR: logging.ERROR, Flag.INFO: logging.DEBUG, Flag.CONN: logging.INFO}


class Tracer:
    """Emits :class:`Event` objects to every sink when ``flags`` has the event's flag.

    ``flags`` is a plain attribute so it can change at run time (reload, admin ``set_trace_flags``).
    A sink must not block or raise: a sink that raises is logged and removed, so a broken sink never
    takes the echo path down with it.
    """

    def __init__(self, flags: Flag, *, logger: logging.Logger | None = None) -> None:
        self.flags = flags
        self._sinks: list[Sink] = []
        self._logger = logger or logging.getLogger("trio_echo.trace")
        self.add_sink(self._log)

    def add_sink(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def remove_sink(self, sink: Sink) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)

    def emit(self, flag: Flag, event: str, **fields: object) -> None:
        if not self.flags & flag:
            return
        record = Event(ts=time.time(), flag=flag, event=event, fields=fields)
        for sink in list(self._sinks):
            try:
                sink(record)
            except Exception:
                self._logger.exception("trace sink %r failed and was removed", sink)
                self.remove_sink(sink)

    def _log(self, event: Event) -> None:
        self._logger.log(_LOG_LEVELS.get(event.flag, logging.DEBUG), "%s", event.describe())
