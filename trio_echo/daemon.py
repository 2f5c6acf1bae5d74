"""Running the server as a daemon: signals, descriptor limits, exit codes.

SIGINT/SIGTERM begin the graceful drain; a second one closes everything at once (exit 1). SIGHUP
reloads the configuration (``reload``) and reopens the log and trace files.
The server is built before the event loop starts, so configuration problems it finds (an unreadable
admin token, say) surface as ConfigError (exit 2) before anything is bound.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import trio

from .activation import adopt
from .config import Config
from .errors import ConfigError, SupervisorGaveUp
from .events import Flag
from .logsetup import configure_logging, reopen_logs
from .master import Master, worker_count
from .sdnotify import Notifier
from .server import EchoServer
from .trace import TraceFile, Tracer

logger = logging.getLogger("trio_echo.daemon")

ConfigLoader = Callable[[], Config]

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


class Daemon(Protocol):
    """What runs under signals and systemd: an :class:`EchoServer`, or a worker master."""

    @property
    def config(self) -> Config: ...

    @property
    def tracer(self) -> Tracer: ...

    @property
    def trace_file(self) -> TraceFile | None: ...

    @property
    def active(self) -> int: ...

    reload_failed: bool
    """The last SIGHUP's file was rejected (until one is applied): the agent check says maint."""

    def status(self) -> str:
        """The one-line STATUS= for systemctl status."""

    def healthy(self) -> bool:
        """False while part of it does not answer (the watchdog is then not petted)."""

    def stop(self) -> None: ...

    def abort(self) -> None: ...

    async def run(self, *, task_status: trio.TaskStatus[Any] = ...) -> None: ...

    async def reconfigure(self, config: Config, *, max_connections: int | None = None) -> list[str]: ...


async def reload(server: Daemon, load: ConfigLoader, notifier: Notifier) -> None:
    """SIGHUP: re-read the config (CLI flags still override it) and apply what can change live.
    A bad file changes nothing and says why in one line."""
    notifier.reloading()
    reopen_logs()
    if server.trace_file is not None:
        server.trace_file.reopen()
    try:
        config = load()
        max_connections = config.effective_max_connections(raise_nofile_limit())
        needs_restart = await server.reconfigure(config, max_connections=max_connections)
    except ConfigError as exc:
        server.reload_failed = True
        logger.error("reload failed, keeping the running configuration: %s", exc)
        server.tracer.emit(Flag.ERROR, "config.reloaded", ok=False, message=str(exc))
    else:
        server.reload_failed = False
        configure_logging(config.log)
        if needs_restart:
            logger.warning("reloaded; these changes require a restart: %s", ", ".join(needs_restart))
        else:
            logger.info("reloaded")
        server.tracer.emit(Flag.INFO, "config.reloaded", ok=True, requires_restart=needs_restart)
    notifier.ready(server.status())


async def serve_until_signalled(
    server: Daemon,
    notifier: Notifier | None = None,
    load: ConfigLoader | None = None,
    *,
    signals: bool = True,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Run ``server`` until a signal stops it; return the process exit code. With ``load``, SIGHUP
    reloads the configuration; without it, SIGHUP is logged and ignored.

    ``signals=False`` is for runs off the main thread (a Windows service's SvcDoRun), where Trio
    cannot install signal handlers: the caller stops the server itself (``server.stop()`` through the
    run's Trio token). ``on_ready`` is called once the server is serving."""
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
                if stopping:
                    logger.info("%s while stopping: ignored", name)
                elif load is None:
                    logger.warning("%s: no config file to reload", name)
                else:
                    logger.info("%s: reloading the configuration", name)
                    await reload(server, load, notifier)
            elif not stopping:
                stopping = True
                limits = server.config.limits
                delay = (
                    f"not ready, still accepting for {limits.drain_delay:g} s, then "
                    if limits.drain_delay
                    else ""
                )
                logger.info(
                    "%s: %sdraining (up to %g s); send it again to stop at once",
                    name,
                    delay,
                    limits.drain_timeout,
                )
                notifier.stopping(f"draining {server.active} connections")
                server.stop()
            else:
                logger.warning("%s again: closing every connection now", name)
                forced = True
                server.abort()

    async def run_server(*, task_status: trio.TaskStatus[Daemon]) -> None:
        try:
            await server.run(task_status=task_status)
        finally:
            nursery.cancel_scope.cancel()  # the helpers below end with the server

    async def refresh_status() -> None:
        await trio.sleep(1.0)  # a first refresh soon after READY, then a steady pace
        while True:
            notifier.status(server.status())
            await trio.sleep(STATUS_INTERVAL)

    async def pet_watchdog(interval: float) -> None:
        # Runs only if the event loop does: a wedged loop stops petting and systemd restarts us; so
        # does a worker that stops answering (until the master has replaced it).
        while True:
            if server.healthy():
                notifier.watchdog()
            await trio.sleep(interval)

    gave_up: list[BaseException] = []
    try:
        receiver = trio.open_signal_receiver(*handled) if signals else contextlib.nullcontext(None)
        with receiver as received:
            async with trio.open_nursery() as nursery:
                if received is not None:
                    nursery.start_soon(watch, received)
                if notifier.watchdog_interval:
                    nursery.start_soon(pet_watchdog, notifier.watchdog_interval)
                await nursery.start(run_server)
                notifier.ready(server.status())
                if on_ready is not None:
                    on_ready()
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


def run(config: Config, load: ConfigLoader | None = None) -> int:
    """Raise descriptor limits, run the daemon in the foreground, return its exit code. ``load``
    re-reads the configuration on SIGHUP."""
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
    workers = worker_count(config.server.workers)
    server: Daemon  # both may raise ConfigError
    if workers > 1:
        server = Master(config, workers=workers, inherited=inherited)
    else:
        server = EchoServer(config, max_connections=max_connections, inherited=inherited)
    try:
        return trio.run(serve_until_signalled, server, Notifier(), load)
    except KeyboardInterrupt:  # Ctrl-C before the signal receiver was installed
        print("interrupted", file=sys.stderr)
        return EXIT_FAILURE
