"""Synthetic recorded-style streams for benchmarks and tests of correlation.

``synth_events`` makes many flows for scale; ``LabStream`` and ``lb_failover`` make a few,
shaped like the lab's recordings, for what the lab cannot show on demand.

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
        "state_num": 7, "reason": "TCP_STATE", "reason_num": 14, "pid": 4242,
        "comm": "python3",
    }  # fmt: skip


# ---------------------------------------------------------------- lab-shaped streams

LAB_CLIENT, LAB_VIP, LAB_LB = "198.18.1.10", "198.18.3.1", "198.18.2.1"
LAB_SERVERS = {"server": "198.18.2.10", "server1": "198.18.2.10", "server2": "198.18.2.11"}
LAB_MONO_NS = 972_513_000_000
"""The lab's hosts are namespaces of one kernel: one monotonic clock."""
LAB_OFFSET_NS = 1_795_623_897_822_985_538
PSH = 8


class LabStream:
    """Records as ``trace tcp-rst --json`` gives them in the lab: client -> lb (nftables
    DNAT + masquerade) -> servers on a bridge, so lb sees a packet on ``to-client``,
    ``br-servers`` and ``to-SERVER``, and a reply on ``br-servers`` half translated.

    ``cport`` is the client's port, ``vport`` the VIP's, ``bport`` the backend's and
    ``mport`` the port masquerade picks (the client's by default). Only ``hosts`` are
    traced. ``records`` is the stream; :meth:`clocks` gives SSH-like estimates of it.
    """

    def __init__(
        self,
        *,
        cport: int = 47337,
        vport: int = 8081,
        bport: int = 8081,
        mport: int | None = None,
        hosts: tuple[str, ...] = ("client", "lb", "server1", "server2"),
        start_ns: int = LAB_MONO_NS,
    ) -> None:
        self.cport, self.vport, self.bport = cport, vport, bport
        self.mport = mport or cport
        self.hosts = set(hosts)
        self.records: list[dict] = []
        self.t = start_ns
        self.last = start_ns

    def client_tuple(self) -> tuple[str, int, str, int]:
        return (LAB_CLIENT, self.cport, LAB_VIP, self.vport)

    def backend_tuple(self, server: str, mport: int | None = None) -> tuple[str, int, str, int]:
        return (LAB_LB, mport or self.mport, LAB_SERVERS[server], self.bport)

    def clocks(self, error_ns: int = 330_000) -> dict[str, ClockEstimate]:
        skew = {"client": 24_000, "lb": -500, "server1": 900, "server2": -1_300, "server": 900}
        return {
            h: ClockEstimate(LAB_OFFSET_NS + skew.get(h, 0), error_ns) for h in sorted(self.hosts)
        }

    def wait(self, ns: int) -> None:
        self.t += ns

    def _see(self, host, ifname, direction, tup, flags, seq, ack, length, ipid, why, ts):  # noqa: ANN001
        if host not in self.hosts:
            return
        saddr, sport, daddr, dport = tup
        self.records.append({
            "type": "packet", "ts_ns": ts, "ifname": ifname, "ifindex": 3, "dir": direction,
            "family": 4, "saddr": saddr, "daddr": daddr, "sport": sport, "dport": dport,
            "flags": flags, "seq": seq % 2**32, "ack": ack % 2**32, "ipid": ipid, "ttl": 64,
            "len": length, "win": 502, "why": why, "host": host, "ts": ts + LAB_OFFSET_NS,
        })  # fmt: skip

    def forward(self, server: str, flags: int, seq: int, ack: int, length: int = 0,
                ipid: int = 1, why: str = "history", pieces: int = 1,
                mport: int | None = None, server_why: str | None = None) -> int:  # fmt: skip
        """Client -> lb -> ``server``; ``pieces`` > 1 cuts the payload into that many
        segments after lb (what GSO does to a 64 KiB packet). Returns the send time."""
        t = self.last = self.t
        c, b = self.client_tuple(), self.backend_tuple(server, mport)
        self._see("client", "eth0", "egress", c, flags, seq, ack, length, ipid, why, t)
        self._see("lb", "to-client", "ingress", c, flags, seq, ack, length, ipid, why, t + 20_000)
        size = length // pieces
        for i in range(pieces):
            part = size if i < pieces - 1 else length - size * (pieces - 1)
            part_flags = flags if pieces == 1 or i == pieces - 1 else flags & ~PSH
            at, args = t + 60_000 + 3_000 * i, (part_flags, seq + size * i, ack, part, ipid + i)
            self._see("lb", "br-servers", "egress", b, *args, server_why or why, at)
            self._see("lb", f"to-{server}", "egress", b, *args, server_why or why, at + 1_000)
            self._see(server, "eth0", "ingress", b, *args, server_why or why, at + 8_000)
        self.t += 200_000 + 3_000 * pieces
        return t

    def reply(self, server: str, flags: int, seq: int, ack: int, length: int = 0,
              ipid: int = 0, why: str = "history", mport: int | None = None,
              server_why: str | None = None) -> int:  # fmt: skip
        """``server`` -> lb -> client (un-NAT on lb). Returns the send time."""
        t = self.last = self.t
        saddr, sport, daddr, dport = self.backend_tuple(server, mport)
        b = (daddr, dport, saddr, sport)
        half = (daddr, dport, LAB_CLIENT, self.cport)
        c = (LAB_VIP, self.vport, LAB_CLIENT, self.cport)
        args = (flags, seq, ack, length, ipid)
        self._see(server, "eth0", "egress", b, *args, server_why or why, t)
        self._see("lb", f"to-{server}", "ingress", b, *args, server_why or why, t + 4_000)
        self._see("lb", "br-servers", "ingress", half, *args, why, t + 15_000)
        self._see("lb", "to-client", "egress", c, *args, why, t + 18_000)
        self._see("client", "eth0", "ingress", c, *args, why, t + 45_000)
        self.t += 200_000
        return t

    def reset(self, host: str, probe: str, tup: tuple, *, state: str | None = None,
              reason: str | None = None, dt_ns: int = -20_000,
              **extra: object) -> dict:  # fmt: skip
        """A reset record ``dt_ns`` from the last packet's send time, local side first."""
        saddr, sport, daddr, dport = tup
        ts = self.last + dt_ns
        rec = {
            "type": "reset", "ts_ns": ts, "probe": probe, "family": 4, "saddr": saddr,
            "daddr": daddr, "sport": sport, "dport": dport, "state": state, "reason": reason,
            "pid": 4242, "comm": "python3", "host": host, "ts": ts + LAB_OFFSET_NS, **extra,
        }  # fmt: skip
        if host in self.hosts:
            self.records.append(rec)
        return rec


def lb_failover(*, mport_after: int | None = None, kept: bool = True, **kw) -> LabStream:
    """``rst-lb-failover`` as the lab plays it: a connection through lb to server1, lb
    forgets it (conntrack entry deleted, DNAT target changed), the client's next request
    goes to server2, whose listening socket answers with a RST (recorded as 6.18 records
    a listener's reset: ``0.0.0.0:PORT > 0.0.0.0:0``, TCP_LISTEN, TCP_FLAGS).

    With ``kept`` the packets of the hosts the RST never crossed (server1, lb's server1
    side) come at the end of the stream as ``why: "kept"``, as the tracer dumps them."""
    lab = LabStream(**kw)
    c_isn, s_isn = 3_844_565_477, 2_598_029_163
    lab.forward("server1", 2, c_isn, 0, ipid=63505, why="handshake")
    lab.reply("server1", 18, s_isn, c_isn + 1, why="handshake")
    lab.forward("server1", 16, c_isn + 1, s_isn + 1, ipid=63506)
    lab.forward("server1", 24, c_isn + 1, s_isn + 1, 6, ipid=63507)
    lab.reply("server1", 16, s_isn + 1, c_isn + 7, ipid=52098)
    lab.wait(50_000_000)
    lab.forward("server2", 24, c_isn + 7, s_isn + 1, 6, ipid=63508, mport=mport_after,
                why="rst", server_why="rst")  # fmt: skip
    lab.wait(-100_000)
    lab.reply("server2", 4, s_isn + 1, 0, why="rst", mport=mport_after)
    lab.reset("server2", "tcp_send_reset", ("0.0.0.0", lab.bport, "0.0.0.0", 0),
              state="TCP_LISTEN", reason="TCP_FLAGS")  # fmt: skip
    lab.reset("client", "tcp_receive_reset", lab.client_tuple(), dt_ns=60_000)
    if kept:
        for rec in lab.records:
            on_server1 = rec["host"] == "server1" or rec.get("ifname") == "to-server1"
            early = rec["ts_ns"] < lab.last - 10_000_000
            if on_server1 or (rec["host"] == "lb" and rec.get("ifname") == "br-servers" and early):
                rec["why"] = "kept"
        lab.records.sort(key=lambda r: r.get("why") == "kept")
    return lab
