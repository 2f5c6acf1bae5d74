"""The stop-from-another-thread path a Windows service uses (SvcDoRun in one thread, SvcStop from
another), exercised on Linux: pywin32 itself is only exercised on Windows."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

from tests.conftest import make_config, port_of
from trio_echo import winservice
from trio_echo.service import ServiceRunner


def test_service_thread_serves_and_drains_when_stopped_from_another_thread() -> None:
    runner = ServiceRunner(make_config(server={"listen": ["127.0.0.1:0"]}, limits={"drain_timeout": 10}))
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(runner.run()), name="SvcDoRun")
    thread.start()
    assert runner.wait_started(timeout=20)
    port = port_of(runner.server.addresses[0])
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(b"from a service")
    assert client.recv(100) == b"from a service"
    runner.stop()  # SvcStop's path, from this (another) thread
    # draining: new connections are refused, the open one is still served until it finishes
    client.sendall(b"during the drain")
    assert client.recv(100) == b"during the drain"
    client.shutdown(socket.SHUT_WR)
    assert client.recv(100) == b""
    client.close()
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert result == [0]
    assert runner.server.stats.closed == {"eof": 1}
    runner.stop()  # after the run: harmless


def test_stop_before_the_loop_started_still_stops() -> None:
    runner = ServiceRunner(make_config(server={"listen": ["127.0.0.1:0"]}))
    runner.stop()
    thread = threading.Thread(target=runner.run)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive()


def test_winservice_without_pywin32_says_what_is_missing() -> None:
    assert winservice.win32serviceutil is None  # (this is not Windows)
    result = subprocess.run(
        [sys.executable, "-m", "trio_echo.winservice", "install"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "needs Windows and pywin32" in result.stderr


def test_service_config_logs_to_a_file_beside_the_config(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "trio-echo.toml"
    path.write_text("[limits]\nidle_timeout = 7\n")
    monkeypatch.setenv("TRIO_ECHO_CONFIG", str(path))
    config = winservice.service_config()
    assert config.limits.idle_timeout == 7
    assert config.log.file == str(tmp_path / "trio-echo.log")
