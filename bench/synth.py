"""Synthetic recorded-style streams for benchmarks and scale tests of correlation.

Each flow crosses a chain of hosts (client -> lb... -> server, every middle host doing
DNAT+SNAT) and shows the handshake, a request, its ACK and a close; every ``rst_every``-th
flow ends with a server RST and a matching ``tcp_send_reset`` record instead. Hosts get
different monotonic clocks, as real hosts do, and :func:`synth_clocks` gives SSH-like
estimates of them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from ebpfdiag.clock import ClockEstimate

PACKETS_PER_FLOW = 6
REAL_BASE_NS = 1_795_000_000_000_000_000
_HOP_NS = 20_000
_GAP_NS = 150_000
_FLOW_SPACING_NS = 40_000


def host_names(hosts: int = 3) -> list[str]:
    """client, lb (or lb1..lbN), server."""
    if hosts < 2:
        raise ValueError("a flow needs at least two hosts")
    middles = hosts - 2
    lbs = ["lb"] if middles == 1 else [f"lb{i}" for i in range(1, middles + 1)]
    return ["client", *lbs, "server"]


def _uptime_ns(index: int) -> int:
    """Host monotonic clock at REAL_BASE_NS: each host booted at a different time."""
    return 3_600_000_000_000 * (index + 1) + 1_234_567 * index


def events_per_flow(hosts: int = 3) -> int:
    """Packet events one flow produces (each packet is seen twice per link)."""
    return PACKETS_PER_FLOW * 2 * (hosts - 1)


def synth_clocks(
    hosts: int = 3, *, error_ns: int = 500_000, seed: int = 0
) -> dict[str, ClockEstimate]:
    """SSH-like estimates for :func:`synth_events`: true offsets, off by less than the error."""
    rng = random.Random(seed)
    return {
        name: ClockEstimate(
            REAL_BASE_NS - _uptime_ns(i) + rng.randrange(-error_ns // 2, error_ns // 2 + 1),
            error_ns,
        )
        for i, name in enumerate(host_names(hosts))
    }


def synth_events(
    n_flows: int, hosts: int = 3, *, rst_every: int = 10, seed: int = 0
) -> Iterator[dict]:
    """Yield host-tagged ``packet`` and ``reset`` records of ``n_flows`` flows."""
    rng = random.Random(seed)
    names = host_names(hosts)
    mono = [_uptime_ns(i) - REAL_BASE_NS for i in range(hosts)]
    # link k joins host k (its "eth1", or eth0 for the client) to host k+1 (its eth0)
    links = [(f"198.18.{2 + k}.1", f"198.18.{2 + k}.2") for k in range(hosts - 1)]
    vip = "198.18.10.10"
    for flow in range(n_flows):
        client = f"198.18.1.{2 + (flow // 60_000) % 250}"
        cport = 1024 + flow % 60_000
        # the tuple on each link, initiator first: client -> VIP, then lb -> next lb/server
        tuples = [(client, cport, vip, 80)]
        tuples += [(links[k][0], cport, links[k][1], 8080) for k in range(1, hosts - 1)]
        if hosts == 2:
            tuples = [(client, cport, links[0][1], 80)]
        c_isn, s_isn = rng.getrandbits(32), rng.getrandbits(32)
        c_id, s_id = rng.getrandbits(16) | 1, rng.getrandbits(16) | 1
        rst = rst_every > 0 and flow % rst_every == rst_every - 1
        last = (True, 20, s_isn + 1, c_isn + 19, 0, s_id + 1) if rst else (
            True, 17, s_isn + 1, c_isn + 19, 0, s_id + 1)  # fmt: skip
        packets = [  # (from server?, flags, seq, ack, len, ipid)
            (False, 2, c_isn, 0, 0, c_id),
            (True, 18, s_isn, c_isn + 1, 0, 0),
            (False, 16, c_isn + 1, s_isn + 1, 0, c_id + 1),
            (False, 24, c_isn + 1, s_isn + 1, 18, c_id + 2),
            (True, 16, s_isn + 1, c_isn + 19, 0, s_id),
            last,
        ]
        t = REAL_BASE_NS + flow * _FLOW_SPACING_NS
        for from_server, flags, seq, ack, length, ipid in packets:
            seq, ack = seq % 2**32, ack % 2**32
            order = range(hosts - 1, 0, -1) if from_server else range(hosts - 1)
            for step, k in enumerate(order):
                # link k connects host k and host k+1 (forward) or k-1 and k (backward)
                link = k - 1 if from_server else k
                src, sport, dst, dport = tuples[link]
                if from_server:
                    src, sport, dst, dport = dst, dport, src, sport
                sender, receiver = (k, k - 1) if from_server else (k, k + 1)
                t_out = t + 2 * step * _HOP_NS
                t_in = t_out + _HOP_NS
                if rst and from_server and flags & 4 and step == 0:
                    yield _reset(
                        names[sender], t_out - 5_000 + mono[sender], src, sport, dst, dport
                    )
                yield _packet(names[sender], "eth0" if sender == 0 or from_server else "eth1",
                              "egress", t_out + mono[sender], src, sport, dst, dport, flags,
                              seq, ack, length, ipid)  # fmt: skip
                yield _packet(names[receiver], "eth1" if from_server and receiver else "eth0",
                              "ingress", t_in + mono[receiver], src, sport, dst, dport, flags,
                              seq, ack, length, ipid)  # fmt: skip
            t += _GAP_NS


def _packet(host, ifname, direction, ts_ns, saddr, sport, daddr, dport, flags, seq, ack,
            length, ipid) -> dict:  # fmt: skip
    return {
        "type": "packet", "host": host, "ts_ns": ts_ns, "ifname": ifname, "ifindex": 2,
        "dir": direction, "family": 4, "saddr": saddr, "daddr": daddr, "sport": sport,
        "dport": dport, "flags": flags, "seq": seq, "ack": ack, "ipid": ipid, "ttl": 64,
        "len": length, "win": 502, "why": "rst" if flags & 4 else "history",
    }  # fmt: skip


def _reset(host, ts_ns, saddr, sport, daddr, dport) -> dict:
    return {
        "type": "reset", "host": host, "ts_ns": ts_ns, "probe": "tcp_send_reset", "family": 4,
        "saddr": saddr, "daddr": daddr, "sport": sport, "dport": dport, "state": "TCP_CLOSE",
        "state_num": 7, "reason": "TCP_ABORT_ON_CLOSE", "reason_num": 11, "pid": 4242,
        "comm": "python3",
    }  # fmt: skip
