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
}


def load(name: str) -> tuple[list[dict], dict[str, ClockEstimate]]:
    recs = [json.loads(line) for line in (STREAMS / f"lab-{name}.ndjson").read_text().splitlines()]
    clocks = {
        r["host"]: ClockEstimate(r["offset_ns"], r["error_ns"])
        for r in recs
        if r["type"] == "clock"
    }
    return [r for r in recs if r["type"] != "clock"], clocks


def shifted(events, clocks, shifts: dict[str, int]):
    """Host h's monotonic clock reads ``shift`` more; its offset is ``shift`` less."""
    evs = []
    for e in events:
        e = dict(e)
        e["ts_ns"] += shifts[e["host"]]
        e.pop("ts", None)
        evs.append(e)
    est = {h: ClockEstimate(c.offset_ns - shifts[h], c.error_ns) for h, c in clocks.items()}
    return evs, est


def signature(result):
    out = []
    for f in result.flows:
        v = f.verdict
        out.append(
            (
                (v.origin_host, v.origin_kind, v.reason) if v else None,
                [(h.host, h.ifname, h.dir, h.flags, h.seq) for h in (v.path if v else [])],
                [(e.host, getattr(e, "ifname", getattr(e, "probe", None))) for e in f.events],
                sorted((m.kind, m.host) for m in f.nat),
            )
        )
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_reset_gives_one_flow_with_the_right_verdict(name):
    events, clocks = load(name)
    result = correlate(events, clocks)
    assert len(result.flows) == 1
    v = result.flows[0].verdict
    assert (v.origin_host, v.origin_kind, v.reason) == EXPECTED[name]
    assert v.path[-1].host == "client" and v.path[-1].dir == "ingress"
    assert not [w for w in result.warnings if w.kind == "causality"]


def test_recorded_nat_mapping_joins_client_and_server_tuples():
    events, clocks = load("rst-no-listener")
    [flow] = correlate(events, clocks).flows
    by_host = {e.host: e for e in flow.endpoints}
    assert by_host["client"].daddr == "198.18.3.1" and by_host["client"].dport == 8081
    assert by_host["server"].daddr == "198.18.2.10" and by_host["server"].saddr == "198.18.2.1"
    assert any(m.host == "lb" and "dnat" in m.kind for m in flow.nat)


def test_recorded_healthy_stream_has_no_reset_flow():
    events, clocks = load("healthy")
    assert correlate(events, clocks).flows == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("seed", range(5))
def test_clock_offsets_up_to_50ms_do_not_change_the_answer(name, seed):
    events, clocks = load(name)
    base = signature(correlate(events, clocks))
    rng = random.Random(seed)
    shifts = {h: rng.randint(-50_000_000, 50_000_000) for h in clocks}
    got = correlate(*shifted(events, clocks, shifts))
    assert signature(got) == base
    assert not [w for w in got.warnings if w.kind == "causality"]
