"""Listening sockets: open them (TCP and UDP v4/v6, Unix), and run accept loops that survive overload.

Only this module, :mod:`trio_echo.connection` and :mod:`trio_echo.datagrams` touch sockets.
``open_listeners`` turns one listen entry into one or more bound sockets (listening, or for ``udp://``
bound datagram sockets); ``accept_loop`` hands each accepted socket to a callback and backs off,
quietly, when the process or system is out of descriptors or memory.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as stdlib_socket
import stat
import sys
from collections.abc import Callable

import attrs
import trio

from .addresses import Address, format_sockaddr
from .errors import ListenerError

logger = logging.getLogger("trio_echo.listeners")

# accept(2) failures that mean the system is out of a resource; existing clients keep being served while
# the accept loop backs off (trio's ACCEPT_CAPACITY_ERRNOS).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# accept(2) failures that concern only the one connection being accepted, never the listener; nothing
# to do but accept the next one:
# - the peer reset or gave up while queued (ECONNABORTED, ECONNRESET, ETIMEDOUT), or a firewall hook
#   refused it (Linux EPERM);
# - Linux passes a network error already pending on the new socket as accept's own error, and accept(2)
#   says to treat the TCP/IP ones like EAGAIN: ENETDOWN, EPROTO, ENOPROTOOPT, EHOSTDOWN, ENONET,
#   EHOSTUNREACH, EOPNOTSUPP, ENETUNREACH (trio's SocketListener ignores the same set).
# Letting any of them escape would crash the listener and spend the supervisor's restart budget on
# what one client's network did.
ACCEPT_IGNORED_ERRNOS = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ECONNRESET, errno.ETIMEDOUT}
    | {
        getattr(errno, name)
        for name in (
            "ENETDOWN",
            "ENOPROTOOPT",
            "EHOSTDOWN",
            "ENONET",
            "EHOSTUNREACH",
            "EOPNOTSUPP",
            "ENETUNREACH",
        )
        if hasattr(errno, name)  # ENONET is Linux-only
    }
)
# Binding a family the host lacks fails with these; such a family is skipped with a warning.
FAMILY_MISSING_ERRNOS = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT})
ACCEPT_BACKOFF_INITIAL = 0.01
ACCEPT_BACKOFF_MAX = 1.0
CAPACITY_LOG_INTERVAL = 1.0  # at most one line per second per listener while out of descriptors


@attrs.define(eq=False)
class ListeningSocket:
    """A bound socket (listening, or a UDP socket); for Unix sockets also the file we created (removed
    on close)."""

    sock: stdlib_socket.socket  # non-blocking; accept_loop waits for readability through trio
    name: str
    unix_identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we bound
    unix_path: str | None = None

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.sock)  # wakes an accept loop still waiting on it
        self.sock.close()
        if self.unix_path is not None and self.unix_identity is not None:
            # Remove the file only if it is still the one we made: a newer instance may own the path.
            try:
                st = os.stat(self.unix_path)
            except OSError:
                return
            if (st.st_dev, st.st_ino) == self.unix_identity:
                os.unlink(self.unix_path)


async def open_listeners(
    address: Address, *, backlog: int, socket_buffer: int = 0, reuse_port: bool = False, listen: bool = True
) -> list[ListeningSocket]:
    """Bind (and for stream transports listen on) every socket ``address`` stands for.

    ``:PORT`` is 0.0.0.0 and :: (IPV6_V6ONLY); a host name is every address it resolves to; with port 0
    every socket gets the port the first one was given. A family the host lacks is skipped with a
    warning. ``reuse_port`` sets SO_REUSEPORT (worker processes each bind the same port and the kernel
    spreads connections over them); ``listen=False`` only binds, which holds a port for the workers
    without taking a share of its connections (a worker master resolving port 0).

    Raises:
        ListenerError: nothing could be bound (port taken, path in use, no such host, ...).
    """
    if address.path is not None:
        return [await _open_unix(address.path, backlog=backlog)]
    kind = stdlib_socket.SOCK_DGRAM if address.transport == "udp" else stdlib_socket.SOCK_STREAM
    targets = await _resolve(address, kind)
    for _attempt in range(10):  # port 0: another process may take our port in the second family
        opened: list[ListeningSocket] = []
        port = address.port
        try:
            for family, host in targets:
                try:
                    sock = _open_inet(
                        family,
                        kind,
                        host,
                        port,
                        backlog=backlog,
                        listen=listen,
                        socket_buffer=socket_buffer,
                        reuse_port=reuse_port,
                    )
                except OSError as exc:
                    if exc.errno in FAMILY_MISSING_ERRNOS and (len(targets) > 1 or address.host is None):
                        logger.warning("skipping %s for %s: %s", host or "::", address, exc.strerror)
                        continue
                    raise
                port = sock.getsockname()[1]
                opened.append(ListeningSocket(sock, format_sockaddr(sock.getsockname())))
        except OSError as exc:
            for item in opened:
                item.close()
            if exc.errno == errno.EADDRINUSE and address.port == 0 and opened:
                continue
            raise ListenerError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
        if not opened:
            raise ListenerError(f"cannot listen on {address}: no address family is available")
        return opened
    raise ListenerError(f"cannot listen on {address}: no port free in every family")  # pragma: no cover


async def _resolve(address: Address, kind: int) -> list[tuple[int, str]]:
    if address.host is None:
        families: list[tuple[int, str]] = [(stdlib_socket.AF_INET, "0.0.0.0")]
        if stdlib_socket.has_ipv6:
            families.append((stdlib_socket.AF_INET6, "::"))
        return families
    try:
        infos = await trio.socket.getaddrinfo(
            address.host, address.port, type=kind, flags=stdlib_socket.AI_PASSIVE
        )
    except stdlib_socket.gaierror as exc:
        raise ListenerError(f"cannot resolve {address.host!r}: {exc.strerror}") from exc
    seen: list[tuple[int, str]] = []
    for family, _type, _proto, _name, sockaddr in infos:
        item = (int(family), str(sockaddr[0]))
        if item not in seen:
            seen.append(item)
    return seen


def _open_inet(
    family: int,
    kind: int,
    host: str,
    port: int,
    *,
    backlog: int,
    socket_buffer: int,
    reuse_port: bool,
    listen: bool,
) -> stdlib_socket.socket:
    sock = stdlib_socket.socket(family, kind)
    try:
        if sys.platform != "win32" and kind == stdlib_socket.SOCK_STREAM:
            # Rebind at once after a restart even with connections in TIME_WAIT.
            sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
        if family == stdlib_socket.AF_INET6:
            # One socket per family, so ":PORT" behaves the same whatever net.ipv6.bindv6only says.
            sock.setsockopt(stdlib_socket.IPPROTO_IPV6, stdlib_socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEPORT, 1)
        if socket_buffer:
            # Set on the listener so accepted sockets inherit it before window scaling is negotiated.
            sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_RCVBUF, socket_buffer)
            sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_SNDBUF, socket_buffer)
        sock.bind((host, port))  # numeric: getaddrinfo already resolved it
        if kind == stdlib_socket.SOCK_STREAM and listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _open_unix(path: str, *, backlog: int) -> ListeningSocket:
    _remove_stale_unix_socket(path)
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        sock.bind(path)
        st = os.stat(path)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from exc
    return ListeningSocket(sock, f"unix:{path}", (st.st_dev, st.st_ino), path)


def _remove_stale_unix_socket(path: str) -> None:
    """Remove a socket file left by a dead process; refuse to touch a live socket or any other file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenerError(f"cannot listen on unix:{path}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"cannot listen on unix:{path}: the path exists and is not a socket")
    probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    probe.setblocking(False)  # a live server with a full backlog answers EAGAIN, never blocks us
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: stale
        logger.info("removed stale socket file %s", path)
        return
    except FileNotFoundError:
        return
    except BlockingIOError:
        pass
    finally:
        probe.close()
    raise ListenerError(f"cannot listen on unix:{path}: another process is listening there")


OnAccept = Callable[[stdlib_socket.socket, object], None]
ACCEPT_BATCH = 16  # accepts in a row before yielding to other tasks


async def accept_loop(listener: ListeningSocket, on_accept: OnAccept) -> None:
    """Accept forever, calling ``on_accept(sock, peer_sockaddr)`` for each connection (a non-blocking
    stdlib socket, now owned by the callback).

    Per-connection accept failures are skipped; running out of descriptors or memory pauses accepting
    with exponential backoff (existing connections are unaffected) and logs at most one line per second.
    Any other error propagates: the supervisor restarts the listener.
    """
    backoff = ACCEPT_BACKOFF_INITIAL
    last_logged = -CAPACITY_LOG_INTERVAL
    suppressed = 0
    batch = 0
    sock = listener.sock
    while True:
        try:
            conn, peer = sock.accept()
        except BlockingIOError:
            batch = 0
            await trio.lowlevel.wait_readable(sock)
            continue
        except OSError as exc:
            if exc.errno in ACCEPT_IGNORED_ERRNOS:
                continue
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            now = trio.current_time()
            if now - last_logged >= CAPACITY_LOG_INTERVAL:
                more = f" ({suppressed} more since last report)" if suppressed else ""
                logger.warning(
                    "%s: accept failed: %s; pausing accepts for %.3g s%s",
                    listener.name,
                    os.strerror(exc.errno or 0),
                    backoff,
                    more,
                )
                last_logged, suppressed = now, 0
            else:
                suppressed += 1
            await trio.sleep(backoff)
            backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
            continue
        backoff = ACCEPT_BACKOFF_INITIAL
        conn.setblocking(False)
        on_accept(conn, peer)
        batch += 1
        if batch >= ACCEPT_BATCH:  # a flood of connects must not starve the connections
            batch = 0
            await trio.lowlevel.checkpoint()


def as_stream(sock: stdlib_socket.socket) -> trio.SocketStream:
    """Wrap an accepted stdlib socket for the paths that are not hot (closing, refusing, admin, TLS)."""
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
