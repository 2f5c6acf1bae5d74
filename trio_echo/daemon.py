"""Running the server as a daemon: signals, descriptor limits, exit codes.

SIGINT/SIGTERM begin the graceful drain; a second one closes everything at once (exit 1). SIGHUP is
caught so that it does not kill the daemon; live reload is not part of this version yet and says so.
The server is built before the event loop starts, so configuration problems it finds (an unreadable
admin token, say) surface as ConfigError (exit 2) before anything is bound.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import AsyncIterator

import trio

from .activation import adopt
from .config import Config
from .errors import SupervisorGaveUp
from .sdnotify import Notifier
from .server import EchoServer

logger = logging.getLogger("trio_echo.daemon")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def raise_nofile_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the limit now in force (None: no rlimit)."""
    try:
        import resource  # noqa: PLC0415 - not on Windows
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


STATUS_INTERVAL = 5.0  # seconds between STATUS= refreshes to the service manager


def status_line(server: EchoServer) -> str:
    """The one-line STATUS= for systemctl status: counts, and listeners still retrying."""
    stats = server.stats
    retrying = [name for name in server.listener_names if not server.supervisor.running(name)]
    text = (
        f"{stats.active} active, {stats.total} total, {sum(stats.refused.values())} refused; "
        f"listening on {', '.join(server.addresses) or 'nothing yet'}"
    )
    return text + (f"; retrying {', '.join(retrying)}" if retrying else "")


async def serve_until_signalled(server: EchoServer, notifier: Notifier | None = None) -> int:
    """Run ``server`` until a signal stops it; return the process exit code."""
    notifier = notifier or Notifier(env={})
    forced = False
    handled = [signal.SIGINT, signal.SIGTERM]
    if hasattr(signal, "SIGHUP"):
        handled.append(signal.SIGHUP)

    async def watch(signals: AsyncIterator[int]) -> None:
        nonlocal forced
        stopping = False
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == getattr(signal, "SIGHUP", None):
                logger.warning("%s: live reload is not supported by this version; restart to apply", name)
            elif not stopping:
                stopping = True
                logger.info(
                    "%s: draining (up to %g s); send it again to stop at once",
                    name,
                    server.config.limits.drain_timeout,
                )
                notifier.stopping(f"draining {server.stats.active} connections")
                server.stop()
            else:
                logger.warning("%s again: closing every connection now", name)
                forced = True
                server.abort()

    async def run_server(*, task_status: trio.TaskStatus[EchoServer]) -> None:
        try:
            await server.run(task_status=task_status)
        finally:
            nursery.cancel_scope.cancel()  # the helpers below end with the server

    async def refresh_status() -> None:
        while True:
            await trio.sleep(STATUS_INTERVAL)
            notifier.status(status_line(server))

    async def pet_watchdog(interval: float) -> None:
        # Runs only if the event loop does: a wedged loop stops petting and systemd restarts us.
        while True:
            notifier.watchdog()
            await trio.sleep(interval)

    gave_up: list[BaseException] = []
    try:
        with trio.open_signal_receiver(*handled) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, signals)
                if notifier.watchdog_interval:
                    nursery.start_soon(pet_watchdog, notifier.watchdog_interval)
                await nursery.start(run_server)
                notifier.ready(status_line(server))
                if notifier.enabled:
                    nursery.start_soon(refresh_status)
    except* SupervisorGaveUp as group:
        gave_up.extend(group.exceptions)
    finally:
        notifier.close()
    if gave_up:
        logger.critical("%s", gave_up[0])
        return EXIT_FAILURE
    logger.info("stopped")
    return EXIT_FAILURE if forced else EXIT_OK


def run(config: Config) -> int:
    """Raise descriptor limits, run the daemon in the foreground, return its exit code."""
    limit = raise_nofile_limit()
    max_connections = config.effective_max_connections(limit)
    if config.limits.max_connections is not None and config.limits.max_connections > max_connections:
        logger.warning(
            "limits.max_connections = %d exceeds the open-file limit %s minus fd_reserve; using %d",
            config.limits.max_connections,
            limit,
            max_connections,
        )
    inherited = adopt()  # systemd socket activation, if any (may raise ConfigError)
    server = EchoServer(config, max_connections=max_connections, inherited=inherited)  # may raise ConfigError
    try:
        return trio.run(serve_until_signalled, server, Notifier())
    except KeyboardInterrupt:  # Ctrl-C before the signal receiver was installed
        print("interrupted", file=sys.stderr)
        return EXIT_FAILURE
