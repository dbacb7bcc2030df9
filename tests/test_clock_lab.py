"""Clocks you can trust, in the real lab: every lab host shares one kernel clock, so the
offsets applied to their events must agree within the reported bounds, and no sighting of
a packet may come before its departure from another host: not in the live event records
(their times nor their order), not in the flows' hops.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ebpfdiag.catalog import script_path
from ebpfdiag.cli.app import App, HostOptions
from ebpfdiag.fanout import Fanout
from ebpfdiag.lab.scenarios import SCENARIOS, run_scenario
from ebpfdiag.lab.topology import Lab
from ebpfdiag.tracing import TraceSession
from ebpfdiag.transport import Script
from tests.conftest import require, require_root_tools

pytestmark = pytest.mark.root

PREFIX, BASE = "ebc", "198.18.96.0"
STATE_DIR = Path("/run/ebpfdiag/lab-clock-test")
#: Beside the state, not under pytest's temporary base (rotated by other pytest runs as root).
INVENTORY = Path("/run/ebpfdiag/lab-clock-test.inventory.yaml")
HOSTS = "client,lb,server"


@pytest.fixture(scope="module")
def lab():
    require_root_tools("ip", "nft", "tc", "bpftool", "/usr/sbin/sshd")
    require(Path("/usr/lib/python3/dist-packages/bcc").is_dir(), "needs python3-bpfcc")
    the_lab = Lab(state_dir=STATE_DIR, prefix=PREFIX, base=BASE, inventory_out=INVENTORY)
    the_lab.down()
    try:
        yield the_lab.up()
    finally:
        the_lab.down()


def _trace(lab, name: str, document: Path) -> list[dict]:
    """A real ``trace tcp-rst --json`` run around one real scenario."""
    spec = SCENARIOS[name]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ebpfdiag", "trace", "tcp-rst", "-i", lab.inventory,
         "--hosts", HOSTS, "--port", str(spec.port), "--json", "--count", "1",
         "--duration", "20s", "--output", str(document)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        rec = json.loads(line)
        if rec["type"] == "status" and rec["state"] == "tracing":
            break
    result = run_scenario(name, lab)
    assert result.reproduced, result.summary()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def _fingerprint(rec: dict) -> tuple:
    return (rec["seq"], rec["ack"], rec["flags"], rec["len"], rec.get("ipid") or 0)


def _departures_first(sightings: list[dict]) -> list[str]:
    """Every arrival at one host that is shown before the same packet left another."""
    bad = []
    for arrival in sightings:
        for departure in sightings:
            if (
                arrival["dir"] == "ingress"
                and departure["dir"] == "egress"
                and arrival["host"] != departure["host"]
                and _fingerprint(arrival) == _fingerprint(departure)
                and arrival["ts"] < departure["ts"]
            ):
                bad.append(
                    f"{arrival['host']} got {arrival['flags']:#x} "
                    f"{(departure['ts'] - arrival['ts']) / 1e3:.1f} us before "
                    f"{departure['host']} sent it"
                )
    return bad


@pytest.mark.parametrize("name", ["rst-lb-reject", "rst-no-listener"])
def test_offsets_agree_across_hosts_and_no_hop_precedes_its_cause(lab, name, tmp_path):
    document = tmp_path / "trace.json"
    recs = _trace(lab, name, document)
    hosts = {r["host"]: r for r in recs if r["type"] == "host"}
    assert set(hosts) == {"client", "lb", "server"}
    assert all(h["clock"] for h in hosts.values())
    assert not [w for w in recs if w["type"] == "warning" and w["kind"] == "malformed"]
    flows = [r for r in recs if r["type"] == "flow"]
    assert len(flows) == 1 and flows[0]["verdict"]["origin_host"] == SCENARIOS[name].expected.host

    # live event records: each carries the bound used for it (the host's, if it does not)
    events = [r for r in recs if r["type"] == "event"]
    assert {e["host"] for e in events} >= {"client", "lb"}
    assert all(isinstance(e.get("ts"), int) for e in events)
    for e in events:
        e["bound"] = e.get("clock_error_ns", hosts[e["host"]]["clock"]["error_ns"])
    for a in events:
        for b in events:
            gap = abs((a["ts"] - a["ts_ns"]) - (b["ts"] - b["ts_ns"]))
            assert gap <= a["bound"] + b["bound"], (
                f"{a['host']} and {b['host']} applied offsets {gap / 1e3:.1f} us apart, "
                f"bounds {a['bound'] / 1e3:.1f} + {b['bound'] / 1e3:.1f} us"
            )
    packets = [e for e in events if e["kind"] == "packet"]
    assert _departures_first(packets) == []
    order = [e["ts"] for e in events]
    assert order == sorted(order), "live records out of time order"
    assert json.loads(document.read_text())["events"] == [
        {k: v for k, v in e.items() if k != "bound"} for e in events
    ]

    # the clocks the flows were built with
    clocks = {h: r["clock"] for h, r in hosts.items()}
    for a, ca in clocks.items():
        for b, cb in clocks.items():
            gap = abs(ca["offset_ns"] - cb["offset_ns"])
            assert gap <= ca["error_ns"] + cb["error_ns"], (a, ca, b, cb)
    hops = [e for e in flows[0]["events"] if e["kind"] == "hop"]
    assert {h["host"] for h in hops} >= {"client", "lb"}, flows[0]["events"]
    assert _departures_first(hops) == []
    for hop in hops:
        assert hop["ts"] - hop["ts_ns"] == clocks[hop["host"]]["offset_ns"]


def test_pings_go_on_through_the_trace_and_each_host_keeps_its_model(lab):
    app = App()
    app.options = HostOptions(hosts_expr=HOSTS, inventory=str(lab.inventory), fanout=8)
    hosts, opts = app.prepare_run()
    session = TraceSession([h.name for h in hosts], duration=4.0)
    sent: dict[str, list[int]] = {}
    keep = session.clock

    def clock(host, sample):
        sent.setdefault(host, []).append(sample.t_send_ns)
        keep(host, sample)

    session.clock = clock
    engine = Fanout(hosts, Script.from_path(script_path("tcp_rst"), ("--port", "9")), opts, session)
    session.fanout = engine
    asyncio.run(engine.run())
    result = session.finish(False)
    assert all(h.result is not None and h.result.ok for h in result.hosts.values())
    assert set(result.clocks) == {"client", "lb", "server"}
    for name, model in result.clocks.items():
        assert model["samples"] >= 9, model  # the start-up burst, then on through the trace
        assert model["samples"] == len(sent[name])
        assert sent[name][-1] - sent[name][0] >= 3_000_000_000, (name, sent[name])
        assert len(model["segments"]) == 1, model  # one kernel clock: no step
        # one kernel clock and the controller's monotonic clock: the offset is the anchor's
        summary = model["summary"]
        assert abs(summary["offset_ns"] - result.anchor.shift_ns) <= summary["error_ns"], name
