"""Correlation of recorded-style streams of the lab scenarios across DNAT+SNAT.

Fixtures are one NDJSON file per scenario under fixtures/streams/, every record tagged
with ``host``. Clock estimates come from ``{"type":"clock"}`` records when the stream has
them, else from each host's ``hello`` (its realtime and monotonic clocks read together).
"""

import json
import random
from pathlib import Path

import pytest

from bench.synth import events_per_flow, synth_clocks, synth_events
from ebpfdiag.clock import ClockEstimate
from ebpfdiag.questions.rst import correlate, summary
from ebpfdiag.trace.flows import Hop, ResetEvent
from ebpfdiag.trace.sightings import flag_names

STREAMS = Path(__file__).parent / "fixtures" / "streams"
HELLO_CLOCK_ERROR_NS = 1_000_000
MS = 1_000_000

CLIENT, LB_FRONT, LB_BACK, VIP, SERVER = (
    "198.18.1.2", "198.18.1.1", "198.18.2.1", "198.18.10.10", "198.18.2.2")  # fmt: skip


def load_stream(name: str) -> tuple[list[dict], dict[str, ClockEstimate]]:
    lines = (STREAMS / f"{name}.ndjson").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    clocks = {
        r["host"]: ClockEstimate(r["offset_ns"], r["error_ns"])
        for r in records
        if r["type"] == "clock"
    }
    for r in records:
        if r["type"] == "hello" and r["host"] not in clocks:
            clocks[r["host"]] = ClockEstimate(r["real_ns"] - r["mono_ns"], HELLO_CLOCK_ERROR_NS)
    return records, clocks


def hop_points(hops) -> list[tuple[str, str, str]]:
    return [(h.host, h.ifname, h.dir) for h in hops]


def assert_causal(flow):
    """Every packet's later points come no earlier than its earlier points."""
    seen: dict[int, int] = {}
    for ev in flow.events:
        if isinstance(ev, Hop):
            assert ev.ts >= seen.get(ev.packet, ev.ts), ev
            seen[ev.packet] = ev.ts


def test_no_listener_through_dnat_snat_is_one_flow_blamed_on_the_server_stack():
    records, clocks = load_stream("rst-no-listener")
    result = correlate(records, clocks)
    assert result.warnings == []
    [flow] = result.flows
    assert [(e.host, e.saddr, e.sport, e.daddr, e.dport) for e in flow.endpoints] == [
        ("client", CLIENT, 40000, VIP, 80),
        ("lb", CLIENT, 40000, VIP, 80),
        ("lb", LB_BACK, 40000, SERVER, 8080),
        ("server", LB_BACK, 40000, SERVER, 8080),
    ]
    [nat] = flow.nat
    assert nat.host == "lb" and nat.kind == "dnat+snat"
    assert (nat.before.daddr, nat.before.dport) == (VIP, 80)
    assert (nat.after.saddr, nat.after.daddr, nat.after.dport) == (LB_BACK, SERVER, 8080)

    v = flow.verdict
    assert (v.origin_host, v.origin_kind, v.reason, v.state) == (
        "server", "tcp-stack", "NO_SOCKET", None)  # fmt: skip
    assert hop_points(v.path) == [
        ("server", "eth0", "egress"),
        ("lb", "eth1", "ingress"),
        ("lb", "eth0", "egress"),
        ("client", "eth0", "ingress"),
    ]
    assert [h.nat for h in v.path] == [False, False, True, False]
    assert v.accepted_by == ["client"]
    assert 0 < v.origin_to_client_ns < 1 * MS
    assert v.text.startswith("RST sent by server (TCP stack, reason NO_SOCKET, state -), ")
    assert "leaving lb eth0 after NAT" in v.text and "reaching client eth0" in v.text

    # the SYN's journey comes first, the server's tcp_send_reset right before its RST
    kinds = [(type(e).__name__, e.host, flag_names(e.flags) if isinstance(e, Hop) else e.probe)
             for e in flow.events]  # fmt: skip
    assert kinds[0] == ("Hop", "client", "SYN")
    send = kinds.index(("ResetEvent", "server", "tcp_send_reset"))
    assert kinds[send + 1] == ("Hop", "server", "RST|ACK")
    assert kinds[-1] == ("ResetEvent", "client", "tcp_receive_reset")
    assert_causal(flow)


def test_abort_with_linger_zero_names_reason_and_state():
    records, clocks = load_stream("rst-abort")
    [flow] = correlate(records, clocks).flows
    v = flow.verdict
    assert (v.origin_host, v.origin_kind, v.reason, v.state) == (
        "server", "tcp-stack", "TCP_ABORT_ON_CLOSE", "TCP_CLOSE")  # fmt: skip
    assert [m.kind for m in flow.nat] == ["dnat+snat"]
    packets = {e.packet for e in flow.events if isinstance(e, Hop)}
    assert len(packets) == 6  # SYN, SYN-ACK, ACK, request, its ACK, RST
    assert all(len([e for e in flow.events if isinstance(e, Hop) and e.packet == p]) == 4
               for p in packets)  # fmt: skip
    assert_causal(flow)


def test_lb_reject_is_a_firewall_reset_on_the_lb():
    records, clocks = load_stream("rst-lb-reject")
    result = correlate(records, clocks)
    [flow] = result.flows
    v = flow.verdict
    assert (v.origin_host, v.origin_kind, v.reason) == ("lb", "firewall", None)
    assert hop_points(v.path) == [("lb", "eth0", "egress"), ("client", "eth0", "ingress")]
    assert "server" not in {e.host for e in flow.endpoints}
    assert flow.nat == []
    assert "firewall" in v.text
    assert summary(result.flows).to_json()["resets"] == [
        {"origin_host": "lb", "origin_kind": "firewall", "reason": None, "count": 1}
    ]


def test_healthy_stream_has_no_reset_flow_unless_asked():
    records, clocks = load_stream("healthy")
    assert correlate(records, clocks).flows == []
    [flow] = correlate(records, clocks, include_all=True).flows
    assert flow.verdict is None
    assert len(flow.endpoints) == 4


def test_missing_send_probe_cannot_blame_a_firewall():
    records, clocks = load_stream("rst-lb-reject")
    for r in records:
        if r["type"] == "hello" and r["host"] == "lb":
            r["missing"] = [{"probe": "tcp_send_reset", "why": "tracepoint not found"}]
    v = correlate(records, clocks).flows[0].verdict
    assert (v.origin_host, v.origin_kind) == ("lb", "unknown")


def test_rst_only_seen_arriving_has_unknown_origin():
    records, clocks = load_stream("rst-lb-reject")
    records = [r for r in records if r["host"] == "client"]
    v = correlate(records, clocks).flows[0].verdict
    assert (v.origin_host, v.origin_kind) == (None, "unknown")
    assert v.origin_to_client_ns is None
    assert v.text.startswith("RST from outside the traced hosts")


def test_send_reset_without_any_packet_still_gives_a_verdict():
    records, clocks = load_stream("rst-no-listener")
    records = [r for r in records if r["type"] == "reset" and r["host"] == "server"]
    [flow] = correlate(records, clocks).flows
    assert (flow.verdict.origin_host, flow.verdict.origin_kind) == ("server", "tcp-stack")
    assert flow.verdict.path == []
    assert isinstance(flow.events[0], ResetEvent)


def _shifted(name: str, seed: int, exact: bool):
    """The same stream as if each host's monotonic clock started up to +-50 ms apart,
    with SSH estimates that follow (exactly, or off by up to a realistic error)."""
    rng = random.Random(seed)
    records, clocks = load_stream(name)
    shift = {h: rng.randrange(-50 * MS, 50 * MS) for h in clocks}
    moved = []
    for r in records:
        r = dict(r)
        r.pop("ts", None)
        if "ts_ns" in r:
            r["ts_ns"] += shift[r["host"]]
        moved.append(r)
    new_clocks = {}
    for h, est in clocks.items():
        error = est.error_ns if exact else rng.randrange(300_000, 2 * MS)
        bias = 0 if exact else rng.randrange(-error // 2, error // 2)
        new_clocks[h] = ClockEstimate(est.offset_ns - shift[h] + bias, error)
    return moved, new_clocks


def _without_host_time(result) -> list[dict]:
    flows = [f.to_json() for f in result.flows]
    for f in flows:
        for ev in f["events"] + f["verdict"]["path"]:
            del ev["ts_ns"]
    return flows


def _shape(result):
    """What must not depend on clocks: flows, NAT, verdicts, each packet's path and each
    host's own order of events."""
    shape = []
    for f in result.flows:
        v = f.verdict
        per_host: dict[str, list] = {}
        for e in f.events:
            label = flag_names(e.flags) if isinstance(e, Hop) else e.probe
            per_host.setdefault(e.host, []).append((label, getattr(e, "dir", None)))
        paths: dict[int, list] = {}
        for e in f.events:
            if isinstance(e, Hop):
                paths.setdefault(e.packet, []).append((e.host, e.ifname, e.dir))
        shape.append((
            [e.to_json() for e in f.endpoints], [m.to_json() for m in f.nat],
            (v.origin_host, v.origin_kind, v.reason, v.state, hop_points(v.path), v.accepted_by),
            per_host, sorted(paths.values()),
        ))  # fmt: skip
    return shape


@pytest.mark.parametrize("name", ["rst-no-listener", "rst-abort", "rst-lb-reject"])
@pytest.mark.parametrize("seed", range(5))
def test_clock_offsets_between_hosts_change_nothing(name, seed):
    records, clocks = load_stream(name)
    base = correlate(records, clocks)

    moved, exact_clocks = _shifted(name, seed, exact=True)
    exact = correlate(moved, exact_clocks)
    assert _without_host_time(exact) == _without_host_time(base)

    moved, fuzzy_clocks = _shifted(name, seed, exact=False)
    fuzzy = correlate(moved, fuzzy_clocks)
    assert _shape(fuzzy) == _shape(base)
    assert [w for w in fuzzy.warnings if w.kind != "clock-uncertain"] == []
    for flow in fuzzy.flows:
        assert flow.warnings == []
        assert_causal(flow)


def test_tightening_shrinks_the_clock_bounds():
    records, clocks = load_stream("rst-abort")
    used = correlate(records, clocks).clocks
    assert used.consistent
    for host, est in clocks.items():
        assert used[host].error_ns < est.error_ns
    untouched = correlate(records, clocks, tighten_clocks=False).clocks
    assert dict(untouched) == clocks


def test_contradictory_clocks_produce_warnings_not_a_silent_timeline():
    records, clocks = load_stream("rst-no-listener")
    # claim the server's clock is known to +-20 us while it is really 5 ms off
    clocks["server"] = ClockEstimate(clocks["server"].offset_ns - 5 * MS, 20_000)
    clocks["lb"] = ClockEstimate(clocks["lb"].offset_ns, 20_000)
    result = correlate(records, clocks)
    assert not result.clocks.consistent
    assert [w.kind for w in result.warnings] == ["clock-inconsistent"]
    [flow] = result.flows
    assert flow.warnings and {w.kind for w in flow.warnings} == {"causality"}
    assert all(w.flow == flow.id and w.by_ns > 0 for w in flow.warnings)
    out = list(result.records())
    kinds = [r["type"] for r in out]
    assert kinds[0] == "warning" and kinds[-2:] == ["flow", "summary"]
    assert any(r.get("kind") == "causality" and r["flow"] == flow.id for r in out)
    # the verdict itself does not depend on clocks
    assert flow.verdict.origin_host == "server"


def test_host_without_clock_estimate_is_warned_about():
    records, clocks = load_stream("rst-lb-reject")
    del clocks["lb"]
    result = correlate(records, clocks)
    assert [w.kind for w in result.warnings] == ["clock-missing"]
    assert result.flows[0].verdict.origin_host == "lb"


def test_retransmission_of_the_same_fingerprint_is_a_separate_packet():
    records, clocks = load_stream("rst-abort")
    synack = [r for r in records if r.get("type") == "packet" and r["flags"] == 18]
    for r in synack:  # SYN-ACK retransmitted 1 s later: IP ID 0, same seq/ack
        again = dict(r, ts_ns=r["ts_ns"] + 1_000 * MS)
        again.pop("ts", None)
        records.append(again)
    [flow] = correlate(records, clocks).flows
    synack_packets = {e.packet for e in flow.events if isinstance(e, Hop) and e.flags == 18}
    assert len(synack_packets) == 2
    for p in synack_packets:
        assert len([e for e in flow.events if isinstance(e, Hop) and e.packet == p]) == 4
    assert_causal(flow)


def test_malformed_records_are_counted_not_fatal():
    records, clocks = load_stream("rst-no-listener")
    records.append({"type": "packet", "host": "client", "ts_ns": 1})
    records.append({"type": "packet", "host": "client", "dir": "sideways"})
    result = correlate(records, clocks)
    assert [w.kind for w in result.warnings] == ["malformed"]
    assert len(result.flows) == 1


def test_records_are_compact_json():
    records, clocks = load_stream("rst-no-listener")
    out = list(correlate(records, clocks).records())
    flow = next(r for r in out if r["type"] == "flow")
    assert set(flow) >= {"type", "id", "endpoints", "nat", "verdict", "events"}
    assert set(flow["verdict"]) >= {"origin_host", "origin_kind", "reason", "state", "path",
                                    "origin_to_client_ns", "text"}  # fmt: skip
    assert flow["events"][0]["rel_ms"] == 0.0
    assert flow["verdict"]["path"][0]["rel_ms"] == 0.0
    for rec in out:
        json.dumps(rec, separators=(",", ":"))


def test_synthetic_stream_at_scale_correlates_every_reset():
    n_flows = 100_000 // events_per_flow(3)
    result = correlate(synth_events(n_flows, 3, rst_every=10), synth_clocks(3))
    assert len(result.flows) == n_flows // 10
    assert result.warnings == []
    assert {(f.verdict.origin_host, f.verdict.origin_kind) for f in result.flows} == {
        ("server", "tcp-stack")
    }
    assert all(len(f.verdict.path) == 4 and len(f.endpoints) == 4 for f in result.flows)
    assert all(not f.warnings for f in result.flows)
    assert all(e.error_ns < 500_000 for e in result.clocks.values())


@pytest.mark.parametrize("hosts", [2, 5])
def test_synthetic_chains_of_other_lengths(hosts):
    result = correlate(synth_events(50, hosts, rst_every=5), synth_clocks(hosts))
    assert len(result.flows) == 10
    for flow in result.flows:
        assert len(flow.verdict.path) == 2 * (hosts - 1)
        assert len(flow.nat) == hosts - 2
        assert not flow.warnings
