"""The remote metrics tool (scripts/bpf/netmetrics.py): its pure parts, the C it generates
for recorded kernels (compiled and loaded by BCC), and a real run in a network namespace
whose resets, received resets and connection set-up times show up in its deltas."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.bpfstate import SYSTEM_PYTHON, load_core
from tests.conftest import require, require_root_tools

parse_format = load_core("tracepoints").parse_format  # the tools' format parser

TOOL = Path(__file__).resolve().parents[1] / "scripts" / "bpf" / "netmetrics.py"
FORMATS = Path(__file__).resolve().parent / "fixtures" / "tracepoint_formats"
DROP_FORMATS = Path(__file__).resolve().parent / "fixtures" / "drop"
SOCK_FORMATS = Path(__file__).resolve().parent / "fixtures" / "sock"
NETNS = "ebmx-script"


def load_tool():
    if str(TOOL.parent) not in sys.path:
        sys.path.insert(0, str(TOOL.parent))
    spec = importlib.util.spec_from_file_location("netmetrics_script", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


nm = load_tool()


def test_diff_counts_sends_only_growth_and_remembers():
    prev: dict = {}
    assert nm.diff_counts(prev, {("A", "x"): 2, ("B", "y"): 0}) == [["A", "x", 2]]
    assert nm.diff_counts(prev, {("A", "x"): 5, ("B", "y"): 0}) == [["A", "x", 3]]
    assert nm.diff_counts(prev, {("A", "x"): 5}) == []


def test_netstat_and_listening_ports_parse_proc_text():
    netstat = (
        "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n"
        "TcpExt: 0 7 9\n"
        "IpExt: InNoRoutes\nIpExt: 1\n"
    )
    values = nm.parse_netstat(netstat)
    assert values["TcpExt.ListenOverflows"] == 7 and values["TcpExt.ListenDrops"] == 9
    tcp = (
        "  sl  local_address rem_address   st\n"
        "   0: 0100007F:1F90 00000000:0000 0A\n"  # 8080 listening
        "   1: 0100007F:0016 00000000:0000 0A\n"  # 22 listening
        "   2: 0100007F:9C40 0100007F:1F90 01\n"  # established: not a label
    )
    assert nm.listening_ports([tcp], 16) == [22, 8080]
    assert nm.listening_ports([tcp], 1) == [22]


def test_the_sock_diag_request_asks_for_tcp_listeners_only():
    request = nm.diag_listen_request(socket.AF_INET6)
    assert struct.unpack_from("=BBBBI", request) == (socket.AF_INET6, 6, 0, 0, 1 << 10)
    assert len(request) == 56  # struct inet_diag_req_v2


SOCK_DIAG_PROBE = """
import socket, sys
sys.path.insert(0, sys.argv[1])
import netmetrics as nm
v4 = socket.socket(); v4.bind(("127.0.0.1", 7001)); v4.listen()
v6 = socket.socket(socket.AF_INET6); v6.bind(("::1", 7002)); v6.listen()
low = socket.socket(); low.bind(("127.0.0.1", 22)); low.listen()
peer = socket.create_connection(("127.0.0.1", 7001))  # established: never a label
texts = [open("/proc/self/net/tcp").read(), open("/proc/self/net/tcp6").read()]
print(nm.diag_listening_ports(16), nm.diag_listening_ports(2), nm.listening_ports(texts, 16))
"""


@pytest.mark.root
def test_sock_diag_lists_the_listening_ports_proc_lists(netns):
    """The tool reads listening ports from sock_diag (0.1 ms) rather than /proc/net/tcp,
    which walks the whole socket table (milliseconds every interval on a large host)."""
    subprocess.run(["ip", "-n", netns, "addr", "add", "::1/128", "dev", "lo"],
                   capture_output=True)  # fmt: skip
    r = subprocess.run(
        ["ip", "netns", "exec", netns, SYSTEM_PYTHON, "-c", SOCK_DIAG_PROBE, str(TOOL.parent)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("] [") == ["[22, 7001, 7002", "22, 7001", "22, 7001, 7002]\n"]


def test_reason_names_come_from_the_recorded_format_not_a_table():
    formats = nm.read_formats(str(FORMATS / "6.18"))
    names = nm.symbol_names(formats)
    assert nm.reason_name(names, 1) == "NO_SOCKET"
    # a format whose table is renumbered is followed (no built-in table)
    text = (FORMATS / "6.18" / "tcp_send_reset").read_text().replace('{ 1, "NO_SOCKET" }', "")
    renamed = nm.symbol_names({"tcp_send_reset": parse_format(text)})
    assert nm.reason_name(renamed, 1) == "1"
    assert nm.reason_name(names, nm.NO_REASON) == "unknown"
    assert nm.state_name(names, 7) == "TCP_CLOSE" and nm.state_name(names, 0) == "UNKNOWN"


def test_receive_reset_without_state_reads_the_socket_through_btf():
    formats = nm.read_formats(str(FORMATS / "6.18"))
    fmt = formats["tcp_receive_reset"]
    assert "state" not in nm.field_map(fmt)
    code = nm.c_state_counter("tcp_receive_reset", "rst_recv", fmt, None, 18)
    assert "rec.skaddr + 18" in code
    assert "rec.skaddr +" not in nm.c_state_counter("tcp_receive_reset", "r", fmt, None, None)


def test_socket_state_changes_that_do_not_touch_syn_sent_leave_before_the_namespace_reads():
    """Most state changes of a connection (FIN_WAIT, CLOSE_WAIT, ...) are not set-up times:
    they return on the tracepoint's own fields, without the probe reads of the namespace
    (every host's program sees every namespace's changes)."""
    fmt = nm.read_formats(str(SOCK_FORMATS / "6.18"))["inet_sock_set_state"]
    offsets = {"sk_net": 48, "skb_dev": 16, "dev_net": 280, "net_inum": 176}
    code = nm.c_set_state(fmt, offsets)
    early = code.index("if (rec.newstate != 2 && rec.oldstate != 2)")
    assert code.index("if (rec.protocol != 6)") < early < code.index("(rec.skaddr + 48)")
    assert early < code.index("OWN_NETNS") < code.index("syn_start.update")


class FakeSymbols:
    """kallsyms stand-in: one known function."""

    def resolve(self, addr: int):
        return "nf_hook_slow+0x4c" if addr == 0xFFFFFFFF81000100 else None


@pytest.mark.parametrize(
    ("version", "netfilter_drop"), [("5.18", 6), ("6.2", 8), ("6.18", 12)]
)  # fmt: skip
def test_drop_reasons_are_named_from_each_kernels_own_format(version, netfilter_drop):
    names = nm.symbol_names(nm.read_formats(str(DROP_FORMATS / version)))
    assert nm.drop_name(names, FakeSymbols(), netfilter_drop, 0) == "NETFILTER_DROP"
    assert nm.drop_name(names, FakeSymbols(), 100000, 0) == "100000"  # unnamed: its number


def test_drop_reasons_fall_back_to_the_btf_enum_for_what_the_format_leaves_out():
    fmt = nm.read_formats(str(DROP_FORMATS / "6.18"))
    enum = {0: "SKB_NOT_DROPPED_YET", 1: "SKB_CONSUMED", 2: "SKB_DROP_REASON_NOT_SPECIFIED"}
    names = nm.symbol_names(fmt, enum)
    assert names["drop"][1] == "SKB_CONSUMED" and names["drop"][12] == "NETFILTER_DROP"


def test_a_kernel_without_drop_reasons_labels_drops_by_function_or_unknown():
    names = nm.symbol_names(nm.read_formats(str(DROP_FORMATS / "5.10")))
    assert nm.drop_name(names, FakeSymbols(), nm.NO_REASON, 0xFFFFFFFF81000100) == "nf_hook_slow"
    assert nm.drop_name(names, FakeSymbols(), nm.NO_REASON, 0xFFFFFFFF81999999) == "unknown"
    assert nm.drop_name(names, FakeSymbols(), nm.NO_REASON, 0) == "unknown"


@pytest.mark.parametrize(
    ("version", "skip_below", "consumed"),
    [("5.18", "0u", "4294967295u"), ("6.2", "2u", "4294967295u"), ("6.18", "2u", "4294967295u")],
)  # fmt: skip
def test_ebpf_drop_program_skips_consumed_packets_by_the_kernels_numbers(
    version, skip_below, consumed
):
    proc = run_tool("--ebpf", "--format-dir", str(DROP_FORMATS / version))
    assert proc.returncode == 0, proc.stderr
    assert "int nm_kfree_skb(void *ctx)" in proc.stdout
    assert f"if (k.reason < {skip_below} || k.reason == {consumed})" in proc.stdout
    assert "k.loc = rec.location;" not in proc.stdout


def test_ebpf_drop_program_counts_by_location_without_a_reason_field():
    proc = run_tool("--ebpf", "--format-dir", str(DROP_FORMATS / "5.10"))
    assert proc.returncode == 0, proc.stderr
    assert "k.loc = rec.location;" in proc.stdout and "rec.reason" not in proc.stdout


def test_ebpf_drop_program_with_btf_skips_consumed_and_other_namespaces():
    enum = {0: "SKB_NOT_DROPPED_YET", 1: "SKB_CONSUMED", 2: "SKB_DROP_REASON_NOT_SPECIFIED"}
    fmt = nm.read_formats(str(DROP_FORMATS / "6.18"))["kfree_skb"]
    table = nm.reason_table(fmt, enum)
    offsets = {"sk_net": 48, "net_inum": 176, "skb_dev": 16, "dev_net": 264}
    code = nm.c_kfree_skb(fmt, offsets, table, 24)
    assert "if (k.reason < 2u || k.reason == 1u)" in code
    assert "__u64 sk = rec.rx_sk;" in code and "(void *)(skb + 24)" in code
    assert "if (e.netns != OWN_NETNS)" in code  # a drop of no known namespace is not ours


DROP_COMPILE = r"""
import importlib.util, json, os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
spec = importlib.util.spec_from_file_location("netmetrics", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
formats = m.read_formats(None)
formats["kfree_skb"] = m.read_formats(sys.argv[2])["kfree_skb"]
(offsets, _), (tuples, _) = m.btf_offsets()
enum, skb_sk = m.drop_btf()
text = m.build_program(
    formats, offsets, tuples["skc_state"], m.own_netns(), enum, skb_sk, tuples
)
from bcc import BPF
b = BPF(text=text)
b.load_func("nm_kfree_skb", BPF.TRACEPOINT)
print(json.dumps(["k.loc = rec.location;" in text, "delivered to its socket" in text]))
"""


@pytest.mark.root
@pytest.mark.parametrize("version", ["5.10", "5.18", "6.2", "6.18"])
def test_recorded_drop_formats_compile_and_load(version):
    require(os.path.exists(SYSTEM_PYTHON), "needs the system python3")
    require(Path("/usr/lib/python3/dist-packages/bcc").is_dir(), "needs python3-bpfcc")
    proc = subprocess.run(
        [SYSTEM_PYTHON, "-c", DROP_COMPILE, str(TOOL), str(DROP_FORMATS / version)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    by_location, delivered_rule = json.loads(proc.stdout)
    assert by_location is (version == "5.10")  # by location only without reasons
    # the delivered-FIN rule wherever the kernel has drop reasons (this kernel's BTF enum
    # names QUEUE_PURGE and NOT_SPECIFIED for every recorded format with a reason field)
    assert delivered_rule is (version != "5.10")


def test_the_delivered_fin_rule_reads_headers_only_for_its_two_reasons():
    fmt = nm.read_formats(str(DROP_FORMATS / "6.18"))["kfree_skb"]
    table = nm.reason_table(fmt, None)
    assert (table["queue_purge"], table["not_specified"]) == (104, 2)  # 6.18's own format
    offsets = {"sk_net": 48, "net_inum": 176, "skb_dev": 16, "dev_net": 264}
    tuples = {"skb_head": 200, "skb_nh": 182, "skc_num": 14, "skc_dport": 12,
              "inet_sport": 782, "skc_state": 18}  # fmt: skip
    code = nm.c_kfree_skb(fmt, offsets, table, 24, tuples)
    test = "if (k.reason == 104u /* QUEUE_PURGE */ || k.reason == 2u /* NOT_SPECIFIED */) {"
    rule = code.index(test)
    assert code.index("if (e.netns != OWN_NETNS)") < rule < code.index("drops.lookup(&k)")
    assert "read_packet(skb, rec.protocol, &p)" in code[rule:]
    assert "if ((k.reason == 104u || state == 6) && local" in code[rule:]
    assert "return 0;    /* delivered to its socket: no drop */" in code[rule:]
    program = nm.build_program({"kfree_skb": fmt}, offsets, None, 1, None, 24, tuples)
    assert "#define OFF_SKC_STATE 18" in program and "struct skb_packet {" in program
    # without the socket's state in BTF every such FIN counts
    del tuples["skc_state"]
    assert "NOT_SPECIFIED" not in nm.c_kfree_skb(fmt, offsets, table, 24, tuples)
    # 6.2 has no QUEUE_PURGE: only the time-wait rule
    fmt_62 = nm.read_formats(str(DROP_FORMATS / "6.2"))["kfree_skb"]
    table_62 = nm.reason_table(fmt_62, None)
    assert table_62["queue_purge"] is None and table_62["not_specified"] is not None
    tuples["skc_state"] = 18
    code = nm.c_kfree_skb(fmt_62, offsets, table_62, 24, tuples)
    assert "QUEUE_PURGE" not in code and "if ((state == 6) && local" in code


COMPILE = r"""
import importlib.util, json, os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
spec = importlib.util.spec_from_file_location("netmetrics", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
formats = m.read_formats(sys.argv[2])
live = m.read_formats(None)
for probe in ("tcp_retransmit_skb", "inet_sock_set_state"):
    formats[probe] = live[probe]
(offsets, _), (tuples, _) = m.btf_offsets()
text = m.build_program(formats, offsets, tuples["skc_state"], m.own_netns())
from bcc import BPF
b = BPF(text=text)
for probe in sorted(formats):
    b.load_func("nm_" + probe, BPF.TRACEPOINT)
print(json.dumps(sorted(formats)))
"""


@pytest.mark.root
@pytest.mark.parametrize("version", ["4.15", "6.1", "6.18"])
def test_recorded_kernels_compile_and_load(version):
    require(os.path.exists(SYSTEM_PYTHON), "needs the system python3")
    require(Path("/usr/lib/python3/dist-packages/bcc").is_dir(), "needs python3-bpfcc")
    proc = subprocess.run(
        [SYSTEM_PYTHON, "-c", COMPILE, str(TOOL), str(FORMATS / version)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tcp_send_reset" in json.loads(proc.stdout)


CLIENT = textwrap.dedent(
    """
    import socket, struct, time
    listener = socket.socket()
    listener.bind(("127.0.0.1", 7000))
    listener.listen()
    time.sleep(1.2)                         # the tool learns its listening ports each interval
    for _ in range(3):                      # no listener on port 9: NO_SOCKET resets
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", 9))
        except ConnectionRefusedError:
            pass
    s = socket.socket()                     # an abort: SO_LINGER 0 sends TCP_STATE/CLOSE
    s.connect(("127.0.0.1", 7000))
    conn, _ = listener.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
    try:
        s.recv(10)
    except ConnectionResetError:
        print("reset")
    """
)


@pytest.fixture
def netns():
    require_root_tools("ip")
    require(Path("/usr/lib/python3/dist-packages/bcc").is_dir(), "needs python3-bpfcc")
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    subprocess.run(["ip", "-n", NETNS, "link", "set", "lo", "up"], check=True)
    try:
        yield NETNS
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


@pytest.mark.root
def test_real_run_counts_resets_and_connect_times_in_its_namespace(netns):
    tool = subprocess.Popen(
        ["ip", "netns", "exec", netns, SYSTEM_PYTHON, str(TOOL), "--interval", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = [json.loads(tool.stdout.readline()) for _ in range(2)]
        assert [r["type"] for r in first] == ["hello", "ready"], first
        hello = first[0]
        assert hello["families"]["tcp_resets_sent"]["labels"] == ["reason", "state", "port"]
        assert set(hello["attach"]) == {
            "tcp_send_reset", "tcp_receive_reset", "tcp_retransmit_skb", "inet_sock_set_state",
            "kfree_skb",
        }  # fmt: skip
        assert hello["families"]["packet_drops"]["labels"] == ["reason"]
        # resets in another namespace (this one) must not be counted
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", 1))
        client = subprocess.run(
            ["ip", "netns", "exec", netns, SYSTEM_PYTHON, "-c", CLIENT],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert client.stdout.strip() == "reset", client.stderr
        deltas = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(deltas) < 4:
            deltas.append(json.loads(tool.stdout.readline()))
    finally:
        tool.terminate()
        rest, err = tool.communicate(timeout=15)
    assert json.loads(rest.splitlines()[-1]) == {"type": "bye", "reason": "signal"}, err
    assert all(d["type"] == "delta" for d in deltas)
    assert [d["seq"] for d in deltas] == list(range(deltas[0]["seq"], deltas[0]["seq"] + 4))
    sent: dict = {}
    received: dict = {}
    connects = 0
    for d in deltas:
        for *labels, n in d.get("c", {}).get("tcp_resets_sent", []):
            sent[tuple(labels)] = sent.get(tuple(labels), 0) + n
        for *labels, n in d.get("c", {}).get("tcp_resets_received", []):
            received[tuple(labels)] = received.get(tuple(labels), 0) + n
        for _labels_sum, slots in d.get("h", {}).get("tcp_connect_seconds", []):
            connects += sum(n for _slot, n in slots)
    assert sent == {("NO_SOCKET", "UNKNOWN", ""): 3, ("TCP_STATE", "TCP_CLOSE", "7000"): 1}
    assert received == {("TCP_SYN_SENT", ""): 3, ("TCP_ESTABLISHED", "7000"): 1}
    assert connects == 1  # the refused SYNs never got established


CLOSE_FIRST = textwrap.dedent(
    """
    import socket, time
    listener = socket.socket()
    listener.bind(("127.0.0.1", 7001))
    listener.listen()
    for delay in (0, 0, 0, 0.3, 0.3):  # the server answers and closes before the client
        c = socket.create_connection(("127.0.0.1", 7001))
        c.sendall(b"hello")
        conn, _ = listener.accept()
        conn.recv(10)
        conn.sendall(b"ok")
        conn.close()
        assert c.recv(10) == b"ok" and c.recv(10) == b""
        time.sleep(delay)     # later than the delayed ACK: the FIN reaches a time-wait socket
        port = c.getsockname()[1]
        c.close()             # else an orphaned socket, which purges it at its end
    listener.close()          # a SYN from the last port now meets a time-wait socket and no
    c = socket.socket()       # listener: answered by it, freed as NOT_SPECIFIED, and lost
    c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.bind(("127.0.0.1", port))
    c.settimeout(0.5)
    try:
        c.connect(("127.0.0.1", 7001))
    except OSError:
        pass
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(3):        # a real drop beside them: UDP to a port nobody has
        u.sendto(b"x", ("127.0.0.1", 9))
    print("done")
    """
)


@pytest.mark.root
def test_a_fin_purged_after_this_side_closed_is_not_counted_as_a_drop(netns):
    """The peer's FIN after this side closed first was delivered, though the kernel frees
    it as QUEUE_PURGE (purged unread when the orphaned socket is destroyed) or, when the
    peer closes later, as NOT_SPECIFIED (from the time-wait socket): trace drop does not call
    it a drop, and neither do the metrics. A SYN that meets a time-wait socket and no
    listener is still one (the only NOT_SPECIFIED), and so is UDP to a closed port."""
    tool = subprocess.Popen(
        ["ip", "netns", "exec", netns, SYSTEM_PYTHON, str(TOOL), "--interval", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        first = [json.loads(tool.stdout.readline()) for _ in range(2)]
        assert [r["type"] for r in first] == ["hello", "ready"], first
        client = subprocess.run(
            ["ip", "netns", "exec", netns, SYSTEM_PYTHON, "-c", CLOSE_FIRST],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert client.stdout.strip() == "done", client.stderr
        drops: dict = {}
        deadline = time.monotonic() + 1.6  # three deltas after the last packet
        while time.monotonic() < deadline:
            d = json.loads(tool.stdout.readline())
            for reason, n in d.get("c", {}).get("packet_drops", []):
                drops[reason] = drops.get(reason, 0) + n
    finally:
        tool.terminate()
        tool.communicate(timeout=15)
    assert drops.get("NO_SOCKET", 0) >= 3, drops
    assert "QUEUE_PURGE" not in drops and drops.get("NOT_SPECIFIED") == 1, drops


def run_tool(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *argv], capture_output=True, text=True, timeout=30
    )


def test_ebpf_prints_the_program_for_recorded_formats_without_root_or_bcc():
    proc = run_tool("--ebpf", "--format-dir", str(FORMATS / "4.15"))
    assert proc.returncode == 0, proc.stderr
    assert "int nm_tcp_send_reset(void *ctx)" in proc.stdout
    assert "k.reason = 4294967295u;" in proc.stdout  # 4.15 has no reset reason
    assert "nm_inet_sock_set_state" not in proc.stdout  # not in the recorded formats


def test_a_bad_argument_is_one_line_exit_2_and_a_bye():
    proc = run_tool("--format-dir", "/tmp")
    assert proc.returncode == 2
    assert proc.stderr == "netmetrics: --format-dir only goes with --ebpf\n"
    assert json.loads(proc.stdout) == {
        "type": "bye", "reason": "error", "error": "--format-dir only goes with --ebpf"
    }  # fmt: skip
