"""scripts/bpf/drop.py for real: the lab's drop scenarios traced on lb, server and client.

Each drop scenario must show its packets dying on the host and for the reason that
``DROP_EXPECTED`` names (Linux 6.18), and nowhere else; drops without a reason must show in
that host's netstat deltas; healthy traffic on the traced port must give no drop at all.
After every run the tool's programs are gone, whichever way it was stopped. IPv6, UDP and
the in-kernel address filter are checked in a namespace of their own (loopback only).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ebpfdiag.lab.scenarios import DROP_EXPECTED, SCENARIOS, _noroute_backend, run_scenario
from tests.conftest import require, require_root_tools, running_lab

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bpf" / "drop.py"
SYSTEM_PYTHON = "/usr/bin/python3"
PREFIX, BASE = "ebdk", "198.18.144.0"
STATE_DIR = Path("/run/ebpfdiag/lab-drop-test")
SYN, ACK, PSH = 0x02, 0x10, 0x08


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    yield from running_lab(
        tmp_path_factory,
        "drop",
        ("ip", "nft", "bpftool", "/usr/sbin/sshd"),
        state_dir=STATE_DIR,
        prefix=PREFIX,
        base=BASE,
    )


def held_programs(pid: int) -> dict[int, str]:
    """{id: name} of the BPF programs process ``pid`` holds (its fdinfo), named by bpftool."""
    ids = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            ids.update(int(i) for i in re.findall(r"^prog_id:\s+(\d+)", info.read_text(), re.M))
        except OSError:
            continue
    return {i: n for i, n in loaded_programs().items() if i in ids}


def loaded_programs() -> dict[int, str]:
    """{id: name} of every BPF program loaded in the kernel."""
    progs = json.loads(
        subprocess.run(
            ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
        ).stdout
    )
    return {p["id"]: p.get("name", "") for p in progs}


class Tracer:
    """drop.py running inside one lab host's namespace, started and waited on until ready."""

    def __init__(self, lab, host: str, *args: str) -> None:
        argv = ["ip", "netns", "exec", lab.hosts[host].netns, SYSTEM_PYTHON, str(SCRIPT), *args]
        self.host = host
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        self.records: list[dict] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.records.append(json.loads(line))
            if self.records[-1]["type"] == "ready":
                self.programs = held_programs(self.proc.pid)
                return
        self.proc.kill()
        raise AssertionError(f"drop.py on {host} never became ready: {self.proc.stderr.read()}")

    @property
    def hello(self) -> dict:
        return self.records[0]

    def stop(self, sig: int | None = signal.SIGTERM) -> list[dict]:
        if sig is not None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        self.records += [json.loads(line) for line in out.splitlines()]
        assert self.records[-1]["type"] == "bye", self.records[-1]
        gone = set(self.programs) - set(loaded_programs())
        assert gone == set(self.programs)  # nothing of it outlives it
        return self.records

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["type"] == kind]

    def final(self, kind: str) -> dict:
        finals = [r for r in self.of(kind) if r["final"]]
        assert len(finals) == 1, self.records
        return finals[0]


def trace(lab, name: str, hosts=("client", "lb", "server")) -> tuple:
    """Run scenario ``name`` with drop.py on ``hosts`` filtered on its port."""
    port = SCENARIOS[name].port
    tracers = {host: Tracer(lab, host, "--port", str(port)) for host in hosts}
    result = run_scenario(name, lab)
    time.sleep(1.2)  # one periodic report after the last drop
    for tracer in tracers.values():
        tracer.stop()
    return result, tracers


@pytest.mark.parametrize("name", sorted(DROP_EXPECTED))
def test_drop_scenario_dies_where_and_why_expected(lab, name):
    spec, expected = SCENARIOS[name], DROP_EXPECTED[name]
    result, tracers = trace(lab, name)
    assert result.reproduced, result.summary()
    origin = tracers[expected.host]
    hello = origin.hello
    assert hello["reasons"]["source"] == "format" and hello["reasons"]["count"] > 100
    assert hello["filter"] == {"ports": [spec.port], "addrs": []}
    assert set(hello["attach"]) == {"kfree_skb", "tcp_retransmit_skb", "tcp_retransmit_synack",
                                    "tc"}  # fmt: skip
    assert hello["history"] == 8 and set(hello["attach"]["tc"]["interfaces"]) >= {"mgmt0"}
    # the kernel's symbols were read while setting up, not at the first drop
    assert hello["symbols"] > 1000, hello
    client = str(lab.hosts["client"].data_address)
    if expected.reason:
        drops = [d for d in origin.of("drop") if d["reason"] == expected.reason]
        assert drops, origin.records
        for d in drops:
            assert d["saddr"] == client and d["dport"] == spec.port, d
            assert d["location"] and "+0x" in d["location"]
        counted = [c for c in origin.final("drop_counts")["counts"]
                   if c["reason"] == expected.reason]  # fmt: skip
        assert sum(c["matched"] for c in counted) >= len(drops)
        for other, tracer in tracers.items():
            if other != expected.host:
                assert [d for d in tracer.of("drop") if d["reason"] == expected.reason] == []
    else:  # no packet freed with a reason on that host: only its counters say so
        assert [d for d in origin.of("drop") if d["flags"] == SYN] == []
    delta = origin.final("netstat")["delta"]
    for counter in expected.counters:
        assert delta[counter] > 0, delta
    if expected.client_retrans:
        syns = [r for r in tracers["client"].of("retrans")
                if r["state"] == "TCP_SYN_SENT" and r["dport"] == spec.port]  # fmt: skip
        assert syns and all(r["saddr"] == client for r in syns)
        assert tracers["client"].final("netstat")["delta"]["TCPSynRetrans"] >= len(syns)


def test_firewall_drops_are_the_clients_syns(lab):
    result, tracers = trace(lab, "drop-lb-firewall", hosts=("lb",))
    drops = tracers["lb"].of("drop")
    assert len(drops) >= 2  # the SYN and its retransmissions, one record each
    assert {(d["flags"], d["sport"], d["ifname"]) for d in drops} == {
        (SYN, result.client_port, "to-client")
    }
    assert len({d["ipid"] for d in drops}) == len(drops)
    # its own drops make lb send the history of the flow: the SYNs entering to-client
    history = tracers["lb"].of("packet")
    assert {(p["why"], p["dir"], p["ifname"], p["flags"]) for p in history} == {
        ("history", "ingress", "to-client", SYN)
    }
    assert {(p["seq"], p["ipid"]) for p in history} >= {(d["seq"], d["ipid"]) for d in drops}
    summary = tracers["lb"].of("history")
    assert len(summary) == 1 and summary[0]["flows"] == 1 and summary[0]["packets"] == len(history)


def test_noroute_names_the_unroutable_backend(lab):
    _result, tracers = trace(lab, "drop-lb-noroute", hosts=("lb",))
    drops = tracers["lb"].of("drop")
    assert drops and {d["daddr"] for d in drops} == {_noroute_backend(lab)}
    assert {d["location"].split("+")[0] for d in drops} == {"ip_error"}


def test_invalid_segment_is_the_only_drop_and_the_connection_goes_on(lab):
    result, tracers = trace(lab, "drop-lb-invalid")
    assert result.error is None and result.received.startswith("ok ")
    drops = [d for d in tracers["lb"].of("drop") if d["dport"] == 8093]
    assert len(drops) == 1 and drops[0]["flags"] == PSH | ACK and drops[0]["len"] == 1
    assert tracers["server"].of("drop") == [] and tracers["client"].of("drop") == []


def test_healthy_traffic_gives_no_drop(lab):
    result, tracers = trace(lab, "healthy")
    assert result.reproduced, result.summary()
    for tracer in tracers.values():
        assert tracer.of("drop") == [], tracer.records
        assert tracer.of("packet") == []  # no drop, no window: no history sent
        assert tracer.of("history")[0]["windows"] == 0
        assert all(c["matched"] == 0 for c in tracer.final("drop_counts")["counts"])
        assert tracer.final("drop_counts")["suppressed"] == 0


def test_rate_limit_counts_what_it_suppresses(lab):
    tracer = Tracer(lab, "lb", "--port", "8090", "--rate", "0")
    assert tracer.hello["rate"] == {"events_per_s": 0, "burst": 0}
    result = run_scenario("drop-lb-firewall", lab)
    tracer.stop()
    assert result.reproduced
    assert tracer.of("drop") == []
    counted = sum(c["matched"] for c in tracer.final("drop_counts")["counts"])
    assert counted >= 2 and tracer.final("drop_counts")["suppressed"] == counted


def test_count_stops_after_n_drops(lab):
    tracer = Tracer(lab, "lb", "--port", "8090", "--count", "1")
    run_scenario("drop-lb-firewall", lab)
    records = tracer.stop(sig=None)
    assert records[-1]["reason"] == "count"
    assert len(tracer.of("drop")) == 1


@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "duration"])
def test_every_stop_detaches(lab, how):
    args = ["--duration", "1"] if how == "duration" else []
    tracer = Tracer(lab, "server", *args)
    names = set(tracer.programs.values())
    assert {"ebd_kfree_skb", "ebd_tcp_retransmit_skb", "ebd_tcp_retransmit_synack"} <= names
    sig = None if how == "duration" else getattr(signal, how)
    records = tracer.stop(sig)
    assert records[-1]["reason"] == ("duration" if how == "duration" else "signal")
    assert tracer.final("drop_counts") and tracer.final("netstat")


@pytest.fixture
def v6_host():
    """A namespace of its own dropping UDP to ports 9 and 10 and TCP to port 7 on output."""
    require_root_tools("ip", "nft", "bpftool")
    require(Path("/usr/lib/python3/dist-packages/bcc").is_dir(), "needs python3-bpfcc")
    name = f"{PREFIX}-v6"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        rules = ("add table inet ebdk_drop { chain out { type filter hook output priority 0; "
                 "udp dport { 9, 10 } drop; tcp dport 7 drop; }; }")  # fmt: skip
        subprocess.run(["ip", "netns", "exec", name, "nft", rules], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


SEND_V6 = """
import socket
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for port in (9, 10, 10):
    try:
        u.sendto(b"hello", ("::1", port))
    except PermissionError:  # the local drop is reported to the sender
        pass
t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
t.settimeout(0.3)
try:
    t.connect(("::1", 7))
except OSError:
    pass
"""


def test_ipv6_udp_and_tcp_drops_filtered_in_the_kernel(v6_host):
    class Host:  # Tracer only needs the namespace of a host
        hosts = {"v6": type("H", (), {"netns": v6_host})()}

    tracer = Tracer(Host, "v6", "--port", "9,7", "--addr", "::1")
    subprocess.run(["ip", "netns", "exec", v6_host, SYSTEM_PYTHON, "-c", SEND_V6], check=True)
    time.sleep(0.5)
    tracer.stop()
    drops = tracer.of("drop")
    assert {(d["family"], d["proto"], d["saddr"], d["daddr"], d["dport"]) for d in drops} == {
        (6, 17, "::1", "::1", 9),
        (6, 6, "::1", "::1", 7),
    }
    for d in drops:
        assert d["reason"] == "NETFILTER_DROP" and d["ipid"] == 0
        if d["proto"] == 17:
            assert d["len"] == 5 and d["flags"] is None and d["seq"] is None
        else:
            assert d["flags"] == SYN and d["seq"] is not None
    # port 10 is dropped too: counted, but not matched and never sent
    [counted] = [c for c in tracer.final("drop_counts")["counts"]
                 if c["reason"] == "NETFILTER_DROP"]  # fmt: skip
    assert counted["count"] - counted["matched"] == 2
    assert counted["matched"] == len(drops)
