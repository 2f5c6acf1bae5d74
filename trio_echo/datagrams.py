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
from .faults import DatagramFaults, FaultPlan
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
PlanOf = Callable[[], FaultPlan | None]
OnFault = Callable[[str, dict[str, object]], None]


async def echo_datagrams(
    sock: socket.socket,
    *,
    verdict: Verdict,
    counts: DatagramCounts,
    dropped: collections.Counter[str],
    tracer: Tracer,
    listener: str,
    plan_of: PlanOf = lambda: None,
    on_fault: OnFault | None = None,
) -> None:
    """Echo datagrams on the non-blocking UDP ``sock`` forever.

    ``verdict(ip, size)`` decides each one: ``None`` echoes it, otherwise it is dropped and counted
    under the returned reason. Counts go to ``counts``/``dropped``; trace events are ``udp.echo``
    (``data`` flag) and ``udp.dropped`` (``conn`` flag). ``plan_of()`` is the listener's fault profile
    now (asked per datagram: the admin channel may change it); what it does is reported to
    ``on_fault(kind, fields)``, and a datagram it drops is counted under ``fault``.
    """
    buffer = bytearray(RECEIVE_BUFFER)
    view = memoryview(buffer)
    done = 0
    plan: FaultPlan | None = None
    shaper: DatagramFaults | None = None
    while True:
        try:
            size, peer = sock.recvfrom_into(buffer)
        except BlockingIOError:
            done = 0
            if shaper is not None and len(shaper):  # delayed echoes are waiting: wake for them too
                with trio.move_on_at(shaper.next_due):
                    await trio.lowlevel.wait_readable(sock)
                _send_due(sock, shaper, counts, dropped)
            else:
                await trio.lowlevel.wait_readable(sock)
            continue
        except OSError as exc:
            if exc.errno not in STALE_ERRNOS:
                raise
            continue  # an ICMP error about an earlier reply: this socket is fine
        counts.received += 1
        counts.bytes_in += size
        reason = "loop_port" if peer[1] in LOOP_PORTS else verdict(peer[0], size)
        if (current := plan_of()) is not plan:
            plan, shaper = current, current.datagrams() if current is not None else None
        if reason is None and shaper is not None:
            kinds = shaper.shape(bytes(view[:size]), peer, trio.current_time())
            for kind in kinds:
                if on_fault is not None and kind != "overflow":
                    on_fault(kind, {"listener": listener, "peer": format_sockaddr(peer)})
            if "overflow" in kinds:
                reason = "fault_queue_full"  # latency holds at most MAX_DELAYED_DATAGRAMS
            elif "loss" in kinds:
                reason = "fault"
            else:
                _send_due(sock, shaper, counts, dropped)
        elif reason is None:
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


def _send_due(
    sock: socket.socket, shaper: DatagramFaults, counts: DatagramCounts, dropped: collections.Counter[str]
) -> None:
    """Send the faulted echoes whose time has come (never waiting, as any echo)."""
    for datagram, peer in shaper.due_now(trio.current_time()):
        try:
            sock.sendto(datagram, peer)
        except BlockingIOError:
            dropped["send_buffer_full"] += 1
        except OSError:
            dropped["send_error"] += 1
        else:
            counts.echoed += 1
            counts.bytes_out += len(datagram)
