"""``ebpfdiag trace tcp-rst`` end to end in the lab: real sshd, real BPF, real nftables.

Each scenario must give exactly the flows it caused, with the right origin host, origin
kind and kernel reason; afterwards no TC filter and no BPF program of the tracer is left
on any host, also after the controller is SIGKILLed mid-trace; a clsact filter that was
there before survives untouched.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ebpfdiag.lab.scenarios import SCENARIOS, run_scenario
from ebpfdiag.lab.topology import Lab
from tests.bpfstate import load_core, load_tcp_rst, tcx_progs
from tests.conftest import require, require_root_tools

pytestmark = pytest.mark.root

tcp_rst = load_tcp_rst()
core_tc = load_core("tc")
PREFIX, BASE = "eblr", "198.18.88.0"
STATE_DIR = Path("/run/ebpfdiag/lab-trace-test")
HOSTS = "client,lb,server"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    require_root_tools("ip", "nft", "tc", "bpftool", "/usr/sbin/sshd")
    require(Path("/usr/lib/python3/dist-packages/bcc").is_dir(), "needs python3-bpfcc")
    inventory = tmp_path_factory.mktemp("trace") / "inventory.yaml"
    the_lab = Lab(state_dir=STATE_DIR, prefix=PREFIX, base=BASE, inventory_out=inventory)
    the_lab.down()
    try:
        yield the_lab.up()
    finally:
        the_lab.down()


def ns(lab, host: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", lab.host(host).netns, *argv],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def interfaces(lab, host: str) -> list[str]:
    links = json.loads(ns(lab, host, "ip", "-j", "link", "show"))
    return [link["ifname"] for link in links if link["ifname"] != "lo"]


def tc_state(lab) -> dict[tuple[str, str, str], str]:
    """Every filter on every interface of every lab host, as tc prints it."""
    out = {}
    for host in lab.hosts:
        for dev in interfaces(lab, host):
            for hook in ("ingress", "egress"):
                out[(host, dev, hook)] = ns(lab, host, "tc", "filter", "show", "dev", dev, hook)
    return out


def tracer_programs() -> list[str]:
    progs = json.loads(subprocess.run(
        ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
    ).stdout)  # fmt: skip
    return [p.get("name", "") for p in progs if p.get("name", "").startswith("ebd_")]


def start_trace(lab, port: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ebpfdiag", "trace", "tcp-rst", "-i", lab.inventory,
         "--hosts", HOSTS, "--port", str(port), "--json", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        rec = json.loads(line)
        if rec["type"] == "status" and rec["state"] == "tracing":
            assert sorted(rec["hosts"]) == ["client", "lb", "server"], rec
            return proc
    proc.kill()
    raise AssertionError(f"trace never became ready: {proc.stderr.read()}")


def finish(proc: subprocess.Popen) -> list[dict]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def attached(lab) -> dict[str, str]:
    """Per host, what is attached to its interfaces: tc and xdp as bpftool lists them, plus
    tcx links (which bpftool before 7.3 does not list)."""
    nr = core_tc.bpf_syscall_number()
    out = {}
    for host in lab.hosts:
        net = json.loads(ns(lab, host, "bpftool", "-j", "net", "show"))
        tcx = {dev: tcx_progs(lab.host(host).netns, dev, nr) for dev in interfaces(lab, host)}
        tcx = {dev: hooks for dev, hooks in tcx.items() if hooks["ingress"] or hooks["egress"]}
        if any(entry.get("tc") or entry.get("xdp") for entry in net) or tcx:
            out[host] = json.dumps({"net": net, "tcx": tcx})
    return out


def assert_clean(lab) -> None:
    deadline = time.monotonic() + 10
    while tracer_programs() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tracer_programs() == []
    leftover = {k: v for k, v in tc_state(lab).items() if v.strip()}
    assert leftover == {}
    assert attached(lab) == {}


@pytest.mark.parametrize("name", ["rst-no-listener", "rst-abort", "rst-lb-reject"])
def test_scenario_reset_is_traced_to_its_origin(lab, name, tmp_path):
    spec = SCENARIOS[name]
    document = tmp_path / "trace.json"
    proc = start_trace(
        lab, spec.port, "--count", "1", "--duration", "20s", "--output", str(document)
    )
    result = run_scenario(name, lab)
    assert result.reproduced, result.summary()
    recs = finish(proc)
    flows = [r for r in recs if r["type"] == "flow"]
    assert len(flows) == 1, [f["verdict"]["text"] for f in flows]
    verdict = flows[0]["verdict"]
    expected = spec.expected
    assert verdict["origin_host"] == expected.host
    assert verdict["origin_kind"] == expected.kind
    assert verdict["reason"] == expected.reason
    assert verdict["path"][-1]["host"] == "client"
    client = next(e for e in flows[0]["endpoints"] if e["host"] == "client")
    assert client["dport"] == spec.port and client["daddr"] == lab.vip
    hosts = {r["host"]: r for r in recs if r["type"] == "host"}
    assert all(h["status"] == "ok" and h["ready"] and h["lost"] == 0 for h in hosts.values())
    summary = recs[-1]
    assert summary["type"] == "summary"
    assert summary["duration_s"] < 15  # --count 1 ended it, not the 20 s --duration
    doc = json.loads(document.read_text())
    assert doc["type"] == "trace" and doc["summary"] == summary and doc["flows"] == flows
    assert doc["events"] == [r for r in recs if r["type"] == "event"]
    assert [h["host"] for h in doc["hosts"]] == ["client", "lb", "server"]
    assert summary["resets"] == [
        {"origin_host": expected.host, "origin_kind": expected.kind,
         "reason": expected.reason, "count": 1}
    ]  # fmt: skip
    assert_clean(lab)


@pytest.mark.parametrize("all_flows", [False, True])
def test_healthy_scenario_gives_no_reset_flow(lab, all_flows):
    extra = ["--all-flows"] if all_flows else []
    proc = start_trace(lab, SCENARIOS["healthy"].port, "--duration", "2s", *extra)
    result = run_scenario("healthy", lab)
    assert result.reproduced and result.error is None
    recs = finish(proc)
    assert [r for r in recs if r["type"] == "flow"] == []
    packets = [r for r in recs if r["type"] == "event" and r["kind"] == "packet"]
    if all_flows:  # the handshake was seen everywhere, and streamed
        assert {p["host"] for p in packets} == {"client", "lb", "server"}
        assert {p["why"] for p in packets} == {"handshake", "close"}
    else:  # kept in the kernel, since no reset came
        assert packets == []
    assert recs[-1]["resets"] == []
    assert_clean(lab)


def test_killed_controller_leaves_nothing_attached(lab):
    proc = start_trace(lab, 9)
    assert tracer_programs(), "the tracer's programs should be loaded while it runs"
    assert set(attached(lab)) == {"client", "lb", "server"}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_clean(lab)


def test_existing_clsact_filter_survives_a_trace(lab):
    dev = interfaces(lab, "client")[0]
    ns(lab, "client", "tc", "qdisc", "add", "dev", dev, "clsact")
    # A CNI's filter stand-in (u32 is the classifier this kernel has besides bpf).
    ns(lab, "client", "tc", "filter", "add", "dev", dev, "ingress", "prio", "7",
       "u32", "match", "u32", "0", "0")  # fmt: skip
    try:
        before = ns(lab, "client", "tc", "filter", "show", "dev", dev, "ingress")
        assert "u32" in before
        proc = start_trace(lab, SCENARIOS["rst-no-listener"].port, "--count", "1")
        run_scenario("rst-no-listener", lab)
        flows = [r for r in finish(proc) if r["type"] == "flow"]
        assert len(flows) == 1
        assert ns(lab, "client", "tc", "filter", "show", "dev", dev, "ingress") == before
        assert "clsact" in ns(lab, "client", "tc", "qdisc", "show", "dev", dev)
        assert tracer_programs() == []
    finally:
        ns(lab, "client", "tc", "qdisc", "del", "dev", dev, "clsact")


def test_ctrl_c_ends_the_trace_cleanly_with_its_result(lab):
    proc = start_trace(lab, SCENARIOS["rst-lb-reject"].port)
    run_scenario("rst-lb-reject", lab)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    recs = [json.loads(line) for line in out.splitlines()]
    assert recs[-1]["type"] == "summary" and recs[-1]["interrupted"] is True
    assert [r["verdict"]["origin_host"] for r in recs if r["type"] == "flow"] == ["lb"]
    assert "None" not in err
    assert_clean(lab)
