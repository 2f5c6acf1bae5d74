"""systemd socket activation: adopt the listening sockets systemd passes instead of binding.

``$LISTEN_PID`` must be this process and ``$LISTEN_FDS`` counts descriptors from 3; ``$LISTEN_FDNAMES``
names them (``FileDescriptorName=`` in the .socket unit). A socket named ``admin`` serves the admin port;
every other one serves echo: a listening stream socket (``ListenStream=``) TCP or Unix echo, a bound
datagram socket (``ListenDatagram=``) UDP echo. The variables are removed from the
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
        ConfigError: a passed descriptor is neither a listening stream socket nor a UDP socket (the
            admin one must be a stream), or two are named admin.
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
            if name == ADMIN_NAME and sock.type != socket.SOCK_STREAM:
                sock.detach()
                raise ConfigError(
                    "LISTEN_FDNAMES", ":".join(names), "the admin socket must be a stream socket"
                )
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
    udp = sock.type == socket.SOCK_DGRAM and sock.family in (socket.AF_INET, socket.AF_INET6)
    listening = sock.type == socket.SOCK_STREAM and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if not (udp or listening):
        sock.detach()
        raise ConfigError(
            "LISTEN_FDS", count, f"descriptor {fd} ({name}) is neither a listening stream socket nor UDP"
        )
    sock.setblocking(False)
    return sock
