"""Correlation across hosts and NAT: recorded lab streams, and lab-shaped synthetic ones for
what the lab cannot show on demand (segmentation offload, port reuse, tracer versions).

Recorded fixtures are one NDJSON file per scenario under fixtures/streams/, every record
tagged with ``host``; clock estimates come from their ``{"type":"clock"}`` records.
"""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from bench.synth import (
    LAB_CLIENT,
    LAB_LB,
    LAB_SERVERS,
    LAB_VIP,
    LabStream,
    events_per_flow,
    lb_failover,
    synth_clocks,
    synth_events,
)
from ebpfdiag.clock import ClockEstimate
from ebpfdiag.questions.rst import correlate
from ebpfdiag.render.timeline import nat_line, render_result
from ebpfdiag.trace.flows import Hop, ResetEvent
from ebpfdiag.trace.sightings import flag_names

STREAMS = Path(__file__).parent / "fixtures" / "streams"
MS = 1_000_000
CLIENT, VIP, LB_BACK, SERVER = "198.18.1.10", "198.18.3.1", "198.18.2.1", "198.18.2.10"
#: what a host's hello says when tcp_send_reset is attached (6.18 layout)
PROBE_OK = {"attach": {"tcp_send_reset": {"kind": "tracepoint", "layout": "sockaddr"}}}


def load_stream(name: str) -> tuple[list[dict], dict[str, ClockEstimate]]:
    lines = (STREAMS / f"{name}.ndjson").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    clocks = {
        r["host"]: ClockEstimate(r["offset_ns"], r["error_ns"])
        for r in records
        if r["type"] == "clock"
    }
    return records, clocks


def hop_points(hops) -> list[tuple[str, str, str]]:
    return [(h.host, h.ifname, h.dir) for h in hops]


def tuples(endpoints) -> list[tuple]:
    return [(e.host, e.saddr, e.sport, e.daddr, e.dport) for e in endpoints]


def assert_causal(flow):
    """Every packet's later points come no earlier than its earlier points."""
    seen: dict[int, int] = {}
    for ev in flow.events:
        if isinstance(ev, Hop):
            assert ev.ts >= seen.get(ev.packet, ev.ts), ev
            seen[ev.packet] = ev.ts


# ---------------------------------------------------------------- recorded lab streams


def test_no_listener_through_dnat_snat_is_one_flow_blamed_on_the_server_stack():
    records, clocks = load_stream("lab-rst-no-listener")
    result = correlate(records, clocks)
    assert result.warnings == []
    [flow] = result.flows
    # the bridge device's half-translated view of the RST is in the events, not a tuple
    assert tuples(flow.endpoints) == [
        ("client", CLIENT, 47337, VIP, 8081),
        ("lb", CLIENT, 47337, VIP, 8081),
        ("lb", LB_BACK, 47337, SERVER, 8081),
        ("server", LB_BACK, 47337, SERVER, 8081),
    ]
    [nat] = flow.nat
    assert (nat.host, nat.from_host, nat.to_host) == ("lb", "client", "server")
    assert nat.kind == "dnat+snat"  # masquerade: the lb's address towards the server
    assert nat.before.tuple == (CLIENT, 47337, VIP, 8081)
    assert nat.after.tuple == (LB_BACK, 47337, SERVER, 8081)
    assert flow.isn == (3844565477, None)

    v = flow.verdict
    assert (v.origin_host, v.origin_kind, v.reason, v.state) == (
        "server", "tcp-stack", "NO_SOCKET", None)  # fmt: skip
    assert hop_points(v.path) == [
        ("server", "eth0", "egress"),
        ("lb", "to-server", "ingress"),
        ("lb", "br-servers", "ingress"),
        ("lb", "to-client", "egress"),
        ("client", "eth0", "ingress"),
    ]
    assert [h.nat for h in v.path] == [False, False, True, True, False]
    assert v.accepted_by == ["client"]
    assert 0 < v.origin_to_client_ns < 1 * MS
    assert v.moved is None
    assert v.text.startswith("RST sent by server (TCP stack, reason NO_SOCKET, state -), ")
    assert "leaving lb to-client after NAT" in v.text and "reaching client eth0" in v.text

    # the SYN's journey comes first, the server's tcp_send_reset right before its RST
    kinds = [(type(e).__name__, e.host, flag_names(e.flags) if isinstance(e, Hop) else e.probe)
             for e in flow.events]  # fmt: skip
    assert kinds[0] == ("Hop", "client", "SYN")
    send = kinds.index(("ResetEvent", "server", "tcp_send_reset"))
    assert kinds[send + 1] == ("Hop", "server", "RST|ACK")
    assert kinds[-1] == ("ResetEvent", "client", "tcp_receive_reset")
    [sent] = [e for e in flow.events if isinstance(e, ResetEvent) and e.host == "server"]
    assert sent.packet == v.path[0].packet
    assert_causal(flow)


def test_abort_with_linger_zero_names_the_reason_the_kernel_gives():
    records, clocks = load_stream("lab-rst-abort")
    [flow] = correlate(records, clocks).flows
    v = flow.verdict
    # Linux 6.18 reports TCP_STATE for an abort on close, not TCP_ABORT_ON_CLOSE
    assert (v.origin_host, v.origin_kind, v.reason, v.state) == (
        "server", "tcp-stack", "TCP_STATE", "TCP_CLOSE")  # fmt: skip
    assert [(m.host, m.kind) for m in flow.nat] == [("lb", "dnat+snat")]
    packets = {e.packet: [] for e in flow.events if isinstance(e, Hop)}
    for e in flow.events:
        if isinstance(e, Hop):
            packets[e.packet].append(e)
    names = [flag_names(hops[0].flags) for hops in packets.values()]
    assert names == ["SYN", "SYN|ACK", "ACK", "PSH|ACK", "ACK", "RST|ACK"]
    assert all(hops[0].host in ("client", "server") for hops in packets.values())
    assert flow.isn == (3706782880, 2434841943)
    assert_causal(flow)


def test_lb_reject_is_a_firewall_reset_only_when_lb_could_see_stack_resets():
    records, clocks = load_stream("lab-rst-lb-reject")
    result = correlate(records, clocks, hellos={"lb": PROBE_OK})
    [flow] = result.flows
    v = flow.verdict
    assert (v.origin_host, v.origin_kind, v.reason) == ("lb", "firewall", None)
    assert hop_points(v.path) == [("lb", "to-client", "egress"), ("client", "eth0", "ingress")]
    assert "server" not in {e.host for e in flow.endpoints}
    assert flow.nat == []
    assert "firewall" in v.text
    assert result.summary().to_json()["resets"] == [
        {"origin_host": "lb", "origin_kind": "firewall", "reason": None, "count": 1}
    ]
    # without a hello nothing says lb's tcp_send_reset worked: no firewall blamed
    v = correlate(records, clocks).flows[0].verdict
    assert (v.origin_host, v.origin_kind) == ("lb", "unknown")
    assert "cannot tell stack from firewall" in v.text


def test_the_clis_own_host_records_say_which_probes_worked():
    """A saved ``--json`` output replays: its ``host`` records carry ``attach``."""
    records, clocks = load_stream("lab-rst-lb-reject")
    host = {"type": "host", "host": "lb", "status": "ok", "missing": [], **PROBE_OK}
    v = correlate([*records, host], clocks).flows[0].verdict
    assert (v.origin_host, v.origin_kind) == ("lb", "firewall")


def test_missing_send_probe_cannot_blame_a_firewall():
    records, clocks = load_stream("lab-rst-lb-reject")
    missing = {"missing": [{"probe": "tcp_send_reset", "why": "tracepoint not found"}]}
    records.insert(0, {"type": "hello", "host": "lb", **missing})
    v = correlate(records, clocks).flows[0].verdict
    assert (v.origin_host, v.origin_kind) == ("lb", "unknown")
    assert "no tcp_send_reset probe on lb" in v.text


def test_healthy_stream_has_no_reset_flow_unless_asked():
    records, clocks = load_stream("lab-healthy")
    assert correlate(records, clocks).flows == []
    [flow] = correlate(records, clocks, include_all=True).flows
    assert flow.verdict is None
    assert [e.host for e in flow.endpoints] == ["client", "lb", "lb", "server"]
    assert flow.isn == (2354567722, 2598029163)


def test_rst_only_seen_arriving_has_unknown_origin():
    records, clocks = load_stream("lab-rst-lb-reject")
    records = [r for r in records if r["host"] == "client"]
    v = correlate(records, clocks, hellos={"lb": PROBE_OK}).flows[0].verdict
    assert (v.origin_host, v.origin_kind) == (None, "unknown")
    assert v.origin_to_client_ns is None
    assert v.text.startswith("RST from outside the traced hosts")


def test_send_reset_without_any_packet_still_gives_a_verdict():
    records, clocks = load_stream("lab-rst-no-listener")
    records = [r for r in records if r["type"] == "reset" and r["host"] == "server"]
    [flow] = correlate(records, clocks).flows
    assert (flow.verdict.origin_host, flow.verdict.origin_kind) == ("server", "tcp-stack")
    assert flow.verdict.path == []
    assert isinstance(flow.events[0], ResetEvent)


def test_nat_is_one_line_per_translating_host():
    """lb sees each packet on to-client, br-servers and to-server: one translating point."""
    records, clocks = load_stream("lab-rst-abort")
    [flow] = correlate(records, clocks).flows
    assert [nat_line(m) for m in flow.nat] == [
        f"  client {CLIENT}:57181 > {VIP}:8082  =>  lb {LB_BACK}:57181 > {SERVER}:8082"
    ]


def test_untraced_translator_is_named_as_such():
    records, clocks = load_stream("lab-rst-no-listener")
    records = [r for r in records if r.get("host") != "lb"]
    [flow] = correlate(records, clocks).flows
    [nat] = flow.nat
    assert (nat.host, nat.from_host, nat.to_host) == (None, "client", "server")
    assert nat.kind == "dnat+snat"
    assert nat.to_json()["between"] == ["client", "server"]
    line = nat_line(nat)
    assert line.startswith(f"  client {CLIENT}:47337 > {VIP}:8081  =>  server {LB_BACK}:47337")
    assert "the host translating them is not traced" in line


# ---------------------------------------------------------------- clocks


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
            [e.to_json() for e in f.endpoints],
            [{**m.to_json(), "first_ts": None} for m in f.nat],
            (v.origin_host, v.origin_kind, v.reason, v.state, hop_points(v.path), v.accepted_by),
            per_host, sorted(paths.values()),
        ))  # fmt: skip
    return shape


@pytest.mark.parametrize(
    "name", ["lab-rst-no-listener", "lab-rst-abort", "lab-rst-lb-failover-all-flows"]
)
@pytest.mark.parametrize("seed", range(3))
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
    """The lab's hosts share one clock, so SSH estimates that are off by a realistic error
    leave room that the packets' causality takes away."""
    records, clocks = _shifted("lab-rst-abort", 1, exact=False)
    used = correlate(records, clocks).clocks
    assert used.consistent
    for host, est in clocks.items():
        assert used[host].error_ns <= est.error_ns
        assert est.low - 1 <= used[host].low and used[host].high <= est.high + 1  # midpoints
    assert sum(e.error_ns for e in used.values()) < 0.8 * sum(e.error_ns for e in clocks.values())
    untouched = correlate(records, clocks, tighten_clocks=False).clocks
    assert dict(untouched) == clocks


def test_every_event_carries_the_clock_bound_applied_to_its_host():
    records, clocks = _shifted("lab-rst-abort", 1, exact=False)
    result = correlate(records, clocks)
    [flow] = result.flows
    rec = flow.to_json()
    assert {e["host"] for e in rec["events"]} == {"client", "lb", "server"}
    for ev in rec["events"] + rec["verdict"]["path"]:
        assert ev["err_ns"] == result.clocks[ev["host"]].error_ns
    assert any(result.clocks[h].error_ns != clocks[h].error_ns for h in clocks)


def test_records_without_aligned_ts_are_kept():
    """A record that arrived before its host's first clock estimate has ``ts: null``."""
    records, clocks = load_stream("lab-rst-no-listener")
    base = correlate(records, clocks).flows[0].to_json()
    for r in records:
        if "ts_ns" in r:
            r["ts"] = None
    result = correlate(records, clocks)
    assert result.warnings == []
    assert result.flows[0].to_json() == base


def test_malformed_records_are_counted_not_fatal():
    records, clocks = load_stream("lab-rst-no-listener")
    records.append({"type": "packet", "host": "client", "ts_ns": 1})
    records.append({"type": "packet", "host": "client", "dir": "sideways"})
    records.append({"type": "reset", "host": "server", "ts_ns": 1, "probe": "tcp_nothing"})
    result = correlate(records, clocks)
    assert [(w.kind, w.message) for w in result.warnings] == [
        ("malformed", "3 records lacked required fields")
    ]
    assert len(result.flows) == 1


def test_contradictory_clocks_produce_warnings_not_a_silent_timeline():
    records, clocks = load_stream("lab-rst-no-listener")
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
    records, clocks = load_stream("lab-rst-lb-reject")
    del clocks["lb"]
    result = correlate(records, clocks)
    assert [w.kind for w in result.warnings] == ["clock-missing"]
    assert result.flows[0].verdict.origin_host == "lb"


# ---------------------------------------------------------------- matching


def test_retransmission_of_the_same_fingerprint_is_a_separate_packet():
    records, clocks = load_stream("lab-rst-abort")
    synack = [r for r in records if r.get("type") == "packet" and r["flags"] == 18]
    for r in synack:  # SYN-ACK retransmitted 1 s later: IP ID 0, same seq/ack
        again = dict(r, ts_ns=r["ts_ns"] + 1_000 * MS)
        again.pop("ts", None)
        records.append(again)
    [flow] = correlate(records, clocks).flows
    synack_packets = {e.packet for e in flow.events if isinstance(e, Hop) and e.flags == 18}
    assert len(synack_packets) == 2
    for p in synack_packets:
        assert len([e for e in flow.events if isinstance(e, Hop) and e.packet == p]) == 5
    assert_causal(flow)


def _handshake(lab: LabStream, server: str, c_isn: int, s_isn: int) -> None:
    lab.forward(server, 2, c_isn, 0, ipid=100, why="handshake")
    lab.reply(server, 18, s_isn, c_isn + 1, why="handshake")
    lab.forward(server, 16, c_isn + 1, s_isn + 1, ipid=101)


def test_one_gso_packet_and_its_45_segments_are_one_packet_in_one_flow():
    """TSO/GSO: 65,160 bytes leave the client as one packet and reach the server as 45
    segments of 1,448; a RST from the server then ends the flow."""
    lab = LabStream(hosts=("client", "lb", "server1"))
    c_isn, s_isn = 4_294_900_000, 1_000  # the client's bytes wrap past 2**32
    _handshake(lab, "server1", c_isn, s_isn)
    lab.forward("server1", 24, c_isn + 1, s_isn + 1, 65_160, ipid=102, pieces=45)
    lab.reply("server1", 20, s_isn + 1, c_isn + 1 + 65_160, ipid=900, why="rst")
    lab.reset("server1", "tcp_send_reset", lab.backend_tuple("server1")[2:] + lab.backend_tuple(
        "server1")[:2], state="TCP_CLOSE", reason="TCP_STATE")  # fmt: skip
    result = correlate(lab.records, lab.clocks(), hellos={"server1": PROBE_OK})
    assert result.warnings == []
    [flow] = result.flows
    assert [e.host for e in flow.endpoints] == ["client", "lb", "lb", "server1"]
    data = [e for e in flow.events if isinstance(e, Hop) and e.len]
    assert len({e.packet for e in data}) == 1
    by_point: dict[tuple, list[int]] = {}
    for e in data:
        by_point.setdefault((e.host, e.ifname, e.dir), []).append(e.len)
    assert by_point == {
        ("client", "eth0", "egress"): [65_160],
        ("lb", "to-client", "ingress"): [65_160],
        ("lb", "br-servers", "egress"): [1_448] * 45,
        ("lb", "to-server1", "egress"): [1_448] * 45,
        ("server1", "eth0", "ingress"): [1_448] * 45,
    }
    # every segment's hop is measured from the point that carried its bytes before
    assert all(e.hop_ns is not None and 0 <= e.hop_ns < MS for e in data[1:])
    assert not flow.warnings
    assert (flow.verdict.origin_host, flow.verdict.origin_kind) == ("server1", "tcp-stack")
    assert len(flow.paths) == 5  # SYN, SYN-ACK, ACK, the data, the RST


def test_segments_of_other_bytes_are_not_matched():
    """Same ack and flags but disjoint sequence ranges: different packets."""
    lab = LabStream(hosts=("client", "lb", "server1"))
    _handshake(lab, "server1", 5_000, 9_000)
    lab.forward("server1", 24, 5_001, 9_001, 1_448, ipid=102)
    lab.forward("server1", 24, 5_001 + 1_448, 9_001, 1_448, ipid=103)
    [flow] = correlate(lab.records, lab.clocks(), include_all=True).flows
    data = [p for p in flow.paths if p[0].len]
    assert len(data) == 2
    assert [len(p) for p in data] == [5, 5]


def test_retransmitted_bytes_are_a_second_packet_however_they_are_cut():
    lab = LabStream(hosts=("client", "lb", "server1"))
    _handshake(lab, "server1", 5_000, 9_000)
    lab.forward("server1", 24, 5_001, 9_001, 2_896, ipid=102)
    lab.wait(200 * MS)  # no ACK came: the same bytes again, cut in two after lb this time
    lab.forward("server1", 24, 5_001, 9_001, 2_896, ipid=103, pieces=2)
    [flow] = correlate(lab.records, lab.clocks(), include_all=True).flows
    data = [p for p in flow.paths if p[0].len]
    assert [[h.len for h in p] for p in data] == [
        [2_896] * 5,
        [2_896, 2_896, 1_448, 1_448, 1_448, 1_448, 1_448, 1_448],
    ]
    assert not flow.warnings


def _lost_then_resent(ipid_after_lb: int = 0) -> list[list[tuple[str, int]]]:
    """Data lost on lb after its ingress, resent 200 ms later and seen through to the server,
    whose clock estimate is 0.3 ms behind (within its bound): aligned, the server's sighting
    of the second copy lands before the client sent that copy. The data packets' points
    and IP IDs; ``ipid_after_lb`` makes lb rewrite IP IDs (added to them past its ingress)."""
    lab = LabStream(hosts=("client", "lb", "server1"))
    _handshake(lab, "server1", 5_000, 9_000)
    lab.forward("server1", 24, 5_001, 9_001, 12, ipid=102)
    del lab.records[-3:]  # lb dropped it: seen leaving the client and entering lb only
    lab.wait(200 * MS)
    lab.forward("server1", 24, 5_001, 9_001, 12, ipid=103)
    for r in lab.records[-3:]:
        r["ipid"] += ipid_after_lb
    clocks = lab.clocks()
    clocks["server1"] = ClockEstimate(clocks["server1"].offset_ns - 300_000, 330_000)
    [flow] = correlate(lab.records, clocks, include_all=True).flows
    return [[(h.host, h.ipid) for h in p] for p in flow.paths if p[0].len]


def test_a_copy_lost_early_keeps_its_hops_when_the_next_one_arrives_within_clock_error():
    assert _lost_then_resent() == [
        [("client", 102), ("lb", 102)],
        [("client", 103), ("lb", 103), ("lb", 103), ("lb", 103), ("server1", 103)],
    ]


def test_ip_ids_rewritten_on_the_way_leave_the_copies_to_aligned_time():
    """IP IDs that do not say which copy is which are not used: the copies are cut by time
    as before (here that puts the server's sighting with the first copy, which the clocks
    cannot rule out), never split into pieces that start nowhere."""
    paths = _lost_then_resent(ipid_after_lb=1_000)
    assert len(paths) == 2 and sum(len(p) for p in paths) == 7
    assert [p[0] for p in paths] == [("client", 102), ("client", 103)]


def test_reused_source_port_with_a_new_isn_is_a_new_flow():
    lab = LabStream(hosts=("client", "lb", "server1"))
    _handshake(lab, "server1", 1_111_111, 2_222_222)
    lab.forward("server1", 17, 1_111_112, 2_222_223, ipid=102, why="close")
    lab.reply("server1", 17, 2_222_223, 1_111_113, why="close")
    lab.wait(3_000 * MS)  # seconds later the same 4-tuple connects again
    lab.forward("server1", 2, 3_333_333, 0, ipid=200, why="handshake")
    lab.reply("server1", 20, 0, 3_333_334, why="rst")
    lab.reset("server1", "tcp_send_reset", ("0.0.0.0", 8081, "0.0.0.0", 0), reason="NO_SOCKET")
    result = correlate(lab.records, lab.clocks(), include_all=True)
    assert [f.isn for f in result.flows] == [(1_111_111, 2_222_222), (3_333_333, None)]
    old, new = result.flows
    assert old.verdict is None
    assert {flag_names(p[0].flags) for p in old.paths} == {"SYN", "SYN|ACK", "ACK", "FIN|ACK"}
    assert [flag_names(p[0].flags) for p in new.paths] == ["SYN", "RST|ACK"]
    assert (new.verdict.origin_host, new.verdict.reason) == ("server1", "NO_SOCKET")
    assert [f.id for f in correlate(lab.records, lab.clocks()).flows] == [1]


# ---------------------------------------------------------------- resets and their RST


def test_listener_reset_as_618_records_it_joins_its_flow():
    """A LISTEN socket's reset is recorded as 0.0.0.0:PORT > 0.0.0.0:0: it must be tied to
    the RST leaving that host, not make a flow of its own or leave the RST to a firewall."""
    lab = lb_failover(kept=False)
    result = correlate(lab.records, lab.clocks(), hellos={"server2": PROBE_OK})
    [flow] = result.flows
    v = flow.verdict
    assert (v.origin_host, v.origin_kind, v.reason, v.state) == (
        "server2", "tcp-stack", "TCP_FLAGS", "TCP_LISTEN")  # fmt: skip
    [sent] = [e for e in flow.resets if e.probe == "tcp_send_reset"]
    assert sent.packet == v.path[0].packet
    assert not any(e.saddr == "0.0.0.0" for e in flow.endpoints)


def test_version_2_reset_records_are_tied_by_tuple_and_seq():
    """Version 2 gives the RST's seq and the packet's own addresses (or none): the record
    is tied to the RST with that seq even when another RST of the same connection left
    closer in time."""
    lab = lb_failover(kept=False)
    rst = next(r for r in lab.records if r["host"] == "server2" and r.get("flags") == 4)
    reset = next(r for r in lab.records if r.get("probe") == "tcp_send_reset")
    reset.update(seq=rst["seq"], ack=None, tuple_from="skb", sk_kind="listener")
    reset.update({k: rst[k] for k in ("saddr", "sport", "daddr", "dport")})
    decoy = dict(rst, ts_ns=reset["ts_ns"] + 1_000, seq=rst["seq"] + 7_000, ipid=77)
    lab.records.append(decoy)
    for addresses in ({}, {"saddr": None, "daddr": None, "sport": None, "dport": None}):
        reset.update(addresses)
        [flow] = correlate(lab.records, lab.clocks(), hellos={"server2": PROBE_OK}).flows
        [sent] = [e for e in flow.resets if e.probe == "tcp_send_reset"]
        assert flow.paths[sent.packet][0].seq == rst["seq"]
        [rec] = [e for e in flow.to_json()["events"] if e.get("probe") == "tcp_send_reset"]
        assert (rec["seq"], rec["tuple_from"], rec["sk_kind"]) == (rst["seq"], "skb", "listener")
        assert rec["packet"] == sent.packet
        assert not any(e.saddr in ("0.0.0.0", None) for e in flow.endpoints)


def test_a_reset_without_addresses_or_rst_makes_no_flow():
    lab = LabStream(hosts=("server1",))
    lab.reset("server1", "tcp_send_reset", ("0.0.0.0", 8081, "0.0.0.0", 0), reason="TCP_FLAGS")
    lab.reset("server1", "tcp_send_reset", (None, 0, None, 0), seq=5, tuple_from=None)
    result = correlate(lab.records, lab.clocks())
    assert result.flows == []
    assert [w.kind for w in result.warnings] == ["reset-unplaced"]


# ---------------------------------------------------------------- load balancers


def test_lb_failover_says_the_lb_moved_the_connection():
    lab = lb_failover()
    result = correlate(lab.records, lab.clocks(), hellos={"server2": PROBE_OK})
    [flow] = result.flows
    v = flow.verdict
    assert v.moved.to_json() == {"host": "lb", "from": "server1", "to": "server2"}
    assert v.text.startswith(
        "lb moved the connection from server1 (198.18.2.10:8081) to server2 "
        "(198.18.2.11:8081) mid-flow; server2's TCP stack reset it (reason TCP_FLAGS, "
        "state TCP_LISTEN), seen leaving server2 eth0"
    )
    hosts = [e.host for e in flow.endpoints]
    assert "server1" in hosts and "server2" in hosts  # the kept packets joined
    assert [(m.host, m.to_host) for m in flow.nat] == [("lb", "server1"), ("lb", "server2")]
    assert flow.to_json()["verdict"]["moved"] == {"host": "lb", "from": "server1", "to": "server2"}


def test_moved_names_an_untraced_backend_by_address_and_follows_port_changes():
    lab = lb_failover(hosts=("client", "lb", "server2"), mport_after=1_500, cport=40_000,
                      vport=80, bport=8080)  # fmt: skip
    [flow] = correlate(lab.records, lab.clocks()).flows
    v = flow.verdict
    assert v.moved.to_json() == {"host": "lb", "from": "198.18.2.10:8080", "to": "server2"}
    assert [m.after.sport for m in flow.nat] == [40_000, 1_500]  # below the server port


def test_port_rewriting_nat_is_one_flow_with_both_ports_in_one_mapping():
    lab = LabStream(hosts=("client", "lb", "server1"), cport=40_000, vport=80, bport=8080,
                    mport=51_234)  # fmt: skip
    lab.forward("server1", 2, 77_000, 0, ipid=300, why="handshake")
    lab.reply("server1", 20, 0, 77_001, why="rst")
    lab.reset("server1", "tcp_send_reset", (LAB_SERVERS["server1"], 8080, LAB_LB, 51_234),
              reason="NO_SOCKET")  # fmt: skip
    [flow] = correlate(lab.records, lab.clocks()).flows
    [nat] = flow.nat
    assert (nat.host, nat.kind) == ("lb", "dnat+snat")
    assert nat.before.tuple == (LAB_CLIENT, 40_000, LAB_VIP, 80)
    assert nat.after.tuple == (LAB_LB, 51_234, LAB_SERVERS["server1"], 8080)
    assert nat_line(nat) == (
        f"  client {LAB_CLIENT}:40000 > {LAB_VIP}:80  =>  lb {LAB_LB}:51234 > "
        f"{LAB_SERVERS['server1']}:8080"
    )


# ---------------------------------------------------------------- output


def test_records_are_compact_json_built_from_the_same_objects():
    records, clocks = load_stream("lab-rst-no-listener")
    result = correlate(records, clocks)
    out = list(result.records())
    assert [r["type"] for r in out] == ["flow", "summary"]
    flow = out[0]
    assert set(flow) == {"type", "id", "isn", "endpoints", "nat", "verdict", "events", "warnings"}
    assert set(flow["verdict"]) == {"origin_host", "origin_kind", "reason", "state", "path",
                                    "origin_to_client_ns", "accepted_by", "moved",
                                    "text"}  # fmt: skip
    assert flow["events"][0]["rel_ms"] == 0.0
    assert flow["verdict"]["path"][0]["rel_ms"] == 0.0
    assert flow["isn"] == {"initiator": 3844565477, "responder": None}
    for rec in out:
        assert json.loads(json.dumps(rec, separators=(",", ":"))) == rec
    assert out[-1] == result.summary().to_json() == {
        "type": "summary",
        "resets": [{"origin_host": "server", "origin_kind": "tcp-stack",
                    "reason": "NO_SOCKET", "count": 1}],
        "flows": 1,
    }  # fmt: skip


def test_terminal_view_reads_the_result_objects():
    records, clocks = load_stream("lab-rst-no-listener-portmap")
    result = SimpleNamespace(correlation=correlate(records, clocks))  # what the view reads
    out, err = Console(record=True, width=250), Console(record=True, width=250)
    render_result(result, out, err)
    text = out.export_text()
    nat = (
        "client 198.18.121.10:49625 > 198.18.123.1:8085  =>  "
        "lb 198.18.122.1:19184 > 198.18.122.10:9085"
    )
    assert text.count("  =>  ") == 1 and nat in text
    assert "resets by origin" in text and "NO_SOCKET" in text


# ---------------------------------------------------------------- scale


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
