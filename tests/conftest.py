from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from trio_echo.config import Config
from trio_echo.configfile import config_from_mapping
from trio_echo.server import EchoServer

pytest_plugins = ["pytester"]


def has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = has_ipv6_loopback()
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="this host has no IPv6 loopback (::1)")


def make_config(**sections: dict[str, object]) -> Config:
    """A config from sections; the admin port is off unless a test asks for it."""
    sections.setdefault("admin", {"listen": ""})
    return config_from_mapping(sections)


@asynccontextmanager
async def running_server(config: Config, **kwargs: object) -> AsyncIterator[EchoServer]:
    """A server on its own nursery; stopped (drained) and awaited on exit, within a bounded time."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server: EchoServer = await nursery.start(EchoServer(config, **kwargs).run)  # type: ignore[arg-type]
            try:
                yield server
            finally:
                server.stop()


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])
