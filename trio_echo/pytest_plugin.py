"""pytest fixtures for testing your own Trio clients against trio_echo (registered through ``pytest11``).

Needs pytest-trio (the fixtures are async and run in the test's event loop)::

    async def test_my_client(echo_server):
        stream = await trio.open_tcp_stream(echo_server.host, echo_server.port)
        ...

    @pytest.mark.echo_server(server={"farewell": "bye\\n"}, limits={"idle_timeout": 5})
    async def test_with_config(echo_server): ...

    async def test_in_memory(echo_stream):
        await echo_stream.send_all(b"ping")
        assert await echo_stream.receive_some() == b"ping"

Configuration comes from the ``echo_server`` marker or an indirect parametrization (a mapping of config
sections). The server always listens on 127.0.0.1 port 0 unless ``server.listen`` is given, and has its
admin port off unless ``admin.listen`` is given. See docs/testing.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from .config import Config
from .configfile import config_from_mapping
from .connection import Connection
from .echo import EchoSession
from .policy import ConnectionPolicy
from .server import EchoServer
from .stats import Stats


@attrs.frozen
class RunningEchoServer:
    """What the ``echo_server`` fixture gives a test."""

    server: EchoServer
    host: str
    port: int

    @property
    def address(self) -> str:
        """``HOST:PORT`` as trio-echo's own tools take it."""
        return self.server.addresses[0]

    @property
    def stats(self) -> Stats:
        return self.server.stats


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "echo_server(**sections): configuration for the echo_server and echo_stream fixtures, "
        "e.g. echo_server(server={'farewell': 'bye\\n'}, limits={'idle_timeout': 5})",
    )


def _sections(request: pytest.FixtureRequest) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {}
    marker = request.node.get_closest_marker("echo_server")
    if marker is not None:
        sections.update({k: dict(v) for k, v in marker.kwargs.items()})
    param = getattr(request, "param", None)
    if isinstance(param, Mapping):
        sections.update({k: dict(v) for k, v in param.items()})
    return sections


def fixture_config(request: pytest.FixtureRequest) -> Config:
    """The config a fixture runs with: loopback port 0 and no admin port unless asked for."""
    sections = _sections(request)
    sections.setdefault("server", {}).setdefault("listen", ["127.0.0.1:0"])
    sections.setdefault("admin", {}).setdefault("listen", "")
    return config_from_mapping(sections)


@pytest.fixture
async def echo_server(
    request: pytest.FixtureRequest, nursery: trio.Nursery
) -> AsyncIterator[RunningEchoServer]:
    """A running trio_echo server (its first address as ``host``/``port``); drained after the test."""
    server: EchoServer = await nursery.start(EchoServer(fixture_config(request)).run)
    first = server.addresses[0]
    host, _, port = first.rpartition(":")
    yield RunningEchoServer(server, host.strip("[]"), int(port) if port.isdigit() else 0)
    server.stop()


@pytest.fixture
async def echo_stream(
    request: pytest.FixtureRequest, nursery: trio.Nursery
) -> AsyncIterator[trio.abc.HalfCloseableStream]:
    """An in-memory stream whose other end is trio_echo's pump (same session rules: greeting,
    farewell, backpressure, half-close, timeouts as configured)."""
    config = fixture_config(request)
    client, server_end = trio.testing.memory_stream_pair()
    limits = config.limits
    session = EchoSession(
        limits.buffer_size, config.server.greeting.encode(), config.server.farewell.encode()
    )
    connection = Connection(server_end, session, ConnectionPolicy.from_limits(limits))
    nursery.start_soon(connection.run)
    yield client
    await client.aclose()
