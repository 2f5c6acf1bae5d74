"""Linux ``struct tcp_info`` (pure): the per-connection numbers people run an echo server to see."""

from __future__ import annotations

import struct

# struct tcp_info begins with 8 one-byte fields, then 32-bit fields in this order (linux/tcp.h):
# rto ato snd_mss rcv_mss unacked sacked lost retrans fackets last_data_sent last_ack_sent
# last_data_recv last_ack_recv pmtu rcv_ssthresh rtt rttvar snd_ssthresh snd_cwnd advmss reordering
# rcv_rtt rcv_space total_retrans
_U32_FIELDS = 24
SIZE = 8 + 4 * _U32_FIELDS
_SND_MSS, _PMTU, _RTT, _RTTVAR, _CWND, _TOTAL_RETRANS = 2, 13, 15, 16, 18, 23


def parse_tcp_info(raw: bytes) -> dict[str, int]:
    """``rtt_us``, ``rttvar_us``, ``retransmits`` (total), ``pmtu``, ``mss`` (the send MSS),
    ``snd_cwnd`` from the raw struct.

    Returns ``{}`` when ``raw`` is too short (an old kernel or not TCP).
    """
    if len(raw) < SIZE:
        return {}
    fields = struct.unpack_from(f"={_U32_FIELDS}I", raw, 8)
    return {
        "rtt_us": fields[_RTT],
        "rttvar_us": fields[_RTTVAR],
        "retransmits": fields[_TOTAL_RETRANS],
        "pmtu": fields[_PMTU],
        "mss": fields[_SND_MSS],
        "snd_cwnd": fields[_CWND],
    }
