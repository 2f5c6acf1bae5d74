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

    @pytest.mark.echo_server(faults={"reset_after_bytes": 100})   # one fault profile, by its keys
    async def test_retries(echo_server): ...

    async def test_two_servers(echo_server_factory, closed_port):
        flaky = await echo_server_factory(faults={"close_after_bytes": 10})
        ...  # and closed_port: a port on 127.0.0.1 where nothing listens (connecting is refused)

Configuration comes from the ``echo_server`` marker or an indirect parametrization (a mapping of config
sections). The server always listens on 127.0.0.1 port 0 unless ``server.listen`` is given, and has its
admin port off unless ``admin.listen`` is given. ``faults`` is either ``[faults.NAME]`` tables by name,
or the keys of one profile, which then applies to every listen entry. See docs/testing.md.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
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


FIXTURE_PROFILE = "echo_server"  # the name a fault profile given by its keys gets


def fixture_config(request: pytest.FixtureRequest) -> Config:
    """The config a fixture runs with: loopback port 0 and no admin port unless asked for."""
    return config_of(_sections(request))


def config_of(sections: Mapping[str, Any]) -> Config:
    """A fixture's config from sections: loopback port 0, no admin port unless asked for, and a
    ``faults`` mapping of profile keys (rather than of named profiles) applied to every entry."""
    sections = {
        name: dict(value) if isinstance(value, Mapping) else value for name, value in sections.items()
    }
    server = sections.setdefault("server", {})
    server.setdefault("listen", ["127.0.0.1:0"])
    sections.setdefault("admin", {}).setdefault("listen", "")
    faults = sections.get("faults")
    if isinstance(faults, Mapping) and faults and not all(isinstance(v, Mapping) for v in faults.values()):
        sections["faults"] = {FIXTURE_PROFILE: faults}
        server["listen"] = [
            {**entry, "faults": FIXTURE_PROFILE}
            if isinstance(entry, Mapping)
            else {"address": entry, "faults": FIXTURE_PROFILE}
            for entry in server["listen"]
        ]
    return config_from_mapping(sections)


async def _started(nursery: trio.Nursery, config: Config) -> RunningEchoServer:
    server: EchoServer = await nursery.start(EchoServer(config).run)
    host, _, port = server.addresses[0].rpartition(":")
    return RunningEchoServer(server, host.strip("[]"), int(port) if port.isdigit() else 0)


@pytest.fixture
async def echo_server(
    request: pytest.FixtureRequest, nursery: trio.Nursery
) -> AsyncIterator[RunningEchoServer]:
    """A running trio_echo server (its first address as ``host``/``port``); drained after the test."""
    running = await _started(nursery, fixture_config(request))
    yield running
    running.server.stop()


ServerFactory = Callable[..., Awaitable[RunningEchoServer]]


@pytest.fixture
async def echo_server_factory(nursery: trio.Nursery) -> AsyncIterator[ServerFactory]:
    """``await echo_server_factory(**sections)``: another running server, configured like the marker
    (``faults={...}`` included); every one is drained after the test."""
    started: list[RunningEchoServer] = []

    async def start(**sections: Any) -> RunningEchoServer:
        running = await _started(nursery, config_of(sections))
        started.append(running)
        return running

    yield start
    for running in started:
        running.server.stop()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 where nothing listens: connecting is refused. It is held bound (not
    listening) for the test, so nothing else can take it meanwhile."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


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
