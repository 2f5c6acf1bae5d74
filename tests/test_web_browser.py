"""The web echo's page in a real browser: Playwright driving Debian's chromium (headless) connects to
the WebSocket echo, sends a text and a binary message, sees both come back and closes."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from tests.conftest import make_config, port_of, running_server
from tests.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS


def drive_page(page_url: str, shots: Path) -> dict[str, object]:
    from playwright.sync_api import sync_playwright

    seen: dict[str, object] = {}
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.on("websocket", lambda ws: requests.append(ws.url))
            page.goto(page_url)
            page.click("#connect")
            page.wait_for_selector("#state:text('open')", timeout=10_000)
            page.fill("#message", "hello from chromium")
            page.click("#send")
            page.wait_for_selector(".received:text('hello from chromium')", timeout=10_000)
            page.check("#binary")
            page.fill("#message", "bytes")
            page.click("#send")
            page.wait_for_selector(".received:text('binary bytes (5 bytes)')", timeout=10_000)
            page.click("#disconnect")
            page.wait_for_selector(".closed:text('code 1000 bye')", timeout=10_000)
            seen["log"] = page.inner_text("#log")
            page.screenshot(path=str(shots / "web-echo.png"))
        finally:
            browser.close()
    seen["requests"] = requests
    return seen


async def test_the_page_echoes_in_chromium(tmp_path: Path) -> None:
    assert os.path.exists(CHROMIUM), "chromium is missing: scripts/test installs it"  # noqa: ASYNC240
    config = make_config(server={"listen": ["http://127.0.0.1:0"]})
    with trio.fail_after(120):
        async with running_server(config) as server:
            origin = f"127.0.0.1:{port_of(server.addresses[0])}"
            seen = await trio.to_thread.run_sync(drive_page, f"http://{origin}/", tmp_path)
            messages = dict(server.stats.websocket_messages)
    log = str(seen["log"])
    assert "sent: hello from chromium" in log
    assert "received: hello from chromium" in log
    assert "received: binary bytes (5 bytes)" in log
    assert messages == {"text": 1, "binary": 1}
    foreign = [address for address in seen["requests"] if address.split("/")[2] != origin]  # type: ignore[attr-defined]
    assert foreign == [], f"the page reached beyond its origin: {foreign}"
    assert f"ws://{origin}/" in seen["requests"]  # type: ignore[operator]
