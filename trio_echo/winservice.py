"""trio-echo as a Windows service (pywin32; ``pip install trio-echo[windows]``).

    python -m trio_echo.winservice install --config C:\\trio-echo\\trio-echo.toml
    python -m trio_echo.winservice start | stop | remove

``SvcDoRun`` runs the same server as ``trio-echo serve`` through :class:`~trio_echo.service.ServiceRunner`
(in the service thread, where Trio cannot install signal handlers, so none are used); ``SvcStop`` and
``SvcShutdown`` report STOP_PENDING with a wait hint of ``drain_timeout`` plus margin and trigger the
drain through the run's Trio token. A service has no console: it logs to ``[log] file`` (default
``trio-echo.log`` beside the config file). Under NSSM or WinSW run ``trio-echo serve`` instead: their stop
arrives as Ctrl-C, which drains like SIGINT.

Without pywin32 (any non-Windows system) this module imports cleanly and does nothing; running it says
what is missing. pywin32 itself is only exercised on Windows; the thread-stop path it relies on is tested
on Linux through ``ServiceRunner``.
"""

from __future__ import annotations

import os
import sys

import attrs

from .cli import load_config
from .config import Config
from .logsetup import configure_logging
from .service import ServiceRunner

try:  # pragma: no cover - Windows only
    import servicemanager
    import win32event
    import win32service
    import win32serviceutil
except ImportError:
    win32serviceutil = None

SERVICE_NAME = "trio-echo"
CONFIG_ENV = "TRIO_ECHO_CONFIG"


def service_config() -> Config:
    """The config a service runs with: ``$TRIO_ECHO_CONFIG`` (set at install), logging to a file."""
    path = os.environ.get(CONFIG_ENV)
    config = load_config(path) if path else Config()
    if not config.log.file:
        directory = os.path.dirname(path) if path else os.getcwd()
        config = attrs.evolve(
            config, log=attrs.evolve(config.log, file=os.path.join(directory, "trio-echo.log"))
        )
    return config


if win32serviceutil is not None:  # pragma: no cover - Windows only

    class TrioEchoService(win32serviceutil.ServiceFramework):  # type: ignore[misc]
        _svc_name_ = SERVICE_NAME
        _svc_display_name_ = "trio-echo TCP echo service"
        _svc_description_ = "A production-grade TCP echo service on Trio."

        def __init__(self, args: object) -> None:
            super().__init__(args)
            self._runner: ServiceRunner | None = None
            self._stopped = win32event.CreateEvent(None, 0, 0, None)

        def SvcDoRun(self) -> None:
            config = service_config()
            configure_logging(config.log)
            servicemanager.LogInfoMsg(f"{SERVICE_NAME} starting")
            self._runner = ServiceRunner(config)
            self.ReportServiceStatus(win32service.SERVICE_RUNNING)
            self._runner.run()
            win32event.SetEvent(self._stopped)

        def _stop(self) -> None:
            wait_ms = (
                int((self._runner.server.config.limits.drain_timeout + 10) * 1000) if self._runner else 10_000
            )
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=wait_ms)
            if self._runner is not None:
                self._runner.stop()

        def SvcStop(self) -> None:
            self._stop()

        def SvcShutdown(self) -> None:
            self._stop()


def main(argv: list[str] | None = None) -> int:
    if win32serviceutil is None:
        print(
            "trio-echo winservice: needs Windows and pywin32 (pip install trio-echo[windows]); "
            "elsewhere run 'trio-echo serve' under systemd",
            file=sys.stderr,
        )
        return 2
    win32serviceutil.HandleCommandLine(TrioEchoService, argv=argv)  # pragma: no cover
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
