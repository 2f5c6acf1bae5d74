"""systemd's notify protocol (``sd_notify``), on a plain datagram socket: no C headers, no hidden errors.

A no-op without ``$NOTIFY_SOCKET``. Paths and abstract sockets (``@name``) both work. A failure to send
is logged once and then ignored: a daemon must not die because its service manager went away.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

logger = logging.getLogger("trio_echo.sdnotify")


class Notifier:
    """Sends ``KEY=VALUE`` lines to the service manager."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = ("\0" + path[1:]) if path.startswith("@") else (path or None)
        self._socket: socket.socket | None = None
        self._failed = False
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog_for_us = not pid or pid == str(os.getpid())
        self.watchdog_interval: float | None = (
            int(usec) / 1e6 / 2 if usec.isdigit() and int(usec) > 0 and watchdog_for_us else None
        )

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> None:
        """Send one notification, e.g. ``send(READY=1, STATUS="serving")``."""
        if self.address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:
                logger.warning(
                    "sd_notify to %s failed: %s (further failures are not logged)", self.address, exc
                )
                self._failed = True

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def reloading(self) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6))

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
