"""scripts/bpf/tcp_latency.py on the real kernel: three namespaces, real TCP traffic.

client -> lb (a router) -> server, with lb's veth toward the server cutting 64 KiB GSO
packets into MSS-sized ones (a small gso_max_size), so the same bytes travel in packets cut
differently on each side of lb. The tool runs in each namespace like tcp_rst's tests run
tcp_rst (the system python, directly or through the remote bootstrap); the checks: every
packet with --sample 1, the same chosen points at both ends of each link with --sample 8,
tcp_probe/retrans/recv records for a flow with a dropped packet, the filter, and nothing
left attached or loaded after stdin EOF and after SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from ebpfdiag.transport import Script
from tests.bpfstate import load_core, tcx_progs
from tests.conftest import require

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bpf" / "tcp_latency.py"
BOOTSTRAP = ROOT / "src" / "ebpfdiag" / "remote" / "bootstrap.py"
SYSTEM_PYTHON = "/usr/bin/python3"
CLIENT_IP, LB_C_IP = "198.18.128.1", "198.18.128.2"
LB_S_IP, SERVER_IP = "198.18.128.5", "198.18.128.6"


def sh(*cmd, check=True, **kwargs):
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60, **kwargs)


class LatencyLab:
    """The namespaces and veths; `down` removes everything `up` made."""

    def __init__(self, small_gso: int = 4000):
        tag = uuid.uuid4().hex[:4]
        self.ns = {h: f"eblx-{tag}-{h[0]}" for h in ("client", "lb", "server")}
        self.dev = {
            "client": f"eblx-{tag}-c0",  # in client, toward lb
            "lb_c": f"eblx-{tag}-l1",  # in lb, toward client
            "lb_s": f"eblx-{tag}-l2",  # in lb, toward server (small gso_max_size)
            "server": f"eblx-{tag}-s0",  # in server, toward lb
        }
        self.small_gso = small_gso

    def up(self) -> LatencyLab:
        ns, dev = self.ns, self.dev
        for name in ns.values():
            sh("ip", "netns", "add", name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "link", "add", dev["client"], "netns", ns["client"], "type", "veth",
           "peer", "name", dev["lb_c"], "netns", ns["lb"])  # fmt: skip
        sh("ip", "link", "add", dev["lb_s"], "netns", ns["lb"], "type", "veth",
           "peer", "name", dev["server"], "netns", ns["server"])  # fmt: skip
        for host, key, addr in (
            ("client", "client", CLIENT_IP + "/30"),
            ("lb", "lb_c", LB_C_IP + "/30"),
            ("lb", "lb_s", LB_S_IP + "/30"),
            ("server", "server", SERVER_IP + "/30"),
        ):
            sh("ip", "-n", ns[host], "addr", "add", addr, "dev", dev[key])
            sh("ip", "-n", ns[host], "link", "set", dev[key], "up")
        sh("ip", "-n", ns["lb"], "link", "set", "dev", dev["lb_s"], "gso_max_size",
           str(self.small_gso))  # fmt: skip
        sh("ip", "-n", ns["client"], "route", "add", "default", "via", LB_C_IP)
        sh("ip", "-n", ns["server"], "route", "add", "default", "via", LB_S_IP)
        sh("ip", "netns", "exec", ns["lb"], "sysctl", "-qw", "net.ipv4.ip_forward=1")
        return self

    def down(self) -> None:
        for name in self.ns.values():
            sh("ip", "netns", "del", name, check=False)

    def exec(self, host: str, *argv, **kwargs):
        return sh("ip", "netns", "exec", self.ns[host], *argv, **kwargs)

    def popen(self, host: str, *argv, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns[host], *argv], **kwargs)


SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("listening", flush=True)
for _ in range(int(sys.argv[3])):
    c, _ = s.accept()
    got = 0
    while True:
        want = c.recv(4)
        if not want:
            break
        n = int.from_bytes(want, "big")      # request: 4 bytes size, then that many bytes
        body = b""
        while len(body) < n:
            chunk = c.recv(min(1 << 20, n - len(body)))
            if not chunk:
                break
            body += chunk
        got += len(body)
        c.sendall(b"r" * int(sys.argv[4]))   # response
    c.close()
    print(got, flush=True)
"""

CLIENT = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
size, reqs, resp = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
for _ in range(reqs):
    s.sendall(size.to_bytes(4, "big") + b"q" * size)
    got = 0
    while got < resp:
        got += len(s.recv(65536))
    time.sleep(float(sys.argv[6]))
s.shutdown(socket.SHUT_WR)
s.recv(1)
s.close()
print("done", flush=True)
"""


def exchange(lab: LatencyLab, port: int, size: int, reqs: int = 1, resp: int = 100,
             pause: float = 0.0) -> int:  # fmt: skip
    """One connection client -> server: `reqs` requests of `size` bytes, each answered
    with `resp` bytes. Returns the bytes the server received."""
    server = lab.popen("server", SYSTEM_PYTHON, "-c", SERVER, SERVER_IP, str(port), "1",
                       str(resp), stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout.readline().strip() == "listening"
        out = lab.exec("client", SYSTEM_PYTHON, "-c", CLIENT, SERVER_IP, str(port), str(size),
                       str(reqs), str(resp), str(pause)).stdout  # fmt: skip
        assert out.strip() == "done", out
        return int(server.stdout.readline())
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=10)


class Run:
    """tcp_latency in one namespace; records are read as they come."""

    def __init__(self, lab: LatencyLab, host: str, *args, bootstrap: bool = False):
        head = [SYSTEM_PYTHON, "-c", BOOTSTRAP.read_text()] if bootstrap else [SYSTEM_PYTHON]
        tail = [] if bootstrap else [str(SCRIPT)]
        self.host = host
        self.proc = lab.popen(
            host, *head, *tail, *args,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.PIPE if bootstrap else subprocess.DEVNULL,
        )  # fmt: skip
        if bootstrap:
            self.proc.stdin.write(Script.from_path(SCRIPT).frame())
            self.proc.stdin.flush()
        self.records: list[dict] = []
        self._buf = b""
        self.prog_ids: set[int] = set()

    def read_until(self, predicate, deadline_s: float):
        end = time.monotonic() + deadline_s
        while True:
            for record in self.records:
                if predicate(record):
                    return record
            if time.monotonic() > end:
                return None
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    return None
                self._buf += chunk
                *lines, self._buf = self._buf.split(b"\n")
                self.records.extend(json.loads(line) for line in lines if line)

    def finish(self, deadline_s: float = 30):
        if self.proc.stdin:
            self.proc.stdin.close()
            self.proc.stdin = None
        out, err = self.proc.communicate(timeout=deadline_s)
        self.records.extend(json.loads(line) for line in (self._buf + out).splitlines() if line)
        self._buf = b""
        return self.proc.returncode, err.decode()

    def stop(self, sig) -> tuple[int, str]:
        self.proc.send_signal(sig)
        return self.finish()

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["type"] == kind]


def prog_ids_of(pid: int) -> set[int]:
    """IDs of the BPF programs a process holds (prog and link fds), from fdinfo."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        ids.update(int(m) for m in re.findall(r"^prog_id:\s+(\d+)", text, re.M))
    return ids


def start(lab: LatencyLab, host: str, *args, bootstrap: bool = False) -> Run:
    run = Run(lab, host, *args, bootstrap=bootstrap)
    if not run.read_until(lambda r: r["type"] in ("ready", "bye"), 90) or not run.of("ready"):
        code, err = run.finish()
        raise AssertionError(f"{host}: no ready ({code}): {err[-2000:]}")
    run.prog_ids = prog_ids_of(run.proc.pid)
    return run


# ------------------------------------------------------------------ helpers

BPF_NR = load_core("tc").bpf_syscall_number()


def latency_module():
    """The tool as a module, for its pure Python mirror of the sampling rule."""
    import importlib.util
    import sys

    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("tcp_latency_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tcp_latency = latency_module()


@pytest.fixture(scope="module")
def lab():
    require(os.geteuid() == 0, "needs root")
    require(os.path.exists(SYSTEM_PYTHON), "needs the system python3")
    require(shutil.which("nft") is not None, "needs nft")
    require(shutil.which("bpftool") is not None, "needs bpftool")
    proc = subprocess.run([SYSTEM_PYTHON, "-c", "import bcc, pyroute2"], capture_output=True)
    require(proc.returncode == 0, "needs python3-bpfcc and python3-pyroute2")
    the_lab = LatencyLab()
    try:
        yield the_lab.up()
    finally:
        the_lab.down()


LIVE_RUNS: list[Run] = []


@pytest.fixture(autouse=True)
def _stop_runs():
    """A failed test must not leave a run behind, attached and holding its programs."""
    yield
    while LIVE_RUNS:
        proc = LIVE_RUNS.pop().proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def run_on(lab, host, *args, bootstrap=False) -> Run:
    run = start(lab, host, *args, bootstrap=bootstrap)
    LIVE_RUNS.append(run)
    return run


def stop_all(runs: dict) -> None:
    for host, run in runs.items():
        code, err = run.stop(signal.SIGTERM)
        assert code == 0, (host, err)
        assert run.records[-1] == {"type": "bye", "reason": "signal"}, run.records[-3:]


def flow_packets(run: Run, port: int, ifname: str, direction: str) -> list[dict]:
    return [
        p
        for p in run.of("packet")
        if port in (p["sport"], p["dport"]) and p["ifname"] == ifname and p["dir"] == direction
    ]


def to_server(packets, port):
    return [p for p in packets if p["dport"] == port]


def from_server(packets, port):
    return [p for p in packets if p["sport"] == port]


def points(packets, key="pt"):
    return {p[key] for p in packets if p[key] is not None}


def pure_acks(packets) -> list[int]:
    """The ack numbers of the pure ACKs kept (no payload, no SYN/FIN/RST)."""
    return [p["ack"] for p in packets if p["len"] == 0 and p["flags"] & 0x17 == 0x10]


def assert_same_acks(runs, here: list[int], there: list[int]) -> None:
    """The same pure ACKs kept at both ends of a path, whatever order they passed in: the
    rule looks at the ack alone. Only records lost to a full buffer may be missing."""
    from collections import Counter

    lost = sum(run.of("counts")[-1]["lost"] for run in runs)
    a, b = Counter(here), Counter(there)
    only_a, only_b = sorted((a - b).elements()), sorted((b - a).elements())
    assert len(only_a) + len(only_b) <= lost, (only_a[:5], only_b[:5], lost)


def loaded_progs() -> set[int]:
    progs = json.loads(sh("bpftool", "-j", "prog", "show").stdout)
    return {p["id"] for p in progs}


def still_loaded(ids: set[int], deadline_s: float = 5.0) -> set[int]:
    end = time.monotonic() + deadline_s
    while True:
        left = ids & loaded_progs()
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.2)


def perf_attachments(pid: int) -> list:
    return [e for e in json.loads(sh("bpftool", "-j", "perf", "show").stdout) if e["pid"] == pid]


FORMATS = Path(__file__).resolve().parent / "fixtures" / "latency" / "formats"

LOAD = r"""
import importlib.util, json, os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
spec = importlib.util.spec_from_file_location("tcp_latency", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
args = m.parse_args(["--port", "80", "--addr", "198.18.128.1", "--sample", "8"])
btf = m.load_btf()
(offsets, _), (tuples, _) = m.btf_offsets(loaded=btf)
fields = m.sock_fields(btf[0])[0] if sys.argv[4] == "raw" else None
plan = m.make_plan(args, m.read_formats(sys.argv[2]), offsets, tuples, fields)
plan["buffer"] = sys.argv[3]
from bcc import BPF
b = BPF(text=m.build_program(plan))
loaded = []
for probe in sorted(plan["tracepoints"]):
    b.load_func("ebd_" + probe, BPF.RAW_TRACEPOINT if probe in plan["raw"] else BPF.TRACEPOINT)
    loaded.append(("raw " if probe in plan["raw"] else "") + "ebd_" + probe)
for fn in ("ebd_tc_ingress", "ebd_tc_egress", "ebd_tc_in_l3", "ebd_tc_out_l3"):
    b.load_func(fn, BPF.SCHED_CLS)
    loaded.append(fn)
print(json.dumps(loaded))
"""


@pytest.mark.root
@pytest.mark.parametrize("buffer", ["ringbuf", "perf"])
@pytest.mark.parametrize("version", sorted(p.name for p in FORMATS.iterdir()))
def test_generated_program_loads_for_recorded_kernels(version, buffer):
    """BCC compiles the C for each recorded kernel's formats and this kernel's verifier
    takes every program, with ring buffers and with perf buffers (kernels before 5.8)."""
    require(os.geteuid() == 0, "needs root (BPF)")
    require(os.path.exists(SYSTEM_PYTHON), "needs the system python3")
    argv = [SYSTEM_PYTHON, "-c", LOAD, str(SCRIPT), str(FORMATS / version), buffer, "format"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probes = sorted(p.name for p in (FORMATS / version).iterdir())
    assert json.loads(proc.stdout.splitlines()[-1]) == ["ebd_" + p for p in probes] + [
        "ebd_tc_ingress", "ebd_tc_egress", "ebd_tc_in_l3", "ebd_tc_out_l3"
    ]  # fmt: skip


@pytest.mark.root
@pytest.mark.parametrize("buffer", ["ringbuf", "perf"])
def test_raw_tracepoint_programs_load(buffer):
    """With this kernel's BTF, tcp_probe and sock_recv_length compile as raw tracepoint
    programs (the kernel's arguments, no formatted record) and the verifier takes them,
    with either buffer; the retransmit tracepoint keeps its format."""
    require(os.geteuid() == 0, "needs root (BPF)")
    require(os.path.exists(SYSTEM_PYTHON), "needs the system python3")
    version = sorted(p.name for p in FORMATS.iterdir())[-1]
    argv = [SYSTEM_PYTHON, "-c", LOAD, str(SCRIPT), str(FORMATS / version), buffer, "raw"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == [
        "raw ebd_sock_recv_length", "raw ebd_tcp_probe", "ebd_tcp_retransmit_skb",
        "ebd_tc_ingress", "ebd_tc_egress", "ebd_tc_in_l3", "ebd_tc_out_l3",
    ]  # fmt: skip


def assert_every_byte_sighted(packets, isn_next: int, size: int, where) -> None:
    """The payloads of `packets` cover [isn_next, isn_next + size) without a gap (a
    retransmission may cover bytes twice)."""
    rel = sorted(((p["seq"] - isn_next) % 2**32, p["len"]) for p in packets if p["len"])
    at = 0
    for start, length in rel:
        assert start <= at, (where, "gap", at, start)
        at = max(at, start + length)
    assert at == size, (where, at, size)


# ------------------------------------------------------------------ real runs (root)


@pytest.mark.root
def test_sample_1_sights_every_packet_and_the_counts_match(lab):
    port, size, reqs = 8401, 1_500_000, 3
    runs = {h: run_on(lab, h, "--port", str(port), "--sample", "1") for h in ("client", "server")}
    hello = runs["client"].of("hello")[0]
    assert hello["sample"] == {"n": 1, "block": 65536}
    assert hello["attach"]["tc"]["interfaces"] == [lab.dev["client"]]
    assert {"tcp_probe", "tcp_retransmit_skb", "sock_recv_length"} <= set(hello["attach"])
    assert hello["missing"] == [] and hello["scope"] == "netns"
    assert exchange(lab, port, size, reqs=reqs, resp=5000) == size * reqs
    stop_all(runs)

    sent = reqs * (size + 4)
    for host, direction, back_dir in (("client", "egress", "ingress"),
                                      ("server", "ingress", "egress")):  # fmt: skip
        run = runs[host]
        packets = flow_packets(run, port, lab.dev[host], direction)
        # every byte the client sent is in a sighted packet: no gap, and bytes sighted twice
        # only when the client retransmitted (a loaded machine makes it send some again)
        syn = [p for p in to_server(packets, port) if p["flags"] & 0x02]
        assert len(syn) == 1 and syn[0]["why"] == "ctl", host
        at = first = (syn[0]["seq"] + 1) % 2**32
        data = [p for p in to_server(packets, port) if p["len"]]
        data.sort(key=lambda p, isn=at: (p["seq"] - isn) % 2**32)  # the seq space wraps
        assert data, host
        retrans = [r for r in runs["client"].of("retrans") if port in (r["sport"], r["dport"])]
        for p in data:
            if (p["seq"] - at) % 2**32 >= 2**31:  # bytes sighted before: sent again
                assert retrans, (host, "bytes sighted twice without a retransmission", p)
                end = (p["seq"] + p["len"]) % 2**32
                at = end if (end - at) % 2**32 < 2**31 else at
                continue
            assert p["seq"] == at, (host, p)
            at = (at + p["len"]) % 2**32
        assert (at - first) % 2**32 == sent, host
        assert all(p["why"] == "data" for p in data if not p["flags"] & 0x07)
        # the response comes back in packets of their own
        back = flow_packets(run, port, lab.dev[host], back_dir)
        assert sum(p["len"] for p in from_server(back, port)) == reqs * 5000, host
        assert all(p["why"] in ("data", "ack", "ctl") for p in packets + back)
        # counts: every packet that passed the filter was sampled and emitted
        final = run.of("counts")[-1]
        assert run.records[-2] == final, "the last counts record comes right before bye"
        assert final["seen"] == final["sampled"] == len(run.of("packet")) > 0, (host, final)
        assert final["lost"] == 0 and not run.of("lost")
        assert final["seen"] == len(packets + back)  # the filter kept everything else out
    # the server's application reading the flow's socket
    recv = [r for r in runs["server"].of("recv") if r["sport"] == port]
    assert recv and recv[0]["saddr"] == SERVER_IP and recv[0]["daddr"] == CLIENT_IP
    assert all(r["len"] > 0 for r in recv)
    assert not [r for r in runs["client"].of("recv") if r["saddr"] == SERVER_IP]


@pytest.mark.root
def test_sample_8_chooses_the_same_points_on_both_ends_of_every_link(lab):
    port, size = 8402, 3_000_000
    runs = {h: run_on(lab, h, "--port", str(port), "--sample", "8", "--block-shift", "10")
            for h in ("client", "lb", "server")}  # fmt: skip
    # 8 MB answers: the client acks them often enough (20 to 30 pure ACKs kept at 1 in 8)
    # that the check of its pure ACKs below never goes empty (2 x 200 KB kept none 1 time in 4)
    assert exchange(lab, port, size, reqs=2, resp=8_000_000) == 2 * size
    stop_all(runs)
    dev = lab.dev
    c_out = flow_packets(runs["client"], port, dev["client"], "egress")
    c_in = flow_packets(runs["client"], port, dev["client"], "ingress")
    l_in = flow_packets(runs["lb"], port, dev["lb_c"], "ingress")
    l_out = flow_packets(runs["lb"], port, dev["lb_s"], "egress")
    l_back_in = flow_packets(runs["lb"], port, dev["lb_s"], "ingress")
    l_back_out = flow_packets(runs["lb"], port, dev["lb_c"], "egress")
    s_in = flow_packets(runs["server"], port, dev["server"], "ingress")
    s_out = flow_packets(runs["server"], port, dev["server"], "egress")

    # segmentation differs across lb: 64 KiB GSO packets before it, MSS-sized after it
    assert max(p["len"] for p in to_server(c_out, port)) > 60_000
    assert max(p["len"] for p in to_server(l_out, port)) > 60_000
    assert 0 < max(p["len"] for p in to_server(s_in, port)) < lab.small_gso
    sender = points(to_server(c_out, port))
    assert len(sender) >= 20
    # same cut on the client -> lb link and through lb: the same sightings
    assert points(to_server(l_in, port)) == sender
    assert points(to_server(l_out, port)) == sender
    # across the re-cutting hop: every point the sender chose is seen by the receiver
    receiver = points(to_server(s_in, port))
    assert sender <= receiver, sorted(sender - receiver)[:5]
    # the response (server -> client, cut the same everywhere) matches both ways too
    assert points(from_server(s_out, port)) == points(from_server(c_in, port))
    assert points(from_server(s_out, port)) == points(from_server(l_back_in, port))
    assert len(points(from_server(c_in, port))) >= 5

    # every pt is a chosen point inside its packet, and only such packets are data
    for p in c_out + c_in + s_in + s_out:
        if p["pt"] is not None:
            assert tcp_latency.is_chosen(p["pt"], 8, 10)
            start = (p["seq"] + (1 if p["flags"] & 0x02 else 0)) % 2**32
            assert (p["pt"] - start) % 2**32 < p["len"]
        if p["why"] != "ctl":  # a FIN whose own sequence number is not chosen: data or ack
            assert (p["why"] == "data") == (p["pt"] is not None and not p["flags"] & 0x06)
    # pure ACKs: kept by their own ack, so the same ones at both ends of each path
    acks_s = pure_acks(from_server(s_out, port))
    assert acks_s
    assert all(tcp_latency.is_chosen(a - 1, 8, 10) for a in acks_s)
    assert all(p["apt"] is None for p in from_server(s_out, port) if p["len"] == 0)
    both = (runs["client"], runs["server"])
    assert_same_acks(both, acks_s, pure_acks(from_server(c_in, port)))
    assert_same_acks((runs["lb"], runs["server"]), acks_s,
                     pure_acks(from_server(l_back_out, port)))  # fmt: skip
    back_acks = pure_acks(to_server(c_out, port))  # the client acking the response
    assert back_acks
    assert_same_acks(both, back_acks, pure_acks(to_server(s_in, port)))
    # the handshake is kept everywhere or nowhere, by the client's ISN
    syns = [[p for p in pk if p["flags"] & 0x02] for pk in (c_out, l_in, l_out, s_in)]
    assert len({len(s) for s in syns}) == 1
    # sampling samples: far fewer records than packets where packets are small
    final = runs["server"].of("counts")[-1]
    assert final["sampled"] * 3 < final["seen"] and final["lost"] == 0


NFT_DROP_ONE = """
table inet eblx {
  chain in {
    type filter hook input priority 0;
    tcp dport %d meta length > 1000 ct original packets 40 counter drop;
  }
}
"""


@pytest.mark.root
@pytest.mark.parametrize("tp_mode, kind", [("raw", "raw_tracepoint"), ("format", "tracepoint")])
def test_a_dropped_packet_gives_retrans_and_tcp_probe_records(lab, tp_mode, kind):
    """The same records whether the socket tracepoints run raw (the kernel's arguments,
    fields read through BTF) or on their formatted records."""
    port = 8403
    lab.exec("server", "sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1")
    sh("ip", "netns", "exec", lab.ns["server"], "nft", "-f", "-", input=NFT_DROP_ONE % port)
    try:
        runs = {h: run_on(lab, h, "--port", str(port), "--sample", "64", "--block-shift", "10",
                          "--tp-mode", tp_mode)
                for h in ("client", "server")}  # fmt: skip
        assert exchange(lab, port, 2_000_000, reqs=4, resp=100, pause=0.15) == 8_000_000
        stop_all(runs)
        dropped = lab.exec("server", "nft", "list", "table", "inet", "eblx").stdout
        assert re.search(r"counter packets 1 bytes", dropped), dropped
    finally:
        lab.exec("server", "nft", "delete", "table", "inet", "eblx", check=False)
    attach = runs["client"].of("hello")[0]["attach"]
    assert attach["tcp_probe"] == {"kind": kind, "tracepoint": "tcp:tcp_probe"}
    assert attach["sock_recv_length"]["kind"] == kind
    assert attach["tcp_retransmit_skb"]["kind"] == "tracepoint"
    retrans = runs["client"].of("retrans")
    assert retrans, runs["client"].records[-5:]
    r = retrans[0]
    assert (r["saddr"], r["daddr"], r["dport"], r["family"]) == (CLIENT_IP, SERVER_IP, port, 4)
    assert r["state"] == "TCP_ESTABLISHED"
    assert not runs["server"].of("retrans")  # another namespace's retransmission
    probes = runs["client"].of("tcp_probe")
    assert len(probes) >= 3
    assert all((p["saddr"], p["daddr"], p["dport"]) == (CLIENT_IP, SERVER_IP, port)
               for p in probes)  # fmt: skip
    assert all(p["srtt_us"] > 0 and p["snd_cwnd"] > 0 for p in probes)
    assert all((p["snd_nxt"] - p["snd_una"]) % 2**32 < 2**31 for p in probes)
    # one per flow per 100 ms at most
    times = sorted(p["ts_ns"] for p in probes)
    assert all(b - a >= 100_000_000 for a, b in zip(times, times[1:], strict=False))


@pytest.mark.root
def test_the_filter_keeps_other_flows_out(lab):
    port = 8404
    runs = {
        "port": run_on(lab, "server", "--port", "9999", "--sample", "1"),
        "addr": run_on(lab, "server", "--addr", CLIENT_IP, "--sample", "1"),
        "other_addr": run_on(lab, "server", "--addr", "198.18.128.77", "--sample", "1"),
    }
    assert exchange(lab, port, 100_000) == 100_000
    stop_all(runs)
    assert runs["port"].of("packet") == [] and runs["port"].of("counts")[-1]["seen"] == 0
    assert runs["other_addr"].of("packet") == [] and not runs["other_addr"].of("recv")
    assert runs["addr"].of("packet") and runs["addr"].of("recv")
    assert runs["addr"].of("counts")[-1]["seen"] == len(runs["addr"].of("packet"))


def hooks_of(lab, host: str, ids: set[int]) -> set[int]:
    """Which of `ids` are still attached through tcx on the host's interfaces."""
    left = set()
    for key, dev in lab.dev.items():
        if key.startswith(host[0]) or (host == "lb" and key.startswith("lb")):
            progs = tcx_progs(lab.ns[host], dev, BPF_NR)
            left |= set(progs["ingress"] + progs["egress"]) & ids
    return left


def tc_state(lab) -> dict:
    """lb's qdiscs and TC filters per interface, as `tc` lists them."""
    state = {}
    for key in ("lb_c", "lb_s"):
        dev = lab.dev[key]
        qdiscs = sh("tc", "-n", lab.ns["lb"], "qdisc", "show", "dev", dev).stdout
        filters = [
            sh("tc", "-n", lab.ns["lb"], "filter", "show", "dev", dev, hook).stdout.strip()
            if "clsact" in qdiscs
            else ""
            for hook in ("ingress", "egress")
        ]
        state[dev] = (tuple(sorted(re.findall(r"qdisc (\w+)", qdiscs))), *filters)
    return state


@pytest.mark.root
@pytest.mark.parametrize(
    "how, mode, kind", [("eof", "auto", "tcx-link"), ("sigterm", "auto", "tcx-link"),
                        ("sigterm", "clsact", "tc-clsact")]
)  # fmt: skip
def test_nothing_is_left_attached_after_stdin_eof_or_sigterm(lab, how, mode, kind):
    before = tc_state(lab)
    run = run_on(
        lab, "lb", "--sample", "4", "--block-shift", "10", "--tc-mode", mode, bootstrap=how == "eof"
    )
    hello = run.of("hello")[0]
    assert set(hello["interfaces"]) == {lab.dev["lb_c"], lab.dev["lb_s"]}
    assert hello["attach"]["tc"]["kind"] == kind
    if kind == "tcx-link":
        assert len(hooks_of(lab, "lb", run.prog_ids)) >= 2
        assert tc_state(lab) == before
    else:
        assert all("ebd_tc_" in f[1] and "ebd_tc_" in f[2] for f in tc_state(lab).values())
    assert perf_attachments(run.proc.pid)
    assert exchange(lab, 8405, 50_000) == 50_000
    if how == "eof":
        code, err = run.finish()  # closes stdin: the bootstrap stops the tool
    else:
        code, err = run.stop(signal.SIGTERM)
    assert code == 0, err
    assert run.records[-1] == {"type": "bye", "reason": "signal"}
    assert run.records[-2]["type"] == "counts"
    assert run.of("packet")
    assert hooks_of(lab, "lb", run.prog_ids) == set()
    assert tc_state(lab) == before  # clsact: our filters and the qdisc we added are gone
    assert still_loaded(run.prog_ids) == set()
    for dev in (lab.dev["lb_c"], lab.dev["lb_s"]):
        assert tcx_progs(lab.ns["lb"], dev, BPF_NR) == {"ingress": [], "egress": []}


DUAL_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
s.listen(4)
print("listening", flush=True)
for _ in range(2):
    c, _ = s.accept()
    while c.recv(65536):
        c.sendall(b"ok")
    c.close()
"""

DUAL_CLIENT = r"""
import socket, sys, time
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
addr = socket.getaddrinfo(sys.argv[1], int(sys.argv[2]), family, socket.SOCK_STREAM)[0][4]
s = socket.socket(family)
s.settimeout(10)
s.connect(addr)
for _ in range(3):
    s.sendall(b"x" * 3000)
    s.recv(2)
    time.sleep(0.15)  # past the records' 100 ms rate limit
s.close()
"""


def link_local(lab, host: str, dev: str) -> str:
    """The interface's IPv6 link-local address, once duplicate detection is over."""
    end = time.monotonic() + 10
    while time.monotonic() < end:
        out = json.loads(lab.exec(host, "ip", "-j", "-6", "addr", "show", "dev", dev).stdout)
        for info in out[0]["addr_info"]:
            if info["local"].startswith("fe80") and not info.get("tentative"):
                return info["local"]
        time.sleep(0.2)
    raise AssertionError(f"no link-local address on {dev}")


@pytest.mark.root
def test_ipv6_flows_and_v4_mapped_sockets(lab):
    """IPv6 over the link-local addresses the veths already have (no address is added),
    and an IPv4 client of a dual-stack server: its socket is IPv6 with a v4-mapped peer,
    reported, and filtered by --addr, as the IPv4 flow it is."""
    port = 8406
    lb_ll = link_local(lab, "lb", lab.dev["lb_c"])
    client_ll = link_local(lab, "client", lab.dev["client"])
    runs = {
        "client": run_on(lab, "client", "--port", str(port), "--sample", "1"),
        "lb": run_on(lab, "lb", "--addr", CLIENT_IP, "--sample", "1"),
    }
    server = lab.popen("lb", SYSTEM_PYTHON, "-c", DUAL_SERVER, str(port),
                       stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout.readline().strip() == "listening"
        lab.exec("client", SYSTEM_PYTHON, "-c", DUAL_CLIENT, f"{lb_ll}%{lab.dev['client']}",
                 str(port))  # fmt: skip
        lab.exec("client", SYSTEM_PYTHON, "-c", DUAL_CLIENT, LB_C_IP, str(port))
        server.wait(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
    stop_all(runs)
    v6 = [p for p in runs["client"].of("packet") if p["family"] == 6]
    sent = [p for p in v6 if p["dir"] == "egress" and p["dport"] == port]
    assert {(p["saddr"], p["daddr"]) for p in v6 if p["dir"] == "egress"} == {(client_ll, lb_ll)}
    assert sum(p["len"] for p in sent) == 9000 and all(p["ipid"] == 0 for p in v6)
    probes6 = [r for r in runs["client"].of("tcp_probe") if r["family"] == 6]
    assert probes6 and probes6[0]["saddr"] == client_ll and probes6[0]["daddr"] == lb_ll
    # on lb, filtered by the IPv4 client address: only the IPv4 flow, though its socket
    # is an IPv6 one
    recv = runs["lb"].of("recv")
    assert recv and all(
        (r["family"], r["saddr"], r["daddr"], r["sport"]) == (4, LB_C_IP, CLIENT_IP, port)
        for r in recv
    )
    assert len(recv) >= 3 and all(0 < r["len"] <= 3000 for r in recv)  # one per request
    assert {p["family"] for p in runs["lb"].of("packet")} == {4}


# IFLA_GSO_IPV4_MAX_SIZE (63) and IFLA_GRO_IPV4_MAX_SIZE (64): iproute2 here predates them
SET_IPV4_MAX = r"""
import socket, struct, sys
idx = socket.if_nametoindex(sys.argv[1])
attrs = b"".join(struct.pack("=HHI", 8, t, int(sys.argv[2])) for t in (63, 64))
body = struct.pack("=BxHiII", 0, 0, idx, 0, 0) + attrs
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
s.sendto(struct.pack("=IHHII", 16 + len(body), 16, 0x5, 1, 0) + body, (0, 0))
sys.exit(-struct.unpack_from("=i", s.recv(4096), 16)[0])
"""

BULK_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
n = 0
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    n += len(d)
print(n, flush=True)
"""

BULK_CLIENT = r"""
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
addr = socket.getaddrinfo(sys.argv[1], int(sys.argv[2]), family, socket.SOCK_STREAM)[0][4]
s = socket.socket(family)
s.connect(addr)
s.sendall(b"x" * int(sys.argv[3]))
s.close()
"""


def big_tcp(lab, size: int) -> None:
    """BIG TCP on the client -> lb veth, both families (65536: back to normal)."""
    for host, key in (("client", "client"), ("lb", "lb_c")):
        dev = lab.dev[key]
        lab.exec(host, "ip", "link", "set", "dev", dev, "gso_max_size", str(size),
                 "gro_max_size", str(size))  # fmt: skip
        lab.exec(host, SYSTEM_PYTHON, "-c", SET_IPV4_MAX, dev, str(size))


@pytest.mark.root
@pytest.mark.parametrize("family", [4, 6])
def test_big_tcp_packets_are_sighted_whole(lab, family):
    """Packets over 64 KiB: IPv4 with total length 0, IPv6 with a hop-by-hop jumbo header.
    Every byte is in exactly one sighted packet, at the sender and at the receiver."""
    port, size = 8407 + family, 20_000_000
    target = (
        LB_C_IP if family == 4 else f"{link_local(lab, 'lb', lab.dev['lb_c'])}%{lab.dev['client']}"
    )
    big_tcp(lab, 150_000)
    try:
        runs = {h: run_on(lab, h, "--port", str(port), "--sample", "1") for h in ("client", "lb")}
        server = lab.popen("lb", SYSTEM_PYTHON, "-c", BULK_SERVER, str(port),
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert server.stdout.readline().strip() == "listening"
            lab.exec("client", SYSTEM_PYTHON, "-c", BULK_CLIENT, target, str(port), str(size))
            assert server.stdout.readline().strip() == str(size)
        finally:
            if server.poll() is None:
                server.kill()
            server.wait(timeout=10)
        stop_all(runs)
    finally:
        big_tcp(lab, 65536)
    for host, key, direction in (("client", "client", "egress"), ("lb", "lb_c", "ingress")):
        packets = flow_packets(runs[host], port, lab.dev[key], direction)
        sent = [p for p in packets if p["dport"] == port]
        assert {p["family"] for p in sent} == {family}
        [syn] = [p for p in sent if p["flags"] & 0x02]
        assert_every_byte_sighted(sent, syn["seq"] + 1, size, host)
        assert max(p["len"] for p in sent) > 65535, host  # BIG TCP was in use


REUSE_SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(4)
print("listening", flush=True)
for _ in range(int(sys.argv[3])):
    c, _ = s.accept()
    n = int.from_bytes(c.recv(4), "big")
    while n > 0:
        n -= len(c.recv(min(n, 1 << 20)))
    c.sendall(b"r")
    try:
        c.recv(1)  # until the client's RST
    except ConnectionResetError:
        pass
    c.close()
"""

REUSE_CLIENT = r"""
import socket, struct, sys, time
for _ in range(int(sys.argv[4])):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[3])))
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.sendall(int(sys.argv[5]).to_bytes(4, "big") + b"q" * int(sys.argv[5]))
    s.recv(1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # a RST: no TIME_WAIT, so the next connection takes the same 4-tuple
    time.sleep(0.1)  # the next ISN is about 1.5 M higher (RFC 6528 clock, 64 ns a step)
"""


@pytest.mark.root
def test_a_new_connection_on_the_same_four_tuple_starts_the_ack_state_afresh(lab):
    """Five connections from one client port. The ISNs of one 4-tuple grow with time
    (RFC 6528), so an ack compared with the previous connection's last one would span the
    gap between them and "acknowledge" chosen points that no connection sent."""
    port, client_port, conns, size = 8413, 40413, 5, 200_000
    runs = {
        h: run_on(lab, h, "--port", str(port), "--sample", "8", "--block-shift", "10")
        for h in ("client", "server")
    }
    server = lab.popen("server", SYSTEM_PYTHON, "-c", REUSE_SERVER, SERVER_IP, str(port),
                       str(conns), stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout.readline().strip() == "listening"
        lab.exec("client", SYSTEM_PYTHON, "-c", REUSE_CLIENT, SERVER_IP, str(port),
                 str(client_port), str(conns), str(size))  # fmt: skip
        server.wait(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
    stop_all(runs)
    c_in = flow_packets(runs["client"], port, lab.dev["client"], "ingress")
    s_out = flow_packets(runs["server"], port, lab.dev["server"], "egress")
    # each connection ends with the client's RST, whose seq is the end of its data
    rsts = [p for p in flow_packets(runs["client"], port, lab.dev["client"], "egress")
            if p["flags"] & 0x04]  # fmt: skip
    assert len(rsts) == conns and all(p["sport"] == client_port for p in rsts)
    begins = [(rst["seq"] - size - 4) % 2**32 for rst in rsts]

    def sent(point):
        return any((point - begin) % 2**32 < size + 4 for begin in begins)

    # each connection's answer ("r") names a point of that connection's own upload
    answers = [p for p in s_out if p["len"] and p["apt"] is not None]
    for begin in begins:
        mine = [p for p in answers if (p["apt"] - begin) % 2**32 < size + 4]
        assert mine, (begin, "no answer of this connection carried its point")
    # every acknowledged point is a byte a connection sent, at both ends
    for packets in (s_out, c_in):
        assert all(sent(p["apt"]) for p in packets if p["apt"] is not None), [
            (p["flags"], p["ack"], p["apt"]) for p in packets if p["apt"] and not sent(p["apt"])
        ]
    assert_same_acks((runs["client"], runs["server"]), pure_acks(s_out), pure_acks(c_in))
