"""Correlation over streams recorded in the lab (real packets, real tracepoints).

The same streams with every host's clock shifted by up to +-50 ms (and the estimates
shifted with them, as SSH pings would measure) must give the same flows, order and verdicts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ebpfdiag.clock import ClockEstimate
from ebpfdiag.questions.rst import correlate

STREAMS = Path(__file__).parent / "fixtures" / "streams"
EXPECTED = {
    "rst-no-listener": ("server", "tcp-stack", "NO_SOCKET"),
    "rst-abort": ("server", "tcp-stack", "TCP_STATE"),
    "rst-lb-reject": ("lb", "firewall", None),
    "rst-lb-failover": ("server2", "tcp-stack", "TCP_FLAGS"),
    "rst-lb-failover-all-flows": ("server2", "tcp-stack", "TCP_FLAGS"),
    "rst-no-listener-portmap": ("server1", "tcp-stack", "NO_SOCKET"),
}
#: The recordings keep no ``host`` records; this is what they said about the probe.
PROBE_OK = {"attach": {"tcp_send_reset": {"kind": "tracepoint", "layout": "sockaddr"}}}
HELLOS = {h: PROBE_OK for h in ("client", "lb", "server", "server1", "server2")}


def load(name: str) -> tuple[list[dict], dict[str, ClockEstimate]]:
    recs = [json.loads(line) for line in (STREAMS / f"lab-{name}.ndjson").read_text().splitlines()]
    clocks = {
        r["host"]: ClockEstimate(r["offset_ns"], r["error_ns"])
        for r in recs
        if r["type"] == "clock"
    }
    return [r for r in recs if r["type"] != "clock"], clocks


def correlate_recorded(events, clocks):
    return correlate(events, clocks, hellos=HELLOS)


def shifted(events, clocks, shifts: dict[str, int]):
    """Host h's monotonic clock reads ``shift`` more; its offset is ``shift`` less."""
    evs = []
    for e in events:
        e = dict(e)
        if "ts_ns" in e:
            e["ts_ns"] += shifts[e["host"]]
            e.pop("ts", None)
        evs.append(e)
    est = {h: ClockEstimate(c.offset_ns - shifts[h], c.error_ns) for h, c in clocks.items()}
    return evs, est


def signature(result):
    """Verdicts, RST paths, every event's place and the NAT: what clocks must not change."""
    out = []
    for f in result.flows:
        v = f.verdict
        out.append(
            (
                (v.origin_host, v.origin_kind, v.reason) if v else None,
                [(h.host, h.ifname, h.dir, h.flags, h.seq) for h in (v.path if v else [])],
                [(e.host, getattr(e, "ifname", getattr(e, "probe", None))) for e in f.events],
                [(m.kind, m.host, m.before.tuple, m.after.tuple) for m in f.nat],
            )
        )
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_reset_gives_one_flow_with_the_right_verdict(name):
    events, clocks = load(name)
    result = correlate_recorded(events, clocks)
    assert len(result.flows) == 1
    v = result.flows[0].verdict
    assert (v.origin_host, v.origin_kind, v.reason) == EXPECTED[name]
    assert v.path[-1].host == "client" and v.path[-1].dir == "ingress"
    assert not [w for w in result.warnings if w.kind == "causality"]


def test_recorded_nat_mapping_joins_client_and_server_tuples():
    events, clocks = load("rst-no-listener")
    [flow] = correlate_recorded(events, clocks).flows
    by_host = {e.host: e for e in flow.endpoints}
    assert by_host["client"].daddr == "198.18.3.1" and by_host["client"].dport == 8081
    assert by_host["server"].daddr == "198.18.2.10" and by_host["server"].saddr == "198.18.2.1"
    # lb's three interfaces are one translating point: one mapping, whole tuples
    [nat] = flow.nat
    assert (nat.host, nat.kind, nat.from_host, nat.to_host) == (
        "lb",
        "dnat+snat",
        "client",
        "server",
    )
    assert nat.before.tuple == by_host["client"].tuple
    assert nat.after.tuple == by_host["server"].tuple


def test_recorded_healthy_stream_has_no_reset_flow():
    events, clocks = load("healthy")
    assert correlate_recorded(events, clocks).flows == []
    [flow] = correlate(events, clocks, include_all=True).flows
    assert flow.verdict is None and flow.paths and not flow.resets


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("seed", range(5))
def test_clock_offsets_up_to_50ms_do_not_change_the_answer(name, seed):
    events, clocks = load(name)
    base = signature(correlate_recorded(events, clocks))
    rng = random.Random(seed)
    shifts = {h: rng.randint(-50_000_000, 50_000_000) for h in clocks}
    got = correlate_recorded(*shifted(events, clocks, shifts))
    assert signature(got) == base
    assert not [w for w in got.warnings if w.kind == "causality"]


def test_recorded_port_rewriting_is_one_mapping_with_both_port_changes():
    """VIP 8085 -> backend 9085 with fully random masquerade (49625 -> 19184)."""
    events, clocks = load("rst-no-listener-portmap")
    [flow] = correlate(events, clocks).flows
    [nat] = flow.nat
    assert (nat.host, nat.kind, nat.from_host, nat.to_host) == (
        "lb",
        "dnat+snat",
        "client",
        "server1",
    )
    assert nat.before.tuple == ("198.18.121.10", 49625, "198.18.123.1", 8085)
    assert nat.after.tuple == ("198.18.122.1", 19184, "198.18.122.10", 9085)
    assert [e.host for e in flow.endpoints] == ["client", "lb", "lb", "server1"]


def test_recorded_listener_reset_is_tied_to_its_rst_not_a_flow_of_its_own():
    """server2's LISTEN socket reset, recorded by 6.18 as 0.0.0.0:8084 > 0.0.0.0:0."""
    events, clocks = load("rst-lb-failover")
    result = correlate(events, clocks)
    assert result.warnings == []
    [flow] = result.flows
    v = flow.verdict
    assert (v.origin_host, v.origin_kind, v.reason, v.state) == (
        "server2", "tcp-stack", "TCP_FLAGS", "TCP_LISTEN")  # fmt: skip
    assert not any(e.saddr == "0.0.0.0" for e in flow.endpoints)
    [sent] = [e for e in flow.resets if e.probe == "tcp_send_reset"]
    assert sent.packet == v.path[0].packet
    # server1 never saw the RST and this tracer kept its packets to itself: no move to show
    assert v.moved is None and "server1" not in {e.host for e in flow.endpoints}


def test_recorded_lb_failover_says_lb_moved_the_connection():
    events, clocks = load("rst-lb-failover-all-flows")
    [flow] = correlate(events, clocks).flows
    v = flow.verdict
    assert v.moved.to_json() == {"host": "lb", "from": "server1", "to": "server2"}
    assert v.text.startswith(
        "lb moved the connection from server1 (198.18.122.10:8084) to server2 "
        "(198.18.122.11:8084) mid-flow; server2's TCP stack reset it (reason TCP_FLAGS, "
        "state TCP_LISTEN), seen leaving server2 eth0 at +0.000 ms"
    )
    assert v.text.endswith("; accepted by the TCP stack of client")
    assert [(m.host, m.before.tuple, m.after.daddr, m.to_host) for m in flow.nat] == [
        ("lb", ("198.18.121.10", 41205, "198.18.123.1", 8084), "198.18.122.10", "server1"),
        ("lb", ("198.18.121.10", 41205, "198.18.123.1", 8084), "198.18.122.11", "server2"),
    ]
    hosts = [e.host for e in flow.endpoints]
    assert hosts.count("lb") == 3 and {"server1", "server2"} <= set(hosts)


def test_recorded_lb_failover_with_the_lb_untraced_still_shows_the_move():
    events, clocks = load("rst-lb-failover-all-flows")
    events = [e for e in events if e.get("host") != "lb"]
    [flow] = correlate(events, clocks).flows
    v = flow.verdict
    assert v.moved.to_json() == {"host": None, "from": "server1", "to": "server2"}
    assert v.text.startswith("an untraced host moved the connection from server1 ")
    assert [(m.host, m.from_host, m.to_host) for m in flow.nat] == [
        (None, "client", "server1"),
        (None, "client", "server2"),
    ]
