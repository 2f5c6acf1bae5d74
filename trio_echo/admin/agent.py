"""The HAProxy agent-check port (I/O): every accepted connection gets the one-line answer of
:mod:`trio_echo.admin.agentcheck` and is closed at once.

No task per connection: the line is a few bytes into a fresh socket's empty send buffer, so it is
written by the accept loop itself (which already bounds floods: it yields every few accepts and
backs off when out of descriptors); a peer gone already is simply skipped.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import trio

from trio_echo.addresses import parse_address
from trio_echo.listeners import accept_loop, open_listeners
from trio_echo.restarts import Restart
from trio_echo.supervisor import ChildSpec

from .agentcheck import AgentStatus, reply

logger = logging.getLogger("trio_echo.admin")

AGENT_BACKLOG = 128
AGENT_CHILD = "agent"


def agent_children(listen: str, status: Callable[[], AgentStatus]) -> list[ChildSpec]:
    """The supervisor child serving the agent check on ``listen`` (none when it is empty)."""
    return [ChildSpec(AGENT_CHILD, AgentPort(listen, status).run, Restart.PERMANENT)] if listen else []


class AgentPort:
    """Serve ``status()`` on ``listen`` (``[admin] agent_listen``)."""

    def __init__(self, listen: str, status: Callable[[], AgentStatus]) -> None:
        self.address = parse_address(listen)
        self._status = status

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        sockets = await open_listeners(self.address, backlog=AGENT_BACKLOG)
        try:
            names = [item.name for item in sockets]
            for name in names:
                logger.info("HAProxy agent check on %s", name)
            task_status.started(names)
            async with trio.open_nursery() as nursery:
                for item in sockets:
                    nursery.start_soon(accept_loop, item, self._answer)
        finally:
            for item in sockets:
                item.close()

    def _answer(self, sock: socket.socket, _peer: object) -> None:
        try:
            sock.send(reply(self._status()))
        except OSError:
            pass  # it went away before reading: nothing to tell it
        finally:
            sock.close()
