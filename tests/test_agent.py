"""The HAProxy agent check: the answer (pure, table-driven), and a real HAProxy following it: its
stats socket shows each server's weight fall with load, DRAIN once a stop begins, MAINT after a
failed reload, and back to ready after a good one."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import trio

from tests.conftest import make_config, port_of, running_server
from tests.test_haproxy import HAPROXY, free_port, wait_until
from trio_echo.admin.agentcheck import AgentStatus, reply
from trio_echo.daemon import reload
from trio_echo.errors import ConfigError
from trio_echo.sdnotify import Notifier


@pytest.mark.parametrize(
    ("active", "cap", "draining", "maint", "line"),
    [
        (0, 100, False, False, b"ready up 100%\n"),
        (25, 100, False, False, b"ready up 75%\n"),
        (100, 100, False, False, b"ready up 1%\n"),  # full: the least weight, not zero
        (150, 100, False, False, b"ready up 1%\n"),
        (7, 0, False, False, b"ready up 100%\n"),  # no known cap
        (5, 100, True, False, b"drain\n"),
        (5, 100, True, True, b"maint\n"),  # maint wins
        (5, 100, False, True, b"maint\n"),
    ],
)
def test_agent_reply(active: int, cap: int, draining: bool, maint: bool, line: bytes) -> None:
    assert reply(AgentStatus(active, cap, draining, maint)) == line


CONFIG = """\
global
    stats socket {sock} level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend echo
    bind 127.0.0.1:{port}
    default_backend trio_echo
backend trio_echo
    server one 127.0.0.1:{echo} weight 100 check inter 100ms agent-check agent-port {agent} agent-inter 100ms
"""


async def state(sock: Path) -> tuple[str, int]:
    """HAProxy's view of server ``one``: its status and current weight (``show stat``)."""
    stream = await trio.open_unix_socket(str(sock))
    async with stream:
        await stream.send_all(b"show stat\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("svname") == "one":
            return row["status"], int(row["weight"])
    raise AssertionError(data)


async def until(sock: Path, wanted: tuple[str, int | None]) -> tuple[str, int]:
    with trio.fail_after(10):
        while True:
            status, weight = await state(sock)
            if status == wanted[0] and wanted[1] in (None, weight):
                return status, weight
            await trio.sleep(0.05)


async def test_haproxy_follows_the_agent_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert shutil.which(HAPROXY), "haproxy is missing: scripts/test installs it (apt-get install haproxy)"
    agent = free_port()
    config = make_config(
        server={"listen": ["127.0.0.1:0"]},
        limits={"max_connections": 10, "drain_delay": 30.0, "drain_timeout": 1.0},
        admin={"listen": "", "agent_listen": f"127.0.0.1:{agent}"},
    )
    with trio.fail_after(90):
        async with running_server(config) as server:
            sock, port = tmp_path / "haproxy.sock", free_port()
            cfg = tmp_path / "haproxy.cfg"
            cfg.write_text(
                CONFIG.format(sock=sock, port=port, echo=port_of(server.addresses[0]), agent=agent)
            )
            async with trio.open_nursery() as nursery:
                haproxy: trio.Process = await nursery.start(
                    functools.partial(trio.run_process, [HAPROXY, "-db", "-f", str(cfg)], check=False)
                )
                try:
                    with trio.fail_after(10):
                        await wait_until(sock.exists)  # HAProxy creates its socket when ready
                    assert await until(sock, ("UP", 100)) == ("UP", 100)
                    clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4)]
                    for client in clients:  # through HAProxy: 4 of 10 taken
                        await client.send_all(b"hi")
                        assert await client.receive_some(10) == b"hi"
                    assert await until(sock, ("UP", 60)) == ("UP", 60)

                    def bad() -> object:
                        raise ConfigError("limits.idle_timeout", -1, "must be >= 0")

                    await reload(server, bad, Notifier(env={}))  # type: ignore[arg-type]
                    assert (await until(sock, ("MAINT", None)))[0] == "MAINT"
                    await reload(server, lambda: config, Notifier(env={}))
                    assert await until(sock, ("UP", 60)) == ("UP", 60)
                    for client in clients:
                        await client.aclose()
                    server.stop()  # drain_delay: not ready, still accepting, and HAProxy drains it
                    assert (await until(sock, ("DRAIN (agent)", None)))[0] == "DRAIN (agent)"
                finally:
                    haproxy.terminate()
                    server.abort()
