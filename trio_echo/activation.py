"""systemd socket activation: adopt the listening sockets systemd passes instead of binding.

``$LISTEN_PID`` must be this process and ``$LISTEN_FDS`` counts descriptors from 3; ``$LISTEN_FDNAMES``
names them (``FileDescriptorName=`` in the .socket unit). A socket named ``admin`` serves the admin port;
every other one serves echo. Each must be a listening stream socket. The variables are removed from the
environment afterwards, so children do not adopt them again.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

import attrs

from .errors import ConfigError

SD_LISTEN_FDS_START = 3
ADMIN_NAME = "admin"


@attrs.frozen
class Inherited:
    echo: tuple[socket.socket, ...] = ()
    admin: socket.socket | None = None


def adopt(env: MutableMapping[str, str] | None = None, *, first_fd: int = SD_LISTEN_FDS_START) -> Inherited:
    """The sockets systemd passed to this process (none when not socket-activated).

    Raises:
        ConfigError: a passed descriptor is not a listening stream socket, or two are named admin.
    """
    env = os.environ if env is None else env
    try:
        if env.get("LISTEN_PID") != str(os.getpid()):
            return Inherited()
        count = int(env.get("LISTEN_FDS", "0"))
        names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    finally:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    echo: list[socket.socket] = []
    admin: socket.socket | None = None
    try:
        for index in range(count):
            fd = first_fd + index
            name = names[index] if index < len(names) else f"fd{fd}"
            sock = _listening_socket(fd, name, count)
            if name == ADMIN_NAME:
                if admin is not None:
                    sock.detach()
                    raise ConfigError(
                        "LISTEN_FDNAMES", ":".join(names), "more than one socket is named admin"
                    )
                admin = sock
            else:
                echo.append(sock)
    except ConfigError:
        for adopted in (*echo, admin):
            if adopted is not None:
                adopted.detach()  # the descriptors stay as systemd passed them
        raise
    return Inherited(tuple(echo), admin)


def _listening_socket(fd: int, name: str, count: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(
            "LISTEN_FDS", count, f"descriptor {fd} ({name}) is not a socket: {exc.strerror}"
        ) from None
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ConfigError("LISTEN_FDS", count, f"descriptor {fd} ({name}) is not a listening stream socket")
    sock.setblocking(False)
    return sock
