"""scripts/bpf/drop.py without root: reason names per kernel, C generation, decoding.

Recorded (6.18) and reconstructed (5.18, 6.2, 5.10) kfree_skb formats live in
tests/fixtures/drop/ (see NOTES.md there): the numbering differs in each, the names must not.
"""

import importlib.util
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bpfstate import load_core
from tests.conftest import require

parse_format = load_core("tracepoints").parse_format  # the tools' format parser
Btf = load_core("btf").Btf  # the tools' BTF reader

ROOT = Path(__file__).resolve().parent.parent
BPF_DIR = ROOT / "scripts" / "bpf"
SCRIPT = BPF_DIR / "drop.py"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "drop"
KERNELS = ["5.18", "6.2", "6.18"]


def load_drop():
    if str(BPF_DIR) not in sys.path:
        sys.path.insert(0, str(BPF_DIR))
    spec = importlib.util.spec_from_file_location("drop_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


drop = load_drop()


def fmt(version: str) -> dict:
    return drop.read_formats(str(FIXTURES / version))["kfree_skb"]


def btf_blob(enum_name: str, values: dict) -> bytes:
    """A minimal BTF file holding one 32-bit enum (what the kernel's vmlinux BTF has)."""
    strings = b"\0"
    offsets = {}
    for name in [enum_name, *values.values()]:
        offsets[name] = len(strings)
        strings += name.encode() + b"\0"
    types = struct.pack("<III", offsets[enum_name], (6 << 24) | len(values), 4)
    for value, name in values.items():
        types += struct.pack("<II", offsets[name], value)
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


ENUM_618 = {0: "SKB_NOT_DROPPED_YET", 1: "SKB_CONSUMED", 2: "SKB_DROP_REASON_NOT_SPECIFIED",
            12: "SKB_DROP_REASON_NETFILTER_DROP", 128: "SKB_DROP_REASON_MAX",
            0xFFFF0000: "SKB_DROP_REASON_SUBSYS_MASK"}  # fmt: skip


def ebpf(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--ebpf", *argv], capture_output=True, text=True, timeout=60
    )


# ------------------------------------------------------------------ reason names


@pytest.mark.parametrize(
    "version, netfilter, first", [("5.18", 6, 0), ("6.2", 8, 2), ("6.18", 12, 2)]
)
def test_reason_names_come_from_each_kernels_own_format(version, netfilter, first):
    table = drop.reason_table(fmt(version), None)
    assert table["source"] == "format" and table["has_field"]
    assert table["names"][netfilter] == "NETFILTER_DROP"
    assert table["names"][first] == "NOT_SPECIFIED"
    assert table["first_drop"] == first
    assert "MAX" not in table["names"].values()


def test_numbering_differs_and_names_stay_right():
    numbers = {v: {n: k for k, n in drop.reason_table(fmt(v), None)["names"].items()}
               for v in KERNELS}  # fmt: skip
    assert len({numbers[v]["NETFILTER_DROP"] for v in KERNELS}) == 3
    # the same name, a different number: a table from one kernel would misname the others
    assert numbers["6.2"]["NEIGH_FAILED"] != numbers["6.18"]["NEIGH_FAILED"]
    assert drop.reason_table(fmt("6.18"), None)["names"][58] == "NEIGH_FAILED"
    assert drop.reason_count(drop.reason_table(fmt("6.18"), None)) == 126


def test_live_format_reason_names_match_this_kernel():
    live = Path("/sys/kernel/tracing/events/skb/kfree_skb/format")
    require(live.exists(), "no tracefs here")
    parsed = parse_format(live.read_text())
    table = drop.reason_table(parsed, None)
    assert "NETFILTER_DROP" in table["names"].values()


def test_kernel_without_reason_field_falls_back_to_locations():
    table = drop.reason_table(fmt("5.10"), {1: "SKB_CONSUMED"})
    assert table == {"source": "none", "names": {}, "has_field": False, "first_drop": 0,
                     "consumed": None, "queue_purge": None,
                     "not_specified": None}  # fmt: skip
    proc = ebpf("--format-dir", str(FIXTURES / "5.10"))
    assert proc.returncode == 0, proc.stderr
    assert "__u32 reason = NO_REASON;" in proc.stdout
    assert "rec.reason" not in proc.stdout
    assert "tcp_retransmit_skb" in proc.stderr  # the missing probes are named


def test_skb_consumed_named_only_in_btf_is_not_a_drop(tmp_path):
    btf = tmp_path / "vmlinux"
    btf.write_bytes(btf_blob("skb_drop_reason", ENUM_618))
    table = drop.reason_table(fmt("6.18"), Btf(btf.read_bytes()).enum("skb_drop_reason"))
    assert table["consumed"] == 1 and table["first_drop"] == 2
    assert table["names"][1] == "SKB_CONSUMED" and table["names"][12] == "NETFILTER_DROP"
    assert 0xFFFF0000 not in table["names"]
    proc = ebpf("--format-dir", str(FIXTURES / "6.18"), "--btf", str(btf))
    assert proc.returncode == 0, proc.stderr
    assert "#define CONSUMED_REASON 1u" in proc.stdout
    assert "#define FIRST_DROP_REASON 2u" in proc.stdout
    assert "if (reason < FIRST_DROP_REASON || reason == CONSUMED_REASON)" in proc.stdout


def test_btf_names_when_the_format_prints_none():
    bare = dict(fmt("6.18"), symbols={})
    table = drop.reason_table(bare, ENUM_618)
    assert table["source"] == "btf"
    assert table["names"][12] == "NETFILTER_DROP" and table["first_drop"] == 2


def test_live_btf_enum_is_read():
    vmlinux = Path("/sys/kernel/btf/vmlinux")
    require(vmlinux.exists(), "no BTF here")
    values = Btf(vmlinux.read_bytes()).enum("skb_drop_reason")
    by_name = {v: k for k, v in values.items()}
    assert by_name["SKB_CONSUMED"] == 1
    live = drop.reason_table(fmt("6.18"), values)
    assert live["names"][by_name["SKB_DROP_REASON_NETFILTER_DROP"]] == "NETFILTER_DROP"


# ------------------------------------------------------------------ generated C


@pytest.mark.parametrize("version", [*KERNELS, "5.10"])
def test_ebpf_text_for_each_recorded_format(version):
    proc = ebpf("--format-dir", str(FIXTURES / version), "--port", "8090", "--addr", "198.18.1.1")
    assert proc.returncode == 0, proc.stderr
    code = proc.stdout
    assert code.count("{") == code.count("}")
    assert "int ebd_kfree_skb(void *ctx)" in code
    pinned = dict(re.findall(r"offsetof\(struct tp_kfree_skb, (\w+)\) == (\d+)", code))
    expected = {f["name"]: str(f["offset"]) for f in fmt(version)["fields"]}
    assert pinned == expected
    assert "enum skb_drop_reason" not in code.split("*/")[0]
    assert "#define FILTER_PORTS 1" in code and "#define FILTER_ADDRS 1" in code
    # recorded formats come without this host's BTF: no header reads, so nothing matches
    assert "read_packet" not in code and "int have = 0;" in code
    if version == "6.18":
        assert "int ebd_tcp_retransmit_skb(void *ctx)" in code
        assert "int ebd_tcp_retransmit_synack(void *ctx)" in code


def test_ebpf_with_this_hosts_btf_reads_headers_and_namespace():
    require(Path("/sys/kernel/btf/vmlinux").exists(), "no BTF here")
    proc = ebpf("--format-dir", str(FIXTURES / "6.18"), "--btf", "/sys/kernel/btf/vmlinux")
    assert proc.returncode == 0, proc.stderr
    code = proc.stdout
    for name in ("OFF_SKB_HEAD", "OFF_SKB_NH", "OFF_SKB_SK", "OFF_DEV_IFINDEX", "OFF_NET_INUM"):
        assert re.search(rf"#define {name} \d+", code), name
    assert "int have = skb ? read_packet(skb, rec.protocol, ev) : 0;" in code
    assert "__u64 sk = rec.rx_sk;" in code
    assert "e.netns != OWN_NETNS" in code
    # a FIN its own socket got after this side closed is no drop: the numbers of
    # QUEUE_PURGE and NOT_SPECIFIED from 6.18's format, the socket's ports and state from
    # BTF, the test before anything is counted
    maybe = "if ((reason == 104u /* QUEUE_PURGE */ || reason == 2u /* NOT_SPECIFIED */)"
    assert maybe + " && have && ev->l4 == 1 && !ev->len\n" in code
    assert "\t\t&& !(ev->flags & 0x02) && sk) {  /* no payload, no SYN */" in code
    assert "if ((reason == 104u || state == 6) && local && local == ev->dport" in code
    for name in ("OFF_SKC_NUM", "OFF_SKC_DPORT", "OFF_INET_SPORT", "OFF_SKC_STATE"):
        assert re.search(rf"#define {name} \d+", code), name
    body = code[code.index("int ebd_kfree_skb(void *ctx)") :]
    assert body.index("/* QUEUE_PURGE */") < body.index("count_drop(")


def test_without_the_sockets_fields_in_btf_a_fin_after_a_close_stays_a_drop():
    require(Path("/sys/kernel/btf/vmlinux").exists(), "no BTF here")
    offsets, enum, whys = drop.btf_facts("/sys/kernel/btf/vmlinux")
    assert whys == [] and all(k in offsets for k in drop.SOCK_FIELDS)
    args = drop.parse_args(["--port", "8090"])
    plan = drop.make_plan(args, drop.read_formats(str(FIXTURES / "6.18")), offsets, enum)
    assert "/* NOT_SPECIFIED */) && have" in drop.build_program(plan)
    del offsets["skc_state"]
    code = drop.build_program(plan)
    assert "/* NOT_SPECIFIED */" not in code and "int have = skb ? read_packet(" in code


def test_kernel_without_drop_reasons_has_no_delivered_fin_rule():
    """5.10's format has no reason field: nothing can be told apart by reason there."""
    require(Path("/sys/kernel/btf/vmlinux").exists(), "no BTF here")
    proc = ebpf("--format-dir", str(FIXTURES / "5.10"), "--btf", "/sys/kernel/btf/vmlinux")
    assert proc.returncode == 0, proc.stderr
    assert "read_packet(skb" in proc.stdout
    assert "/* QUEUE_PURGE */" not in proc.stdout and "/* NOT_SPECIFIED */" not in proc.stdout


def test_kernel_without_queue_purge_keeps_the_time_wait_rule():
    """6.2 names NOT_SPECIFIED but has no QUEUE_PURGE: only a time-wait socket's FIN is
    told apart there."""
    require(Path("/sys/kernel/btf/vmlinux").exists(), "no BTF here")
    offsets, _enum, _whys = drop.btf_facts("/sys/kernel/btf/vmlinux")
    formats = drop.read_formats(str(FIXTURES / "6.2"))
    plan = drop.make_plan(drop.parse_args([]), formats, offsets, None)  # 6.2's names only
    code = drop.build_program(plan)
    assert "if ((reason == 2u /* NOT_SPECIFIED */) && have" in code
    assert "if ((state == 6) && local" in code
    assert "QUEUE_PURGE" not in code


@pytest.mark.parametrize("rate, interval, burst", [(1000, 1_000_000, 99_000_000), (0, 0, 0)])
def test_rate_limit_constants(rate, interval, burst):
    proc = ebpf("--format-dir", str(FIXTURES / "6.18"), "--rate", str(rate))
    assert proc.returncode == 0, proc.stderr
    assert f"#define RATE_INTERVAL_NS {interval}ull" in proc.stdout
    assert f"#define RATE_BURST_NS {burst}ull" in proc.stdout


def test_bad_arguments_are_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--format-dir", "/tmp"],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--format-dir" in proc.stderr
    assert json.loads(proc.stdout)["reason"] == "error"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rate", "-1"],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 2 and "--rate" in proc.stderr


# ------------------------------------------------------------------ decoding


class FakeSymbols:
    def resolve(self, addr):
        return {0xFFFF1000: "nf_hook_slow+0x97"}.get(addr)


def drop_event(reason, *, l4=1, family=4, location=0xFFFF1000, ifindex=3):
    saddr = bytes([198, 18, 1, 10]).ljust(16, b"\0")
    daddr = bytes([198, 18, 3, 1]).ljust(16, b"\0")
    return struct.pack(drop.DROP_FMT, 5, location, reason, ifindex, 7, 100, 0, 40000, 8090,
                       0, 321, family, 6, 0x02, l4, saddr, daddr)  # fmt: skip


def test_decode_drop_names_reason_and_location():
    names = drop.reason_table(fmt("6.18"), None)["names"]
    rec = drop.decode_drop(drop_event(12), names, FakeSymbols(), {3: "to-client"}.get)
    assert rec == {
        "type": "drop", "ts_ns": 5, "reason": "NETFILTER_DROP", "reason_num": 12,
        "location": "nf_hook_slow+0x97", "ifindex": 3, "ifname": "to-client", "family": 4,
        "proto": 6, "saddr": "198.18.1.10", "daddr": "198.18.3.1", "sport": 40000,
        "dport": 8090, "flags": 2, "seq": 100, "ack": 0, "len": 0, "ipid": 321,
    }  # fmt: skip
    # 5.18 numbering: the same number is another reason there
    assert drop.decode_drop(drop_event(12), drop.reason_table(fmt("5.18"), None)["names"],
                            FakeSymbols(), {}.get)["reason"] == "XFRM_POLICY"  # fmt: skip


def test_decode_drop_without_reason_or_ports():
    rec = drop.decode_drop(drop_event(drop.NO_REASON, l4=0), {}, FakeSymbols(), {}.get)
    assert rec["reason"] is None and rec["reason_num"] is None
    assert rec["location"] == "nf_hook_slow+0x97"
    assert rec["sport"] is None and rec["flags"] is None and rec["seq"] is None
    assert rec["saddr"] == "198.18.1.10"
    rec = drop.decode_drop(drop_event(12, family=0, l4=0, ifindex=0), {}, FakeSymbols(), {}.get)
    assert rec["family"] is None and rec["saddr"] is None and rec["ifname"] is None


def test_count_rows_sorted_with_names():
    names = drop.reason_table(fmt("6.18"), None)["names"]
    items = [
        (struct.pack(drop.COUNT_KEY_FMT, 0xFFFF1000, 12), struct.pack(drop.COUNT_VAL_FMT, 3, 2)),
        (struct.pack(drop.COUNT_KEY_FMT, 0, 58), struct.pack(drop.COUNT_VAL_FMT, 9, 0)),
    ]
    rows = drop.count_rows(items, names, FakeSymbols())
    assert rows == [
        {"reason": "NEIGH_FAILED", "reason_num": 58, "location": None, "count": 9, "matched": 0},
        {"reason": "NETFILTER_DROP", "reason_num": 12, "location": "nf_hook_slow+0x97",
         "count": 3, "matched": 2},
    ]  # fmt: skip


def test_decode_retrans_v4_mapped_and_state():
    mapped = b"\0" * 10 + b"\xff\xff"
    src, dst = mapped + bytes([198, 18, 1, 10]), mapped + bytes([198, 18, 3, 1])
    raw = struct.pack(drop.RETRANS_FMT, 9, 0, 2, 40000, 8091, 6, 1, src, dst)
    rec = drop.decode_retrans(raw, {2: "TCP_SYN_SENT"})
    assert rec == {"type": "retrans", "ts_ns": 9, "probe": "tcp_retransmit_skb", "family": 4,
                   "saddr": "198.18.1.10", "sport": 40000, "daddr": "198.18.3.1",
                   "dport": 8091, "state": "TCP_SYN_SENT"}  # fmt: skip


def test_netstat_deltas_and_names(tmp_path):
    netstat_mod = importlib.import_module("core.netstat")
    path = tmp_path / "netstat"
    text = "TcpExt: ListenOverflows ListenDrops PAWSEstab\nTcpExt: {} {} 0\n"
    path.write_text(text.format(5, 5))
    watch = netstat_mod.NetstatDelta(paths=(str(path),))
    assert watch.names() == ["ListenDrops", "ListenOverflows", "PAWSEstab"]
    assert watch.changed() is None
    path.write_text(text.format(8, 9))
    assert watch.changed() == {"ListenDrops": 4, "ListenOverflows": 3, "PAWSEstab": 0}
    assert watch.changed() is None


def test_symbols_from_kallsyms(tmp_path):
    symbols_mod = importlib.import_module("core.symbols")
    path = tmp_path / "kallsyms"
    path.write_text("ffffffff81000000 T _text\nffffffff81000100 t nf_hook_slow\n"
                    "ffffffff81000200 d some_data\nffffffff81000300 T ip_error\n")  # fmt: skip
    table = symbols_mod.Symbols(str(path))
    assert table.resolve(0xFFFFFFFF81000197) == "nf_hook_slow+0x97"
    assert table.resolve(0xFFFFFFFF81000250) == "nf_hook_slow+0x150"  # data symbols skipped
    assert table.resolve(0) is None
    hidden = tmp_path / "hidden"
    hidden.write_text("0000000000000000 T _text\n")
    assert symbols_mod.Symbols(str(hidden)).resolve(0xFFFFFFFF81000197) is None


def test_catalog_lists_the_tool_with_its_parameters_and_fields():
    from ebpfdiag.catalog import list_scripts

    info = next(s for s in list_scripts() if s.name == "drop")
    assert info.summary.startswith("drop: where a flow's packets die")
    options = [p[0].split()[0] for p in info.parameters]
    assert options == ["--port", "--addr", "--duration", "--count", "--rate", "--history", "--ebpf",
                       "--format-dir"]  # fmt: skip
    fields = {f[0] for f in info.fields}
    assert {"drop.reason", "drop.location", "drop_counts.counts", "netstat.delta",
            "retrans.state", "hello.reasons"} <= fields  # fmt: skip


# ------------------------------------------------------------------ packet history


def test_history_programs_are_compiled_for_the_hosts_kinds_of_link_only():
    args = drop.parse_args(["--port", "8090"])
    formats = drop.read_formats(str(FIXTURES / "6.18"))
    plan = drop.make_plan(args, formats, None, None, [(2, "eth0", 14), (3, "eth1", 14)])
    code = drop.build_program(plan)
    assert "int ebd_tc_ingress(" in code and "int ebd_tc_egress(" in code
    assert "ebd_tc_in_l3" not in code and "ebd_tc_out_l3" not in code
    plan = drop.make_plan(args, formats, None, None, [(2, "eth0", 14), (7, "wg0", 0)])
    assert "int ebd_tc_in_l3(" in drop.build_program(plan)


def test_history_programs_use_the_shared_parser_and_the_drop_filter():
    proc = ebpf("--format-dir", str(FIXTURES / "6.18"), "--port", "8090")
    assert proc.returncode == 0, proc.stderr
    code = proc.stdout
    assert "static __always_inline int ebd_parse_tcp(" in code  # core/packet.py's parser
    for fn in ("ebd_tc_ingress", "ebd_tc_egress", "ebd_tc_in_l3", "ebd_tc_out_l3"):
        assert f"int {fn}(struct __sk_buff *skb)" in code
    assert "#define HISTORY 8" in code and "lru_hash" in code
    assert "flow_wanted(t.family," in code  # the kernel filter keeps the history small
    none = ebpf("--format-dir", str(FIXTURES / "6.18"), "--history", "0").stdout
    assert "ebd_tc_ingress" not in none and "struct hist" not in none


def hist_value(slots: int, pkts: list[tuple], head: int, count: int) -> bytes:
    """A `flows` map value: key 198.18.1.10:40000 <-> 198.18.3.1:80, then the ring."""
    a = bytes([198, 18, 1, 10]) + bytes(12)
    b = bytes([198, 18, 3, 1]) + bytes(12)
    raw = struct.pack(drop.FLOW_FMT, a, b, 40000, 80, 4)
    raw += struct.pack(drop.HIST_HEAD_FMT, head, count, 0)
    ring = [struct.pack(drop.FLOW_PKT_FMT, *p) for p in pkts]
    ring += [bytes(struct.calcsize(drop.FLOW_PKT_FMT))] * (slots - len(ring))
    return raw + b"".join(ring)


def test_history_decodes_oldest_first_in_each_packets_direction():
    # ts, ifindex, seq, ack, len, win, ipid, ttl, flags, dir, fwd; the ring wrapped once
    syn = (100, 2, 7, 0, 0, 64240, 1, 64, 0x02, 1, 1)
    synack = (300, 2, 9, 8, 0, 65160, 0, 64, 0x12, 0, 0)
    retrans = (200, 2, 7, 0, 0, 64240, 2, 64, 0x02, 1, 1)
    raw = hist_value(2, [synack, retrans], head=1, count=2)
    recs = drop.decode_hist(raw, {2: "eth0"})
    assert [r["ts_ns"] for r in recs] == [200, 300]
    assert (recs[0]["saddr"], recs[0]["sport"], recs[0]["dir"]) == ("198.18.1.10", 40000, "egress")
    assert (recs[1]["saddr"], recs[1]["dport"], recs[1]["dir"]) == ("198.18.3.1", 40000, "ingress")
    assert {r["why"] for r in recs} == {"history"} and recs[0]["ifname"] == "eth0"
    assert drop.decode_hist(hist_value(2, [syn], head=1, count=1), {})[0]["ifname"] == "2"


def test_windows_merge_and_stay_bounded():
    gap = 2 * drop.WINDOW_MARGIN_NS
    assert drop.add_window([(10, 20)], 20 + gap, 30 + gap) == [(10, 30 + gap)]
    assert drop.add_window([(10, 20)], 21 + gap, 21 + gap) == [(10, 20), (21 + gap, 21 + gap)]
    many = []
    for i in range(drop.WINDOWS_MAX + 5):
        many = drop.add_window(many, i * 10 * gap, i * 10 * gap)
    assert len(many) == drop.WINDOWS_MAX
    assert many[0][0] == 0 and many[-1][1] == (drop.WINDOWS_MAX + 4) * 10 * gap
    assert drop.parse_windows("5-9,20-30") == [(5, 9), (20, 30)]
    with pytest.raises(ValueError):
        drop.parse_windows("5")


def test_only_flows_near_a_drop_are_emitted_newest_first_and_bounded():
    margin = drop.WINDOW_MARGIN_NS
    near = [{"ts_ns": 10 * margin - margin}]
    late = [{"ts_ns": 1}, {"ts_ns": 12 * margin + margin}]
    far = [{"ts_ns": 30 * margin}]
    chosen, left_out = drop.pick_flows([near, far, late], [(10 * margin, 12 * margin)])
    assert chosen == [late, near] and left_out == 0
    assert drop.pick_flows([near], []) == ([], 0)  # no drop anywhere: nothing
    flows = [[{"ts_ns": i}] for i in range(drop.DUMP_FLOWS_MAX + 3)]
    chosen, left_out = drop.pick_flows(flows, [(0, 0)])
    assert len(chosen) == drop.DUMP_FLOWS_MAX and left_out == 3
    assert chosen[0] == [{"ts_ns": drop.DUMP_FLOWS_MAX + 2}]


def test_control_line_adds_windows_and_ignores_what_it_does_not_know(capsys):
    session = drop.Session.__new__(drop.Session)
    session.windows = []
    session.window_lock = drop.threading.Lock()
    session.control("drops 5-9,100-200")
    session.control("drops x-y")
    session.control("port 80")
    assert session.windows == [(5, 200)]
    err = capsys.readouterr().err
    assert "ignored" in err and "not understood" in err
