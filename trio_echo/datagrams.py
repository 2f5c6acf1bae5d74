"""UDP echo (RFC 862): every datagram goes back to its sender unchanged, or is dropped.

One task per UDP socket (not per sender: there are no connections). Like the TCP socket pump it calls
``recvfrom_into`` on one reused buffer and ``sendto`` directly on the non-blocking socket, awaits
readiness only when the kernel says EAGAIN, and checkpoints every ``FAIR_SHARE`` datagrams.

UDP echo is the textbook reflection vector — a forged source address makes us send to a victim —
so the service never sends more than it received (one reply of the same size per datagram, nothing
on its own), every source has a datagram and byte budget (``verdict``), and datagrams from the
ports of services that answer anything (echo, daytime, qotd, chargen, time, port 0) are dropped, so
two such services cannot be made to bounce datagrams between each other forever.
"""

from __future__ import annotations

import collections
import errno
import socket
from collections.abc import Callable

import trio

from .addresses import format_sockaddr
from .events import Flag
from .stats import DatagramCounts
from .trace import Tracer

FAIR_SHARE = 32  # datagrams between checkpoints while the socket always has more (as the TCP pump)
RECEIVE_BUFFER = 65535  # larger than any UDP payload over IPv4 or (non-jumbo) IPv6: never truncated
LOOP_PORTS = frozenset({0, 7, 13, 17, 19, 37})
# recvfrom failures about an earlier reply (an ICMP error queued on the socket), not about this socket;
# Windows reports a port-unreachable as ECONNRESET (WSAECONNRESET) on the next recvfrom.
STALE_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EMSGSIZE}
)

Verdict = Callable[[str, int], str | None]


async def echo_datagrams(
    sock: socket.socket,
    *,
    verdict: Verdict,
    counts: DatagramCounts,
    dropped: collections.Counter[str],
    tracer: Tracer,
    listener: str,
) -> None:
    """Echo datagrams on the non-blocking UDP ``sock`` forever.

    ``verdict(ip, size)`` decides each one: ``None`` echoes it, otherwise it is dropped and counted
    under the returned reason. Counts go to ``counts``/``dropped``; trace events are ``udp.echo``
    (``data`` flag) and ``udp.dropped`` (``conn`` flag).
    """
    buffer = bytearray(RECEIVE_BUFFER)
    view = memoryview(buffer)
    done = 0
    while True:
        try:
            size, peer = sock.recvfrom_into(buffer)
        except BlockingIOError:
            done = 0
            await trio.lowlevel.wait_readable(sock)
            continue
        except OSError as exc:
            if exc.errno not in STALE_ERRNOS:
                raise
            continue  # an ICMP error about an earlier reply: this socket is fine
        counts.received += 1
        counts.bytes_in += size
        reason = "loop_port" if peer[1] in LOOP_PORTS else verdict(peer[0], size)
        if reason is None:
            try:
                sock.sendto(view[:size], peer)
            except BlockingIOError:
                reason = "send_buffer_full"  # never wait: the next sender must not queue behind this one
            except OSError:
                reason = "send_error"  # e.g. no route back to that address
            else:
                counts.echoed += 1
                counts.bytes_out += size
        if reason is not None:
            dropped[reason] += 1
            if tracer.conn:
                tracer.emit(
                    Flag.CONN,
                    "udp.dropped",
                    peer=format_sockaddr(peer),
                    listener=listener,
                    bytes_in=size,
                    reason=reason,
                )
        elif tracer.data:
            tracer.emit(Flag.DATA, "udp.echo", peer=format_sockaddr(peer), listener=listener, bytes_in=size)
        done += 1
        if done >= FAIR_SHARE:  # a flood must not starve the TCP connections or ignore cancellation
            done = 0
            await trio.lowlevel.checkpoint()
