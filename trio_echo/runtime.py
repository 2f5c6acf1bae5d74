"""What the running server derives from its configuration, in one pure place.

:class:`Settings` is computed once per configuration (at start and on every reload) and swapped in
one assignment, so a connection accepted during a reload sees either the old settings or the new,
never a mix. :func:`restart_required` names the changed keys a reload cannot apply.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

import attrs

from .admission import Network, networks
from .config import Config, ListenerConfig

# Changes a reload cannot apply to a running server: the key and how to read it.
RESTART_KEYS: tuple[tuple[str, Callable[[Config], object]], ...] = (
    ("server.backlog", lambda c: c.server.backlog),
    ("server.workers", lambda c: c.server.workers),
    ("limits.socket_buffer", lambda c: c.limits.socket_buffer),
    ("limits.fd_reserve", lambda c: c.limits.fd_reserve),
    ("trace.file", lambda c: c.trace.file),
    ("trace.file_max_bytes", lambda c: c.trace.file_max_bytes),
    ("admin.listen", lambda c: c.admin.listen),
    ("admin.agent_listen", lambda c: c.admin.agent_listen),
    ("supervisor", lambda c: c.supervisor),
)


@attrs.frozen(eq=False)
class Settings:
    """Everything the accept path reads, derived from one :class:`Config`.

    ``max_connections`` is the effective connection cap (``Config.effective_max_connections``, or
    the configured value, else unlimited); ``listen_options`` and ``trusted`` are per listener label.
    """

    config: Config
    max_connections: int
    greeting: bytes
    farewell: bytes
    refusal: bytes
    refusal_patience: float
    """Seconds a refused client gets for the refusal text, and again for the lingering close."""
    max_lingering_refusals: int
    """Refusals that may linger at once (each holds a descriptor); past that they close at once."""
    listen_options: Mapping[str, ListenerConfig]
    trusted: Mapping[str, tuple[Network, ...]]

    @classmethod
    def from_config(cls, config: Config, max_connections: int | None = None) -> Settings:
        limits = config.limits
        return cls(
            config=config,
            max_connections=max_connections or limits.max_connections or sys.maxsize,
            greeting=config.server.greeting.encode(),
            farewell=config.server.farewell.encode(),
            refusal=limits.refusal.encode(),
            # Bounded so refused clients cannot pin tasks and descriptors: at most ~2 s each.
            refusal_patience=min(limits.linger_timeout, 1.0) or 1.0,
            # A flood of refusals must not eat the descriptors kept in reserve.
            max_lingering_refusals=max(1, limits.fd_reserve // 2),
            listen_options={entry.label: entry for entry in config.server.listen},
            trusted={entry.label: networks(entry.trusted_proxies) for entry in config.server.listen},
        )


def restart_required(old: Config, new: Config, *, adopted_listeners: bool) -> list[str]:
    """The keys whose change from ``old`` to ``new`` only a restart applies. With ``adopted_listeners``
    (socket activation) the listen list is systemd's too."""
    keys = [key for key, read in RESTART_KEYS if read(old) != read(new)]
    if adopted_listeners and old.server.listen != new.server.listen:
        keys.append("server.listen (the listening sockets come from systemd)")
    return keys
