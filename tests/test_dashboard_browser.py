"""The dashboard in a real browser: Playwright driving Debian's chromium, headless.

scripts/test installs chromium when it is missing; this test fails (it does not skip) without it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import websockets.sync.client

from tests.conftest import make_config, port_of
from trio_echo.events import Flag
from trio_echo.server import EchoServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chart_points(page: Any) -> int:
    return int(page.locator("#chart").get_attribute("data-points") or 0)


def drive_browser(
    admin_url: str, token: str, echo_port: int, web_port: int, shots: Path
) -> dict[str, object]:
    """Runs in a worker thread (Playwright's sync API has its own loop) while trio serves."""
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    seen: dict[str, object] = {}
    clients: list[socket.socket] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.on("websocket", lambda ws: requests.append(ws.url))
            page.goto(f"{admin_url}#token={token}")
            active = page.locator("#active")
            active.filter(has_text=re.compile("^0$")).wait_for(timeout=15_000)
            seen["status"] = page.locator("#status").inner_text()
            for _ in range(3):
                client = socket.create_connection(("127.0.0.1", echo_port), timeout=10)
                client.sendall(b"hello")
                assert client.recv(10) == b"hello"
                clients.append(client)
            # (the dashboard's CSP forbids eval, so waits are locators, not wait_for_function)
            active.filter(has_text=re.compile("^3$")).wait_for(timeout=15_000)
            rows = page.locator("#connections tbody tr[data-id]")
            rows.nth(2).wait_for(timeout=15_000)
            seen["rows"] = rows.count()
            # the conn checkbox subscribes by itself: on a server with the default flags (error,info)
            # the trace pane still shows each connection opening
            page.locator("#trace", has_text="conn.open").wait_for(timeout=15_000)
            seen["trace_text"] = page.locator("#trace").inner_text()
            # the filter box asks the server for the matching page only
            mine = clients[1].getsockname()[1]
            page.locator("#conn-filter").fill(f":{mine}")
            page.locator("#connections tbody tr[data-id]", has_text=f":{mine}").wait_for(timeout=15_000)
            page.locator("#conn-count", has_text="(1)").wait_for(timeout=15_000)
            seen["filtered_rows"] = page.locator("#connections tbody tr[data-id]").count()
            page.locator("#conn-filter").fill("")
            rows.nth(2).wait_for(timeout=15_000)
            # a WebSocket on the web listener: its row names the protocol
            with websockets.sync.client.connect(f"ws://127.0.0.1:{web_port}/ws", open_timeout=10) as ws:
                ws.send("hi")
                assert ws.recv(timeout=10) == "hi"
                row = page.locator("#connections tbody tr[data-id]", has_text="· websocket")
                row.wait_for(timeout=15_000)
                seen["websocket_listener_cell"] = row.locator("td").nth(2).inner_text()
            rows.nth(3).wait_for(state="detached", timeout=15_000)
            points_before = chart_points(page)
            rows.first.locator("button.close").click()
            active.filter(has_text=re.compile("^2$")).wait_for(timeout=15_000)
            # stats arrive every 0.2 s and each adds a point: the chart grows (polled, bounded: the
            # value moves on faster than Playwright's locator polling could catch one exact number)
            deadline = time.monotonic() + 15
            while chart_points(page) < points_before + 3:
                assert time.monotonic() < deadline, "the chart gained no points"
                page.wait_for_timeout(100)
            seen["points"] = chart_points(page)
            seen["closed_client_eof"] = clients[0].recv(10) == b""
            page.screenshot(path=str(shots / "dashboard.png"), full_page=True)

            bad = browser.new_page()
            bad.on("request", lambda r: requests.append(r.url))
            bad.goto(f"{admin_url}#token=not-the-token")
            message = bad.locator("#login-message")
            message.filter(has_text="not accepted").wait_for(timeout=15_000)
            seen["bad_token_message"] = message.inner_text()
            seen["bad_token_status"] = bad.locator("#status").inner_text()
            bad.screenshot(path=str(shots / "wrong-token.png"))
        finally:
            browser.close()
            for client in clients:
                client.close()
    seen["requests"] = requests
    return seen


async def test_dashboard_live_in_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    present = os.path.exists(CHROMIUM)  # noqa: ASYNC240 - one stat at test start
    assert present, "chromium is missing: scripts/test installs it (apt-get install chromium)"
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    config = make_config(
        server={"listen": ["127.0.0.1:0", "http://127.0.0.1:0"]},
        admin={"listen": "127.0.0.1:0", "stats_interval": 0.2},
    )
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            server: EchoServer = await nursery.start(EchoServer(config).run)
            assert server.admin is not None
            assert server.admin.token is not None
            admin_url = f"http://127.0.0.1:{port_of(server.admin_addresses[0])}/"
            started = time.monotonic()
            seen = await trio.to_thread.run_sync(
                drive_browser,
                admin_url,
                server.admin.token,
                port_of(server.addresses[0]),
                port_of(server.addresses[1]),
                tmp_path,
            )
            server.stop()
    assert seen["status"] == "live"
    assert seen["rows"] == 3
    assert seen["filtered_rows"] == 1
    assert str(seen["websocket_listener_cell"]).endswith(" · websocket")
    assert "conn.open" in str(seen["trace_text"])
    assert server.tracer.flags == Flag.ERROR | Flag.INFO  # the page changed no global flags
    assert seen["closed_client_eof"] is True
    assert isinstance(seen["points"], int)
    assert seen["points"] >= 3
    assert "not accepted" in str(seen["bad_token_message"])
    assert seen["bad_token_status"] == "wrong token"
    assert server.stats.closed["admin"] == 1
    origin = admin_url.removeprefix("http://").rstrip("/")
    foreign = [url for url in seen["requests"] if url.split("/")[2] != origin]  # type: ignore[union-attr]
    assert foreign == [], f"requests left the admin origin: {foreign}"
    assert any(url.startswith(f"ws://{origin}/ws") for url in seen["requests"])  # type: ignore[union-attr]
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert time.monotonic() - started < 120


def drive_workers_page(admin_url: str, token: str, echo_port: int, shots: Path) -> dict[str, object]:
    """The dashboard of a worker master: per-worker rows and load, and a close routed to a worker."""
    from playwright.sync_api import sync_playwright

    seen: dict[str, object] = {}
    clients: list[socket.socket] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(f"{admin_url}#token={token}")
            rows = page.locator("#workers tbody tr[data-worker]")
            rows.nth(1).wait_for(timeout=15_000)
            for _ in range(20):
                client = socket.create_connection(("127.0.0.1", echo_port), timeout=10)
                client.sendall(b"hello")
                assert client.recv(10) == b"hello"
                clients.append(client)
            page.locator("#active").filter(has_text=re.compile("^20$")).wait_for(timeout=15_000)
            seen["workers"] = [rows.nth(i).inner_text().split("\t") for i in range(rows.count())]
            seen["loads"] = [
                rows.nth(i).locator(".load").get_attribute("style") or "" for i in range(rows.count())
            ]
            first = page.locator("#connections tbody tr[data-id]").first
            first.wait_for(timeout=15_000)
            seen["worker_title"] = first.locator("td").first.get_attribute("title")
            first.locator("button.close").click()
            page.locator("#active").filter(has_text=re.compile("^19$")).wait_for(timeout=15_000)
            page.screenshot(path=str(shots / "dashboard-workers.png"), full_page=True)
        finally:
            browser.close()
            for client in clients:
                client.close()
    return seen


async def test_dashboard_of_a_worker_master_in_chromium(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trio_echo.master import Master

    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    config = make_config(
        server={"listen": ["127.0.0.1:0"]},
        limits={"drain_timeout": 1.0},
        admin={"listen": "127.0.0.1:0", "stats_interval": 0.2},
    )
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            master: Master = await nursery.start(Master(config, workers=2).run)
            assert master.admin is not None
            assert master.admin.token is not None
            admin_url = f"http://127.0.0.1:{port_of(master.admin_addresses[0])}/"
            seen = await trio.to_thread.run_sync(
                drive_workers_page, admin_url, master.admin.token, port_of(master.addresses[0]), tmp_path
            )
            master.stop()
    workers = seen["workers"]
    assert isinstance(workers, list)
    assert [row[0] for row in workers] == ["0", "1"]
    assert [row[2] for row in workers] == ["running", "running"]
    assert sum(int(row[3]) for row in workers) == 20
    assert all("width" in style for style in seen["loads"])  # type: ignore[attr-defined]
    assert str(seen["worker_title"]).startswith("worker ")
    assert (tmp_path / "dashboard-workers.png").stat().st_size > 10_000


def drive_faults_panel(admin_url: str, token: str, echo_port: int, shots: Path) -> dict[str, object]:
    """The Faults panel: choose a named profile for the listener, apply, and a new client gets it;
    then custom JSON with a bad value (the server's error shows), then none again."""
    from playwright.sync_api import sync_playwright

    seen: dict[str, object] = {}

    def echo_of(payload: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", echo_port), timeout=10) as client:
            client.sendall(payload)
            got = b""
            while len(got) < len(payload) and (chunk := client.recv(100)):
                got += chunk
            return got

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(f"{admin_url}#token={token}")
            row = page.locator("#faults tbody tr[data-listener]").first
            row.wait_for(timeout=15_000)
            seen["before"] = row.locator(".in-force").inner_text()
            seen["options"] = row.locator("select option").all_inner_texts()
            row.locator("select").select_option("cut")
            row.locator("button.apply").click()
            row.locator(".in-force").filter(has_text="cut").wait_for(timeout=15_000)
            seen["after"] = row.locator(".in-force").inner_text()
            seen["echo_cut"] = echo_of(b"abcdef")
            row.locator("select").select_option("{}")
            row.locator("input.custom").fill('{"loss": 2}')
            row.locator("button.apply").click()
            page.locator("#faults-message").filter(has_text="probability").wait_for(timeout=15_000)
            seen["error"] = page.locator("#faults-message").inner_text()
            page.screenshot(path=str(shots / "dashboard-faults.png"), full_page=True)
            row.locator("select").select_option("")
            row.locator("button.apply").click()
            row.locator(".in-force").filter(has_text=re.compile("^none$")).wait_for(timeout=15_000)
            seen["echo_plain"] = echo_of(b"abcdef")
        finally:
            browser.close()
    return seen


async def test_dashboard_faults_panel_in_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    config = make_config(
        server={"listen": ["127.0.0.1:0", "http://127.0.0.1:0"]},
        admin={"listen": "127.0.0.1:0", "stats_interval": 0.2},
        faults={"cut": {"close_after_bytes": 3}, "slow": {"latency": 0.5}},
    )
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            server: EchoServer = await nursery.start(EchoServer(config).run)
            assert server.admin is not None
            assert server.admin.token is not None
            admin_url = f"http://127.0.0.1:{port_of(server.admin_addresses[0])}/"
            seen = await trio.to_thread.run_sync(
                drive_faults_panel, admin_url, server.admin.token, port_of(server.addresses[0]), tmp_path
            )
            server.stop()
    assert seen["before"] == "none"
    assert seen["options"] == ["none", "cut", "slow", "custom (JSON)…"]
    assert seen["after"] == "cut (close_after_bytes=3)"
    assert seen["echo_cut"] == b"abc"
    assert "set_faults: faults.loss = 2.0: must be a probability from 0 to 1" in str(seen["error"])
    assert seen["echo_plain"] == b"abcdef"
    assert server.stats.faults == {"close_after_bytes": 1}
