"""``trace drop`` answers from synthetic three-host streams shaped like the drop tracer's
records (client -> lb (DNAT) -> server): joins, kernel counts, and what it cannot tell."""

from __future__ import annotations

import io
import json

from rich.console import Console

from ebpfdiag.clock import ClockEstimate
from ebpfdiag.questions.drop import correlate
from ebpfdiag.render.drop import live_line, render

CLIENT, VIP, SERVER = "198.18.1.10", "198.18.3.1", "198.18.2.10"
BASE = 1_795_000_000_000_000_000
#: host CLOCK_MONOTONIC = BASE + t - offset: three hosts booted at different times
OFFSETS = {
    "client": BASE - 3_600_000_000_000,
    "lb": BASE - 7_200_000_123_000,
    "server": BASE - 10_800_000_456_000,
}
HOSTS = ("client", "lb", "server")
SYN, ACK, PSH = 2, 16, 8


def clocks(error_ns: int = 5_000) -> dict[str, ClockEstimate]:
    return {h: ClockEstimate(off, error_ns) for h, off in OFFSETS.items()}


class Stream:
    """Records as the controller holds them (tagged with ``host``), time in ns from t=1 s."""

    def __init__(self, *, hellos: dict[str, dict] | None = None) -> None:
        self.records: list[dict] = []
        self.t = 1_000_000_000
        for host in HOSTS:
            hello = {
                "type": "hello", "host": host, "script": "drop", "version": 1,
                "attach": {"skb:kfree_skb": "tracepoint"}, "missing": [],
                "reasons": {"source": "format", "count": 80},
                "rate": {"events_per_s": 100, "burst": 200}, "filter": {"ports": [80, 8080]},
            }  # fmt: skip
            hello.update((hellos or {}).get(host, {}))
            self.records.append(hello)

    def mono(self, host: str, dt: int) -> int:
        return BASE + self.t + dt - OFFSETS[host]

    def packet(self, host, ifname, direction, tup, flags, seq, ack=0, length=0, ipid=1, dt=0):  # noqa: ANN001
        saddr, sport, daddr, dport = tup
        self.records.append({
            "type": "packet", "host": host, "ts_ns": self.mono(host, dt), "ifname": ifname,
            "ifindex": 2, "dir": direction, "family": 4, "saddr": saddr, "daddr": daddr,
            "sport": sport, "dport": dport, "flags": flags, "seq": seq, "ack": ack,
            "ipid": ipid, "ttl": 64, "len": length, "win": 502, "why": "history",
        })  # fmt: skip

    def drop(self, host, tup, flags=SYN, seq=1000, ack=0, length=0, ipid=1, dt=0, *,  # noqa: ANN001
             reason="NETFILTER_DROP", reason_num=12, location="nf_hook_slow+0x9a",
             ifname="to-client", **extra) -> dict:  # fmt: skip
        saddr, sport, daddr, dport = tup
        rec = {
            "type": "drop", "host": host, "ts_ns": self.mono(host, dt), "reason": reason,
            "reason_num": reason_num, "location": location, "ifindex": 2, "ifname": ifname,
            "family": 4, "proto": 6, "saddr": saddr, "daddr": daddr, "sport": sport,
            "dport": dport, "flags": flags, "seq": seq, "ack": ack, "len": length,
            "ipid": ipid, **extra,
        }  # fmt: skip
        self.records.append(rec)
        return rec

    def retrans(self, host, tup, state="SYN_SENT", dt=0) -> None:  # noqa: ANN001
        saddr, sport, daddr, dport = tup
        self.records.append({
            "type": "retrans", "host": host, "ts_ns": self.mono(host, dt),
            "probe": "tcp:tcp_retransmit_skb", "family": 4, "saddr": saddr, "sport": sport,
            "daddr": daddr, "dport": dport, "state": state,
        })  # fmt: skip

    def counts(self, host: str, rows: list[tuple], suppressed: int = 0, final: bool = True):
        self.records.append({
            "type": "drop_counts", "host": host, "ts_ns": self.mono(host, 0), "final": final,
            "counts": [{"reason": r, "reason_num": n, "location": loc, "count": c,
                        "matched": m} for r, n, loc, c, m in rows],
            "suppressed": suppressed,
        })  # fmt: skip

    def netstat(self, host: str, delta: dict[str, int]) -> None:
        self.records.append(
            {
                "type": "netstat",
                "host": host,
                "ts_ns": self.mono(host, 0),
                "final": True,
                "delta": delta,
            }  # fmt: skip
        )

    def all_counted(self, **rows: list[tuple]) -> None:
        """Every host's final drop_counts (nothing matched unless given)."""
        for host in HOSTS:
            self.counts(host, rows.get(host, []))

    def syn(self, cport: int = 40000, *, isn: int = 1000, ipid: int = 1, drop_on_lb: bool = False):
        """The client's SYN through lb; dropped on lb at +0.080 ms after DNAT, or delivered."""
        c = (CLIENT, cport, VIP, 80)
        s = (CLIENT, cport, SERVER, 8080)
        self.packet("client", "eth0", "egress", c, SYN, isn, ipid=ipid)
        self.packet("lb", "to-client", "ingress", c, SYN, isn, ipid=ipid, dt=30_000)
        if drop_on_lb:
            self.drop("lb", s, SYN, isn, ipid=ipid, dt=80_000)
        else:
            self.packet("lb", "to-server", "egress", s, SYN, isn, ipid=ipid, dt=50_000)
            self.packet("server", "eth0", "ingress", s, SYN, isn, ipid=ipid, dt=90_000)


def records_of(result) -> list[dict]:
    return list(result.records())


def terminal(result) -> str:
    out, err = io.StringIO(), io.StringIO()
    render(result, Console(file=out, width=200), Console(file=err, width=200))
    return out.getvalue() + err.getvalue()


def test_netfilter_drop_on_lb_is_joined_to_the_client_and_lb_sightings():
    s = Stream()
    s.syn(drop_on_lb=True)
    s.t += 1_000_000_000
    s.retrans("client", (CLIENT, 40000, VIP, 80), dt=-5_000)
    s.syn(ipid=2, drop_on_lb=True)
    s.t += 2_000_000_000
    s.retrans("client", (CLIENT, 40000, VIP, 80))  # after the second drop: the client gave up
    s.all_counted(lb=[("NETFILTER_DROP", 12, "nf_hook_slow+0x9a", 2, 2)])
    s.netstat("client", {"TCPSynRetrans": 2, "RetransSegs": 2})
    result = correlate(s.records, clocks(), hosts=HOSTS)

    assert len(result.flows) == 1 and len(result.drops) == 2
    first, second = result.drops
    assert (first.host, first.reason, first.location, first.flow) == (
        "lb", "NETFILTER_DROP", "nf_hook_slow+0x9a", 1,
    )  # fmt: skip
    assert [(h.host, h.ifname, h.dir) for h in first.path] == [
        ("client", "eth0", "egress"), ("lb", "to-client", "ingress"), ("lb", "to-client", "drop"),
    ]  # fmt: skip
    assert first.text.startswith(
        f"SYN {CLIENT}:40000 > {VIP}:80: left client eth0, entered lb to-client, "
        "dropped on lb by NETFILTER_DROP (nf_hook_slow), 0.080 ms later; "
        "client retransmitted on this flow 999.915 ms later (SYN_SENT)"
    ), first.text
    # each retransmission belongs to the latest drop before it
    assert [x.ts_ns for x in first.retrans] == [s.mono("client", -2_000_005_000)]
    assert [x.ts_ns for x in second.retrans] == [s.mono("client", 0)]
    assert first.missing == []

    recs = records_of(result)
    assert all("type" in r for r in recs)
    drop = next(r for r in recs if r["type"] == "drop")
    assert drop["host"] == "lb" and drop["since_first_ns"] == 80_000
    assert [h["rel_ms"] for h in drop["path"]] == [0.0, 0.03, 0.08]
    assert drop["retrans"][0]["state"] == "SYN_SENT"
    (flow,) = [r for r in recs if r["type"] == "flow"]
    kinds = [(e["kind"], e.get("dir"), e.get("reason")) for e in flow["events"]]
    assert ("hop", "drop", "NETFILTER_DROP") in kinds and ("retrans", None, None) in kinds
    assert "0.080 ms later" in flow["verdict"]["text"]
    (count,) = [r for r in recs if r["type"] == "drop_count"]
    assert (count["host"], count["count"], count["matched"]) == ("lb", 2, 2)
    summary = recs[-1]
    assert summary["type"] == "summary" and summary["verdict"] == "dropped"
    assert "2 drops of the traced traffic: lb NETFILTER_DROP at nf_hook_slow x2" in summary["text"]
    assert summary["missing"] == []
    json.dumps(recs)  # plain JSON

    text = terminal(result)
    assert "drops by host, reason, location" in text and "nf_hook_slow+0x9a" in text
    assert "to-client dropped" in text  # the timeline row of the drop ...
    assert "NETFILTER_DROP at nf_hook_slow+0x9a, after NAT, hop 0.050 ms" in text
    assert text.index("tcp:tcp_retransmit_skb") < text.index(" 1000.000 ")  # ... and its retry
    assert "left client eth0, entered lb to-client, dropped on lb" in text


def test_times_across_hosts_with_uncertain_clocks_are_said_to_be_unsure():
    s = Stream()
    s.syn(drop_on_lb=True)
    s.all_counted(lb=[("NETFILTER_DROP", 12, "nf_hook_slow+0x9a", 1, 1)])
    fuzzy = clocks()
    fuzzy["client"] = ClockEstimate(OFFSETS["client"], 20_000_000)
    (d,) = correlate(s.records, fuzzy, hosts=HOSTS).drops
    assert " ms later (times unsure: clock of client uncertain by +-" in d.text
    assert any(m.startswith("clock of client uncertain") for m in d.missing)
    (sure,) = correlate(s.records, clocks(), hosts=HOSTS).drops
    assert "unsure" not in sure.text


def test_a_location_only_host_is_shown_as_such():
    s = Stream(hellos={"server": {"reasons": {"source": "none", "count": 0}, "fallback": "x"}})
    c, b = (CLIENT, 40000, VIP, 80), (CLIENT, 40000, SERVER, 8080)
    s.packet("client", "eth0", "egress", c, PSH | ACK, 5000, 77, 100, ipid=9)
    s.packet("lb", "to-client", "ingress", c, PSH | ACK, 5000, 77, 100, ipid=9, dt=30_000)
    s.packet("lb", "to-server", "egress", b, PSH | ACK, 5000, 77, 100, ipid=9, dt=50_000)
    s.packet("server", "eth0", "ingress", b, PSH | ACK, 5000, 77, 100, ipid=9, dt=90_000)
    rec = s.drop("server", b, PSH | ACK, 5000, 77, 100, ipid=9, dt=120_000,
                 location="tcp_v4_rcv+0x1a4", ifname="eth0")  # fmt: skip
    del rec["reason"], rec["reason_num"]  # a kernel without a reason field
    s.all_counted(server=[(None, None, "tcp_v4_rcv+0x1a4", 1, 1)])
    result = correlate(s.records, clocks(), hosts=HOSTS)

    (d,) = result.drops
    assert d.label == "location only" and d.reason is None
    assert [(h.host, h.dir, h.nat) for h in d.path] == [
        ("client", "egress", False), ("lb", "ingress", False), ("lb", "egress", True),
        ("server", "ingress", False), ("server", "drop", False),
    ]  # fmt: skip
    assert (
        "left lb to-server after NAT, entered server eth0, dropped on server at tcp_v4_rcv "
        "(location only: server's kernel names no drop reasons), 0.120 ms later"
    ) in d.text
    assert "reason unknown" not in d.text
    (count,) = result.counts
    assert count.label == "location only"
    summary = result.summary()
    assert summary.verdict == "dropped"
    assert "server: its kernel names no drop reasons (location only)" in summary.missing
    assert "server location only at tcp_v4_rcv x1" in summary.text


def test_backlog_overflow_shows_through_netstat_and_syn_retransmissions():
    """The listen queue overflows: the kernel counts it, frees no skb with a reason; the
    client retransmits its SYNs."""
    s = Stream()
    for i in range(12):
        s.retrans("client", (CLIENT, 40000 + i, VIP, 80), dt=i * 1_000_000)
    s.all_counted(lb=[("NO_SOCKET", 2, "tcp_v4_rcv+0x1a4", 3, 0)])
    s.netstat("server", {"ListenOverflows": 12, "ListenDrops": 12, "TCPSynRetrans": 0})
    s.netstat("client", {"TCPSynRetrans": 12, "RetransSegs": 12})
    result = correlate(s.records, clocks(), hosts=HOSTS)

    assert result.drops == [] and result.flows == []
    summary = result.summary()
    assert summary.verdict == "counted", summary.text
    assert summary.text.startswith("no drop event on the traced flows; ")
    assert "server ListenOverflows +12, ListenDrops +12" in summary.text
    assert (
        "client retransmitted 12 times on the traced flows (12 SYN), TCPSynRetrans +12"
    ) in summary.text
    recs = records_of(result)
    netstat = {r["host"]: r for r in recs if r["type"] == "netstat"}
    assert netstat["server"]["kernel_drops"] == {"ListenOverflows": 12, "ListenDrops": 12}
    assert netstat["client"]["retrans"] == {"records": 12, "syn": 12}
    assert netstat["client"]["kernel_drops"] == {}
    text = terminal(result)
    assert "ListenOverflows +12" in text and "12 traced (12 SYN), TCPSynRetrans +12" in text


def test_healthy_traffic_has_no_drop_on_the_traced_flows():
    s = Stream()
    s.syn()
    s.syn(40001, isn=7000)
    s.all_counted(lb=[("NO_SOCKET", 2, "tcp_v4_rcv+0x1a4", 3, 0)])  # other traffic only
    result = correlate(s.records, clocks(), hosts=HOSTS)

    assert result.drops == [] and result.flows == []
    summary = result.summary()
    assert summary.verdict == "none", summary.text
    assert summary.text == "no drop on the traced flows (client, lb, server)"
    assert summary.missing == []
    text = terminal(result)
    assert "none: no drop on the traced flows (client, lb, server)" in text
    assert "NO_SOCKET" in text  # the other traffic's drops are still counted


def test_a_rate_limited_host_reports_how_many_drops_it_did_not_send():
    s = Stream()
    for i in range(10):
        s.syn(41000 + i, isn=100 + i, drop_on_lb=True)
        s.t += 2_000_000
    s.all_counted(lb=[("NETFILTER_DROP", 12, "nf_hook_slow+0x9a", 350, 350)])
    s.counts("lb", [("NETFILTER_DROP", 12, "nf_hook_slow+0x9a", 350, 350)], suppressed=340)
    result = correlate(s.records, clocks(), hosts=HOSTS)

    assert len(result.drops) == 10 and len(result.flows) == 10
    summary = result.summary()
    assert (summary.verdict, summary.matched, summary.suppressed) == ("dropped", 350, 340)
    assert "340 of them not sent as events (rate limit: lb 340)" in summary.text
    text = terminal(result)
    assert "lb: 340 drops of the traced traffic not sent as events (limit 100/s)" in text
    (lb,) = [r for r in records_of(result) if r["type"] == "netstat" and r["host"] == "lb"]
    assert lb["suppressed"] == 340


def test_lost_events_missing_probes_and_silent_hosts_make_the_answer_unknown():
    s = Stream(hellos={"server": {"attach": {}, "missing": [
        {"probe": "skb:kfree_skb", "why": "tracepoint not found"}]}})  # fmt: skip
    s.syn()
    s.records.append({"type": "lost", "host": "client", "count": 5, "ts_ns": s.mono("client", 0)})
    s.all_counted()
    result = correlate(s.records, clocks(), hosts=(*HOSTS, "edge"))

    summary = result.summary()
    assert summary.verdict == "unknown", summary.text
    assert summary.text.startswith("no drop seen on the traced traffic, but unknown")
    assert "client: lost 5 events" in summary.missing
    assert "server: kfree_skb probe missing (tracepoint not found)" in summary.missing
    assert "edge: nothing says its kfree_skb probe was attached" in summary.missing
    assert "edge: sent no drop counts" in summary.missing
    assert "no drop on the traced flows" not in summary.text
    assert any(w.kind == "lost" for w in result.warnings)


def test_lost_events_alone_are_enough_for_unknown():
    s = Stream()
    s.records.append({"type": "lost", "host": "lb", "count": 1, "ts_ns": s.mono("lb", 0)})
    s.all_counted()
    summary = correlate(s.records, clocks(), hosts=HOSTS).summary()
    assert (summary.verdict, summary.missing) == ("unknown", ["lb: lost 1 events"])


def test_a_reason_number_without_a_name_is_unknown_and_says_so():
    s = Stream()
    c = (CLIENT, 40000, VIP, 80)
    s.packet("client", "eth0", "egress", c, SYN, 1000)
    s.drop("lb", c, SYN, 1000, dt=40_000, reason=None, reason_num=77)
    s.all_counted(lb=[(None, 77, "nf_hook_slow+0x9a", 1, 1)])
    result = correlate(s.records, clocks(), hosts=HOSTS)

    (d,) = result.drops
    assert d.label == "unknown"
    assert "dropped on lb at nf_hook_slow, reason unknown" in d.text
    assert "[unknown: lb: drop reason number 77 has no name there]" in d.text
    assert result.counts[0].label == "unknown"
    assert "lb: drop reason number 77 has no name there" in result.summary().missing


def test_drops_seen_nowhere_else_still_get_a_line_per_host():
    s = Stream()
    s.drop("server", (CLIENT, 40000, SERVER, 8080), SYN, 1000, ifname="eth0",
           reason="TCP_LISTEN_OVERFLOW", location="tcp_conn_request+0x55")  # fmt: skip
    s.drop("server", ("198.18.1.10", 5353, SERVER, 53), dt=1_000, reason="NO_SOCKET",
           location="__udp4_lib_rcv+0x6c", ifname="eth0", proto=17, flags=None, seq=None,
           ack=None)  # fmt: skip
    s.all_counted(server=[("NO_SOCKET", 2, "__udp4_lib_rcv+0x6c", 1, 1)])
    result = correlate(s.records, clocks(), hosts=HOSTS)

    tcp, udp = result.drops
    assert tcp.flow == 1 and udp.flow is None
    assert tcp.text.endswith(
        "dropped on server by TCP_LISTEN_OVERFLOW (tcp_conn_request); "
        "not seen on any other traced interface"
    )
    assert udp.text == (
        f"{CLIENT}:5353 > {SERVER}:53: dropped on server by NO_SOCKET (__udp4_lib_rcv)"
    )
    text = terminal(result)
    assert "drops not joined to any flow" in text and "__udp4_lib_rcv" in text


def test_not_seen_elsewhere_is_only_claimed_when_no_host_lost_events():
    s = Stream()
    s.drop("server", (CLIENT, 40000, SERVER, 8080), SYN, 1000, ifname="eth0")
    s.records.append({"type": "lost", "host": "lb", "count": 3, "ts_ns": s.mono("lb", 0)})
    s.all_counted(server=[("NETFILTER_DROP", 12, "nf_hook_slow+0x9a", 1, 1)])
    (d,) = correlate(s.records, clocks(), hosts=HOSTS).drops
    assert "(unknown whether it was: lb lost 3 events)" in d.text
    assert d.missing == ["lb lost 3 events"]


def test_live_lines_name_reason_location_and_state():
    s = Stream()
    rec = s.drop("lb", (CLIENT, 40000, SERVER, 8080), SYN, 1000)
    line = live_line({**rec, "ts": 5}, 0).plain
    assert "lb" in line and "NETFILTER_DROP nf_hook_slow+0x9a SYN" in line
    s.retrans("client", (CLIENT, 40000, VIP, 80))
    line = live_line(s.records[-1], None).plain
    assert "tcp:tcp_retransmit_skb SYN_SENT" in line


def test_no_counted_drop_is_not_shown_as_none_when_a_host_could_not_count():
    s = Stream(hellos={"server": {"attach": {}, "missing": [
        {"probe": "skb:kfree_skb", "why": "tracepoint not found"}]}})  # fmt: skip
    s.syn()
    s.counts("client", [])
    s.counts("lb", [])
    result = correlate(s.records, clocks(), hosts=(*HOSTS, "edge"))
    text = terminal(result)
    assert "no drops counted on any host" not in text
    assert (
        "no drops counted by the hosts that reported; unknown on server, edge"
        " (see missing evidence)"
    ) in text
    healthy = Stream()
    healthy.syn()
    healthy.all_counted()
    assert "no drops counted on any host" in terminal(correlate(healthy.records, clocks()))


def test_a_host_without_netstat_is_unknown_in_the_kernel_counters():
    s = Stream()
    s.syn()
    s.all_counted()
    s.netstat("client", {"TCPSynRetrans": 0})
    lines = terminal(correlate(s.records, clocks(), hosts=HOSTS)).splitlines()
    (client,) = [line for line in lines if line.startswith("client ")]
    (lb,) = [line for line in lines if line.startswith("lb ")]
    assert [cell.strip() for cell in client.split("│")[1:]] == ["-", "-"]
    assert [cell.strip() for cell in lb.split("│")[1:]] == ["unknown (no netstat)"] * 2


def test_times_across_hosts_within_their_clock_errors_are_only_bounds():
    """0.1 ms clock errors on each host: a 0.080 ms span from client to lb is not
    measured, only bounded; a span on one host is."""
    s = Stream()
    s.syn(drop_on_lb=True)
    s.retrans("client", (CLIENT, 40000, VIP, 80), dt=150_000)
    s.all_counted(lb=[("NETFILTER_DROP", 12, "nf_hook_slow+0x9a", 1, 1)])
    result = correlate(s.records, clocks(100_000), hosts=HOSTS, tighten_clocks=False)
    (d,) = result.drops
    assert "dropped on lb by NETFILTER_DROP (nf_hook_slow), < 0.280 ms later;" in d.text
    assert "client retransmitted on this flow < 0.270 ms later (SYN_SENT)" in d.text
    text = terminal(result)
    assert "hop < 0.230 ms" in text  # client eth0 -> lb to-client
    assert "after NAT, hop 0.050 ms" in text  # both on lb
    (sure,) = correlate(s.records, clocks(), hosts=HOSTS).drops
    assert "(nf_hook_slow), 0.080 ms later;" in sure.text


def test_drop_events_of_a_host_without_counts_are_in_the_headline():
    s = Stream()
    s.syn(drop_on_lb=True)
    s.drop("server", (CLIENT, 40001, SERVER, 8080), ifname="eth0", dt=500_000)
    s.drop("server", (CLIENT, 40002, SERVER, 8080), ifname="eth0", dt=600_000)
    s.counts("client", [])
    s.counts("lb", [("NETFILTER_DROP", 12, "nf_hook_slow+0x9a", 1, 1)])
    summary = correlate(s.records, clocks(), hosts=HOSTS).summary()
    assert summary.text.startswith(
        "1 drops of the traced traffic: lb NETFILTER_DROP at nf_hook_slow x1; "
        "2 drop events on server, which sent no counts; "
    ), summary.text
    s.counts("server", [])
    counted = correlate(s.records, clocks(), hosts=HOSTS).summary()
    assert "which sent no counts" not in counted.text
