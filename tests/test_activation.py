"""Adopting systemd's sockets, in process (the real systemd-socket-activate run is in test_systemd)."""

from __future__ import annotations

import os
import socket

import pytest

from trio_echo.activation import adopt
from trio_echo.errors import ConfigError


def consecutive_fds(*socks: socket.socket) -> int:
    """dup the sockets onto consecutive descriptors (as systemd passes them); return the first."""
    first = max(s.fileno() for s in socks) + 50
    for index, sock in enumerate(socks):
        os.dup2(sock.fileno(), first + index)
    return first


def env_for(count: int, names: str | None = None) -> dict[str, str]:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(count)}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    return env


def test_not_for_us_adopts_nothing_and_clears_the_variables() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "OTHER": "x"}
    inherited = adopt(env)
    assert inherited.echo == ()
    assert inherited.admin is None
    assert env == {"OTHER": "x"}


def test_names_route_echo_and_admin() -> None:
    echo, admin = socket.socket(), socket.socket()
    for sock in (echo, admin):
        sock.bind(("127.0.0.1", 0))
        sock.listen()
    first = consecutive_fds(echo, admin)
    env = env_for(2, "echo:admin")
    inherited = adopt(env, first_fd=first)
    try:
        assert [s.fileno() for s in inherited.echo] == [first]
        assert inherited.admin is not None
        assert inherited.admin.fileno() == first + 1
        assert inherited.admin.getsockname() == admin.getsockname()
        assert "LISTEN_FDS" not in env
    finally:
        for sock in (*inherited.echo, inherited.admin, echo, admin):
            if sock is not None:
                sock.close()


@pytest.mark.parametrize(
    ("make", "names", "message"),
    [
        (
            lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
            "admin",
            "the admin socket must be a stream socket",
        ),
        (
            lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM),
            "echo",
            "is neither a listening stream socket nor UDP",
        ),
        (socket.socket, "echo", "is neither a listening stream socket nor UDP"),  # not listening
    ],
)
def test_bad_descriptors_are_config_errors(make, names: str, message: str) -> None:  # type: ignore[no-untyped-def]
    sock = make()
    first = consecutive_fds(sock)
    try:
        with pytest.raises(ConfigError, match=message):
            adopt(env_for(1, names), first_fd=first)
    finally:
        os.close(first)
        sock.close()


def test_two_admin_sockets_are_an_error() -> None:
    socks = [socket.socket(), socket.socket()]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
    first = consecutive_fds(*socks)
    try:
        with pytest.raises(ConfigError, match="more than one socket is named admin"):
            adopt(env_for(2, "admin:admin"), first_fd=first)
    finally:
        for fd in (first, first + 1):
            os.close(fd)
        for sock in socks:
            sock.close()
