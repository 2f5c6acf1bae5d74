"""Worker processes for real: a master and its workers as processes, driven from outside with real
sockets, real signals (SIGKILL, SIGSTOP, SIGTERM, SIGHUP), the admin CLI, an sd_notify socket and
systemd-socket-activate."""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.test_reload import LogWatcher
from tests.test_systemd import NotifyListener, free_port

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT workers and POSIX signals")

TOKEN = "worker-test-token-0123456789abcdef"
READY = r"worker (\d) \(pid (\d+)\) ready: 127\.0\.0\.1:(\d+)"


def wait_until(check: Callable[[], object], *, timeout: float = 15.0, what: str = "the condition") -> object:
    """Poll ``check`` (every 50 ms, at most ``timeout`` s) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts: it runs no code)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class Daemon:
    """``trio-echo serve`` with a config file, its stderr watched, its admin port on a known port."""

    def __init__(
        self, tmp_path: Path, config: str, *args: str, workers: int = 2, env: dict[str, str] | None = None
    ):
        self.admin_port = free_port()
        self.path = tmp_path / "trio-echo.toml"
        self.path.write_text(config)
        self.env = {
            **os.environ,
            "TRIO_ECHO_ADMIN_TOKEN": TOKEN,
            "RUNTIME_DIRECTORY": str(tmp_path),
            **(env or {}),
        }
        command = [sys.executable, "-m", "trio_echo", "serve", "--config", str(self.path)]
        command += ["--admin", f"127.0.0.1:{self.admin_port}", "--workers", str(workers), *args]
        self.proc = subprocess.Popen(command, env=self.env, stderr=subprocess.PIPE, text=True)
        self.log = LogWatcher(self.proc)

    def ready(self, workers: int = 2) -> int:
        """Wait for every worker's ready line; the echo port they share."""
        ports = set()
        for index in range(workers):
            line = self.log.lines[self.log.wait_for(READY.replace(r"(\d)", str(index), 1))]
            match = re.search(READY, line)
            assert match is not None
            ports.add(int(match.group(3)))
        assert len(ports) == 1, ports
        return ports.pop()

    def admin(self, *args: str) -> object:
        """``trio-echo admin ADDR ARGS``: its JSON output, or its text (``close``)."""
        done = subprocess.run(
            [sys.executable, "-m", "trio_echo", "admin", f"127.0.0.1:{self.admin_port}", *args],
            env=self.env,
            capture_output=True,
            timeout=30,
            check=True,
        )
        return json.loads(done.stdout) if done.stdout.startswith((b"{", b"[")) else done.stdout.decode()

    def stats(self) -> dict[str, object]:
        stats = self.admin("stats")
        assert isinstance(stats, dict)
        return stats

    def workers(self) -> list[dict[str, object]]:
        rows = self.stats()["workers"]
        assert isinstance(rows, list)
        return rows

    def metrics(self) -> str:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return str(answer.read().decode())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=40)
        finally:
            self.log.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(config: str = "", *args: str, **kwargs: object) -> Daemon:
        daemon = Daemon(tmp_path, config, *args, **kwargs)  # type: ignore[arg-type]
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        pids = [row["pid"] for row in _last_rows(daemon)]
        if daemon.proc.poll() is None:
            daemon.proc.kill()
        daemon.proc.wait(timeout=30)
        daemon.log.close()
        for pid in pids:  # no worker outlives its test
            if isinstance(pid, int) and not gone(pid):
                os.kill(pid, signal.SIGKILL)


def _last_rows(daemon: Daemon) -> list[dict[str, object]]:
    try:
        return daemon.workers() if daemon.proc.poll() is None else []
    except (subprocess.SubprocessError, AssertionError, ValueError, KeyError):
        return []


_clients: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def connect(port: int, count: int) -> list[socket.socket]:
    """``count`` client connections (closed after the test)."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    _clients.extend(socks)
    return socks


def echoes(sock: socket.socket, data: bytes = b"ping") -> bool:
    try:
        sock.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = sock.recv(len(data) - len(got))
            if not chunk:
                return False
            got += chunk
    except OSError:
        return False
    return got == data


def owners(daemon: Daemon, socks: list[socket.socket]) -> dict[int, int]:
    """For each client socket (by index in ``socks``): the index of the worker serving it."""
    items = daemon.admin("connections")
    assert isinstance(items, list)
    by_peer = {item["peer"]: item["worker"] for item in items}
    result = {}
    for index, sock in enumerate(socks):
        host, port = sock.getsockname()[:2]
        result[index] = by_peer[f"{host}:{port}"]
    return result


CONFIG = '[server]\nlisten = ["127.0.0.1:0"]\n[limits]\ndrain_timeout = 2.0\n'


def test_two_workers_share_one_port_and_answer_as_one_server(daemons: Callable[..., Daemon]) -> None:
    daemon = daemons(CONFIG)
    port = daemon.ready()
    clients = connect(port, 40)
    assert all(echoes(sock, b"hello %d" % i) for i, sock in enumerate(clients))
    stats = daemon.stats()
    assert stats["connections"]["active"] == 40  # type: ignore[index]
    rows = daemon.workers()
    assert [row["index"] for row in rows] == [0, 1]
    assert {row["state"] for row in rows} == {"running"}
    assert sum(row["active"] for row in rows) == 40  # type: ignore[misc]
    assert all(row["active"] > 0 for row in rows)  # type: ignore[operator]  # SO_REUSEPORT spreads them
    owner = owners(daemon, clients)
    items = daemon.admin("connections")
    ids = [item["id"] for item in items]  # type: ignore[union-attr]
    assert len(set(ids)) == 40
    # close reaches the worker that owns the connection: that client alone sees EOF.
    victim = next(index for index, worker in owner.items() if worker == 1)
    host, cport = clients[victim].getsockname()[:2]
    victim_id = next(i["id"] for i in items if i["peer"] == f"{host}:{cport}")  # type: ignore[union-attr]
    assert daemon.admin("close", str(victim_id)) == f"closed connection {victim_id}\n"
    clients[victim].settimeout(10)
    assert clients[victim].recv(10) == b""
    assert all(echoes(sock) for index, sock in enumerate(clients) if index != victim)
    metrics = daemon.metrics()
    assert 'trio_echo_connections_total{listener="127.0.0.1:0"} 40' in metrics
    assert 'trio_echo_workers{state="running"} 2' in metrics
    assert "trio_echo_bytes_received_total " in metrics
    for sock in clients:
        sock.close()
    assert daemon.stop() == 0


def test_a_killed_worker_is_restarted_and_the_others_keep_their_connections(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    events_file = tmp_path / "events.jsonl"
    daemon = daemons(CONFIG + f'[trace]\nflags = "error,info,conn"\nfile = "{events_file}"\n')
    port = daemon.ready()
    trace_file = tmp_path / "trace.jsonl"
    tracer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trio_echo",
            "admin",
            f"127.0.0.1:{daemon.admin_port}",
            "trace",
            "--flags",
            "info,conn",
            "-o",
            str(trace_file),
        ],
        env=daemon.env,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(trace_file.exists, what="the trace subscriber")
        clients = connect(port, 30)
        assert all(echoes(sock) for sock in clients)
        owner = owners(daemon, clients)
        rows = daemon.workers()
        victim_pid = rows[0]["pid"]
        assert isinstance(victim_pid, int)
        os.kill(victim_pid, signal.SIGKILL)
        # worker 1's connections are untouched; worker 0's are gone with it.
        survivors = [sock for index, sock in enumerate(clients) if owner[index] == 1]
        lost = [sock for index, sock in enumerate(clients) if owner[index] == 0]
        assert survivors
        assert lost
        assert all(echoes(sock) for sock in survivors)
        assert not any(echoes(sock) for sock in lost)

        def replaced() -> bool:
            row = daemon.workers()[0]
            return row["pid"] != victim_pid and row["state"] == "running" and row["restarts"] == 1

        wait_until(replaced, what="worker 0 restarted")
        daemon.log.wait_for(r"worker 0 failed: WorkerExited: worker 0 \(pid \d+\) killed by SIGKILL")
        events = wait_until(
            lambda: [
                json.loads(line)
                for line in trace_file.read_text().splitlines()
                if '"supervisor.restart"' in line
            ],
            what="the supervisor.restart event",
        )
        assert events[0]["child"] == "worker 0"  # type: ignore[index]
        # worker events carry their worker: a new connection's conn.open says which.
        fresh = connect(port, 10)
        assert all(echoes(sock) for sock in fresh)
        opened = wait_until(
            lambda: [
                json.loads(line) for line in trace_file.read_text().splitlines() if '"conn.open"' in line
            ],
            what="conn.open events",
        )
        assert {event["worker"] for event in opened} <= {0, 1}  # type: ignore[index]
        assert all("worker" in event for event in opened)  # type: ignore[operator]
        assert all(echoes(sock) for sock in survivors)
    finally:
        tracer.terminate()
        tracer.wait(timeout=10)
    assert daemon.stop() == 0
    # The master's trace file has every worker's events, each naming its worker, and its own.
    recorded = [json.loads(line) for line in events_file.read_text().splitlines()]
    opened = [event for event in recorded if event["event"] == "conn.open"]
    assert len(opened) == 40
    assert {event["worker"] for event in opened} == {0, 1}
    assert any(event["event"] == "supervisor.restart" for event in recorded)


def test_a_hung_worker_is_killed_and_replaced_and_the_watchdog_waits_for_it(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    notify = NotifyListener(str(tmp_path / "notify.sock"))
    notify.sock.settimeout(0.05)
    try:
        daemon = daemons(CONFIG, env={"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": "200000"})
        port = daemon.ready()
        notify.collect(20, until="READY")
        hung_pid = daemon.workers()[1]["pid"]
        assert isinstance(hung_pid, int)
        mark = len(daemon.log.lines)
        stopped_at = time.monotonic()
        os.kill(hung_pid, signal.SIGSTOP)
        pets: list[float] = []  # when the master petted the watchdog (every 0.1 s while all answer)
        replaced_at = None
        while time.monotonic() < stopped_at + 15 and (
            replaced_at is None or time.monotonic() < replaced_at + 1
        ):
            try:
                if b"WATCHDOG=1" in notify.sock.recv(4096):
                    pets.append(time.monotonic())
            except TimeoutError:
                pass
            if replaced_at is None and any(
                re.search(r"worker 1 \(pid \d+\) ready", line) for line in daemon.log.lines[mark:]
            ):
                replaced_at = time.monotonic()
        assert replaced_at is not None, "worker 1 was not replaced"
        line = daemon.log.wait_for(r"worker 1 \(pid \d+\) has not answered its heartbeat", after=mark)
        assert "killing it" in daemon.log.lines[line]
        assert replaced_at - stopped_at < 6
        assert gone(hung_pid)
        row = daemon.workers()[1]
        assert (row["state"], row["restarts"]) == ("running", 1)
        assert row["pid"] != hung_pid
        assert all(echoes(sock) for sock in connect(port, 10))
        # No pets from about 1 s after SIGSTOP (its heartbeat late) until the replacement answered;
        # pets again after that.
        silent = [later - earlier for earlier, later in itertools.pairwise(pets) if earlier > stopped_at]
        assert silent, pets
        assert max(silent) > 1.5, pets
        assert pets[-1] > replaced_at
    finally:
        notify.close()
    while _clients:
        _clients.pop().close()
    assert daemon.stop() == 0


def test_sigterm_drains_every_worker_within_one_deadline(daemons: Callable[..., Daemon]) -> None:
    daemon = daemons(CONFIG)
    port = daemon.ready()
    clients = connect(port, 30)
    assert all(echoes(sock) for sock in clients)
    assert set(owners(daemon, clients).values()) == {0, 1}
    pids = [row["pid"] for row in daemon.workers()]
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.log.wait_for("draining")
    assert all(echoes(sock) for sock in clients)  # connections keep being served while draining
    for sock in clients:  # drain_timeout = 2 s: then each is closed (EOF after its echo)
        sock.settimeout(15)
        assert sock.recv(10) == b""
        sock.close()  # which ends the server's lingering close
    assert daemon.proc.wait(timeout=20) == 0
    assert time.monotonic() - started < 2 + 3
    assert all(gone(pid) for pid in pids if isinstance(pid, int))
    daemon.log.close()


def test_a_second_sigterm_stops_every_worker_at_once(daemons: Callable[..., Daemon]) -> None:
    daemon = daemons('[server]\nlisten = ["127.0.0.1:0"]\n[limits]\ndrain_timeout = 60.0\n')
    port = daemon.ready()
    clients = connect(port, 20)
    assert all(echoes(sock) for sock in clients)
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.log.wait_for("draining")
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=15) == 1
    assert time.monotonic() - started < 5
    for sock in clients:
        sock.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(10) == b""
    daemon.log.close()


def test_sighup_applies_to_every_worker_and_a_bad_file_changes_nothing(
    daemons: Callable[..., Daemon],
) -> None:
    def config(greeting: str) -> str:
        return f'[server]\nlisten = ["127.0.0.1:0"]\ngreeting = "{greeting}\\n"\n'

    daemon = daemons(config("hi"))
    port = daemon.ready()
    pids = [row["pid"] for row in daemon.workers()]

    def greetings(count: int = 30) -> tuple[set[bytes], set[int]]:
        socks = connect(port, count)
        seen = set()
        for sock in socks:
            seen.add(sock.recv(100))
        workers = set(owners(daemon, socks).values())
        for sock in socks:
            sock.close()
        return seen, workers

    assert greetings() == ({b"hi\n"}, {0, 1})
    daemon.path.write_text(config("hello"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.log.wait_for("reloaded")
    assert greetings() == ({b"hello\n"}, {0, 1})
    daemon.path.write_text("[server]\ngreeting = 5\n")
    mark = len(daemon.log.lines)
    daemon.proc.send_signal(signal.SIGHUP)
    line = daemon.log.wait_for("reload failed", after=mark)
    assert "server.greeting" in daemon.log.lines[line]
    assert greetings() == ({b"hello\n"}, {0, 1})
    assert [row["pid"] for row in daemon.workers()] == pids
    assert daemon.stop() == 0


def test_socket_activation_with_two_workers(tmp_path: Path) -> None:
    tool = shutil.which("systemd-socket-activate")
    assert tool, "scripts/test installs systemd (systemd-socket-activate)"
    port, admin = free_port(), free_port()
    env = {**os.environ, "TRIO_ECHO_ADMIN_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [
            tool,
            "-l",
            f"127.0.0.1:{port}",
            "-E",
            f"TRIO_ECHO_ADMIN_TOKEN={TOKEN}",
            "-E",
            f"RUNTIME_DIRECTORY={tmp_path}",
            sys.executable,
            "-m",
            "trio_echo",
            "serve",
            "--workers",
            "2",
            "--admin",
            f"127.0.0.1:{admin}",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = LogWatcher(proc)
    try:
        log.wait_for("Listening on")  # the tool binds; the first connection launches the daemon
        first = connect(port, 1)[0]
        assert echoes(first)
        log.wait_for(r"worker 0 \(pid \d+\) ready")
        log.wait_for(r"worker 1 \(pid \d+\) ready")
        assert any("socket activation" in line for line in log.lines)
        clients = [first, *connect(port, 19)]
        assert all(echoes(sock) for sock in clients)
        done = subprocess.run(
            [sys.executable, "-m", "trio_echo", "admin", f"127.0.0.1:{admin}", "stats"],
            env=env,
            capture_output=True,
            timeout=30,
            check=True,
        )
        stats = json.loads(done.stdout)
        assert [row["state"] for row in stats["workers"]] == ["running", "running"]
        assert stats["connections"]["active"] == 20
        for sock in clients:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        log.close()


def test_the_master_dying_takes_its_workers_with_it(daemons: Callable[..., Daemon]) -> None:
    daemon = daemons(CONFIG)
    port = daemon.ready()
    clients = connect(port, 10)
    assert all(echoes(sock) for sock in clients)
    pids = [row["pid"] for row in daemon.workers()]
    daemon.proc.kill()
    daemon.proc.wait(timeout=10)
    wait_until(lambda: all(gone(pid) for pid in pids if isinstance(pid, int)), timeout=10, what="no orphans")
    for sock in clients:
        sock.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(10) == b""


def test_unix_listener_is_shared_by_the_workers(daemons: Callable[..., Daemon], tmp_path: Path) -> None:
    path = tmp_path / "echo.sock"
    daemon = daemons(f'[server]\nlisten = ["unix:{path}"]\n')
    daemon.log.wait_for(r"worker 1 \(pid \d+\) ready")
    daemon.log.wait_for(r"worker 0 \(pid \d+\) ready")
    clients = []
    for _ in range(10):
        sock = socket.socket(socket.AF_UNIX)
        _clients.append(sock)
        sock.settimeout(10)
        sock.connect(str(path))
        clients.append(sock)
    assert all(echoes(sock) for sock in clients)
    assert daemon.stats()["connections"]["active"] == 10  # type: ignore[index]
    for sock in clients:
        sock.close()
    assert daemon.stop() == 0
    assert not path.exists()


def test_one_worker_is_one_process(daemons: Callable[..., Daemon]) -> None:
    daemon = daemons('[server]\nlisten = ["127.0.0.1:0"]\n', workers=1)
    line = daemon.log.lines[daemon.log.wait_for(r"listening on 127\.0\.0\.1:\d+")]
    match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
    assert match is not None
    port = int(match.group(1))
    assert all(echoes(sock) for sock in connect(port, 5))
    children = Path(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children").read_text().split()
    assert children == []
    assert "workers" not in daemon.stats()
    assert not any(re.search(r"\[worker \d+\]|trio_echo\.master", line) for line in daemon.log.lines)
    while _clients:
        _clients.pop().close()
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("flag", "message"),
    [("0", "--workers"), ("many", "--workers"), ("-3", "--workers")],
)
def test_bad_workers_flag_is_one_line_and_exit_2(flag: str, message: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "trio_echo",
            "serve",
            "--workers",
            flag,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "off",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def test_past_the_restart_budget_the_master_drains_and_exits_1(daemons: Callable[..., Daemon]) -> None:
    daemon = daemons(
        '[server]\nlisten = ["127.0.0.1:0"]\n[limits]\ndrain_timeout = 1.0\n'
        "[supervisor]\nmax_restarts = 1\nperiod = 60.0\nbackoff_initial = 0.0\n"
    )
    port = daemon.ready()
    clients = connect(port, 20)
    assert all(echoes(sock) for sock in clients)
    owner = owners(daemon, clients)
    first = daemon.workers()[0]["pid"]
    assert isinstance(first, int)
    os.kill(first, signal.SIGKILL)  # one restart is within the budget
    second = wait_until(
        lambda: (row := daemon.workers()[0])["state"] == "running" and row["pid"] != first and row["pid"],
        what="worker 0 restarted",
    )
    assert isinstance(second, int)
    os.kill(second, signal.SIGKILL)  # the second is past it
    assert daemon.proc.wait(timeout=20) == 1
    daemon.log.wait_for(r"supervisor gave up|restart budget|gave up")
    # worker 1 was drained, not killed: its clients got their EOF.
    for index, sock in enumerate(clients):
        if owner[index] == 1:
            sock.settimeout(10)
            assert sock.recv(10) == b""
    daemon.log.close()


class Link:
    """The master's end of a worker's control link, driven by hand (blocking, line by line)."""

    def __init__(self) -> None:
        self.sock, child = socket.socketpair()
        self.sock.settimeout(20)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trio_echo.worker", str(child.fileno())],
            pass_fds=[child.fileno()],
            stderr=subprocess.PIPE,
            text=True,
        )
        child.close()
        self.file = self.sock.makefile("rb")

    def send(self, message: dict[str, object]) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def receive(self, kind: str | None = None, re_: int | None = None) -> dict[str, object]:
        while True:
            message = json.loads(self.file.readline())
            assert isinstance(message, dict)
            if (kind is None or message.get("type") == kind) and (re_ is None or message.get("re") == re_):
                return message

    def close(self) -> tuple[int, str]:
        self.file.close()
        self.sock.close()
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err


def test_the_worker_side_of_the_control_link() -> None:
    link = Link()
    config = '[server]\nlisten = ["127.0.0.1:0"]\n[admin]\nlisten = ""\n'
    link.send({"type": "start", "index": 3, "first_id": 4294967297, "config": config, "wanted": 4})
    ready = link.receive("ready")
    port = int(str(ready["addresses"][0]).rsplit(":", 1)[1])  # type: ignore[index]
    client = connect(port, 1)[0]
    assert echoes(client)
    opened = link.receive("trace")  # conn flag wanted: the worker forwards conn.open
    assert opened["events"][0][2] == "conn.open"  # type: ignore[index]
    link.send({"type": "ping"})
    pong = link.receive("pong")
    assert pong["stats"]["connections"]["active"] == 1  # type: ignore[index]
    link.send({"id": 1, "type": "rank", "query": {"limit": 5, "offset": 0, "sort": "bytes_in", "filter": ""}})
    ranked = link.receive(re_=1)
    assert ranked["total"] == 1
    [(value, conn_id)] = ranked["ranked"]  # type: ignore[misc]
    assert (value, conn_id) == (4, 4294967297)
    link.send({"id": 2, "type": "items", "ids": [conn_id, 12345]})
    assert [item["id"] for item in link.receive(re_=2)["items"]] == [conn_id]  # type: ignore[union-attr]
    link.send({"id": 3, "type": "reconfigure", "config": "[server]\ngreeting = 5\n"})
    refused = link.receive(re_=3)
    assert refused["ok"] is False
    assert "server.greeting" in str(refused["error"])
    link.send({"id": 4, "type": "reconfigure", "config": config + "[limits]\nbuffer_size = 4096\n"})
    assert link.receive(re_=4)["ok"] is True
    link.send({"type": "no such thing"})
    link.send({"id": 5, "type": "close", "conn": conn_id})
    assert link.receive(re_=5)["ok"] is True
    client.settimeout(10)
    assert client.recv(10) == b""
    link.send({"type": "drain"})
    assert link.proc.wait(timeout=30) == 0  # drained: exits 0 by itself (closing the link would abort it)
    code, err = link.close()
    assert code == 0, err
    assert "unknown control message 'no such thing'" in err
    assert "[worker 3]" in err


@pytest.mark.parametrize(
    ("first", "code", "problem"),
    [
        (b"", 2, "no start message from the master"),
        (
            b'{"type": "start", "index": 0, "first_id": 1, "config": "[server]\\nworkers = 0"}\n',
            2,
            "config error",
        ),
        (b"this is not json\n", 1, "not a JSON control message"),
    ],
)
def test_a_worker_without_a_good_start_exits_with_one_line(first: bytes, code: int, problem: str) -> None:
    link = Link()
    if first:
        link.sock.sendall(first)
    link.sock.shutdown(socket.SHUT_WR)
    returned, err = link.close()
    assert returned == code
    assert problem in err
    assert "Traceback" not in err


def test_the_worker_entry_point_wants_its_descriptor() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trio_echo.worker"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2
    assert "usage: python -m trio_echo.worker FD" in done.stderr


def test_drain_delay_keeps_every_worker_accepting_while_not_ready(daemons: Callable[..., Daemon]) -> None:
    daemon = daemons('[server]\nlisten = ["127.0.0.1:0"]\n[limits]\ndrain_delay = 1.5\ndrain_timeout = 2.0\n')
    port = daemon.ready()
    signalled = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.log.wait_for(r"not ready, still accepting for 1\.5 s")

    def readyz() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{daemon.admin_port}/readyz", timeout=5) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    assert readyz() == 503
    stragglers = connect(port, 20)  # routed here before the load balancer noticed: still served
    assert all(echoes(sock) for sock in stragglers)
    assert time.monotonic() - signalled < 1.5
    for sock in stragglers:
        sock.close()
    assert daemon.proc.wait(timeout=20) == 0
    assert time.monotonic() - signalled >= 1.5
    daemon.log.close()


def test_the_agent_check_of_a_master(daemons: Callable[..., Daemon]) -> None:
    agent = free_port()
    daemon = daemons(
        '[server]\nlisten = ["127.0.0.1:0"]\n[limits]\nmax_connections = 10\ndrain_delay = 2.0\n'
        f'[admin]\nagent_listen = "127.0.0.1:{agent}"\n'
    )
    port = daemon.ready()

    def answer() -> bytes:
        with socket.create_connection(("127.0.0.1", agent), timeout=10) as check:
            return check.recv(100)

    assert answer() == b"ready up 100%\n"
    clients = connect(port, 5)
    assert all(echoes(sock) for sock in clients)
    wait_until(lambda: daemon.stats()["connections"]["active"] == 5, what="5 open")  # type: ignore[index]
    wait_until(lambda: answer() == b"ready up 50%\n", what="the weight to follow the load")
    pid = daemon.workers()[0]["pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGSTOP)  # a worker that does not answer: maint until it is replaced
    wait_until(lambda: answer() == b"maint\n", what="maint")
    wait_until(lambda: answer().startswith(b"ready up"), what="ready again after the replacement")
    for sock in clients:
        sock.close()
    daemon.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: answer() == b"drain\n", what="drain")
    assert daemon.proc.wait(timeout=20) == 0
    daemon.log.close()


def _until_end(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def test_faults_are_set_on_every_worker_and_routed_to_one_connection(daemons: Callable[..., Daemon]) -> None:
    daemon = daemons(CONFIG + "[faults.cut]\nclose_after_bytes = 3\n")
    port = daemon.ready()
    reply = daemon.admin("faults", "--listener", "127.0.0.1:0", "cut")
    assert reply == {"ok": True, "listener": "127.0.0.1:0", "faults": {"name": "cut", "close_after_bytes": 3}}
    clients = connect(port, 20)
    assert set(owners(daemon, clients).values()) == {0, 1}  # both workers hold some
    assert all(_until_end(sock, b"abcdef") == b"abc" for sock in clients)
    assert daemon.stats()["faults"] == {"127.0.0.1:0": {"name": "cut", "close_after_bytes": 3}}
    assert 'trio_echo_faults_applied_total{kind="close_after_bytes"} 20' in daemon.metrics()
    # a worker started later (a restart) gets the profile set live too
    victim = daemon.workers()[1]["pid"]
    assert isinstance(victim, int)
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: [row["state"] for row in daemon.workers()] == ["running", "running"], what="the restart"
    )
    clients = connect(port, 20)
    assert set(owners(daemon, clients).values()) == {0, 1}
    assert all(_until_end(sock, b"abcdef") == b"abc" for sock in clients)
    # off for the listener; then one connection, on the worker that owns it
    assert daemon.admin("faults", "--listener", "127.0.0.1:0", "off")["faults"] is None  # type: ignore[index]
    clients = connect(port, 10)
    assert all(echoes(sock) for sock in clients)
    owner = owners(daemon, clients)
    victim_index = next(index for index, worker in owner.items() if worker == 1)
    host, cport = clients[victim_index].getsockname()[:2]
    items = daemon.admin("connections")
    victim_id = next(item["id"] for item in items if item["peer"] == f"{host}:{cport}")  # type: ignore[union-attr]
    reply = daemon.admin("faults", "--id", str(victim_id), '{"close_after_bytes": 2}')
    assert reply == {"ok": True, "id": victim_id, "faults": {"name": "", "close_after_bytes": 2}}
    assert _until_end(clients[victim_index], b"xyz") == b"xy"
    assert all(echoes(sock) for index, sock in enumerate(clients) if index != victim_index)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "trio_echo",
            "admin",
            f"127.0.0.1:{daemon.admin_port}",
            "faults",
            "--id",
            "7",
            "cut",
        ],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (bad.returncode, bad.stderr) == (1, "trio-echo admin: set_faults: no open connection with id 7\n")
    assert daemon.stop() == 0


def test_a_web_listener_with_two_workers(daemons: Callable[..., Daemon]) -> None:
    """Each worker serves the web echo on the shared port: the JSON names the worker that answered
    (both answer, SO_REUSEPORT spreads fresh connections) and the master's /metrics sums them."""
    daemon = daemons('[server]\nlisten = ["http://127.0.0.1:0"]\n')
    port = daemon.ready()
    seen: collections.Counter[int] = collections.Counter()
    for _ in range(40):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/who", timeout=10) as answer:
            document = json.loads(answer.read())
        server = document["connection"]["server"]
        assert server["host"] == socket.gethostname()
        seen[server["worker"]] += 1
    assert set(seen) == {0, 1}, seen
    pids = {row["pid"] for row in daemon.workers()}
    assert len(pids) == 2
    metrics = daemon.metrics()
    assert 'trio_echo_http_requests_total{status="200"} 40' in metrics
    assert daemon.stop() == 0
