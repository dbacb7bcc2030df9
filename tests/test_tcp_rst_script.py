"""scripts/bpf/tcp_rst.py: format parsing and C generation (pure), then real runs.

The real runs build two network namespaces joined by a veth (198.18.250.1 <-> .2), run the
script under the system python inside the listener side, make resets happen and check the
records, and check that every exit leaves TC and BPF exactly as they were.
"""

import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.bpfstate import load_tcp_rst, tcx_progs
from tests.conftest import require

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bpf" / "tcp_rst.py"
FORMATS = Path(__file__).resolve().parent / "fixtures" / "tracepoint_formats"
SYSTEM_PYTHON = "/usr/bin/python3"


tcp_rst = load_tcp_rst()
BPF_NR = tcp_rst.bpf_syscall_number()


def read_format(version: str, probe: str) -> dict:
    return tcp_rst.parse_format((FORMATS / version / probe).read_text())


def offsets(fmt: dict) -> dict:
    return {f["name"]: (f["offset"], f["size"]) for f in fmt["fields"]}


# ------------------------------------------------------------------ pure: format files


def test_parse_live_618_send_reset_fields_and_tables():
    fmt = read_format("6.18", "tcp_send_reset")
    assert fmt["name"] == "tcp_send_reset"
    got = offsets(fmt)
    assert got["state"] == (24, 4)
    assert got["reason"] == (28, 4)
    assert got["saddr"] == (32, 28) and got["daddr"] == (60, 28)
    reason_field = next(f for f in fmt["fields"] if f["name"] == "reason")
    assert reason_field["type"] == "enum sk_rst_reason"
    assert fmt["symbols"]["reason"][1] == "NO_SOCKET"
    assert fmt["symbols"]["reason"][0] == "NOT_SPECIFIED"
    # State keys are constant names in this file; they map through the ABI numbers.
    assert fmt["symbols"]["state"][7] == "TCP_CLOSE"
    assert fmt["symbols"]["state"][10] == "TCP_LISTEN"
    assert tcp_rst.address_layout(fmt) == "sockaddr"


def test_parse_pointer_and_array_declarations():
    fmt = read_format("6.1", "tcp_send_reset")
    by_name = {f["name"]: f for f in fmt["fields"]}
    assert by_name["skbaddr"]["type"] == "const void *"
    assert by_name["saddr_v6"]["count"] == 16
    assert by_name["family"]["count"] is None
    assert fmt["symbols"]["family"] == {2: "AF_INET", 10: "AF_INET6"}
    assert tcp_rst.address_layout(fmt) == "legacy"


@pytest.mark.parametrize(
    "version, probe, expected",
    [
        ("6.18", "tcp_send_reset", {"skaddr": 16, "state": 24, "reason": 28, "daddr": 60}),
        ("6.18", "tcp_receive_reset", {"sport": 16, "saddr_v6": 30, "sock_cookie": 64}),
        ("6.1", "tcp_send_reset", {"state": 24, "sport": 28, "family": 32, "daddr_v6": 58}),
        ("4.19", "tcp_receive_reset", {"saddr": 20, "daddr_v6": 44, "sock_cookie": 64}),
        ("4.15", "tcp_send_reset", {"skaddr": 16, "sport": 24, "saddr_v6": 36}),
        ("4.15", "tcp_receive_reset", {"sport": 16, "daddr_v6": 44}),
    ],
)
def test_generated_struct_pins_recorded_offsets(version, probe, expected):
    fmt = read_format(version, probe)
    code = tcp_rst.c_tracepoint_struct("tp_x", fmt)
    pinned = dict(
        (name, int(off))
        for name, off in re.findall(r"offsetof\(struct tp_x, (\w+)\) == (\d+)", code)
    )
    assert pinned == {f["name"]: f["offset"] for f in fmt["fields"]}
    for name, offset in expected.items():
        assert pinned[name] == offset


def test_unknown_types_become_char_arrays_and_gaps_are_padded():
    send = tcp_rst.c_tracepoint_struct("tp_s", read_format("6.18", "tcp_send_reset"))
    assert "char reason[4];" in send
    assert "enum" not in send.split("*/")[0]  # no enum type in a declaration
    receive = tcp_rst.c_tracepoint_struct("tp_r", read_format("6.18", "tcp_receive_reset"))
    # daddr_v6 ends at 62, sock_cookie starts at 64: two bytes of explicit padding.
    assert re.search(r"char __pad\d+\[2\];", receive)


def test_reason_names_follow_the_file(tmp_path):
    text = (FORMATS / "6.18" / "tcp_send_reset").read_text()
    text = text.replace('{ 1, "NO_SOCKET" }', '{ 1, "NO_LISTENER_HERE" }')
    fmt = tcp_rst.parse_format(text)
    raw = struct.pack(
        tcp_rst.RESET_FMT,
        123,
        0,
        42,
        0,
        1,
        1,
        4,
        80,
        40000,
        bytes([198, 18, 250, 2]) + bytes(12),
        bytes([198, 18, 250, 1]) + bytes(12),
        b"python3".ljust(16, b"\0"),
    )
    record = tcp_rst.decode_reset(raw, {"tcp_send_reset": fmt["symbols"]})
    assert record["reason"] == "NO_LISTENER_HERE"
    assert record["reason_num"] == 1
    assert record["state"] is None and record["state_num"] is None
    assert (record["saddr"], record["sport"]) == ("198.18.250.2", 80)
    live = read_format("6.18", "tcp_send_reset")
    assert tcp_rst.decode_reset(raw, {"tcp_send_reset": live["symbols"]})["reason"] == "NO_SOCKET"


def test_legacy_reset_unmaps_v4_addresses_and_has_no_reason():
    mapped = bytes(10) + b"\xff\xff"
    raw = struct.pack(
        tcp_rst.RESET_FMT,
        5,
        0,
        1,
        -1,
        -1,
        2,
        0,
        8080,
        50000,
        mapped + bytes([10, 0, 0, 1]),
        mapped + bytes([10, 0, 0, 2]),
        b"curl".ljust(16, b"\0"),
    )
    record = tcp_rst.decode_reset(raw, {})
    assert record["probe"] == "tcp_receive_reset"
    assert record["family"] == 4
    assert (record["saddr"], record["daddr"]) == ("10.0.0.1", "10.0.0.2")
    assert record["reason"] is None and record["state"] is None


def pkt(ts, seq, fwd, flags=16, length=0):
    return struct.pack(tcp_rst.PKT_FMT, ts, 2, seq, 0, length, 100, 0, 64, flags, 0, fwd)


def test_history_is_emitted_oldest_first_across_ring_wrap():
    key = struct.pack(
        tcp_rst.FLOW_FMT,
        bytes([198, 18, 250, 1]) + bytes(12),
        bytes([198, 18, 250, 2]) + bytes(12),
        40000,
        80,
        4,
    )
    # Four slots; five packets were stored, so slot 0 holds the newest (ts 5) and head is 1.
    ring = [pkt(5, 5, 1), pkt(2, 2, 0), pkt(3, 3, 1), pkt(4, 4, 0)]
    no_handshake = struct.pack(tcp_rst.EVENT_HEAD_FMT, 1, 1, 4, 0) + bytes(2 * tcp_rst.PKT_SIZE)
    raw = key + pkt(9, 9, 0, flags=20) + no_handshake + b"".join(ring)
    records = tcp_rst.decode_packets(raw, {2: "veth0"})
    assert [r["ts_ns"] for r in records] == [2, 3, 4, 5, 9]
    assert [r["why"] for r in records] == ["history"] * 4 + ["rst"]
    assert records[1]["saddr"] == "198.18.250.1" and records[1]["sport"] == 40000
    assert records[-1]["saddr"] == "198.18.250.2" and records[-1]["dport"] == 40000
    assert records[-1]["ifname"] == "veth0"


def test_kept_handshake_comes_first_and_fins_are_marked_close():
    """Without --all-flows the SYN and SYN-ACK wait in the flow's map entry for a RST."""
    key = struct.pack(
        tcp_rst.FLOW_FMT,
        bytes([198, 18, 250, 1]) + bytes(12),
        bytes([198, 18, 250, 2]) + bytes(12),
        40000,
        80,
        4,
    )
    syn_ack, syn = pkt(2, 20, 0, flags=0x12), pkt(1, 10, 1, flags=0x02)
    ring = [pkt(3, 11, 1), pkt(4, 11, 1, flags=0x11), bytes(tcp_rst.PKT_SIZE) * 2]
    head = struct.pack(tcp_rst.EVENT_HEAD_FMT, 1, 2, 2, 0b11)
    raw = key + pkt(9, 21, 0, flags=0x14) + head + syn + syn_ack + b"".join(ring)
    records = tcp_rst.decode_packets(raw, {})
    assert [(r["ts_ns"], r["why"]) for r in records] == [
        (1, "handshake"), (2, "handshake"), (3, "history"), (4, "close"), (9, "rst")
    ]  # fmt: skip
    assert records[0]["flags"] == 0x02 and records[1]["flags"] == 0x12


def test_prio_goes_ahead_of_existing_filters_when_possible():
    assert tcp_rst.pick_prio(set()) == tcp_rst.TC_PRIO_BASE
    assert tcp_rst.pick_prio({100, 49152}) == 99
    assert tcp_rst.pick_prio({1}) == tcp_rst.TC_PRIO_BASE
    assert tcp_rst.pick_prio({1, tcp_rst.TC_PRIO_BASE}) == tcp_rst.TC_PRIO_BASE + 1


def test_tcx_is_detected_from_kallsyms(tmp_path):
    with_tcx = tmp_path / "with"
    with_tcx.write_text("0 T tcx_prog_attach_x\n0 T tcx_prog_attach\n0 T tcx_prog_detach\n")
    without = tmp_path / "without"
    without.write_text("0 T tcx_prog_attach_x\n0 T tc_setup_cb_add\n")
    assert tcp_rst.kernel_has_tcx(str(with_tcx)) is True
    assert tcp_rst.kernel_has_tcx(str(without)) is False
    # Unreadable proves nothing: the attach itself decides, falling back on refusal.
    assert tcp_rst.kernel_has_tcx(str(tmp_path / "absent")) is True


def test_link_create_attr_matches_the_uapi_layout():
    # prog_fd, target_ifindex, attach_type, flags, tcx.relative_fd, pad, tcx.expected_revision
    assert struct.calcsize(tcp_rst.LINK_CREATE_FMT) == 32
    raw = struct.pack(tcp_rst.LINK_CREATE_FMT, 7, 3, 46, tcp_rst.BPF_F_BEFORE, 0, 5)
    assert struct.unpack_from("<IIII", raw) == (7, 3, 46, 8)
    assert struct.unpack_from("<Q", raw, 24) == (5,)


def test_btf_offsets_match_bpftool():
    require(os.path.exists(tcp_rst.BTF_VMLINUX), "needs /sys/kernel/btf/vmlinux")
    require(shutil.which("bpftool") is not None, "needs bpftool")
    found, why = tcp_rst.netns_offsets()
    assert found is not None, why
    dump = subprocess.run(
        ["bpftool", "btf", "dump", "file", tcp_rst.BTF_VMLINUX, "format", "raw"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def member_bits(struct_name, member):
        block = re.search(rf"STRUCT '{struct_name}' size=\d+ vlen=\d+\n((?:\t.*\n)+)", dump)
        return int(re.search(rf"'{member}' type_id=\d+ bits_offset=(\d+)", block.group(1))[1])

    assert found["sk_net"] == member_bits("sock_common", "skc_net") // 8
    assert found["dev_net"] == member_bits("net_device", "nd_net") // 8
    assert found["net_inum"] == (member_bits("net", "ns") + member_bits("ns_common", "inum")) // 8


# ------------------------------------------------------------------ system python, no root


def run_system(*args, **kwargs):
    require(os.path.exists(SYSTEM_PYTHON), "needs the system python3")
    return subprocess.run(
        [SYSTEM_PYTHON, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, **kwargs
    )


def test_help_works_without_bcc_or_root():
    proc = run_system("--help")
    assert proc.returncode == 0
    assert "--port" in proc.stdout and "--history" in proc.stdout


@pytest.mark.parametrize("bad", [("--history", "9"), ("--tc-mode", "xdp")])
def test_bad_argument_exits_2_with_bye(bad):
    proc = run_system(*bad)
    assert proc.returncode == 2
    assert proc.stderr.startswith("tcp_rst: ")
    bye = json.loads(proc.stdout.strip().splitlines()[-1])
    assert bye["type"] == "bye" and bye["reason"] == "error"


@pytest.mark.parametrize("version", ["6.18", "6.1", "4.19", "4.15"])
def test_ebpf_generation_for_recorded_kernels(version):
    proc = run_system("--ebpf", "--format-dir", str(FORMATS / version), "--port", "80")
    assert proc.returncode == 0, proc.stderr
    code = proc.stdout
    assert "int ebd_tc_ingress(struct __sk_buff *skb)" in code
    assert "ports.lookup" in code  # --port filters in the kernel
    for probe in ("tcp_send_reset", "tcp_receive_reset"):
        fmt_file = FORMATS / version / probe
        if not fmt_file.exists():
            assert f"int ebd_{probe}(" not in code
            assert probe in proc.stderr  # reported as missing
            continue
        fmt = tcp_rst.parse_format(fmt_file.read_text())
        assert f"int ebd_{probe}(void *ctx)" in code
        for field in fmt["fields"]:
            assert f"offsetof(struct tp_{probe}, {field['name']}) == {field['offset']}" in code
    layout = tcp_rst.address_layout(read_format(version, "tcp_receive_reset"))
    assert layout == "legacy"
    if version == "6.18":
        assert "rec.saddr[4]" in code and "__builtin_memcpy(&reason" in code
    else:
        assert "e.reason = -1;" in code


# ------------------------------------------------------------------ real runs (root)

CONNECT = """
import socket, sys
s = socket.socket()
s.settimeout(5)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except ConnectionRefusedError:
    print("refused")
"""

ACCEPT_ONE = """
import socket, struct, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
"""

ABORT_SERVER = (
    ACCEPT_ONE
    + """
c.recv(5)
c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
c.close()
"""
)

NORMAL_SERVER = (
    ACCEPT_ONE
    + """
while c.recv(100):
    pass
c.close()
"""
)

SEND_CLIENT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"hello")
if sys.argv[3] == "abort":
    try:
        s.recv(10)
        print("eof")
    except ConnectionResetError:
        print("reset")
else:
    s.shutdown(socket.SHUT_WR)
    s.recv(10)
    print("closed")
"""


def sh(*cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def in_ns(ns, code, *args, **kwargs):
    return sh("ip", "netns", "exec", ns, SYSTEM_PYTHON, "-c", code, *args, **kwargs)


class Lab:
    """Namespaces a (client, 198.18.250.1) and b (listener side, .2, where tcp_rst runs).

    b also has an internal veth pair x1/x2. Before any run: vb has a clsact with a
    `prio 100 u32` catch-all on ingress, x2 a clsact with `prio 1 u32` catch-all; x1 has nothing.
    """

    def __init__(self):
        tag = uuid.uuid4().hex[:4]
        self.a, self.b = f"ebdtr-{tag}-a", f"ebdtr-{tag}-b"
        self.va, self.vb = f"ebdtr-{tag}-va", f"ebdtr-{tag}-vb"
        self.x1, self.x2 = f"ebdtr-{tag}-x1", f"ebdtr-{tag}-x2"

    def up(self):
        sh("ip", "netns", "add", self.a)
        sh("ip", "netns", "add", self.b)
        sh(
            "ip",
            "link",
            "add",
            self.va,
            "netns",
            self.a,
            "type",
            "veth",
            "peer",
            "name",
            self.vb,
            "netns",
            self.b,
        )
        sh("ip", "-n", self.b, "link", "add", self.x1, "type", "veth", "peer", "name", self.x2)
        sh("ip", "-n", self.a, "addr", "add", "198.18.250.1/24", "dev", self.va)
        sh("ip", "-n", self.b, "addr", "add", "198.18.250.2/24", "dev", self.vb)
        sh("ip", "-n", self.a, "addr", "add", "2001:db8:250::1/64", "dev", self.va, "nodad")
        sh("ip", "-n", self.b, "addr", "add", "2001:db8:250::2/64", "dev", self.vb, "nodad")
        for ns, links in ((self.a, ("lo", self.va)), (self.b, ("lo", self.vb, self.x1, self.x2))):
            for link in links:
                sh("ip", "-n", ns, "link", "set", link, "up")
        for dev, prio in ((self.vb, "100"), (self.x2, "1")):
            sh("tc", "-n", self.b, "qdisc", "add", "dev", dev, "clsact")
            sh(
                "tc",
                "-n",
                self.b,
                "filter",
                "add",
                "dev",
                dev,
                "ingress",
                "prio",
                prio,
                "u32",
                "match",
                "u32",
                "0",
                "0",
            )

    def down(self):
        for ns in (self.a, self.b):
            sh("ip", "netns", "del", ns, check=False)

    def tc_state(self):
        """{dev: (qdisc kinds, ingress filter lines, egress filter lines)} in namespace b."""
        state = {}
        for dev in (self.vb, self.x1, self.x2):
            qdiscs = sh("tc", "-n", self.b, "qdisc", "show", "dev", dev).stdout
            kinds = tuple(sorted(re.findall(r"qdisc (\w+)", qdiscs)))
            filters = []
            for hook in ("ingress", "egress"):
                if "clsact" in kinds:
                    out = sh("tc", "-n", self.b, "filter", "show", "dev", dev, hook).stdout
                    filters.append(tuple(line for line in out.splitlines() if line.strip()))
                else:
                    filters.append(())
            state[dev] = (kinds,) + tuple(filters)
        return state


@pytest.fixture(scope="module")
def lab():
    require(os.geteuid() == 0, "needs root")
    require(os.path.exists(SYSTEM_PYTHON), "needs the system python3")
    require(shutil.which("tc") is not None, "needs tc")
    require(shutil.which("bpftool") is not None, "needs bpftool")
    proc = subprocess.run([SYSTEM_PYTHON, "-c", "import bcc, pyroute2"], capture_output=True)
    require(proc.returncode == 0, "needs python3-bpfcc and python3-pyroute2")
    lab = Lab()
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


LIVE_RUNS = []


@pytest.fixture(autouse=True)
def _stop_runs():
    """A failed test must not leave a run behind, attached and holding its programs."""
    yield
    while LIVE_RUNS:
        proc = LIVE_RUNS.pop().proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


class Run:
    """tcp_rst running inside namespace b; records are read as they come."""

    def __init__(self, lab, *args):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.b, SYSTEM_PYTHON, str(SCRIPT), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        LIVE_RUNS.append(self)
        self.records = []
        self._buf = b""

    def read_until(self, predicate, deadline_s):
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            for record in self.records:
                if predicate(record):
                    return record
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                self._buf += chunk
                *lines, self._buf = self._buf.split(b"\n")
                self.records.extend(json.loads(line) for line in lines if line)
        for record in self.records:
            if predicate(record):
                return record
        return None

    def finish(self, deadline_s=15):
        """Wait for exit (a functional deadline) and collect the remaining records."""
        out, err = self.proc.communicate(timeout=deadline_s)
        self.records.extend(json.loads(line) for line in (self._buf + out).splitlines() if line)
        self._buf = b""
        return self.proc.returncode, err.decode()

    def of(self, kind):
        return [r for r in self.records if r["type"] == kind]


def run_prog_ids(pid: int) -> set:
    """IDs of the BPF programs a process holds (its prog and link fds), from fdinfo.

    Checks are by ID, not by name, so other tcp_rst runs on the machine do not interfere.
    """
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        ids.update(int(m) for m in re.findall(r"^prog_id:\s+(\d+)", text, re.M))
    return ids


def loaded_progs() -> dict:
    """{id: name} of every loaded BPF program."""
    progs = json.loads(sh("bpftool", "-j", "prog", "show").stdout)
    return {p["id"]: p.get("name", "") for p in progs}


def still_loaded(ids: set, deadline_s=5.0) -> set:
    """Which of `ids` are still loaded, once all are gone or the deadline passed."""
    end = time.monotonic() + deadline_s
    while True:
        left = ids & set(loaded_progs())
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.2)


def tcx_state(lab) -> dict:
    return {dev: tcx_progs(lab.b, dev, BPF_NR) for dev in (lab.vb, lab.x1, lab.x2)}


def start(lab, *args):
    run = Run(lab, *args)
    assert run.read_until(lambda r: r["type"] in ("ready", "bye"), 90), "no ready/bye record"
    assert run.of("ready"), run.finish()[1]
    run.prog_ids = run_prog_ids(run.proc.pid)
    names = {loaded_progs()[i] for i in run.prog_ids}
    assert {"ebd_tc_ingress", "ebd_tc_egress"} <= names, names
    return run


def exchange(lab, server_code: str, port: str, how: str) -> str:
    """One connection from a to a one-shot server in b; what the client saw."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", lab.b, SYSTEM_PYTHON, "-c", server_code, "198.18.250.2", port],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout.readline().strip() == "listening"
    seen = in_ns(lab.a, SEND_CLIENT, "198.18.250.2", port, how).stdout.strip()
    server.wait(timeout=10)
    return seen


def tcx_needed():
    require(tcp_rst.kernel_has_tcx(), "needs a kernel with tcx (Linux 6.6+)")
    require(tcp_rst.bpf_syscall_number() is not None, "needs a known bpf syscall number")


@pytest.mark.root
@pytest.mark.parametrize(
    "mode, kind, all_flows", [("auto", "tcx-link", False), ("clsact", "tc-clsact", True)]
)
def test_resets_packets_history_and_cleanup_on_sigterm(lab, mode, kind, all_flows):
    if mode == "auto":
        tcx_needed()
    before, tcx_before = lab.tc_state(), tcx_state(lab)
    run = start(lab, "--history", "6", "--tc-mode", mode, *(["--all-flows"] if all_flows else []))
    hello = run.of("hello")[0]
    assert hello["attach"]["tcp_send_reset"]["kind"] == "tracepoint"
    assert hello["attach"]["tc"]["kind"] == kind
    assert set(hello["attach"]["tc"]["interfaces"]) == {lab.vb, lab.x1, lab.x2}
    assert "198.18.250.2" in hello["addrs"]
    # x2's prio 1 u32 filter runs ahead of a clsact filter; tcx runs before any of them.
    late = [m for m in hello["missing"] if m["probe"] == f"tc:{lab.x2}:ingress"]
    assert bool(late) == (kind == "tc-clsact")
    assert hello["scope"] == "netns"
    if kind == "tcx-link":
        assert lab.tc_state() == before  # no qdisc, no filter: tc sees nothing of ours

    # (a) SYN to a port nobody listens on, from a: b answers with a RST.
    assert in_ns(lab.a, CONNECT, "198.18.250.2", "81").stdout.strip() == "refused"
    # (b) a server in b aborts with SO_LINGER 0 after reading 5 bytes.
    assert exchange(lab, ABORT_SERVER, "8080", "abort") == "reset"
    # (c) a normal connection that ends with FINs.
    assert exchange(lab, NORMAL_SERVER, "8081", "close") == "closed"
    # (d) resets that happen in namespace a: must not show up in b's stream.
    assert in_ns(lab.a, CONNECT, "127.0.0.1", "82").stdout.strip() == "refused"
    assert in_ns(lab.b, CONNECT, "198.18.250.1", "83").stdout.strip() == "refused"

    assert run.read_until(lambda r: r["type"] == "reset" and r["sport"] == 8080, 10), (
        "no reset for the aborted connection"
    )
    if all_flows:
        run.read_until(lambda r: r["type"] == "packet" and r["why"] == "close", 5)
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish()
    assert code == 0, err
    assert run.records[-1] == {"type": "bye", "reason": "signal"}

    packets, resets = run.of("packet"), run.of("reset")
    # (a) the kernel's view and the RST leaving b's veth.
    no_socket = [r for r in resets if r["probe"] == "tcp_send_reset" and r["sport"] == 81]
    assert len(no_socket) == 1
    assert no_socket[0]["reason"] == "NO_SOCKET" and no_socket[0]["state"] is None
    assert no_socket[0]["saddr"] == "198.18.250.2" and no_socket[0]["netns"] == hello["netns"]
    syn = [p for p in packets if p["dport"] == 81 and p["why"] == "handshake"]
    rst = [p for p in packets if p["sport"] == 81 and p["why"] == "rst"]
    assert len(syn) == 1 and len(rst) == 1
    assert (syn[0]["dir"], syn[0]["ifname"], syn[0]["flags"]) == ("ingress", lab.vb, 2)
    assert (rst[0]["dir"], rst[0]["ifname"]) == ("egress", lab.vb)
    assert rst[0]["flags"] & 4 and rst[0]["ack"] == (syn[0]["seq"] + 1) % 2**32
    assert rst[0]["dport"] == syn[0]["sport"] and rst[0]["ts_ns"] > syn[0]["ts_ns"]

    # (b) abort: reason name from the live format, history before the RST.
    live = tcp_rst.parse_format(
        Path("/sys/kernel/tracing/events/tcp/tcp_send_reset/format").read_text()
    )
    abort = [r for r in resets if r["probe"] == "tcp_send_reset" and r["sport"] == 8080]
    assert len(abort) == 1
    assert abort[0]["reason"] == live["symbols"]["reason"][abort[0]["reason_num"]]
    assert abort[0]["state"] == "TCP_CLOSE" and abort[0]["state_num"] == 7
    flow = [p for p in packets if 8080 in (p["sport"], p["dport"])]
    rst_at = next(i for i, p in enumerate(flow) if p["why"] == "rst")
    history = [p for p in flow[:rst_at] if p["why"] == "history"]
    assert history, flow
    assert any(p["len"] == 5 and p["dir"] == "ingress" for p in history)
    assert all(p["ts_ns"] < flow[rst_at]["ts_ns"] for p in history)
    assert [p["ts_ns"] for p in history] == sorted(p["ts_ns"] for p in history)
    # its handshake comes with it (kept in the kernel, or streamed with --all-flows)
    assert [p["flags"] for p in flow[:rst_at] if p["why"] == "handshake"] == [2, 0x12]

    # (c) the normal connection: no RST, no reset record; its handshake and FINs are
    # streamed only with --all-flows (else they stay in the kernel, waiting for a RST).
    normal = [p for p in packets if 8081 in (p["sport"], p["dport"])]
    assert {p["why"] for p in normal} == ({"handshake", "close"} if all_flows else set())
    assert not [r for r in resets if 8081 in (r["sport"], r["dport"])]
    # (d) nothing from namespace a.
    assert all(r["netns"] == hello["netns"] for r in resets)
    assert not [r for r in resets if r["probe"] == "tcp_send_reset" and r["sport"] in (82, 83)]
    assert [r for r in resets if r["probe"] == "tcp_receive_reset" and r["dport"] == 83]

    assert lab.tc_state() == before
    assert tcx_state(lab) == tcx_before
    assert still_loaded(run.prog_ids) == set()


@pytest.mark.root
def test_sighup_and_count_leave_no_filters_on_the_clsact_path(lab):
    before = lab.tc_state()
    run = start(lab, "--port", "84", "--interfaces", lab.vb, "--tc-mode", "clsact")
    during = lab.tc_state()
    assert len(during[lab.vb][1]) > len(before[lab.vb][1])  # our ingress filter is there
    assert during[lab.x1] == before[lab.x1]  # not asked for: untouched
    run.proc.send_signal(signal.SIGHUP)
    code, err = run.finish()
    assert code == 0, err
    assert run.records[-1] == {"type": "bye", "reason": "signal"}
    assert lab.tc_state() == before  # vb's u32 filter and clsact stay; nothing added remains
    assert still_loaded(run.prog_ids) == set()

    run = start(lab, "--count", "1", "--port", "85", "--tc-mode", "clsact")
    assert "clsact" in lab.tc_state()[lab.x1][0]  # created for us on x1 ...
    assert in_ns(lab.a, CONNECT, "198.18.250.2", "85").stdout.strip() == "refused"
    code, err = run.finish(deadline_s=10)
    assert code == 0, err
    assert run.records[-1] == {"type": "bye", "reason": "count"}
    assert [r["sport"] for r in run.of("reset")] == [85]
    assert lab.tc_state() == before  # ... and removed again
    assert still_loaded(run.prog_ids) == set()


CONNECT6 = """
import socket, sys
s = socket.socket(socket.AF_INET6)
s.settimeout(5)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except ConnectionRefusedError:
    print("refused")
"""


@pytest.mark.root
def test_ipv6_reset_packets_and_kernel_view(lab):
    run = start(lab, "--port", "86", "--interfaces", lab.vb)
    assert in_ns(lab.a, CONNECT6, "2001:db8:250::2", "86").stdout.strip() == "refused"
    assert run.read_until(lambda r: r["type"] == "reset" and r["sport"] == 86, 10)
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish()
    assert code == 0, err
    [reset] = [r for r in run.of("reset") if r["probe"] == "tcp_send_reset"]
    assert (reset["family"], reset["saddr"], reset["daddr"]) == (
        6,
        "2001:db8:250::2",
        "2001:db8:250::1",
    )
    assert reset["reason"] == "NO_SOCKET"
    packets = [p for p in run.of("packet") if 86 in (p["sport"], p["dport"])]
    assert [(p["family"], p["why"], p["dir"]) for p in packets] == [
        (6, "handshake", "ingress"), (6, "rst", "egress")
    ]  # fmt: skip
    syn, rst = packets
    assert (syn["saddr"], syn["daddr"]) == ("2001:db8:250::1", "2001:db8:250::2")
    assert rst["ack"] == (syn["seq"] + 1) % 2**32 and rst["ipid"] == 0
    assert still_loaded(run.prog_ids) == set()


@pytest.mark.root
def test_tcx_sighup_detaches_only_the_asked_interface(lab):
    tcx_needed()
    before, tcx_before = lab.tc_state(), tcx_state(lab)
    run = start(lab, "--port", "84", "--interfaces", lab.vb)
    names = loaded_progs()
    on_vb = tcx_progs(lab.b, lab.vb, BPF_NR)
    assert [names[i] for i in on_vb["ingress"]] == ["ebd_tc_ingress"]
    assert [names[i] for i in on_vb["egress"]] == ["ebd_tc_egress"]
    assert tcx_progs(lab.b, lab.x1, BPF_NR) == tcx_before[lab.x1]  # not asked for: untouched
    assert lab.tc_state() == before
    run.proc.send_signal(signal.SIGHUP)
    code, err = run.finish()
    assert code == 0, err
    assert run.records[-1] == {"type": "bye", "reason": "signal"}
    assert tcx_state(lab) == tcx_before
    assert still_loaded(run.prog_ids) == set()


@pytest.mark.root
def test_tcx_runs_share_the_hook_and_sigkill_leaves_nothing(lab):
    """Two runs at once: the later one goes first, both see every packet (TCX_NEXT), and
    SIGKILL of either leaves nothing of it attached or loaded."""
    tcx_needed()
    before, tcx_before = lab.tc_state(), tcx_state(lab)
    first = start(lab, "--port", "86")
    second = start(lab, "--port", "86")
    ingress = tcx_progs(lab.b, lab.vb, BPF_NR)["ingress"]
    # Each run holds one ingress program; the later run was put first in the chain.
    assert [i in second.prog_ids for i in ingress] == [True, False]
    assert ingress[1] in first.prog_ids
    assert in_ns(lab.a, CONNECT, "198.18.250.2", "86").stdout.strip() == "refused"
    for run in (second, first):
        for why in ("handshake", "rst"):
            assert run.read_until(
                lambda r, why=why: (
                    r["type"] == "packet" and r["why"] == why and r["ifname"] == lab.vb
                ),
                10,
            ), (why, run.records)

    second.proc.send_signal(signal.SIGKILL)
    second.proc.wait(timeout=5)
    assert still_loaded(second.prog_ids) == set()
    left = tcx_progs(lab.b, lab.vb, BPF_NR)
    assert not set(left["ingress"] + left["egress"]) & second.prog_ids
    assert set(left["ingress"]) & first.prog_ids  # the other run keeps its hook

    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=5)
    assert still_loaded(first.prog_ids) == set()
    assert tcx_state(lab) == tcx_before
    assert lab.tc_state() == before


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
