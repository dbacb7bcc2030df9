"""``ebpfdiag trace tcp-rst`` end to end in the lab: real sshd, real BPF, real nftables.

Each scenario must give exactly the flows it caused, with the right origin host, origin
kind and kernel reason, with and without --all-flows; afterwards no TC filter and no BPF
program of the tracer is left on any host, also after the controller is SIGKILLed
mid-trace; a clsact filter that was there before survives untouched, also when the
tracer's own filters go into that clsact (--tc-mode clsact). A flow the LB moves to
another server mid-connection and a flow whose ports the LB rewrites are followed
through the LB.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ebpfdiag.lab.scenarios import SCENARIOS, run_scenario
from ebpfdiag.lab.topology import Lab
from tests.bpfstate import load_core, load_tcp_rst, tcx_progs
from tests.conftest import require, require_root_tools, running_lab

pytestmark = pytest.mark.root

tcp_rst = load_tcp_rst()
core_tc = load_core("tc")
PREFIX, BASE = "eblr", "198.18.88.0"
STATE_DIR = Path("/run/ebpfdiag/lab-trace-test")
HOSTS = "client,lb,server"
# The two-server lab for rst-lb-failover (never up at the same time as test_lab's eblm).
MULTI_PREFIX, MULTI_BASE = "eblm", "198.18.92.0"
MULTI_STATE_DIR = Path("/run/ebpfdiag/lab-trace-multi")
MULTI_HOSTS = "client,lb,server1,server2"
RESET_SCENARIOS = ["rst-no-listener", "rst-abort", "rst-lb-reject"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    yield from running_lab(
        tmp_path_factory,
        "trace",
        ("ip", "nft", "tc", "bpftool", "/usr/sbin/sshd"),
        state_dir=STATE_DIR,
        prefix=PREFIX,
        base=BASE,
    )


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    require_root_tools("ip", "nft", "tc", "conntrack", "/usr/sbin/sshd")
    require(Path("/usr/lib/python3/dist-packages/bcc").is_dir(), "needs python3-bpfcc")
    inventory = tmp_path_factory.mktemp("trace-multi") / "inventory.yaml"
    the_lab = Lab(state_dir=MULTI_STATE_DIR, prefix=MULTI_PREFIX, base=MULTI_BASE, servers=2,
                  inventory_out=inventory)  # fmt: skip
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


def tracer_programs(lab) -> list[str]:
    """Names of the tracer's BPF programs held by processes of this lab's hosts.

    Scoped to the lab's namespaces because other runs on the same kernel load the same
    programs. A program of ours outlives its process only when attached to an interface,
    which ``tc_state`` and ``attached`` check.
    """
    inodes = {os.stat(f"/run/netns/{h.netns}").st_ino for h in lab.hosts.values()}
    ids = set()
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or os.stat(proc / "ns" / "net").st_ino not in inodes:
                continue
            for info in (proc / "fdinfo").iterdir():
                ids.update(re.findall(r"^prog_id:\s+(\d+)", info.read_text(), re.M))
        except OSError:  # the process ended meanwhile
            continue
    progs = json.loads(subprocess.run(
        ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
    ).stdout)  # fmt: skip
    return [
        p["name"] for p in progs if p.get("name", "").startswith("ebd_") and str(p.get("id")) in ids
    ]


def start_trace(
    lab,
    port: int | None,
    *extra: str,
    hosts: str = HOSTS,
    status: bool = False,
    before: list | None = None,
    inventory: str | None = None,
    env: dict | None = None,
):
    """``trace tcp-rst`` on ``hosts``, returned once every host traces; ``port`` None: all.
    With ``status``, also the ``status`` record that said so; ``before`` gets the records
    that came before it. ``inventory`` (else the lab's) and ``env`` (added to this one's)
    run it as another user."""
    ports = ["--port", str(port)] if port is not None else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "ebpfdiag", "trace", "tcp-rst", "-i", inventory or lab.inventory,
         "--hosts", hosts, *ports, "--json", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        rec = json.loads(line)
        if before is not None:
            before.append(rec)
        if rec["type"] == "status" and rec["state"] == "tracing":
            assert sorted(rec["hosts"]) == sorted(hosts.split(",")), rec
            return (proc, rec) if status else proc
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


def programs_gone(lab) -> bool:
    """No process of the lab holds a tracer program any more (they end a moment after
    the controller does)."""
    deadline = time.monotonic() + 10
    while tracer_programs(lab) and time.monotonic() < deadline:
        time.sleep(0.2)
    return tracer_programs(lab) == []


def assert_clean(lab) -> None:
    assert programs_gone(lab)
    leftover = {k: v for k, v in tc_state(lab).items() if v.strip()}
    assert leftover == {}
    assert attached(lab) == {}


@pytest.mark.parametrize("all_flows", [False, True], ids=["default", "all-flows"])
@pytest.mark.parametrize("name", RESET_SCENARIOS)
def test_scenario_reset_is_traced_to_its_origin(lab, name, all_flows, tmp_path):
    spec = SCENARIOS[name]
    document = tmp_path / "trace.json"
    extra = ["--all-flows"] if all_flows else []
    proc = start_trace(
        lab, spec.port, "--count", "1", "--duration", "20s", "--output", str(document), *extra
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
    assert set(hosts) == {"client", "lb", "server"}
    assert all(h["status"] == "ok" and h["ready"] and h["lost"] == 0 for h in hosts.values())
    summary = recs[-1]
    assert summary["type"] == "summary"
    assert summary["duration_s"] < 15  # --count 1 ended it, not the 20 s --duration
    doc = json.loads(document.read_text())
    assert doc["type"] == "trace" and doc["summary"] == summary and doc["flows"] == flows
    events = [r for r in recs if r["type"] == "event"]
    assert {e["kind"] for e in events} >= {"packet", "reset"}
    assert doc["events"] == events
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
    live = [p for p in packets if p["why"] != "kept"]
    if all_flows:  # the handshake was seen everywhere, and streamed
        assert {p["host"] for p in live} == {"client", "lb", "server"}
        assert {p["why"] for p in live} == {"handshake", "close"}
    else:  # kept in the kernel, since no reset came; dumped only when the trace ended
        assert live == []
        assert {p["host"] for p in packets} == {"client", "lb", "server"}
    assert recs[-1]["resets"] == []
    assert_clean(lab)


def test_killed_controller_leaves_nothing_attached(lab):
    proc = start_trace(lab, 9)
    assert tracer_programs(lab), "the tracer's programs should be loaded while it runs"
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
        assert programs_gone(lab)
    finally:
        ns(lab, "client", "tc", "qdisc", "del", "dev", dev, "clsact")


def test_clsact_path_leaves_a_foreign_filter_alone(lab):
    """--tc-mode clsact on a tcx kernel: our filters share a clsact with a foreign one."""
    dev = "to-client"
    ns(lab, "lb", "tc", "qdisc", "add", "dev", dev, "clsact")
    ns(lab, "lb", "tc", "filter", "add", "dev", dev, "ingress", "prio", "7",
       "u32", "match", "u32", "0", "0")  # fmt: skip
    try:
        before = tc_state(lab)
        assert "u32" in before[("lb", dev, "ingress")]
        assert [k for k, v in before.items() if v.strip()] == [("lb", dev, "ingress")]
        proc = subprocess.Popen(
            [sys.executable, "-m", "ebpfdiag", "run-script", "tcp_rst", "-i", lab.inventory,
             "--hosts", "lb", "--json", "--", "--tc-mode", "clsact", "--duration", "3"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        records = []
        while not any(r.get("record", {}).get("type") == "ready" for r in records):
            line = proc.stdout.readline()
            assert line, f"tcp_rst never became ready: {proc.stderr.read()}"
            records.append(json.loads(line))
        hello = next(r["record"] for r in records if r["record"]["type"] == "hello")
        assert hello["attach"]["tc"]["kind"] == "tc-clsact", hello["attach"]
        during = tc_state(lab)
        # Our filters really are in clsact (the path under test), next to the foreign one.
        assert "ebd_tc_ingress" in during[("lb", dev, "ingress")]
        assert "u32" in during[("lb", dev, "ingress")]
        assert "ebd_tc_egress" in during[("lb", dev, "egress")]
        for other in set(interfaces(lab, "lb")) - {dev}:
            assert "ebd_tc_ingress" in during[("lb", other, "ingress")], other
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        ends = [json.loads(line)["record"] for line in out.splitlines() if '"record"' in line]
        assert ends[-1] == {"type": "bye", "reason": "duration"}
        # Ours are gone everywhere; the foreign filter and the clsact it lives in are intact;
        # the clsact qdiscs we created on the other interfaces are gone too.
        assert tc_state(lab) == before
        assert "clsact" in ns(lab, "lb", "tc", "qdisc", "show", "dev", dev)
        for other in set(interfaces(lab, "lb")) - {dev}:
            assert "clsact" not in ns(lab, "lb", "tc", "qdisc", "show", "dev", other), other
        assert programs_gone(lab)
    finally:
        ns(lab, "lb", "tc", "qdisc", "del", "dev", dev, "clsact")


@pytest.mark.parametrize("all_flows", [False, True], ids=["default", "all-flows"])
def test_failover_reset_is_traced_to_the_second_server(multi, all_flows):
    spec = SCENARIOS["rst-lb-failover"]
    extra = ["--all-flows"] if all_flows else []
    proc = start_trace(
        multi, spec.port, "--count", "1", "--duration", "20s", *extra, hosts=MULTI_HOSTS
    )
    result = run_scenario(spec.name, multi)
    assert result.reproduced, result.summary()
    recs = finish(proc)
    flows = [r for r in recs if r["type"] == "flow" and r.get("verdict")]
    assert len(flows) == 1, [f["verdict"]["text"] for f in flows]
    [flow] = flows
    verdict = flow["verdict"]
    assert verdict["origin_host"] == "server2"
    assert verdict["origin_kind"] == "tcp-stack"
    assert verdict["reason"] == spec.expected.reason
    assert verdict["moved"] == {"host": "lb", "from": "server1", "to": "server2"}
    assert verdict["path"][-1]["host"] == "client"
    lb_side = multi.hosts["lb"].interfaces["br-servers"].split("/")[0]
    tuples = {(e["host"], e["saddr"], e["sport"], e["daddr"], e["dport"])
              for e in flow["endpoints"]}  # fmt: skip
    assert ("client", result.client_address, result.client_port, multi.vip, spec.port) in tuples
    for server in ("server1", "server2"):
        address = multi.hosts[server].data_address
        assert (server, lb_side, result.client_port, address, spec.port) in tuples, server
    assert recs[-1]["resets"] == [
        {"origin_host": "server2", "origin_kind": "tcp-stack", "reason": spec.expected.reason,
         "count": 1}
    ]  # fmt: skip
    assert_clean(multi)


@pytest.mark.parametrize("all_flows", [False, True], ids=["default", "all-flows"])
@pytest.mark.parametrize("filtered", [True, False], ids=["port", "all-ports"])
def test_portmap_reset_is_traced_through_the_rewritten_ports(lab, filtered, all_flows):
    """With --port 8085 the tracer learns lb's 8085 -> 9085 DNAT from nftables and adds
    9085 to every host's filter before tracing starts; without --port nothing is filtered."""
    spec = SCENARIOS["rst-no-listener-portmap"]
    port = spec.port if filtered else None
    extra = ["--all-flows"] if all_flows else []
    proc, status = start_trace(lab, port, "--count", "1", "--duration", "20s", *extra, status=True)
    assert status["ports"] == ([spec.port, spec.backend_port] if filtered else [])
    assert status["unconfirmed"] == []
    result = run_scenario(spec.name, lab)
    assert result.reproduced, result.summary()
    [nat] = result.lb_conntrack
    recs = finish(proc)
    flows = [r for r in recs if r["type"] == "flow" and r.get("verdict")]
    assert len(flows) == 1, [f["verdict"]["text"] for f in flows]
    [flow] = flows
    verdict = flow["verdict"]
    assert (verdict["origin_host"], verdict["origin_kind"], verdict["reason"]) == (
        "server",
        "tcp-stack",
        "NO_SOCKET",
    )
    assert verdict["path"][-1]["host"] == "client"
    client = {"saddr": result.client_address, "sport": result.client_port,
              "daddr": lab.vip, "dport": spec.port}  # fmt: skip
    server_side = {"saddr": nat["reply"]["dst"], "sport": nat["reply"]["dport"],
                   "daddr": nat["reply"]["src"], "dport": spec.backend_port}  # fmt: skip
    assert server_side["sport"] != client["sport"]  # masquerade fully-random moved it
    # lb's NAT as the tracer saw it: the client's tuple before, the server-side one after.
    lb_nat = [(m["before"], m["after"]) for m in flow["nat"] if m["host"] == "lb"]
    assert (client, server_side) in lb_nat, flow["nat"]
    server = next(e for e in flow["endpoints"] if e["host"] == "server")
    assert (server["sport"], server["dport"]) == (server_side["sport"], spec.backend_port)
    hellos = {r["host"]: r for r in recs if r["type"] == "hello"}
    assert hellos["lb"]["nat_ports"] == [[spec.port, spec.backend_port]]
    assert hellos["server"]["nat_ports"] == hellos["client"]["nat_ports"] == []
    assert_clean(lab)


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


def test_each_host_says_when_it_is_ready(lab):
    """A status record per host as it becomes ready (--json), a line per host on a
    terminal, both before the run's `tracing`; each host's hello says where its time went."""
    before: list[dict] = []
    t0 = time.monotonic()
    proc = start_trace(lab, None, "--duration", "1s", before=before)
    waited = time.monotonic() - t0
    recs = finish(proc)
    ready = [r for r in before if r["type"] == "status" and r["state"] == "ready"]
    assert sorted(r["host"] for r in ready) == ["client", "lb", "server"], before
    assert before[-1]["state"] == "tracing"
    assert not [r for r in recs if r["type"] == "status"]
    for rec in ready:
        assert {k for k in rec if k != "v"} == {"type", "host", "state", "after_s"}
        # counted from the process start, which came after t0: never more than we waited
        assert 0 < rec["after_s"] <= waited + 0.05, (rec, waited)
    hellos = {r["host"]: r for r in recs if r["type"] == "hello"}
    assert sorted(hellos) == ["client", "lb", "server"]
    for host, hello in hellos.items():
        assert set(hello["setup"]) == {"process", "import", "discover", "compile", "attach", "cpu"}
        assert all(v >= 0 for v in hello["setup"].values()), (host, hello["setup"])
        assert hello["attach"]["tc"]["kind"] == "tcx-link"

    terminal = subprocess.run(
        [sys.executable, "-m", "ebpfdiag", "trace", "tcp-rst", "-i", lab.inventory,
         "--hosts", HOSTS, "--duration", "1s"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert terminal.returncode == 0, terminal.stderr
    lines = terminal.stderr.splitlines()
    said = {}
    for i, line in enumerate(lines):
        m = re.fullmatch(
            r"(client|lb|server) ready in \d+\.\d\d s \(tcx, (\d+) interfaces?, 2 probes\)", line
        )
        if m:
            said[m.group(1)] = (i, int(m.group(2)))
    assert sorted(said) == ["client", "lb", "server"], terminal.stderr
    for host, (_, count) in said.items():
        assert count == len(interfaces(lab, host))
    tracing_at = next(i for i, line in enumerate(lines) if line.startswith("tracing on 3 hosts"))
    assert all(i < tracing_at for i, _ in said.values()), terminal.stderr
    assert_clean(lab)


def test_a_trace_started_again_loads_each_hosts_kept_program(lab, tmp_path):
    """The first trace compiles on every host and leaves each host's compile with the
    controller; the same trace started again loads it (no compile), catches the same reset
    the same way and leaves nothing behind. With the store off, every host compiles."""
    store = tmp_path / "programs"
    spec = SCENARIOS["rst-no-listener"]
    seen = {}
    for run, where in (("compiled", str(store)), ("kept", str(store)), ("off", "off")):
        proc = start_trace(lab, spec.port, "--count", "1", "--duration", "20s",
                           env={"EBPFDIAG_PROGRAM_CACHE": where})  # fmt: skip
        assert run_scenario("rst-no-listener", lab).reproduced
        recs = finish(proc)
        hellos = {r["host"]: r for r in recs if r["type"] == "hello"}
        assert {h: r.get("program") for h, r in hellos.items()} == dict.fromkeys(
            ("client", "lb", "server"), "compiled" if run == "off" else run
        )
        assert not [r for r in recs if r["type"] == "program"]  # kept, never output
        seen[run] = [
            (f["verdict"]["origin_host"], f["verdict"]["reason"], len(f["verdict"]["path"]))
            for f in recs
            if f["type"] == "flow"
        ]
        assert_clean(lab)
        if run == "compiled":  # one entry per host, each under its own identity
            assert sorted(len(list(d.iterdir())) for d in store.iterdir()) == [1, 1, 1]
    assert seen["kept"] == seen["compiled"] == seen["off"]
    assert [s[:2] for s in seen["kept"]] == [(spec.expected.host, spec.expected.reason)]
