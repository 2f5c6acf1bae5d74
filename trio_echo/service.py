"""Running the daemon from a thread that is not the main one, stopped from another thread.

Service managers that own the main thread (pywin32's ``SvcDoRun`` runs in a worker thread, and its
``SvcStop`` arrives on yet another) cannot use signals: Trio installs signal handlers only on the main
thread. ``ServiceRunner`` runs the same server as ``trio-echo serve``, and ``stop()`` triggers the same
graceful drain from any thread, through the run's Trio token.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import trio

from .config import Config
from .daemon import raise_nofile_limit, serve_until_signalled
from .server import EchoServer

logger = logging.getLogger("trio_echo.service")


class ServiceRunner:
    """``run()`` blocks (in the service thread) until ``stop()`` (from any thread) has drained."""

    def __init__(self, config: Config) -> None:
        self.server = EchoServer(
            config, max_connections=config.effective_max_connections(raise_nofile_limit())
        )
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = threading.Event()
        self._stop_requested = False

    def run(self) -> int:
        """Serve until stopped; return the exit code (0 drained, 1 the supervisor gave up).

        The same entry point ``trio-echo serve`` uses (``serve_until_signalled``), without signal
        handlers, which Trio installs only on the main thread."""
        try:
            return trio.run(self._main)
        finally:
            self._started.set()  # never leave wait_started() hanging

    async def _main(self) -> int:
        self._token = trio.lowlevel.current_trio_token()
        return await serve_until_signalled(self.server, signals=False, on_ready=self._ready)

    def _ready(self) -> None:
        self._started.set()
        if self._stop_requested:  # stop() came before the loop could take it
            self.server.stop()

    def wait_started(self, timeout: float | None = None) -> bool:
        return self._started.wait(timeout)

    def stop(self) -> None:
        """Begin the graceful drain, from any thread (SvcStop, SvcShutdown, a console handler)."""
        self._stop_requested = True
        token = self._token
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):  # already stopped
            trio.from_thread.run_sync(self.server.stop, trio_token=token)
