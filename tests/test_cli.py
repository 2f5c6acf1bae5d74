"""The command line in a subprocess: real signals, real exit codes, what a user sees on stderr."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from trio_echo import __version__

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def trio_echo(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_echo", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kw,
    )  # type: ignore[call-overload, no-any-return]


class Daemon:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []

    def wait_for_line(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(self.lines)}")

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        _, rest = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, "".join(self.lines) + rest


@contextmanager
def daemon(*args: str, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "trio_echo", "serve", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        yield Daemon(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def echo_once(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def test_version() -> None:
    result = trio_echo("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"trio-echo {__version__}"


def test_serve_echoes_and_sigterm_drains_to_exit_0() -> None:
    with daemon("--listen", "127.0.0.1:0", "--admin", "off") as d:
        port = int(d.wait_for_line(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        assert echo_once(port, b"hello over a real socket") == b"hello over a real socket"
        d.proc.send_signal(signal.SIGTERM)
        code, log = d.finish()
    assert code == 0, log
    assert "SIGTERM: draining" in log
    assert "Traceback" not in log


def test_second_sigint_stops_at_once_with_exit_1() -> None:
    with daemon("--listen", "127.0.0.1:0", "--admin", "off") as d:
        port = int(d.wait_for_line(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as open_client:
            open_client.sendall(b"x")
            assert open_client.recv(1) == b"x"
            d.proc.send_signal(signal.SIGINT)
            d.wait_for_line("SIGINT: draining")
            d.proc.send_signal(signal.SIGINT)
            code, log = d.finish()
            assert open_client.recv(10) == b""  # closed, by FIN
    assert code == 1, log
    assert "SIGINT again" in log


def test_default_listen_is_both_families_on_40007() -> None:
    probe = socket.socket()
    # Like the server: a connection of an earlier test in TIME_WAIT on local port 40007 (it is in the
    # ephemeral range) must not count as "in use"; only another listener does.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(("0.0.0.0", 40007))
    except OSError:
        pytest.skip("port 40007 is in use on this machine")
    finally:
        probe.close()
    with daemon("--admin", "off") as d:
        d.wait_for_line(r"listening on 0\.0\.0\.0:40007")
        if socket.has_ipv6:
            d.wait_for_line(r"listening on \[::\]:40007")
        assert echo_once(40007, b"default port") == b"default port"
        d.proc.send_signal(signal.SIGTERM)
        code, log = d.finish()
    assert code == 0, log


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[limits]\nidle_timeout = -5\n", "limits.idle_timeout = -5.0: must be >= 0"),
        ("[server]\nlisten = ['1.2.3.4:70000']\n", "server.listen[0] = '1.2.3.4:70000'"),
        ("[limits]\nnope = 1\n", "limits.nope = 1: unknown key"),
        ("[limits]\nidle_timout = 1\n", "limits.idle_timout = 1: unknown key; did you mean idle_timeout?"),
        ("[limits]\nallow = " + "[" * 4000 + "]" * 4000 + "\n", "invalid TOML: arrays or tables nested"),
        ("[server\n", "invalid TOML"),
        ("[faults.x]\nlatency = -1\n", "faults.x.latency = -1.0: must be >= 0"),
        ("[faults.x]\nlose = 0.1\n", "faults.x.lose = 0.1: unknown key; did you mean loss?"),
        ("[faults.x]\nreorder = 1.01\n", "faults.x.reorder = 1.01: must be a probability from 0 to 1"),
        (
            '[server]\nlisten = [{ address = ":0", faults = "x" }]\n',
            "server.listen[0].faults = 'x': no [faults.NAME] profile by that name (none defined)",
        ),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path: object, content: str, message: str) -> None:
    path = os.path.join(str(tmp_path), "bad.toml")
    with open(path, "w", encoding="utf-8") as file:
        file.write(content)
    for args in (("serve", "--config", path), ("check-config", path)):
        result = trio_echo(*args)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr
        assert result.stderr.startswith("trio-echo: config error: ")


def test_config_from_environment(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "env.toml")
    with open(path, "w", encoding="utf-8") as file:
        file.write("[limits]\nbuffer_size = -1\n")
    result = trio_echo("serve", env={**os.environ, "TRIO_ECHO_CONFIG": path})
    assert result.returncode == 2
    assert "limits.buffer_size = -1" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("serve", "--listen", "nonsense"), "--listen = 'nonsense'"),
        (("serve", "--admin", "x:y"), "--admin = 'x:y'"),
        (("serve", "--config", "/nonexistent/trio-echo.toml"), "cannot read config file /nonexistent"),
        (("serve", "--bogus"), "unrecognized arguments: --bogus"),
        (("serve", "--listn", ":0"), "unrecognized arguments: --listn :0; did you mean --listen?"),
        (("serve", "--adminn=off"), "unrecognized arguments: --adminn=off; did you mean --admin?"),
        (("bench", "127.0.0.1:1", "--conections", "3"), "did you mean --connections?"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        ((), "the following arguments are required"),
        (
            ("admin", "127.0.0.1:1", "faults", "--id", "3", '{"loss": 2}'),
            "faults.loss = 2.0: must be a probability",
        ),
        (("admin", "127.0.0.1:1", "faults", "--id", "3", "{nope"), "not a JSON object of fault keys"),
        (("admin", "127.0.0.1:1", "faults", "cut"), "one of the arguments --listener --id is required"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args: tuple[str, ...], message: str) -> None:
    result = trio_echo(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


def test_check_config_prints_effective_config() -> None:
    result = trio_echo("check-config", "configs/trio-echo.toml")
    assert result.returncode == 0, result.stderr
    assert 'listen = [":40007"]' in result.stdout
    assert re.search(r"^max_connections = \d+$", result.stdout, re.M)


def test_supervisor_giving_up_is_one_clear_line_and_exit_1(tmp_path: object) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    path = os.path.join(str(tmp_path), "c.toml")
    with open(path, "w", encoding="utf-8") as file:
        file.write("[supervisor]\nmax_restarts = 2\nbackoff_initial = 0.01\nbackoff_max = 0.01\n")
    try:
        result = trio_echo("serve", "--config", path, "--listen", f"127.0.0.1:{port}", "--admin", "off")
    finally:
        blocker.close()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    fatal = [line for line in result.stderr.splitlines() if "CRITICAL" in line]
    assert len(fatal) == 1
    assert "supervisor gave up" in fatal[0]
    assert "Address already in use" in fatal[0]


def test_max_connections_above_the_fd_limit_is_clamped_with_a_warning(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "big.toml")
    with open(path, "w", encoding="utf-8") as file:
        file.write("[limits]\nmax_connections = 100000000\n")
    with daemon("--config", path, "--listen", "127.0.0.1:0", "--admin", "off") as d:
        warning = d.wait_for_line(r"limits\.max_connections = 100000000 exceeds the open-file limit")
        assert "using" in warning.string
        d.wait_for_line(r"listening on 127\.0\.0\.1:\d+")
        d.proc.send_signal(signal.SIGTERM)
        code, log = d.finish()
    assert code == 0, log
