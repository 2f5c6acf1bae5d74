"""Limits that need a process of their own: memory under a client that never reads, and running out
of file descriptors (RLIMIT_NOFILE lowered for the daemon only)."""

from __future__ import annotations

import errno
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and sets rlimits")


def start_daemon(
    tmp_path: object, config: str, nofile: int | None = None
) -> tuple[subprocess.Popen[str], int]:
    path = os.path.join(str(tmp_path), "limits.toml")
    with open(path, "w", encoding="utf-8") as file:
        file.write(config)

    def lower_limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trio_echo",
            "serve",
            "--config",
            path,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "off",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        preexec_fn=lower_limit,  # noqa: PLW1509 - only sets an rlimit; no threads in the test process
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
            return proc, int(match.group(1))
    proc.kill()
    raise AssertionError("daemon did not start")


def stop_daemon(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        _, log = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log
    return log


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def echo(sock: socket.socket, payload: bytes = b"ping", expect: bytes | None = None) -> bool:
    """Send ``payload``; True if ``expect`` (default: the payload) comes back."""
    expect = payload if expect is None else expect
    sock.sendall(payload)
    data = b""
    while len(data) < len(expect):
        chunk = sock.recv(100)
        if not chunk:
            return False
        data += chunk
    return data == expect


def test_client_that_never_reads_costs_bounded_memory_and_is_closed(tmp_path: object) -> None:
    proc, port = start_daemon(
        tmp_path,
        "[limits]\nsend_timeout = 2.0\nlinger_timeout = 0.5\nsocket_buffer = 65536\n"
        '[trace]\nflags = "error,info,conn"\n',
    )
    try:
        baseline = rss_kb(proc.pid)
        peak = baseline
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setblocking(False)
        chunk = bytes(65536)
        sent, closed_by_server = 0, False
        deadline = time.monotonic() + 20
        while sent < 20_000_000 and time.monotonic() < deadline:
            _, writable, _ = select.select([], [sock], [], 0.2)
            peak = max(peak, rss_kb(proc.pid))
            if not writable:
                continue
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed_by_server = True
                break
        sock.close()
    finally:
        log = stop_daemon(proc)
    # The server read about one buffer and then stopped (backpressure): its memory did not follow
    # the megabytes the client pushed into the kernel.
    assert peak - baseline < 1024, (baseline, peak)
    assert closed_by_server or sent >= 20_000_000
    assert re.search(r"conn\.close .*reason=send_timeout", log), log


def test_out_of_descriptors_keeps_serving_and_recovers(tmp_path: object) -> None:
    # fd_reserve = 0 lets connections use every descriptor, so accept(2) itself hits EMFILE.
    proc, port = start_daemon(tmp_path, "[limits]\nfd_reserve = 0\n", nofile=40)
    clients: list[socket.socket] = []
    try:
        for _ in range(45):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        started = time.monotonic()
        served = []
        for client in clients:
            client.settimeout(0.3)
            try:
                served.append(echo(client))
            except TimeoutError:
                served.append(False)
        # some were served; the rest wait in the backlog while accept fails with EMFILE
        assert 20 < served.count(True) < 45, served
        waiting = [c for c, ok in zip(clients, served, strict=True) if not ok]
        assert all(ok for ok in served[: served.count(True)])  # the served ones are the first ones
        # existing clients are still served while the listener backs off
        assert echo(clients[0])
        for client in clients[:10]:
            client.close()
        for client in waiting[:5]:
            client.settimeout(10)
            # its first ping waited in the kernel while accept could not run; both come back now
            assert echo(client, expect=b"pingping")
        elapsed = time.monotonic() - started
    finally:
        for client in clients:
            client.close()
        log = stop_daemon(proc)
    warnings = [line for line in log.splitlines() if "accept failed" in line]
    assert warnings, log
    assert os.strerror(errno.EMFILE) in warnings[0]
    assert len(warnings) <= elapsed + 3  # at most about one line per second
    assert "Traceback" not in log, log[log.find("Traceback") - 300 : log.find("Traceback") + 3000]
