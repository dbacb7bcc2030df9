"""scripts/bpf/tcp_latency.py without root: the generated C, the schema and its header, and
the sampling rule, whose Python mirror must agree with the documented examples and with the
kernel program's own C (compiled here for user space with the host's C compiler).
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bpfstate import load_core
from tests.conftest import require

parse_format = load_core("tracepoints").parse_format  # the tools' format parser

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bpf" / "tcp_latency.py"
DOC = ROOT / "docs" / "scripts" / "tcp_latency.md"
FORMATS = Path(__file__).resolve().parent / "fixtures" / "latency" / "formats"
SYSTEM_PYTHON = "/usr/bin/python3"


def load_tool():
    import importlib.util

    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("tcp_latency_compile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = load_tool()


def run_system(*args):
    require(os.path.exists(SYSTEM_PYTHON), "needs the system python3")
    return subprocess.run(
        [SYSTEM_PYTHON, str(SCRIPT), *args], capture_output=True, text=True, timeout=60
    )


# ------------------------------------------------------------------ --ebpf, no root


@pytest.mark.parametrize("version", sorted(p.name for p in FORMATS.iterdir()))
def test_ebpf_output_for_recorded_formats(version):
    proc = run_system("--ebpf", "--format-dir", str(FORMATS / version), "--sample", "8",
                      "--block-shift", "12", "--port", "80")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    code = proc.stdout
    for fn in ("ebd_tc_ingress", "ebd_tc_egress", "ebd_tc_in_l3", "ebd_tc_out_l3"):
        assert f"int {fn}(struct __sk_buff *skb)" in code
    assert "#define SAMPLE_N 8u" in code and "#define BLOCK_SHIFT 12" in code
    assert "port_wanted(t->sport)" in code  # --port filters in the kernel, both sides
    assert "addr_wanted(t->family" not in code  # no --addr: no address lookups
    assert "ebd_parse_tcp(skb, off, t)" in code  # the shared parser from core/packet.py
    recorded = sorted(p.name for p in (FORMATS / version).iterdir())
    for probe in ("tcp_probe", "tcp_retransmit_skb", "sock_recv_length"):
        if probe not in recorded:
            assert f"int ebd_{probe}(" not in code
            assert f"tcp_latency: {probe}: no tracepoint" in proc.stderr
            continue
        fmt = parse_format((FORMATS / version / probe).read_text())
        assert f"int ebd_{probe}(void *ctx)" in code
        for field in fmt["fields"]:
            assert f"offsetof(struct tp_{probe}, {field['name']}) == {field['offset']}" in code
        program = code.split(f"int ebd_{probe}(")[1].split("\n}\n")[0]
        assert "port_wanted(e.sport)" in program and "unmap_v4(&e);" in program
    if version == "5.x-no-family":  # IPv4 sockets only in saddr_v6, v4-mapped
        assert "__builtin_memcpy(e.saddr, rec.saddr_v6, 16);" in code
        assert "e.family = rec.family" not in code


def test_missing_tracepoints_are_named_and_left_out(tmp_path):
    shutil.copy(FORMATS / "6.18" / "tcp_probe", tmp_path / "tcp_probe")
    proc = run_system("--ebpf", "--format-dir", str(tmp_path), "--addr", "198.18.0.1")
    assert proc.returncode == 0, proc.stderr
    assert "int ebd_tcp_probe(void *ctx)" in proc.stdout
    assert "ebd_tcp_retransmit_skb" not in proc.stdout and "sock_ports" not in proc.stdout
    assert "addr_wanted(t->family, t->saddr)" in proc.stdout
    assert "port_wanted(" not in proc.stdout.split("int ebd_tc_ingress")[0].split("on_packet")[1]
    lines = proc.stderr.splitlines()
    assert "tcp_latency: tcp_retransmit_skb: no tracepoint tcp:tcp_retransmit_skb here" in lines
    assert "tcp_latency: sock_recv_length: no tracepoint sock:sock_recv_length here" in lines


def test_raw_tracepoints_only_where_the_kernel_and_btf_allow(monkeypatch):
    """tcp_probe and sock_recv_length run raw on 4.17+ with the socket's BTF offsets, the
    retransmit tracepoint never; otherwise the reason is kept (--tp-mode raw fails on it)."""
    formats = {"tcp_probe": {}, "sock_recv_length": {}, "tcp_retransmit_skb": {}}
    tuples = dict.fromkeys(tool.RECV_TUPLE_KEYS, 0)
    fields = dict.fromkeys(tool.SOCK_FIELDS, 0)
    monkeypatch.setattr(tool, "kernel_version", lambda: (6, 18))
    both = (["sock_recv_length", "tcp_probe"], None)
    assert tool.raw_choice("auto", formats, tuples, fields) == both
    assert tool.raw_choice("raw", formats, tuples, fields) == both
    assert tool.raw_choice("auto", {"tcp_probe": {}}, tuples, fields) == (["tcp_probe"], None)
    assert tool.raw_choice("format", formats, tuples, fields) == ([], "--tp-mode format")
    no_btf = ([], "no BTF offsets for the socket's fields")
    assert tool.raw_choice("raw", formats, None, fields) == no_btf
    assert tool.raw_choice("auto", formats, tuples, None) == no_btf
    assert tool.sock_fields(None) == (None, "no BTF")
    monkeypatch.setattr(tool, "kernel_version", lambda: (4, 14))
    old = ([], "no raw tracepoints before Linux 4.17")
    assert tool.raw_choice("auto", formats, tuples, fields) == old


def test_packet_programs_are_compiled_for_the_hosts_kinds_of_link_only():
    args = tool.parse_args(["--port", "8080"])
    formats = tool.read_formats(str(FORMATS / "6.18"))
    plan = tool.make_plan(args, formats, None, None, None, [(2, "eth0", 14)])
    code = tool.build_program(plan)
    assert "int ebd_tc_ingress(" in code and "int ebd_tc_egress(" in code
    assert "ebd_tc_in_l3" not in code and "ebd_tc_out_l3" not in code
    plan = tool.make_plan(args, formats, None, None, None, [(7, "wg0", 0)])
    code = tool.build_program(plan)
    assert "int ebd_tc_in_l3(" in code and "int ebd_tc_ingress(" not in code


def test_raw_programs_leave_other_namespaces_before_reading_addresses():
    """On a raw tracepoint another namespace's socket on a traced port (a container's, or
    another lab host's) costs the port reads and the namespace reads, nothing more; and
    once a socket is known (a record went out, or it is not wanted) its events for the
    next 100 ms cost one lookup, before any read of the socket."""
    require(os.path.exists("/sys/kernel/btf/vmlinux"), "no BTF here")
    proc = run_system("--ebpf", "--port", "8080", "--addr", "10.0.0.1", "--tp-mode", "raw")
    assert proc.returncode == 0, proc.stderr
    code = proc.stdout
    for probe, kind in (("tcp_probe", 1), ("sock_recv_length", 3)):
        start = code.index(f"int ebd_{probe}(struct bpf_raw_tracepoint_args *ctx)")
        body = code[start : code.index("\n}\n", start)]
        order = [body.index(s) for s in (f"sk_settled(sk, {kind})", "sock_ports(&e, sk)",
                                         "port_wanted(", "e.netns != OWN_NETNS",
                                         "sock_addrs(&e, sk)", "rate_recent(",
                                         "rate_ok(")]  # fmt: skip
        assert order == sorted(order), (probe, order)
        first_read = body.find("bpf_probe_read_kernel(")
        assert first_read < 0 or order[0] < first_read, probe
        settle = f"sk_settle(sk, {kind});"
        # the port filter, the namespace and the address filter each settle what they refuse
        for test in ("port_wanted(", "e.netns != OWN_NETNS", "addr_wanted("):
            line = body[body.index(test) :].split(";", 1)[0]
            assert body[body.index(test) :].index(settle) < len(line) + 40, (probe, test)
        # and a record that goes out settles its socket for the rate limit's 100 ms
        assert body.index(settle, body.index("rate_ok(")) < body.index("e.ts = ")


@pytest.mark.parametrize(
    "bad, why",
    [
        (("--sample", "0"), "--sample: 0 is out of range (1-65536)"),
        (("--block-shift", "21"), "--block-shift: 21 is out of range (0-20)"),
        (("--tc-mode", "xdp"), "xdp"),
        (("--format-dir", "/tmp"), "--format-dir only goes with --ebpf"),
    ],
)
def test_bad_argument_exits_2_with_bye(bad, why):
    proc = run_system(*bad)
    assert proc.returncode == 2
    assert proc.stderr.startswith("tcp_latency: ") and why in proc.stderr
    assert proc.stderr.count("\n") == 1
    bye = json.loads(proc.stdout.strip().splitlines()[-1])
    assert bye["type"] == "bye" and bye["reason"] == "error"


# ------------------------------------------------------------------ schema and header


def test_params_and_header_say_the_same():
    from ebpfdiag.catalog import parse_header, resolve_script
    from ebpfdiag.remote.schema import load_params, params_module

    params = load_params(SCRIPT)
    header = ast.get_docstring(ast.parse(SCRIPT.read_text()))
    block = header.split("Parameters:\n", 1)[1].split("Fields:\n", 1)[0]
    assert block.splitlines() == params_module().help_lines(params)
    info = parse_header("tcp_latency", SCRIPT, SCRIPT.read_text())
    assert resolve_script("tcp_latency") == SCRIPT
    assert [p[0].split()[0] for p in info.parameters] == ["--" + p["name"] for p in params]
    fields = {f[0] for f in info.fields}
    packet = {"ts_ns", "ifname", "ifindex", "dir", "family", "saddr", "daddr", "sport", "dport",
              "flags", "seq", "ack", "ipid", "ttl", "len", "win", "why", "pt", "apt"}  # fmt: skip
    assert {"packet." + f for f in packet} <= fields
    assert {"counts.seen", "counts.sampled", "counts.lost", "hello.sample"} <= fields
    for kind in ("tcp_probe", "retrans", "recv"):
        assert {f"{kind}.{f}" for f in ("ts_ns", "family", "saddr", "sport")} <= fields
    assert {p["name"]: p.get("local", False) for p in params}["ebpf"] is True


def test_the_bundle_command_writes_a_program_that_runs_alone(tmp_path):
    require(os.path.exists(SYSTEM_PYTHON), "needs the system python3")
    out = tmp_path / "tcp_latency.bundle.py"
    r = subprocess.run([sys.executable, "-m", "ebpfdiag", "bundle", "tcp_latency", "-o", str(out)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    program = out.read_text()
    assert "from core" not in program and "# ---- core/packet.py" in program
    proc = subprocess.run([SYSTEM_PYTHON, str(out), "--ebpf", "--format-dir",
                           str(FORMATS / "6.18"), "--sample", "4"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "#define SAMPLE_N 4u" in proc.stdout


# ------------------------------------------------------------------ the sampling rule


def doc_examples() -> list[list[str]]:
    """Rows of the examples table in docs/scripts/tcp_latency.md (after its marker)."""
    text = DOC.read_text().split("<!-- sampling examples -->", 1)[1].strip()
    table = []
    for line in text.splitlines():
        if not line.startswith("|"):
            break
        table.append([c.strip().strip("`") for c in line.strip("|").split("|")])
    return table[2:]  # after the heading and its rule


def test_hash_and_rule_match_the_documented_examples():
    rows = doc_examples()
    assert len(rows) >= 8
    for what, args, expected in rows:
        values = [int(a, 0) for a in args.split(",")]
        if what == "hash32":
            got = f"0x{tool.hash32(*values):08x}"
        elif what == "chosen":
            got = str(tool.is_chosen(*values)).lower()
        elif what == "pt":
            got = str(tool.data_point(*values))
        elif what == "apt":
            got = str(tool.ack_point(*values))
        else:
            raise AssertionError(what)
        assert got == ("None" if expected == "null" else expected), (what, args)


def test_rule_properties():
    # N = 1: every byte is chosen: a payload's point is its first byte, an ack's its last
    assert all(tool.is_chosen(x, 1, 10) for x in range(0, 1 << 20, 333))
    assert tool.data_point(1, 1000, 1, 10) == 1
    assert tool.data_point(2000, 12, 1, 16) == 2000
    assert tool.ack_point(2000, 2012, 1, 16) == 2011
    # every byte of a chosen block is a point: a 12-byte request inside one is sampled,
    # one inside a block that is not chosen is not
    blocks8 = [b for b in range(64) if tool.is_chosen(b << 10, 8, 10)]
    other = next(b for b in range(64) if b not in blocks8)
    for b in blocks8:
        assert tool.data_point((b << 10) + 500, 12, 8, 10) == (b << 10) + 500
        assert tool.ack_point((b << 10) + 500, (b << 10) + 512, 8, 10) == (b << 10) + 511
    assert tool.data_point((other << 10) + 500, 12, 8, 10) is None
    assert tool.ack_point((other << 10) + 500, (other << 10) + 512, 8, 10) is None
    # the lowest chosen byte of a payload, the highest of an ack
    assert tool.data_point(1, 65160, 8, 10) == 1  # block 0 is chosen
    later = next(b for b in blocks8 if b > other)
    assert tool.data_point((other << 10) + 7, 65160, 8, 10) == min(
        b << 10 for b in blocks8 if b > other
    )
    assert tool.ack_point(0, (later << 10) + 5, 8, 10) == (later << 10) + 4
    assert tool.ack_point(0, (other << 10) + 5, 8, 10) == max(
        ((b + 1) << 10) - 1 for b in blocks8 if b < other
    )
    # newly acknowledged only; an equal or backwards ack acknowledges nothing
    assert tool.ack_point(5000, 5000, 8, 10) is None
    assert tool.ack_point(6000, 5000, 8, 10) is None
    # the 32-bit sequence space wraps; block 0 hashes to 0, so it is always chosen
    assert tool.data_point(2**32 - 100, 200, 8, 10) == 0
    assert tool.ack_point(2**32 - 10, 10, 8, 10) == 9
    # beyond 64 blocks only the first (payload) / highest (ack) 64 blocks count
    for end in range(100 * 1024, 400 * 1024, 7 * 1024 + 13):
        assert tool.ack_point(0, end, 8, 10) == tool.ack_point(end - 63 * 1024 - end % 1024,
                                                                end, 8, 10)  # fmt: skip
        assert tool.data_point(end, 300 * 1024, 8, 10) == tool.data_point(end, 63 * 1024, 8, 10)
    # about 1 in N blocks is chosen
    share = sum(tool.is_chosen(b << 10, 8, 10) for b in range(1 << 16)) / (1 << 16)
    assert 0.11 < share < 0.14


C_HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
typedef unsigned int __u32;
typedef unsigned long long __u64;
#define __always_inline inline
%(defines)s
%(functions)s
int main(int argc, char **argv)
{
	char what[8];
	unsigned long a, b;
	while (scanf("%%7s %%lu %%lu", what, &a, &b) == 3) {
		__u32 p = 0, span = (__u32)b - (__u32)a;
		int has;
		if (what[0] == 'd')
			has = data_point(a, b, &p);
		else    /* the caller's guard: only an ack that moves forward */
			has = span != 0 && span < 0x80000000u && ack_point(b, span, &p);
		if (has)
			printf("%%u\n", p);
		else
			printf("none\n");
	}
	return 0;
}
"""


def c_functions(code: str, names) -> str:
    out = []
    for name in names:
        m = re.search(rf"static __always_inline \w+ {name}\(.*?\n}}\n", code, re.S)
        assert m, name
        out.append(m.group(0))
    return "\n".join(out)


@pytest.mark.parametrize("n, shift", [(1, 10), (8, 10), (5, 4), (64, 12), (32, 16), (3, 0)])
def test_kernel_c_and_python_mirror_choose_the_same_points(tmp_path, n, shift):
    """The sampling functions of the generated program, compiled for user space, against
    hash32/data_point/ack_point on payloads and acks that cross blocks and the 2**32 wrap."""
    cc = shutil.which("cc") or shutil.which("gcc")
    require(cc is not None, "needs a C compiler")
    code = tool.build_program(
        {
            "sample": n,
            "block_shift": shift,
            "buffer": "ringbuf",
            "ports": [],
            "addrs": [],
            "tracepoints": {},
            "offsets": None,
            "tuple_offsets": None,
            "raw": [],
            "own_netns": 1,
            "missing": [],
        }  # fmt: skip
    )
    defines = "\n".join(
        line for line in code.splitlines()
        if re.match(r"#define (SAMPLE_N|BLOCK_SHIFT|BLOCK|MAX_BLOCKS) ", line)
    )  # fmt: skip
    functions = c_functions(code, ("fmix32", "chosen", "data_point", "ack_point"))
    src = tmp_path / "rule.c"
    src.write_text(C_HARNESS % {"defines": defines, "functions": functions})
    exe = tmp_path / "rule"
    subprocess.run([cc, "-O2", "-o", str(exe), str(src)], check=True, timeout=60)
    import random

    rng = random.Random(n * 1000 + shift)
    cases = []
    for _ in range(3000):
        start = rng.choice([rng.randrange(2**32), 2**32 - rng.randrange(1, 70000)])
        length = rng.choice([0, 1, rng.randrange(1, 3000), rng.randrange(1, 70000), 65160])
        cases.append(("data", start, length))
        cases.append(("ack", start, (start + length) % 2**32))
    feed = "".join(f"{w} {a} {b}\n" for w, a, b in cases)
    out = subprocess.run([str(exe)], input=feed, capture_output=True, text=True, check=True,
                         timeout=60).stdout.split()  # fmt: skip
    assert len(out) == len(cases)
    for (what, a, b), got in zip(cases, out, strict=True):
        rule = tool.data_point if what == "data" else tool.ack_point
        want = rule(a, b, n, shift)
        assert got == ("none" if want is None else str(want)), (what, a, b)


# ------------------------------------------------------------------ decoding and control


def test_packet_event_decodes_to_the_contract_record():
    raw = struct.pack(
        tool.EVENT_FMT,
        bytes([198, 18, 128, 1]) + bytes(12), bytes([198, 18, 128, 6]) + bytes(12),
        4_000_000_000, 77, 65160, 50000, 9080, 512, 4242, 64, 0x18, 4,
        123456789, 3, 6144, 0, 1, 1, 1, 0,
    )  # fmt: skip
    assert len(raw) == tool.EVENT_SIZE == 80
    record = tool.decode_packet(raw, {3: "eth0"})
    assert record == {
        "type": "packet", "ts_ns": 123456789, "ifname": "eth0", "ifindex": 3, "dir": "egress",
        "family": 4, "saddr": "198.18.128.1", "daddr": "198.18.128.6", "sport": 50000,
        "dport": 9080, "flags": 0x18, "seq": 4_000_000_000, "ack": 77, "ipid": 4242,
        "ttl": 64, "len": 65160, "win": 512, "why": "data", "pt": 6144, "apt": None,
    }  # fmt: skip
    v6 = struct.pack(
        tool.EVENT_FMT, bytes(15) + b"\1", bytes(15) + b"\2", 1, 2, 0, 1, 2, 3, 0, 255, 0x10,
        6, 5, 9, 0, 1024, 0, 2, 0, 1,
    )  # fmt: skip
    record = tool.decode_packet(v6, {})
    assert (record["saddr"], record["daddr"], record["ifname"], record["dir"]) == (
        "::1", "::2", "9", "ingress"
    )  # fmt: skip
    assert (record["why"], record["pt"], record["apt"]) == ("ack", None, 1024)


def sock_event(kind, family=4, state=-1, length=0, netns=7):
    return struct.pack(
        tool.SOCK_FMT, 99, netns, kind, bytes([198, 18, 128, 1]) + bytes(12),
        bytes([198, 18, 128, 6]) + bytes(12), 50000, 9080, family, state,
        2500, 10, 65535, 131072, 1000, 2000, length,
    )  # fmt: skip


def test_socket_events_decode_to_their_records():
    assert tool.SOCK_SIZE == 88
    probe = tool.decode_sock(sock_event(1), {})
    assert probe == {
        "type": "tcp_probe", "ts_ns": 99, "family": 4, "saddr": "198.18.128.1", "sport": 50000,
        "daddr": "198.18.128.6", "dport": 9080, "srtt_us": 2500, "snd_cwnd": 10,
        "snd_wnd": 65535, "rcv_wnd": 131072, "snd_una": 1000, "snd_nxt": 2000, "_netns": 7,
    }  # fmt: skip
    live = parse_format((FORMATS / "6.18" / "tcp_retransmit_skb").read_text())
    retrans = tool.decode_sock(sock_event(2, state=1), live["symbols"]["state"])
    assert retrans["type"] == "retrans" and retrans["state"] == "TCP_ESTABLISHED"
    assert tool.decode_sock(sock_event(2, state=4), {})["state"] == "TCP_FIN_WAIT1"
    recv = tool.decode_sock(sock_event(3, length=300), {})
    assert recv["type"] == "recv" and recv["len"] == 300 and "srtt_us" not in recv


class FakeMap(dict):
    """The ports array as fill_filters sees it: keyed by ctypes ints."""

    def __setitem__(self, key, value):
        super().__setitem__(key.value, value.value)


def test_control_port_widens_the_filter(capsys):
    out = io.StringIO()
    session = tool.Session(tool.parse_args(["--port", "8080"]), tool.Output(out), None)
    session.bpf = {"ports": FakeMap()}
    session.control("port 9080")
    session.control("port 9080")
    session.control("port x")
    session.control("frob")
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [
        {"type": "filter", "ports": [8080, 9080], "added": [9080], "why": "nat"},
        {"type": "filter", "ports": [8080, 9080], "added": [], "why": "nat"},
    ]
    assert session.bpf["ports"] == {9080: 1}
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "tcp_latency: control line ignored: --port: 'x' is not a port number (1-65535)",
        "tcp_latency: control line not understood, ignored: frob",
    ]


def test_packet_lines_are_the_records_as_json_writes_them():
    """The fast line builder the tool uses writes exactly json.dumps(decode_packet(...))."""
    import random

    rng = random.Random(7)
    ifnames = {2: "eth0", 3: 'we"ird\\name'}
    lines = tool.PacketLines(ifnames)
    for _ in range(2000):
        family = rng.choice([4, 6])
        raw = struct.pack(
            tool.EVENT_FMT, rng.randbytes(16), rng.randbytes(16), rng.randrange(2**32),
            rng.randrange(2**32), rng.randrange(2**32), rng.randrange(2**16),
            rng.randrange(2**16), rng.randrange(2**16), rng.randrange(2**16), rng.randrange(256),
            rng.randrange(256), family, rng.randrange(2**64), rng.choice([2, 3, 9]),
            rng.randrange(2**32), rng.randrange(2**32), rng.randrange(2), rng.randrange(1, 4),
            rng.randrange(2), rng.randrange(2),
        )  # fmt: skip
        want = json.dumps(tool.decode_packet(raw, ifnames), separators=(",", ":")) + "\n"
        assert lines.line(raw) == want
