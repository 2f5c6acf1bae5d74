"""Life under systemd, with the real tools: sd_notify to a test-owned socket, socket activation through
systemd-socket-activate, the unit files through systemd-analyze verify. (scripts/test installs the
Debian package systemd when these tools are missing.)"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="systemd is Linux")
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class NotifyListener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.env_value = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def collect(self, seconds: float, until: str | None = None) -> list[dict[str, str]]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(message)
            if until is not None and until in message:
                break
        return self.messages

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_ready_status_stopping_and_watchdog(tmp_path: Path, kind: str) -> None:
    address = str(tmp_path / "notify.sock") if kind == "path" else f"@trio-echo-test-{os.getpid()}"
    listener = NotifyListener(address)
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trio_echo", "serve", "--listen", "127.0.0.1:0", "--admin", "off"],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        listener.collect(20, until="READY")
        ready_at = time.monotonic()
        listener.collect(1.6)  # a STATUS refresh after 1 s; watchdog pings every WATCHDOG_USEC/2 = 0.2 s
        proc.send_signal(signal.SIGTERM)
        listener.collect(10, until="STOPPING")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()
    kinds = [
        next(k for k in ("READY", "STOPPING", "WATCHDOG", "STATUS") if k in m) for m in listener.messages
    ]
    assert "READY" in kinds
    assert kinds.index("READY") < kinds.index("STATUS") < kinds.index("STOPPING")
    ready = listener.messages[kinds.index("READY")]
    assert re.match(r"0 active, 0 total, 0 refused; listening on 127\.0\.0\.1:\d+$", ready["STATUS"])
    assert listener.messages[kinds.index("STOPPING")]["STATUS"] == "draining 0 connections"
    pings = kinds.count("WATCHDOG")
    elapsed = time.monotonic() - ready_at
    assert 3 <= pings <= elapsed / 0.2 + 4, (pings, elapsed)


def test_socket_activation_with_systemd_socket_activate(tmp_path: Path) -> None:
    tool = shutil.which("systemd-socket-activate")
    assert tool, "systemd-socket-activate is missing: scripts/test installs it (apt-get install systemd)"
    port, admin_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            tool,
            "-l", f"127.0.0.1:{port}",
            "-l", f"[::1]:{port}",
            "-l", f"127.0.0.1:{admin_port}",
            "--fdname=echo:echo:admin",
            "-E", f"RUNTIME_DIRECTORY={tmp_path}",
            "-E", f"PYTHONPATH={REPO}",
            sys.executable, "-m", "trio_echo", "serve", "--listen", "127.0.0.1:1",  # ignored: adopted
        ],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:  # the tool binds before launching us: connecting is what launches the daemon
            try:
                first = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "systemd-socket-activate never listened"
                time.sleep(0.05)
        with first:
            first.sendall(b"v4 through systemd")
            assert first.recv(100) == b"v4 through systemd"
        with socket.create_connection(("::1", port), timeout=10) as v6:
            v6.sendall(b"v6 through systemd")
            assert v6.recv(100) == b"v6 through systemd"
        with socket.create_connection(("127.0.0.1", admin_port), timeout=10) as admin:
            admin.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{admin_port}\r\n\r\n".encode())
            assert admin.recv(1000).startswith(b"HTTP/1.1 200 ")
        assert (tmp_path / f"admin-{admin_port}.token").exists()
        proc.send_signal(signal.SIGTERM)
        _, log = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log
    assert "(socket activation)" in log
    assert "listening on 127.0.0.1:1 " not in log  # the adopted sockets replace the listen list


def test_udp_socket_activation(tmp_path: Path) -> None:
    """``ListenDatagram=``: systemd passes a bound UDP socket; the first datagram starts the daemon
    and is echoed once it runs."""
    tool = shutil.which("systemd-socket-activate")
    assert tool, "systemd-socket-activate is missing: scripts/test installs it (apt-get install systemd)"
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    proc = subprocess.Popen(
        [
            tool, "--datagram", "-l", f"127.0.0.1:{port}", "--fdname=echo",
            "-E", f"PYTHONPATH={REPO}",
            sys.executable, "-m", "trio_echo", "serve", "--admin", "off",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(0.5)
            deadline = time.monotonic() + 20
            while True:  # the tool binds before launching us; UDP may drop until then, so resend
                client.sendto(b"udp through systemd", ("127.0.0.1", port))
                try:
                    reply = client.recv(100)
                    break
                except (TimeoutError, ConnectionRefusedError):
                    assert time.monotonic() < deadline, "no echo from the socket-activated daemon"
            assert reply == b"udp through systemd"
        proc.send_signal(signal.SIGTERM)
        _, log = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log
    assert f"listening on udp://127.0.0.1:{port} (socket activation)" in log


def test_a_passed_descriptor_that_is_not_a_listening_socket_is_a_config_error(tmp_path: Path) -> None:
    regular = tmp_path / "not-a-socket"
    regular.write_text("x")
    code = (
        "import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.dup2(fd, 3); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='echo'); "
        "from trio_echo.cli import main; sys.exit(main(['serve', '--admin', 'off']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(regular)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "descriptor 3 (echo) is not a socket" in result.stderr
    assert result.stderr.count("\n") == 1


def test_unit_files_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: scripts/test installs it (apt-get install systemd)"
    for unit in (REPO / "configs" / "systemd").iterdir():
        text = unit.read_text().replace(
            "/usr/local/bin/trio-echo", str(Path(sys.executable).parent / "trio-echo")
        )
        (tmp_path / unit.name).write_text(text)
    units = sorted(str(p) for p in tmp_path.iterdir())
    result = subprocess.run(
        [tool, "verify", *units], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "trio-echo" not in result.stderr, result.stderr  # no warnings about our units


async def test_a_wedged_event_loop_stops_petting_the_watchdog(tmp_path: Path) -> None:
    """The watchdog is petted by a task of the event loop, never by a side thread: while the loop is
    blocked, no WATCHDOG=1 leaves, so systemd's watchdog fires as it should."""
    import trio

    from tests.conftest import make_config
    from trio_echo.daemon import serve_until_signalled
    from trio_echo.sdnotify import Notifier
    from trio_echo.server import EchoServer

    listener = NotifyListener(str(tmp_path / "notify.sock"))
    listener.sock.setblocking(False)

    def drain() -> int:
        count = 0
        while True:
            try:
                count += b"WATCHDOG=1" in listener.sock.recv(4096)
            except BlockingIOError:
                return count

    server = EchoServer(make_config(server={"listen": ["127.0.0.1:0"]}))
    notifier = Notifier(env={"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "100000"})
    seen: dict[str, int] = {}

    async def wedge_then_stop() -> None:
        await trio.sleep(0.5)
        seen["before"] = drain()
        time.sleep(1.0)  # noqa: ASYNC251 - the point: the loop is wedged for a second
        seen["during"] = drain()
        await trio.sleep(0.5)
        seen["after"] = drain()
        server.stop()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wedge_then_stop)
            assert await serve_until_signalled(server, notifier, signals=False) == 0
    listener.close()
    assert seen["before"] >= 3  # every 0.05 s while the loop runs
    assert seen["during"] == 0
    assert seen["after"] >= 3
