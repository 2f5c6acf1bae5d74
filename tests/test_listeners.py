from __future__ import annotations

import errno
import logging
import os
import shutil
import socket

import pytest
import trio
import trio.testing

from tests.conftest import needs_ipv6
from trio_echo.addresses import parse_address
from trio_echo.errors import ListenerError
from trio_echo.listeners import ListeningSocket, accept_loop, open_listeners


class StopAccepting(Exception):
    pass


class AcceptedSocket:
    def setblocking(self, flag: bool) -> None:
        assert flag is False


class ScriptedSocket:
    """Stands in for the kernel's accept(2): fails with the given errnos, then yields one connection."""

    def __init__(self, failures: list[int]) -> None:
        self.failures = list(failures)
        self.sleeps: list[float] = []

    def accept(self) -> tuple[object, object]:
        if self.failures:
            code = self.failures.pop(0)
            raise OSError(code, os.strerror(code))
        return AcceptedSocket(), ("127.0.0.1", 1)

    def close(self) -> None:
        pass


async def test_accept_backs_off_on_emfile_and_logs_once_per_second(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = ScriptedSocket([errno.EMFILE] * 12 + [errno.ECONNABORTED, errno.ENFILE])
    accepted: list[tuple[float, object]] = []

    def on_accept(sock: object, peer: object) -> None:
        accepted.append((trio.current_time(), peer))
        raise StopAccepting  # ends the loop after its first connection

    with caplog.at_level(logging.WARNING, logger="trio_echo.listeners"), pytest.raises(StopAccepting):
        await accept_loop(ListeningSocket(fake, "test"), on_accept)  # type: ignore[arg-type]
    # 12 waits doubling from 0.01 s to the 1 s cap; ECONNABORTED is skipped without a wait and does not
    # reset the backoff (nothing was accepted), so the ENFILE after it waits the capped 1 s.
    expected = sum(min(0.01 * 2**i, 1.0) for i in range(12)) + 1.0
    assert accepted == [(pytest.approx(expected), ("127.0.0.1", 1))]
    warnings = [r.message for r in caplog.records]
    assert len(warnings) < 10  # not one line per failure
    assert all("Too many open files" in w or "file table overflow" in w.lower() for w in warnings)
    assert "more since last report" in warnings[1]


# accept(2) on Linux: "already-pending network errors on the new socket" come back as accept's own
# error, and the TCP/IP ones are to be treated like EAGAIN. Each must skip one connection, never crash
# the listener (which would spend supervisor restarts).
PER_CONNECTION_ERRNOS = [
    "ENETDOWN",
    "EPROTO",
    "ENOPROTOOPT",
    "EHOSTDOWN",
    "ENONET",
    "EHOSTUNREACH",
    "EOPNOTSUPP",
    "ENETUNREACH",
    "ECONNABORTED",
    "ECONNRESET",
    "ETIMEDOUT",
    "EPERM",
]


@pytest.mark.parametrize("name", PER_CONNECTION_ERRNOS)
async def test_per_connection_accept_errors_are_skipped(
    name: str, autojump_clock: trio.testing.MockClock
) -> None:
    if not hasattr(errno, name):
        pytest.skip(f"{name} does not exist on this platform")
    fake = ScriptedSocket([getattr(errno, name)] * 3)
    accepted: list[float] = []

    def on_accept(sock: object, peer: object) -> None:
        accepted.append(trio.current_time())
        raise StopAccepting

    with pytest.raises(StopAccepting):
        await accept_loop(ListeningSocket(fake, "test"), on_accept)  # type: ignore[arg-type]
    assert accepted == [0.0]  # skipped at once: no backoff, no wait


async def test_other_accept_errors_propagate() -> None:
    fake = ScriptedSocket([errno.EBADF])
    with pytest.raises(OSError, match="Bad file descriptor"):
        await accept_loop(ListeningSocket(fake, "test"), lambda s, p: None)  # type: ignore[arg-type]


async def test_socket_options_on_listeners() -> None:
    (item,) = await open_listeners(parse_address("127.0.0.1:0"), backlog=8, socket_buffer=65536)
    try:
        assert item.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 65536
        assert item.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    finally:
        item.close()


@needs_ipv6
async def test_ipv6_listeners_are_v6only() -> None:
    items = await open_listeners(parse_address(":0"), backlog=8)
    try:
        v6 = [i for i in items if i.sock.family == socket.AF_INET6]
        assert v6
        assert v6[0].sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for item in items:
            item.close()


async def test_port_in_use_is_a_listener_error() -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        with pytest.raises(ListenerError, match="Address already in use"):
            await open_listeners(parse_address(f"127.0.0.1:{blocker.getsockname()[1]}"), backlog=8)
    finally:
        blocker.close()


async def test_unix_file_replaced_by_someone_else_is_not_removed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "s.sock")
    (item,) = await open_listeners(parse_address(f"unix:{path}"), backlog=8)
    os.unlink(path)
    with open(path, "w") as newcomer:  # noqa: ASYNC230
        newcomer.write("not ours")
    item.close()
    assert os.path.exists(path)  # noqa: ASYNC240
    os.unlink(path)
    item.close()  # gone entirely: nothing to do


async def test_a_missing_family_is_skipped_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A host without IPv6: binding :: fails with EAFNOSUPPORT; ":PORT" then serves IPv4 alone."""
    from trio_echo import listeners

    real = listeners._open_inet

    def no_ipv6(family: int, *args: int, **options: int) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        return real(family, *args, **options)

    monkeypatch.setattr(listeners, "_open_inet", no_ipv6)
    with caplog.at_level(logging.WARNING, logger="trio_echo.listeners"):
        items = await open_listeners(parse_address(":0"), backlog=8)
    try:
        assert [item.sock.family for item in items] == [socket.AF_INET]
        assert "skipping :: for :0" in caplog.text
    finally:
        for item in items:
            item.close()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read the backlog")
async def test_backlog_is_honoured() -> None:
    (item,) = await open_listeners(parse_address("127.0.0.1:0"), backlog=77)
    try:
        port = item.sock.getsockname()[1]
        result = await trio.run_process(["ss", "-ltnH", f"( sport = :{port} )"], capture_stdout=True)
        # for a listening socket, ss shows the backlog in the Send-Q column
        assert result.stdout.split()[2] == b"77"
    finally:
        item.close()
