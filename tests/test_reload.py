"""SIGHUP reload in a real daemon: each reloadable key changes what a real client sees, open
connections survive, a bad file changes nothing, and systemd hears RELOADING then READY."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.test_systemd import NotifyListener, free_port

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")


class LogWatcher:
    """Reads the daemon's stderr in a thread so the test can wait for lines without blocking."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._proc = proc
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the process if it still runs, finish reading and close the pipe."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._thread.join(timeout=10)
        if self._proc.stderr is not None:
            self._proc.stderr.close()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_for(self, pattern: str, *, after: int = 0, timeout: float = 20) -> int:
        """Index of the first line at or after ``after`` matching ``pattern``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for index in range(after, len(self.lines)):
                    if re.search(pattern, self.lines[index]):
                        return index
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no {pattern!r} in:\n{''.join(self.lines)}"
                self._cond.wait(remaining)


def echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(100)
        if not chunk:
            break
        got += chunk
    return got


def write_config(
    path: Path, ports: list[int], *, farewell: str = "", max_connections: int = 10, flags: str = "error,info"
) -> None:
    listen = ", ".join(f'"127.0.0.1:{port}"' for port in ports)
    path.write_text(
        f"[server]\nlisten = [{listen}]\nfarewell = {json.dumps(farewell)}\n"
        f"[limits]\nmax_connections = {max_connections}\n"
        f"[trace]\nflags = {json.dumps(flags)}\n"
        '[admin]\nlisten = ""\n'
    )


def test_sighup_applies_live_and_keeps_connections(tmp_path: Path) -> None:
    first, second = free_port(), free_port()
    config = tmp_path / "trio-echo.toml"
    write_config(config, [first])
    notify = NotifyListener(str(tmp_path / "notify.sock"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "trio_echo", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NOTIFY_SOCKET": notify.env_value},
    )
    log = LogWatcher(proc)
    try:
        log.wait_for(rf"listening on 127\.0\.0\.1:{first}")
        notify.collect(10, until="READY")
        old_client = socket.create_connection(("127.0.0.1", first), timeout=10)
        assert echo(old_client, b"before") == b"before"

        # farewell, the listen list, max_connections and trace flags, all at once
        write_config(config, [first, second], farewell="bye\n", max_connections=3, flags="error,info,conn")
        proc.send_signal(signal.SIGHUP)
        mark = log.wait_for(r"trio_echo.daemon: reloaded$")
        notify.collect(10, until="READY")
        reload_messages = [m for m in notify.messages if "RELOADING" in m or "READY" in m][1:]
        assert "RELOADING" in reload_messages[0]
        assert int(reload_messages[0]["MONOTONIC_USEC"]) > 0
        assert "READY" in reload_messages[1]
        assert echo(old_client, b"after") == b"after"  # the open connection survived
        new_client = socket.create_connection(("127.0.0.1", second), timeout=10)  # the new listener
        assert echo(new_client, b"new") == b"new"
        log.wait_for(r"conn\.open", after=mark)  # the conn flag is on now
        extra = socket.create_connection(("127.0.0.1", first), timeout=10)
        assert echo(extra, b"third") == b"third"
        refused = socket.create_connection(("127.0.0.1", first), timeout=10)  # a fourth: over the cap
        assert refused.recv(10) == b""
        refused.close()
        extra.close()
        new_client.shutdown(socket.SHUT_WR)
        assert new_client.recv(100) == b"bye\n"  # the new farewell
        new_client.close()

        # a bad file changes nothing
        config.write_text("[limits]\nidle_timeout = -1\n")
        proc.send_signal(signal.SIGHUP)
        log.wait_for(r"reload failed, keeping the running configuration: limits\.idle_timeout = -1\.0")
        assert echo(old_client, b"still") == b"still"
        # nor does one the TOML parser cannot even finish (it recurses on nesting)
        config.write_text("[limits]\nallow = " + "[" * 5000 + "]" * 5000 + "\n")
        proc.send_signal(signal.SIGHUP)
        log.wait_for(r"reload failed, keeping the running configuration: invalid TOML: .* nested too deeply")
        assert echo(old_client, b"still 2") == b"still 2"
        with socket.create_connection(("127.0.0.1", second), timeout=10) as again:
            assert echo(again, b"second still listens") == b"second still listens"

        # removing a listener closes it; its open connections keep running
        keeper = socket.create_connection(("127.0.0.1", second), timeout=10)
        assert echo(keeper, b"keep") == b"keep"
        write_config(config, [first])
        proc.send_signal(signal.SIGHUP)
        log.wait_for(r"trio_echo.daemon: reloaded$", after=mark + 1)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", second), timeout=10)
        assert echo(keeper, b"kept") == b"kept"
        keeper.close()
        old_client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        log.close()
        notify.close()
    assert not any("Traceback" in line for line in log.lines), "".join(log.lines)


def test_restart_only_keys_are_named(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[server]\nlisten = ["127.0.0.1:0"]\nbacklog = 100\n[admin]\nlisten = ""\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "trio_echo", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    log = LogWatcher(proc)
    try:
        log.wait_for(r"listening on 127\.0\.0\.1:\d+")
        config.write_text('[server]\nlisten = ["127.0.0.1:0"]\nbacklog = 200\n[admin]\nlisten = ""\n')
        proc.send_signal(signal.SIGHUP)
        log.wait_for(r"reloaded; these changes require a restart: server\.backlog$")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        log.close()
