"""The HAProxy agent-check answer (pure): one line of HAProxy's agent protocol.

HAProxy (``server ... agent-check agent-port P``) connects every ``agent-inter``, reads one line of
words and applies them: ``ready`` / ``drain`` / ``maint`` set the server's administrative state, ``up``
its operational state, ``N%`` its weight as a share of the configured one. So a busy instance gets
fewer new connections before it is full, a stopping one none, and one whose configuration could not
be applied none until an operator looks.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class AgentStatus:
    active: int
    max_connections: int  # 0: no cap known (weight stays 100 %)
    draining: bool  # a stop began (drain_delay or the drain itself)
    maint: bool  # the last reload failed, or a listener or worker is being restarted


def reply(status: AgentStatus) -> bytes:
    """``maint`` over ``drain`` over ``ready up N%``, where N falls from 100 as the cap fills (never
    below 1: at 0 % HAProxy would stop sending even health-check traffic's share)."""
    if status.maint:
        return b"maint\n"
    if status.draining:
        return b"drain\n"
    if status.max_connections > 0:
        free = max(0.0, 1.0 - status.active / status.max_connections)
        weight = max(1, round(100 * free))
    else:
        weight = 100
    return f"ready up {weight}%\n".encode()
