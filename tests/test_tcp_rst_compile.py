"""The C that tcp_rst generates for each recorded kernel compiles with BCC and passes the
verifier of this kernel.

Comparing text (tests/test_tcp_rst_script.py) cannot tell whether clang accepts a struct
built from an old format file, or whether the verifier accepts the packet/socket reads.
Each case runs under the system python (which has BCC) in a subprocess: the script's own
build_program for the recorded formats, with and without this kernel's BTF offsets, then
BPF(text=...) and load_func for every program. Loading is not attaching: an old kernel's
tracepoint program loads here like any other.
"""

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from tests.bpfstate import SYSTEM_PYTHON, TCP_RST, load_tcp_rst
from tests.conftest import require

FORMATS = Path(__file__).resolve().parent / "fixtures" / "tracepoint_formats"
VERSIONS = sorted(p.name for p in FORMATS.iterdir() if p.is_dir())

COMPILE = r"""
import importlib.util, json, os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))  # the tool's core modules
spec = importlib.util.spec_from_file_location("tcp_rst", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
fmt_dir, btf, buffer = sys.argv[2], sys.argv[3] == "btf", sys.argv[4]
args = m.parse_args(["--port", "80", "--addr", "198.18.200.1", "--history", "4"])
kprobes = fmt_dir == "kprobes"
formats = {} if kprobes else m.read_formats(fmt_dir)
(offsets, why), (tuples, tuples_why) = m.btf_offsets() if btf else ((None, ""), (None, ""))
if btf and not (offsets and tuples):
    sys.exit("no BTF offsets: %s %s" % (why, tuples_why))
plan = m.make_plan(args, formats, offsets, tuples)
plan["kprobes"] = list(m.RESET_PROBES) if kprobes else []
plan["buffer"] = buffer
text = m.build_program(plan) + sys.argv[5]
from bcc import BPF
b = BPF(text=text)
loaded = []
for probe in sorted(formats):
    b.load_func("ebd_" + probe, BPF.TRACEPOINT)
    loaded.append("ebd_" + probe)
for fn in ("ebd_kp_v4_send_reset", "ebd_kp_v6_send_reset", "ebd_kp_tcp_reset")[: 3 * kprobes]:
    b.load_func(fn, BPF.KPROBE)
    loaded.append(fn)
for fn in ("ebd_tc_ingress", "ebd_tc_egress", "ebd_tc_in_l3", "ebd_tc_out_l3"):
    b.load_func(fn, BPF.SCHED_CLS)
    loaded.append(fn)
import ctypes
hist, event = b["flows"].Leaf, b["scratch"].sLeaf  # one CPU's value
pkt = dict(hist._fields_)["hs"]._type_
layout = {
    "hist": ctypes.sizeof(hist),
    "event": ctypes.sizeof(event),
    "pkt": [[n, getattr(pkt, n).offset, getattr(pkt, n).size] for n, _ in pkt._fields_],
}
print(json.dumps({"loaded": loaded, "tuple_code": "tuple_from_skb(&e" in text, "layout": layout}))
"""


def compile_case(version: str, btf: bool, extra: str = "") -> subprocess.CompletedProcess:
    require(os.geteuid() == 0, "needs root (BPF)")
    require(os.path.exists(SYSTEM_PYTHON), "needs the system python3")
    proc = subprocess.run([SYSTEM_PYTHON, "-c", "import bcc"], capture_output=True)
    require(proc.returncode == 0, "needs python3-bpfcc")
    # Kernels before 5.8 get perf buffers; generate what such a kernel would run.
    old = version != "kprobes" and tuple(map(int, version.split("."))) < (5, 8)
    buffer = "perf" if old else "ringbuf"
    where = version if version == "kprobes" else str(FORMATS / version)
    cmd = [SYSTEM_PYTHON, "-c", COMPILE, str(TCP_RST), where]
    cmd += ["btf" if btf else "none", buffer, extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.root
@pytest.mark.parametrize("btf", [True, False], ids=["btf", "no-btf"])
@pytest.mark.parametrize("version", VERSIONS)
def test_generated_program_compiles_and_loads(version, btf):
    proc = compile_case(version, btf)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    probes = sorted(p.name for p in (FORMATS / version).iterdir())
    assert result["loaded"] == ["ebd_" + p for p in probes] + [
        "ebd_tc_ingress", "ebd_tc_egress", "ebd_tc_in_l3", "ebd_tc_out_l3"
    ]  # fmt: skip
    # The RST's own tuple is read from the trigger packet only where tcp_send_reset exists
    # and this kernel's BTF gave the offsets.
    assert result["tuple_code"] == (btf and "tcp_send_reset" in probes)


@pytest.mark.root
def test_kprobe_fallback_compiles_and_loads():
    """Kernels without the reset tracepoints: kprobes reading struct sock via headers."""
    proc = compile_case("kprobes", True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"][:3] == [
        "ebd_kp_v4_send_reset", "ebd_kp_v6_send_reset", "ebd_kp_tcp_reset"
    ]  # fmt: skip


@pytest.mark.root
def test_a_program_that_does_not_compile_fails():
    """The harness itself: a C error must come back as a failure, not a pass."""
    proc = compile_case("6.18", True, extra="\nint broken(void) { return undeclared; }\n")
    assert proc.returncode != 0
    assert "undeclared" in proc.stderr


@pytest.mark.root
def test_decode_formats_match_the_kernel_structs():
    """The user-space struct formats read what the C structs hold: every struct pkt field
    (len is 32 bits: BIG TCP packets exceed 64 KiB) and the kept-history and event sizes."""
    proc = compile_case("6.18", True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    layout = json.loads(proc.stdout.strip().splitlines()[-1])["layout"]
    m = load_tcp_rst()
    codes = m.FLOW_PKT_FMT.lstrip("=")
    names = ["ts", "ifindex", "seq", "ack", "len", "win", "ipid", "ttl", "flags", "dir", "fwd"]
    expected = [
        [name, struct.calcsize("=" + codes[:i]), struct.calcsize("=" + codes[i])]
        for i, name in enumerate(names)
    ]
    assert [f for f in layout["pkt"] if not f[0].startswith("_")] == expected
    assert dict((f[0], f[2]) for f in layout["pkt"])["len"] == 4
    slots = 4  # --history 4
    pkts = (2 + slots) * m.PKT_SIZE
    assert layout["hist"] == m.FLOW_SIZE + struct.calcsize(m.HIST_HEAD_FMT) + pkts
    assert layout["event"] == m.FLOW_SIZE + m.PKT_SIZE + struct.calcsize(m.EVENT_HEAD_FMT) + pkts
