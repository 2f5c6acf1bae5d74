"""trio_echo: a production-grade TCP echo service on Trio structured concurrency.

Library use::

    import trio, trio_echo

    async def main():
        config = trio_echo.Config()
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trio_echo.EchoServer(config).run)
            print(server.addresses)
"""

from ._version import __version__
from .addresses import Address, parse_address
from .config import Config
from .configfile import config_from_toml
from .connection import Connection
from .echo import EchoSession, Step
from .errors import AddressError, ConfigError, ListenerError, SupervisorGaveUp, TrioEchoError
from .events import Event, Flag
from .server import EchoServer
from .stats import Stats
from .supervisor import ChildSpec, Supervisor

__all__ = [
    "Address",
    "AddressError",
    "ChildSpec",
    "Config",
    "ConfigError",
    "Connection",
    "EchoServer",
    "EchoSession",
    "Event",
    "Flag",
    "ListenerError",
    "Stats",
    "Step",
    "Supervisor",
    "SupervisorGaveUp",
    "TrioEchoError",
    "__version__",
    "config_from_toml",
    "parse_address",
]
