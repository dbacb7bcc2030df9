#!/usr/bin/python3
"""netmetrics: TCP counters kept in this host's kernel, sent as deltas every interval.

Counts in BPF maps (nothing per event leaves the kernel): TCP resets sent, by kernel reason,
socket state and local listening port (tcp:tcp_send_reset); resets received, by state and
port (tcp:tcp_receive_reset; where its format has no state, the socket's through BTF);
retransmissions by state and port (tcp:tcp_retransmit_skb); the time from SYN sent to
established as a log2 histogram (sock:inet_sock_set_state, keyed by socket); packets
dropped, by drop reason (skb:kfree_skb; packets freed as consumed, SKB_CONSUMED and every
number before NOT_SPECIFIED, are not drops, nor is the peer's FIN after this side closed
first, which the kernel frees as QUEUE_PURGE or from a time-wait socket as NOT_SPECIFIED
(a payload-less segment freed by the socket it was addressed to, told through BTF as
drop.py does); a kernel without the reason field labels a drop by the function that
dropped it, or "unknown"); and, from this namespace's
/proc/net/netstat, listen queue overflows and drops. Reason and state names come from the
live format files' __print_symbolic tables (drop reasons also from the BTF enum
skb_drop_reason), never from a fixed table. Only this network namespace's events are
counted; a drop whose namespace cannot be told (no socket, no device) is not.

Every interval one `delta` record carries what changed since the last one (only rows that
changed; an empty delta is a heartbeat). A family is declared once in hello (type, label
names, help), so a receiver accumulates families it does not know by name. Counts start
at zero when the tool starts: a receiver adds deltas, it never sees a counter go back.
The port label is the local port when it is one of this host's listening ports (at most
--port-labels of them, read from sock_diag every interval, from /proc/net/tcp where
sock_diag is missing), else empty: it stays bounded.

Parameters:
  --interval SECONDS      send a delta every SECONDS (default 15)
  --port-labels N         listening ports that may label resets (0-64, default 16)
  --duration SECONDS      stop after SECONDS (default 0: run until signalled)
  --ebpf                  print the generated C program and exit (needs no root)
  --format-dir DIR        with --ebpf: read tracepoint format files from DIR
Fields:
  hello.script          str    "netmetrics"
  hello.version         int    record schema version (1)
  hello.kernel          str    kernel release
  hello.netns           int    inode of this network namespace
  hello.interval        float  seconds between deltas
  hello.families        dict   name -> {type: counter|histogram, labels, help, bounds, scale}
  hello.attach          dict   per probe: kind (tracepoint)
  hello.missing         list   probes not attached: {probe, why}
  hello.bpf_stats       bool   whether the kernel counts BPF run time (kernel.bpf_stats_enabled)
  delta.seq             int    1, 2, ... per run
  delta.mono_ns         int    host CLOCK_MONOTONIC ns when the maps were read
  delta.c               dict   counter family -> [[label values..., increase], ...]
  delta.h               dict   histogram family -> [[labels..., sum increase, [[slot, n], ...]]]
  delta.lost            int    updates lost since the last delta (a map was full)
  delta.bpf             list   [run ns, runs] of this tool's programs since the last delta
  bye.reason            str    duration, signal, eof or error
  bye.error             str    error message (reason error only)
"""

import ctypes
import os
import socket
import struct
import sys
import time

from core.btf import BTF_VMLINUX, btf_offsets, c_netns_lookup, load_btf
from core.compile import bpf_compile
from core.discovery import netlink_dump, own_netns
from core.dropreasons import (
    C_SKB_PACKET,
    c_delivered,
    c_maybe_delivered,
    c_offsets,
    c_read_packet,
    knows_delivered,
    location_label,
    reason_table,
)
from core.events import Output, now_ns
from core.lifecycle import SetupError
from core.netstat import parse_counters
from core.symbols import Symbols
from core.tool import parse_tool_args, run_tool
from core.tracepoints import (
    TCP_STATES,
    address_layout,
    c_tracepoint_struct,
    ensure_tracefs,
    field_map,
    read_tracepoint_formats,
)

SCRIPT = "netmetrics"
VERSION = 1
PROBES = (
    ("tcp", "tcp_send_reset"),
    ("tcp", "tcp_receive_reset"),
    ("tcp", "tcp_retransmit_skb"),
    ("sock", "inet_sock_set_state"),
    ("skb", "kfree_skb"),
)
NO_REASON = 0xFFFFFFFF  # the kernel's format has no reason field
HIST_SLOTS = 32  # log2 microseconds: slot s holds values below 2**s us (slot 0: below 1 us)
MAP_ENTRIES = 1024
SYN_ENTRIES = 16384
NETSTAT = (("ListenOverflows", "tcp_listen_overflows"), ("ListenDrops", "tcp_listen_drops"))

FAMILIES = {
    "tcp_resets_sent": {
        "type": "counter",
        "labels": ["reason", "state", "port"],
        "help": "TCP resets sent by this host's kernel (tcp:tcp_send_reset), by reason, "
        "socket state and local listening port",
    },
    "tcp_resets_received": {
        "type": "counter",
        "labels": ["state", "port"],
        "help": "TCP resets received and accepted by a socket (tcp:tcp_receive_reset), by "
        "socket state and local listening port",
    },
    "tcp_retransmits": {
        "type": "counter",
        "labels": ["state", "port"],
        "help": "TCP segments retransmitted (tcp:tcp_retransmit_skb), by socket state and "
        "local listening port",
    },
    "tcp_listen_overflows": {
        "type": "counter",
        "labels": [],
        "help": "Times a listen queue was full (TcpExt ListenOverflows of the namespace)",
    },
    "tcp_listen_drops": {
        "type": "counter",
        "labels": [],
        "help": "SYNs dropped at a listener (TcpExt ListenDrops of the namespace)",
    },
    "packet_drops": {
        "type": "counter",
        "labels": ["reason"],
        "help": "Packets this host's kernel dropped (skb:kfree_skb), by drop reason (on "
        "kernels without one, the function that dropped the packet)",
    },
    "tcp_connect_seconds": {
        "type": "histogram",
        "labels": [],
        "help": "Time from SYN sent to established of this host's outgoing TCP connections "
        "(sock:inet_sock_set_state)",
        "scale": 1e-9,
        "bounds": [2**s * 1e-6 for s in range(HIST_SLOTS)],
    },
}


# --------------------------------------------------------------------------------------
# Formats and C generation
# --------------------------------------------------------------------------------------


def read_formats(fmt_dir) -> dict:
    """{probe: parsed format} from tracefs or a directory of recorded files (`NAME` or
    `NAME.format`); absent probes are left out."""
    return read_tracepoint_formats(PROBES, fmt_dir)


C_COMMON = r"""
#define OWN_NETNS %(netns)du
#define HIST_SLOTS %(slots)d
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define NM_HTONS(x) ((__u16)__builtin_bswap16(x))
#else
#define NM_HTONS(x) ((__u16)(x))
#endif

struct nm_scope { __u32 netns; };
struct rst_key { __u32 reason; __s32 state; __u32 port; };
struct st_key { __s32 state; __u32 port; };
struct drop_key { __u64 loc; __u32 reason; __u32 pad; };  /* loc: kernels without reasons */

BPF_HASH(rst_sent, struct rst_key, __u64, %(entries)d);
BPF_HASH(rst_recv, struct st_key, __u64, %(entries)d);
BPF_HASH(retrans, struct st_key, __u64, %(entries)d);
BPF_HASH(drops, struct drop_key, __u64, %(entries)d);
BPF_HASH(syn_start, __u64, __u64, %(syn_entries)d);
BPF_ARRAY(conn_hist, __u64, HIST_SLOTS);
BPF_ARRAY(conn_sum, __u64, 1);               /* ns */
BPF_ARRAY(lost, __u64, 1);                   /* updates that found a map full */
BPF_ARRAY(listen_ports, __u8, 65536);        /* port -> 1: may be a label */

static __always_inline void count_lost(void)
{
	__u32 zero = 0;
	__u64 *v = lost.lookup(&zero);
	if (v)
		__sync_fetch_and_add(v, 1);
}

static __always_inline __u32 label_port(__u16 a, __u16 b)
{
	__u32 k = a;
	__u8 *on = listen_ports.lookup(&k);
	if (on && *on)
		return a;
	k = b;
	on = listen_ports.lookup(&k);
	if (on && *on)
		return b;
	return 0;
}
"""


def c_bump(table: str, key: str) -> str:
    """C that adds one to table[key]; a racing insert on another CPU is found by the second
    lookup, and an insert into a full map is counted as lost."""
    return (
        "\t__u64 *v = %(t)s.lookup(&%(k)s);\n"
        "\tif (v) {\n"
        "\t\t__sync_fetch_and_add(v, 1);\n"
        "\t} else {\n"
        "\t\t__u64 one = 1;\n"
        "\t\tif (%(t)s.insert(&%(k)s, &one) != 0) {\n"
        "\t\t\tv = %(t)s.lookup(&%(k)s);\n"
        "\t\t\tif (v)\n"
        "\t\t\t\t__sync_fetch_and_add(v, 1);\n"
        "\t\t\telse\n"
        "\t\t\t\tcount_lost();\n"
        "\t\t}\n"
        "\t}\n"
        "\treturn 0;\n}\n" % {"t": table, "k": key}
    )


def c_ports(fmt: dict) -> str:
    """C that sets `sp`, `dp` (host order) from the record, whatever its address layout."""
    fields = field_map(fmt)
    if address_layout(fmt) == "sockaddr":
        return (
            "\t__u16 sp = 0, dp = 0;\n"
            "\t__builtin_memcpy(&sp, &rec.saddr[2], 2);\n"
            "\t__builtin_memcpy(&dp, &rec.daddr[2], 2);\n"
            "\tsp = NM_HTONS(sp);\n"
            "\tdp = NM_HTONS(dp);"
        )
    if "sport" in fields and "dport" in fields:
        return "\t__u16 sp = rec.sport, dp = rec.dport;"
    return "\t__u16 sp = 0, dp = 0;"


def c_probe_head(probe: str, fmt: dict, offsets) -> list:
    """Struct, function head, record copy and the namespace filter of one program."""
    fields = field_map(fmt)
    sname = "tp_" + probe
    sk = "rec.skaddr" if "skaddr" in fields else None
    skb = "rec.skbaddr" if "skbaddr" in fields else None
    return [
        c_tracepoint_struct(sname, fmt),
        "int nm_%s(void *ctx)\n{" % probe,
        "\tstruct %s rec = {};" % sname,
        "\tif (bpf_probe_read_kernel(&rec, sizeof(rec), ctx) != 0)\n\t\treturn 0;",
        "\tstruct nm_scope e = {};",
        c_netns_lookup(offsets, sk, skb),
    ]


def c_state(fields: dict, sk_state_off) -> str:
    """C that sets `state`: the record's, else the socket's skc_state via BTF, else -1."""
    if "state" in fields:
        return "\t__s32 state = rec.state;"
    if "skaddr" in fields and sk_state_off is not None:
        return (
            "\t__s32 state = -1;\n"
            "\t__u8 st = 0;\n"
            "\tif (rec.skaddr && !bpf_probe_read_kernel(&st, 1, (void *)(rec.skaddr + %d)))\n"
            "\t\tstate = st;" % sk_state_off
        )
    return "\t__s32 state = -1;"


def c_send_reset(fmt: dict, offsets) -> str:
    fields = field_map(fmt)
    body = c_probe_head("tcp_send_reset", fmt, offsets)
    reason = fields.get("reason")
    body.append("\tstruct rst_key k = {};")
    if reason and reason["size"] in (1, 2, 4):
        body.append("\t__builtin_memcpy(&k.reason, &rec.reason, %d);" % reason["size"])
    else:
        body.append("\tk.reason = %du;" % NO_REASON)
    body.append("\tk.state = %s;" % ("rec.state" if "state" in fields else "-1"))
    body.append(c_ports(fmt))
    body.append("\tk.port = label_port(sp, dp);")
    body.append(c_bump("rst_sent", "k"))
    return "\n".join(line for line in body if line)


def c_state_counter(probe: str, table: str, fmt: dict, offsets, sk_state_off) -> str:
    body = c_probe_head(probe, fmt, offsets)
    body.append(c_state(field_map(fmt), sk_state_off))
    body.append(c_ports(fmt))
    body.append("\tstruct st_key k = {};\n\tk.state = state;\n\tk.port = label_port(sp, dp);")
    body.append(c_bump(table, "k"))
    return "\n".join(line for line in body if line)


def c_set_state(fmt: dict, offsets) -> str:
    """SYN_SENT stamps the socket; leaving SYN_SENT for ESTABLISHED fills the histogram."""
    fields = field_map(fmt)
    body = c_probe_head("inet_sock_set_state", fmt, offsets)
    scope = body[-2:]  # the namespace reads: after the cheap tests, which most changes fail
    del body[-2:]
    if "protocol" in fields:
        body.append("\tif (rec.protocol != 6)\n\t\treturn 0;")
    body.append(
        "\tif (rec.newstate != %(syn)d && rec.oldstate != %(syn)d)\n"
        "\t\treturn 0;                /* neither entering nor leaving SYN_SENT */"
        % {"syn": TCP_STATES["TCP_SYN_SENT"]}
    )
    body += scope
    body.append(
        "\t__u64 sk = rec.skaddr;\n"
        "\tif (rec.newstate == %(syn)d) {\n"
        "\t\t__u64 now = bpf_ktime_get_ns();\n"
        "\t\tif (syn_start.update(&sk, &now) != 0)\n"
        "\t\t\tcount_lost();\n"
        "\t\treturn 0;\n"
        "\t}\n"
        "\tif (rec.oldstate != %(syn)d)\n"
        "\t\treturn 0;\n"
        "\t__u64 *start = syn_start.lookup(&sk);\n"
        "\tif (!start)\n"
        "\t\treturn 0;\n"
        "\t__u64 took = bpf_ktime_get_ns() - *start;\n"
        "\tsyn_start.delete(&sk);\n"
        "\tif (rec.newstate != %(est)d)\n"
        "\t\treturn 0;\n"
        "\t__u32 slot = bpf_log2l(took / 1000);\n"
        "\tif (slot >= HIST_SLOTS)\n"
        "\t\tslot = HIST_SLOTS - 1;\n"
        "\t__u64 *n = conn_hist.lookup(&slot);\n"
        "\tif (n)\n"
        "\t\t__sync_fetch_and_add(n, 1);\n"
        "\t__u32 zero = 0;\n"
        "\t__u64 *sum = conn_sum.lookup(&zero);\n"
        "\tif (sum)\n"
        "\t\t__sync_fetch_and_add(sum, took);\n"
        "\treturn 0;\n}\n"
        % {"syn": TCP_STATES["TCP_SYN_SENT"], "est": TCP_STATES["TCP_ESTABLISHED"]}
    )
    return "\n".join(line for line in body if line)


def c_kfree_skb(fmt: dict, offsets, reasons: dict, skb_sk_off, tuples=None) -> str:
    """Drops by reason (or, without a reason field, by location) in this namespace only:
    the socket's namespace (the record's rx_sk, else skb->sk through BTF), else the
    device's. Without BTF offsets every namespace's drops are counted, as in the other
    programs. With the skb's and socket's offsets (`tuples`), the peer's FIN after a close
    by this side is no drop, as in drop.py (core/dropreasons.py)."""
    fields = field_map(fmt)
    body = [
        c_tracepoint_struct("tp_kfree_skb", fmt),
        "int nm_kfree_skb(void *ctx)\n{",
        "\tstruct tp_kfree_skb rec = {};",
        "\tif (bpf_probe_read_kernel(&rec, sizeof(rec), ctx) != 0)\n\t\treturn 0;",
        "\tstruct drop_key k = {};",
    ]
    reason = fields.get("reason")
    if reasons["has_field"] and reason and reason["size"] in (1, 2, 4):
        consumed = reasons["consumed"]
        body.append("\t__builtin_memcpy(&k.reason, &rec.reason, %d);" % reason["size"])
        body.append(
            "\tif (k.reason < %du || k.reason == %du)\n"
            "\t\treturn 0;                /* not a drop: consumed or not dropped yet */"
            % (reasons["first_drop"], NO_REASON if consumed is None else consumed)
        )
    else:
        body.append("\tk.reason = %du;             /* no drop reasons: by location */" % NO_REASON)
        body.append("\tk.loc = rec.location;")
    if offsets:
        body.append("\tstruct nm_scope e = {};")
        body.append("\t__u64 skb = rec.skbaddr;")
        body.append("\t__u64 sk = %s;" % ("rec.rx_sk" if "rx_sk" in fields else "0"))
        if skb_sk_off is not None:
            body.append(
                "\tif (!sk && skb)\n"
                "\t\tbpf_probe_read_kernel(&sk, sizeof(sk), (void *)(skb + %d));" % skb_sk_off
            )
        body.append(c_netns_lookup(offsets, "sk", "skb"))
        body.append(
            "\tif (e.netns != OWN_NETNS)\n"
            "\t\treturn 0;                /* no socket, no device: not this host's to claim */"
        )
        if tells_delivered(reasons, offsets, skb_sk_off, tuples):
            protocol = "rec.protocol" if "protocol" in fields else "0"
            body.append(
                "\tif %s {   /* delivered after a close? */\n"
                "\t\tstruct skb_packet p = {};\n"
                "\t\tint have = skb ? read_packet(skb, %s, &p) : 0;"
                % (c_maybe_delivered(reasons, "k.reason"), protocol)
            )
            body.append(
                "\t" + c_delivered(reasons, "k.reason", "(&p)", "have", "sk").replace("\n", "\n\t")
            )
            body.append("\t}")
    body.append(c_bump("drops", "k"))
    return "\n".join(line for line in body if line)


def tells_delivered(reasons: dict, offsets, skb_sk_off, tuples) -> bool:
    """Whether the kfree_skb program can tell the peer's FIN after a close from a drop: it
    needs the socket (namespace offsets, skb->sk) and core/dropreasons.py's facts."""
    return bool(offsets) and skb_sk_off is not None and knows_delivered(reasons, tuples)


def build_program(formats: dict, offsets, sk_state_off, netns: int, drop_enum=None,
                  skb_sk_off=None, tuples=None) -> str:  # fmt: skip
    """The whole C program for the probes whose formats are known (one compile); drop
    reasons from the kfree_skb format and `drop_enum` (BTF enum skb_drop_reason);
    `tuples`: core/btf.py's TUPLE_PATHS offsets, for reading a dropped packet's headers."""
    parts = [
        C_COMMON
        % {
            "netns": netns,
            "slots": HIST_SLOTS,
            "entries": MAP_ENTRIES,
            "syn_entries": SYN_ENTRIES,
        }
    ]
    if "tcp_send_reset" in formats:
        parts.append(c_send_reset(formats["tcp_send_reset"], offsets))
    if "tcp_receive_reset" in formats:
        fmt = formats["tcp_receive_reset"]
        parts.append(c_state_counter("tcp_receive_reset", "rst_recv", fmt, offsets, sk_state_off))
    if "tcp_retransmit_skb" in formats:
        fmt = formats["tcp_retransmit_skb"]
        parts.append(c_state_counter("tcp_retransmit_skb", "retrans", fmt, offsets, sk_state_off))
    if "inet_sock_set_state" in formats:
        parts.append(c_set_state(formats["inet_sock_set_state"], offsets))
    if "kfree_skb" in formats:
        fmt = formats["kfree_skb"]
        reasons = reason_table(fmt, drop_enum)
        if tells_delivered(reasons, offsets, skb_sk_off, tuples):
            parts += [c_offsets(tuples), C_SKB_PACKET, c_read_packet("skb_packet")]
        parts.append(c_kfree_skb(fmt, offsets, reasons, skb_sk_off, tuples))
    return "\n".join(parts)


def drop_btf(path: str = BTF_VMLINUX, loaded=None) -> tuple:
    """(enum skb_drop_reason or None, offset of sk_buff.sk or None). `loaded`: what
    load_btf already returned, so the file is not read again."""
    btf, _why = loaded or load_btf(path)
    if btf is None:
        return None, None
    try:
        enum = btf.enum("skb_drop_reason")
    except (KeyError, struct.error):
        enum = None
    try:
        skb_sk = btf.field("sk_buff", ("sk",), 8)
    except (KeyError, IndexError, TypeError, struct.error):
        skb_sk = None
    return enum, skb_sk


# --------------------------------------------------------------------------------------
# Reading: names, deltas, /proc
# --------------------------------------------------------------------------------------


def symbol_names(formats: dict, drop_enum=None) -> dict:
    """{"reason": {num: name}, "state": {num: name}, "drop": {num: name}} from the live
    formats' print fmt (the state table falls back to the ABI's TCP state names, drop
    reasons to the BTF enum)."""
    send = formats.get("tcp_send_reset", {}).get("symbols", {})
    states = {v: k for k, v in TCP_STATES.items()}
    for fmt in formats.values():
        for field in ("state", "newstate", "oldstate"):
            states.update(fmt.get("symbols", {}).get(field, {}))
    drops = reason_table(formats.get("kfree_skb"), drop_enum)["names"]
    return {"reason": dict(send.get("reason", {})), "state": states, "drop": drops}


def state_name(names: dict, num: int) -> str:
    if num < 0:
        return "unknown"
    if num == 0:
        return "UNKNOWN"  # no socket: what the kernel's own print fmt shows
    return names["state"].get(num, str(num))


def reason_name(names: dict, num: int) -> str:
    if num == NO_REASON:
        return "unknown"
    return names["reason"].get(num, str(num))


def drop_name(names: dict, symbols, reason: int, loc: int) -> str:
    """A drop's label: its reason's name, or on kernels without reasons its function."""
    if reason == NO_REASON:
        return location_label(symbols, loc)
    return names["drop"].get(reason, str(reason))


def port_label(port: int) -> str:
    return str(port) if port else ""


def diff_counts(prev: dict, now: dict) -> list:
    """[[label values..., increase]] for rows that grew since `prev` (updated in place).

    Kernel counts only grow while the tool runs; a row that seems smaller (never expected)
    is taken as a new start rather than sent as a negative increase."""
    rows = []
    for key, value in sorted(now.items()):
        before = prev.get(key, 0)
        if value != before:
            rows.append(list(key) + [value - before if value > before else value])
            prev[key] = value
    return rows


def parse_netstat(text: str) -> dict:
    """/proc/net/netstat -> {"TcpExt.ListenOverflows": n, ...} (header line, value line)."""
    return dict(("%s.%s" % key, value) for key, value in parse_counters(text).items())


def listening_ports(texts, cap: int) -> list:
    """The lowest `cap` local ports in state LISTEN (0A) of /proc/net/tcp{,6} texts."""
    ports = set()
    for text in texts:
        for line in text.splitlines()[1:]:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A":
                try:
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
                except (IndexError, ValueError):
                    continue
    return sorted(ports)[:cap]


NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
TCPF_LISTEN = 1 << 10


def diag_listen_request(family: int) -> bytes:
    """A sock_diag request for TCP sockets in LISTEN only: the kernel then walks its
    listening hash alone, where /proc/net/tcp walks every socket bucket (about 10 ms on a
    host with much memory, 0.1 ms this way)."""
    return struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, TCPF_LISTEN) + bytes(48)


def diag_listening_ports(cap: int) -> list:
    """The lowest `cap` TCP listening ports of this namespace, from sock_diag."""
    ports = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        request = diag_listen_request(family)
        for msg in netlink_dump(SOCK_DIAG_BY_FAMILY, request, NETLINK_SOCK_DIAG):
            ports.add(struct.unpack_from("!H", msg, 4)[0])  # inet_diag_msg.id.sport
    return sorted(ports)[:cap]


def read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def fdinfo_stats(fds) -> tuple:
    """(run_time_ns, run_cnt) summed over program fds, from /proc/self/fdinfo."""
    ns = runs = 0
    for fd in fds:
        for line in read_text("/proc/self/fdinfo/%d" % fd).splitlines():
            key, _, value = line.partition(":")
            if key == "run_time_ns":
                ns += int(value)
            elif key == "run_cnt":
                runs += int(value)
    return ns, runs


# --------------------------------------------------------------------------------------
# The session
# --------------------------------------------------------------------------------------


class Session:
    """Compile, attach, send a delta every interval, detach."""

    def __init__(self, args, out: Output, stop) -> None:
        self.args = args
        self.out = out
        self.stop = stop
        self.bpf = None
        self.formats = {}
        self.names = {}
        self.symbols = Symbols()  # read only on a kernel without drop reasons
        self.attach = {}
        self.missing = []
        self.prev = {}
        self.prev_hist = {}
        self.prev_sum = 0
        self.prev_lost = 0
        self.prev_bpf = (0, 0)
        self.prev_netstat = {}
        #: netstat increases since the start (the namespace's own counters predate the tool)
        self.netstat_total = {}
        self.ports = []
        self.seq = 0

    def setup(self) -> None:
        ensure_tracefs()
        try:
            from bcc import BPF
        except ImportError:
            raise SetupError("BCC is not installed (python3-bpfcc)") from None
        self.formats = read_formats(None)
        for system, probe in PROBES:
            if probe not in self.formats:
                self.missing.append(
                    {"probe": probe, "why": "no tracepoint %s:%s" % (system, probe)}
                )
        btf = load_btf()
        (offsets, why), (tuples, _) = btf_offsets(loaded=btf)
        if why:
            self.missing.append({"probe": "btf:netns", "why": why})
        sk_state = tuples.get("skc_state") if tuples else None
        drop_enum, skb_sk = drop_btf(loaded=btf) if "kfree_skb" in self.formats else (None, None)
        kfree = self.formats.get("kfree_skb")
        reasons = reason_table(kfree, drop_enum) if kfree is not None else None
        if reasons is not None and not reasons["has_field"]:
            self.missing.append(
                {"probe": "kfree_skb:reason", "why": "this kernel's kfree_skb has no drop "
                 "reason: drops are labelled by the function that dropped them"}
            )  # fmt: skip
        elif (
            reasons is not None
            and (reasons["queue_purge"], reasons["not_specified"]) != (None, None)
            and not tells_delivered(reasons, offsets, skb_sk, tuples)
        ):
            self.missing.append(
                {"probe": "kfree_skb:delivered", "why": "no BTF offsets for the packet's "
                 "headers and its socket's ports: a FIN freed after a close counts as a drop"}
            )  # fmt: skip
        self.names = symbol_names(self.formats, drop_enum)
        text = build_program(
            self.formats, offsets, sk_state, own_netns(), drop_enum, skb_sk, tuples
        )
        try:
            self.bpf = bpf_compile(BPF, text)
        except Exception as exc:
            raise SetupError("BPF compile failed: %s" % exc) from None
        self.refresh_ports()
        for system, probe in PROBES:
            if probe not in self.formats:
                continue
            try:
                self.bpf.attach_tracepoint(tp="%s:%s" % (system, probe), fn_name="nm_" + probe)
            except Exception as exc:
                self.missing.append({"probe": probe, "why": str(exc)})
                continue
            self.attach[probe] = {"kind": "tracepoint"}
        self.prev_netstat = self.read_netstat()
        self.prev_bpf = self.bpf_stats() or (0, 0)

    def refresh_ports(self) -> None:
        """Listening ports may label resets: the first --port-labels of them."""
        try:
            ports = diag_listening_ports(self.args.port_labels)
        except OSError:  # no sock_diag (inet_diag not built or not loadable)
            texts = [read_text("/proc/self/net/tcp"), read_text("/proc/self/net/tcp6")]
            ports = listening_ports(texts, self.args.port_labels)
        table = self.bpf["listen_ports"]
        for port in set(self.ports) - set(ports):
            table[ctypes.c_int(port)] = ctypes.c_uint8(0)
        for port in set(ports) - set(self.ports):
            table[ctypes.c_int(port)] = ctypes.c_uint8(1)
        self.ports = ports

    def read_netstat(self) -> dict:
        values = parse_netstat(read_text("/proc/self/net/netstat"))
        return {family: values.get("TcpExt." + name, 0) for name, family in NETSTAT}

    def bpf_stats(self):
        """(ns, runs) of this tool's programs, or None when the kernel does not count."""
        if read_text("/proc/sys/kernel/bpf_stats_enabled").strip() != "1":
            return None
        return fdinfo_stats(f.fd for f in self.bpf.funcs.values())

    def hello(self) -> dict:
        return {
            "type": "hello",
            "script": SCRIPT,
            "version": VERSION,
            "kernel": os.uname().release,
            "mono_ns": now_ns("monotonic"),
            "real_ns": now_ns("time"),
            "netns": own_netns(),
            "interval": self.args.interval,
            "families": FAMILIES,
            "attach": self.attach,
            "missing": self.missing,
            "bpf_stats": self.bpf_stats() is not None,
        }

    def delta(self) -> dict:
        """What changed since the last delta, as one record."""
        b = self.bpf
        counters = {}
        sent = {}
        for k, v in b["rst_sent"].items():
            key = (
                reason_name(self.names, k.reason),
                state_name(self.names, k.state),
                port_label(k.port),
            )
            sent[key] = sent.get(key, 0) + v.value
        for family, table in (("tcp_resets_received", "rst_recv"), ("tcp_retransmits", "retrans")):
            rows = {}
            for k, v in b[table].items():
                key = (state_name(self.names, k.state), port_label(k.port))
                rows[key] = rows.get(key, 0) + v.value
            counters[family] = rows
        counters["tcp_resets_sent"] = sent
        drops = {}
        for k, v in b["drops"].items():
            key = (drop_name(self.names, self.symbols, k.reason, k.loc),)
            drops[key] = drops.get(key, 0) + v.value
        counters["packet_drops"] = drops
        netstat = self.read_netstat()
        for family, value in netstat.items():
            before = self.prev_netstat.get(family, value)
            self.netstat_total[family] = self.netstat_total.get(family, 0) + max(0, value - before)
            counters[family] = {(): self.netstat_total[family]}
        self.prev_netstat = netstat
        record = {"type": "delta", "seq": self.seq + 1, "mono_ns": now_ns("monotonic")}
        c = {}
        for family, rows in sorted(counters.items()):
            prev = self.prev.setdefault(family, {})
            changed = diff_counts(prev, rows)
            if changed:
                c[family] = changed
        if c:
            record["c"] = c
        hist = {i: b["conn_hist"][i].value for i in range(HIST_SLOTS)}
        slots = [[i, n - self.prev_hist.get(i, 0)] for i, n in hist.items()]
        slots = [row for row in slots if row[1]]
        if slots:
            total = b["conn_sum"][0].value
            record["h"] = {"tcp_connect_seconds": [[total - self.prev_sum, slots]]}
            self.prev_hist, self.prev_sum = hist, total
        lost = b["lost"][0].value
        if lost != self.prev_lost:
            record["lost"] = lost - self.prev_lost
            self.prev_lost = lost
        stats = self.bpf_stats()
        if stats is not None and stats != self.prev_bpf:
            record["bpf"] = [stats[0] - self.prev_bpf[0], stats[1] - self.prev_bpf[1]]
            self.prev_bpf = stats
        self.seq += 1
        return record

    def run(self) -> str:
        deadline = time.monotonic() + self.args.duration if self.args.duration else None
        next_at = time.monotonic() + self.args.interval
        while not self.stop.reason:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return "duration"
            wake = next_at if deadline is None else min(next_at, deadline)
            if wake > now:
                time.sleep(min(wake - now, 0.2))
                continue
            self.refresh_ports()
            self.out.write(self.delta())
            self.out.flush()
            next_at += self.args.interval
            if next_at < now:  # a slow read: do not send a burst to catch up
                next_at = now + self.args.interval
        return self.stop.reason

    def cleanup(self) -> list:
        errors = []
        if self.bpf is None:
            return errors
        for probe in sorted(self.attach):
            system = dict((p, s) for s, p in PROBES)[probe]
            try:
                self.bpf.detach_tracepoint(tp="%s:%s" % (system, probe))
            except Exception as exc:  # noqa: BLE001 - keep detaching the rest
                errors.append("detach %s: %s" % (probe, exc))
        try:
            self.bpf.cleanup()
        except Exception as exc:  # noqa: BLE001
            errors.append("cleanup: %s" % exc)
        self.bpf = None
        return errors


# --------------------------------------------------------------------------------------
# Arguments, signals, main
# --------------------------------------------------------------------------------------


PARAMS = [
    {"name": "interval", "type": "duration", "min": 0.1, "max": 3600, "default": 15.0,
     "metavar": "SECONDS", "help": "send a delta every SECONDS (default 15)"},
    {"name": "port-labels", "type": "int", "min": 0, "max": 64, "default": 16, "metavar": "N",
     "help": "listening ports that may label resets (0-64, default 16)"},
    {"name": "duration", "type": "float", "min": 0, "default": 0, "metavar": "SECONDS",
     "help": "stop after SECONDS (default 0: run until signalled)"},
    {"name": "ebpf", "type": "flag", "local": True,
     "help": "print the generated C program and exit (needs no root)"},
    {"name": "format-dir", "type": "path", "local": True, "metavar": "DIR",
     "help": "with --ebpf: read tracepoint format files from DIR"},
]  # fmt: skip


def parse_args(argv):
    return parse_tool_args(PARAMS, argv, SCRIPT, __doc__)


def print_ebpf(args, out) -> int:
    formats = read_formats(args.format_dir)
    offsets = tuples = drop_enum = skb_sk = None
    if not args.format_dir:
        btf = load_btf()
        (offsets, _), (tuples, _) = btf_offsets(loaded=btf)
        drop_enum, skb_sk = drop_btf(loaded=btf)
    sk_state = tuples.get("skc_state") if tuples else None
    text = build_program(formats, offsets, sk_state, own_netns(), drop_enum, skb_sk, tuples)
    out.write(text + "\n")
    return 0


def main(argv=None) -> int:
    return run_tool(SCRIPT, argv, parse_args, print_ebpf, Session)


if __name__ == "__main__":
    sys.exit(main())
