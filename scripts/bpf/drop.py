#!/usr/bin/python3
"""drop: where a flow's packets die on this host, and why.

Watches one host (network namespace) through the skb:kfree_skb tracepoint: every packet
the kernel frees as dropped, with the kernel's drop reason (Linux 5.17+) or, on kernels
without one, the drop location (the caller of kfree_skb, named through /proc/kallsyms).
Reason names are read on the host, from the tracepoint's print format or the BTF enum
skb_drop_reason, never from a table in this file: the numbering moves between kernels.
Packets freed as consumed (consume_skb, or reasons before NOT_SPECIFIED such as
SKB_CONSUMED) are not drops and are left out in the kernel; so is a TCP segment without
payload that reached its socket and that the kernel freed after this side closed first:
the peer's FIN, purged unread when the socket was destroyed (QUEUE_PURGE, on every such
close) or handled by the time-wait socket (NOT_SPECIFIED, when the peer closed later).

In the kernel, every drop of this namespace is counted by (reason, location), and how many
of them passed the filter (--port/--addr on either side, read from the packet's headers
through BTF offsets, IPv4/IPv6, TCP/UDP ports). Drops that pass it are sent one by one,
limited by a token bucket (default 1000 per second, burst 100); the rest are counted as
suppressed. The counts go out every second while they change, and once at the end.
Drops the kernel counts without freeing a packet with a reason (a SYN refused because the
accept queue is full is consumed) show in the namespace's /proc/net/netstat and snmp
counters, sent as deltas since the start. TCP retransmissions of filtered flows
(tcp:tcp_retransmit_skb, tcp:tcp_retransmit_synack) are sent as retrans records.

Packet history, for the cross-host join: observe-only TC programs on every interface but lo
(tcx links, else clsact filters; core/tc.py, with the parser of core/packet.py) keep the last
--history packets of every filtered TCP flow in an LRU map (8192 flows), and send nothing
while the run lasts. At the end, after every probe is detached, the flows that had a packet
within 1 s of a drop window are emitted as packet records (why "history"), most recently
active first, at most 512 flows, followed by a `history` summary. Drop windows are this
host's own drop records, and the windows the controller names with the control line
`ctl drops T0-T1[,T0-T1...]` (this host's CLOCK_MONOTONIC ns; the controller sends every
host the drops seen on all hosts, converted through each host's clock, just before it
stops the run). A flow's 4-tuple differs from host to host behind NAT, so hosts are told
when drops happened, not which flow: time plus the kernel's --port/--addr filter keep the
dump small, and the controller's matcher picks the sightings of the dropped packets.
A run without drops emits no history. Unknown control lines are reported on stderr.
Every probe is detached on stdin EOF, SIGTERM, SIGHUP, --duration or --count.

Parameters:
  --port PORT[,PORT]      only packets with this port on either side; repeatable
  --addr ADDR[,ADDR]      only packets with this IPv4/IPv6 address on either side; repeatable
  --duration SECONDS      stop after SECONDS (default 0: run until signalled)
  --count N               stop after N drop records (default 0: no limit)
  --rate R                drop records per second at most (default 1000, burst 100; 0: counts only)
  --history K             packets kept per flow for the cross-host join (0-16, default 8)
  --ebpf                  print the generated C program and exit (needs no root)
  --format-dir DIR        with --ebpf: read tracepoint format files from DIR
Fields:
  hello.script          str    "drop"
  hello.version         int    record schema version (1)
  hello.kernel          str    kernel release
  hello.mono_ns         int    CLOCK_MONOTONIC ns, sampled together with real_ns
  hello.real_ns         int    CLOCK_REALTIME ns
  hello.netns           int    inode of this network namespace
  hello.addrs           list   this namespace's non-loopback addresses
  hello.interfaces      list   this namespace's interfaces (names)
  hello.attach          dict   per probe: kind (tracepoint); tc: {kind (tcx-link or
                               tc-clsact), interfaces, why (why not tcx)}
  hello.missing         list   probes or facts not available: {probe, why}
  hello.filter          dict   {ports, addrs} as requested
  hello.buffer          str    ringbuf or perf
  hello.reasons         dict   {source: format, btf or none, count}: where reason names come from
  hello.fallback        str    only without drop reasons: why drops are named by location
  hello.rate            dict   {events_per_s, burst}: the per-packet record limit
  hello.setup           dict   seconds this host took to become ready: process (from the
                               process start: interpreter, bootstrap, script transfer),
                               import (BCC), discover, compile (BCC/clang + maps), attach;
                               cpu: CPU seconds the process used until then
  hello.history         int    packets remembered per flow (0: no packet history)
  hello.symbols         int    kernel text symbols read (during set-up) to name drop
                               locations; 0: /proc/kallsyms hidden, locations unnamed
  hello.netstat         dict   {counters}: the netstat/snmp counters watched (names as the
                               kernel prints them: PAWSEstab is LINUX_MIB_PAWSESTABREJECTED)
  drop.ts_ns            int    host CLOCK_MONOTONIC ns
  drop.reason           str    kernel drop reason name, null when unknown or no reasons
  drop.reason_num       int    kernel drop reason number, null on kernels without reasons
  drop.location         str    where it was freed ("nf_hook_slow+0x97"), null when unknown
  drop.ifindex          int    the packet's device, 0 when none
  drop.ifname           str    its name, null when not in this namespace or none
  drop.family           int    4 or 6
  drop.proto            int    IP protocol (6 TCP, 17 UDP, ...)
  drop.saddr            str    source address
  drop.daddr            str    destination address
  drop.sport            int    source port, null for neither TCP nor UDP
  drop.dport            int    destination port, null for neither TCP nor UDP
  drop.flags            int    TCP flag byte, null for non-TCP
  drop.seq              int    TCP sequence number, null for non-TCP
  drop.ack              int    TCP acknowledgement number, null for non-TCP
  drop.len              int    TCP/UDP payload bytes (IP payload for others)
  drop.ipid             int    IPv4 identification (0 for IPv6)
  drop_counts.ts_ns     int    host CLOCK_MONOTONIC ns
  drop_counts.final     bool   true for the last one, sent after every probe is detached
  drop_counts.counts    list   {reason, reason_num, location, count, matched} since start
  drop_counts.suppressed  int  drops that passed the filter but were not sent (rate limit)
  netstat.ts_ns         int    host CLOCK_MONOTONIC ns
  netstat.final         bool   true for the last one
  netstat.delta         dict   counter name -> increase since start
  retrans.ts_ns         int    host CLOCK_MONOTONIC ns
  retrans.probe         str    tcp_retransmit_skb or tcp_retransmit_synack
  retrans.family        int    4 or 6
  retrans.saddr         str    local address
  retrans.sport         int    local port
  retrans.daddr         str    remote address
  retrans.dport         int    remote port
  retrans.state         str    socket state name, null when the probe has none
  packet.*                     as tcp_rst's packet records (ts_ns, ifname, ifindex, dir,
                               family, saddr, daddr, sport, dport, flags, seq, ack, ipid,
                               ttl, len, win) with why "history"; only at the end
  history.ts_ns         int    host CLOCK_MONOTONIC ns
  history.windows       int    drop windows known (own drops and control lines, merged)
  history.flows         int    flows whose packets were emitted
  history.packets       int    packet records emitted
  history.left_out      int    flows in a window beyond the 512 emitted
  lost.count            int    records lost because a buffer overflowed
  lost.source           str    drops or retrans
  lost.ts_ns            int    host CLOCK_MONOTONIC ns
  bye.reason            str    duration, count, signal, eof or error
  bye.error             str    error message (reason error only)
"""

import ctypes
import os
import socket
import struct
import sys
import threading
import time

from core.btf import BTF_VMLINUX, NETNS_PATHS, TUPLE_PATHS, c_netns_lookup, load_btf
from core.compile import bpf_compile
from core.discovery import discover_addrs, kernel_version, own_netns
from core.dropreasons import (
    C_SKB_PACKET_FIELDS,
    SKB_HEADER_OFFSETS,
    SOCK_FIELDS,
    c_delivered,
    c_offsets,
    c_read_packet,
    knows_delivered,
    reason_count,
    reason_table,
)
from core.events import C_LOST, RINGBUF_MIN_KERNEL, BufferCallbacks, Output, c_submit, now_ns
from core.lifecycle import SetupError, Stop
from core.netstat import NetstatDelta
from core.packet import (
    C_FLOW_KEY,
    C_PACKET,
    FLOW_FMT,
    FLOW_PKT_FMT,
    addr_text,
    fill_filters,
    flow_packet_records,
)
from core.symbols import Symbols
from core.tc import Clsact, attach_tool, c_tc_entries, link_kinds, watched_links
from core.tool import (
    SetupTimes,
    ebpfdiag_control,  # noqa: F401 - the bootstrap's hook for ctl lines
    parse_tool_args,
    run_tool,
)
from core.tracepoints import (
    TCP_STATES,
    c_tracepoint_struct,
    ensure_tracefs,
    field_map,
    read_tracepoint_formats,
)

SCRIPT = "drop"
VERSION = 1
DROP_PROBE = ("skb", "kfree_skb")
RETRANS_PROBES = (("tcp", "tcp_retransmit_skb"), ("tcp", "tcp_retransmit_synack"))
DEFAULT_RATE = 1000
BURST = 100
NO_REASON = 0xFFFFFFFF
COUNTS_SIZE = 4096  # (reason, location) pairs counted in the kernel
# lost[] slots in the kernel: records lost (buffer full) and counters that could not grow.
LOST_DROPS, LOST_RETRANS, SUPPRESSED, COUNTS_FULL = 0, 1, 2, 3

FLOW_MAP_SIZE = 8192  # flows whose last packets are kept per host (LRU)
DUMP_FLOWS_MAX = 512  # flows emitted at the end, most recently active first
WINDOW_MARGIN_NS = 1000000000  # a flow is emitted when it has a packet this close to a drop
WINDOWS_MAX = 64

# Userspace mirrors of the C structs below.
DROP_FMT = "=QQIIIIIHHHHBBBB16s16s"
RETRANS_FMT = "=QIiHHBB2x16s16s"
COUNT_KEY_FMT = "=QI4x"
COUNT_VAL_FMT = "=QQ"
HIST_HEAD_FMT = "=IIQ"  # struct hist after its key: head, count, last


# --------------------------------------------------------------------------------------
# Format files and reason names
# --------------------------------------------------------------------------------------


def read_formats(fmt_dir) -> dict:
    """{probe: parsed format} for kfree_skb and the retransmit tracepoints that exist.

    From a directory of recorded files named after the probe (optionally `.format`), or
    from tracefs."""
    return read_tracepoint_formats((DROP_PROBE,) + RETRANS_PROBES, fmt_dir)


# --------------------------------------------------------------------------------------
# BTF facts: offsets for the packet headers and the namespace, the reason enum
# --------------------------------------------------------------------------------------


def btf_facts(path: str):
    """(offsets or None, reason enum or None, [why ...]) from one read of a BTF file."""
    btf, why = load_btf(path)
    if btf is None:
        return None, None, ["no BTF (%s): no packet headers, no namespace filter" % why]
    whys = []
    offsets = None
    try:
        found = dict((key, btf.offset(*spec)) for key, spec in NETNS_PATHS.items())
        for key in SKB_HEADER_OFFSETS:
            found[key] = btf.field(*TUPLE_PATHS[key])
        found["skb_sk"] = btf.field("sk_buff", ("sk",), 8)
        found["dev_ifindex"] = btf.field("net_device", ("ifindex",), 4)
        offsets = found
    except (KeyError, IndexError, TypeError, struct.error) as exc:
        whys.append("no BTF offsets (%s): no packet headers, no namespace filter" % exc)
    if offsets is not None:
        try:  # the socket's ports and state, that tell a FIN freed after a close (c_delivered)
            ports = dict((k, btf.field(*TUPLE_PATHS[k])) for k in SOCK_FIELDS)
            offsets.update(ports)
        except (KeyError, IndexError, TypeError, struct.error) as exc:
            whys.append(
                "no BTF socket fields (%s): a FIN freed after a close counts as a drop" % exc
            )
    try:
        enum = btf.enum("skb_drop_reason")
    except (KeyError, struct.error):
        enum = None
    return offsets, enum, whys


# --------------------------------------------------------------------------------------
# C generation
# --------------------------------------------------------------------------------------


C_COMMON = r"""
#define NO_REASON 0xffffffffu
#define FIRST_DROP_REASON %(first_drop)du   /* NOT_SPECIFIED: lower numbers are not drops */
#define CONSUMED_REASON %(consumed)du       /* SKB_CONSUMED, or NO_REASON when unknown */
#define RATE_INTERVAL_NS %(interval)dull    /* 0: no per-packet records */
#define RATE_BURST_NS %(burst_ns)dull
#define FILTER_PORTS %(filter_ports)d
#define FILTER_ADDRS %(filter_addrs)d
#define HAVE_OFFSETS %(have_offsets)d
#define OWN_NETNS %(own_netns)du

struct drop_event {
	__u64 ts;
	__u64 location;
	__u32 reason;            /* NO_REASON on kernels without drop reasons */
	__u32 ifindex;
	__u32 netns;
%(packet_fields)s};

struct retrans_event {
	__u64 ts;
	__u32 netns;
	__s32 state;             /* -1: the probe has none */
	__u16 sport;
	__u16 dport;
	__u8 family;
	__u8 probe;              /* 1 tcp_retransmit_skb, 2 tcp_retransmit_synack */
	__u8 _pad[2];
	__u8 saddr[16];
	__u8 daddr[16];
};

struct count_key {
	__u64 location;
	__u32 reason;
	__u32 _pad;
};

struct count_val {
	__u64 count;
	__u64 matched;           /* passed the filter */
};

struct addr_key {
	__u32 family;
	__u32 a[4];
};

BPF_PERCPU_ARRAY(lost, __u64, 4);  /* drops lost, retrans lost, suppressed, counts map full */
BPF_HASH(counts, struct count_key, struct count_val, %(counts_size)d);
BPF_ARRAY(ports, __u8, 65536);
BPF_HASH(addrs, struct addr_key, __u8, 64);
BPF_ARRAY(bucket, __u64, 1);      /* token bucket: theoretical arrival time (GCRA) */
BPF_PERCPU_ARRAY(scratch, struct drop_event, 1);
"""

C_HELPERS = r"""
static __always_inline int port_wanted(__u16 a, __u16 b)
{
	__u32 ka = a, kb = b;
	__u8 *va = ports.lookup(&ka);
	__u8 *vb = ports.lookup(&kb);
	return (va && *va) || (vb && *vb);
}

static __always_inline int addr_wanted(__u32 family, __u8 *a)
{
	struct addr_key k = {};
	k.family = family;
	__builtin_memcpy(k.a, a, 16);
	return addrs.lookup(&k) != 0;
}

static __always_inline int flow_wanted(__u32 family, __u8 *sa, __u8 *da, __u16 sp, __u16 dp)
{
	if (FILTER_PORTS && !port_wanted(sp, dp))
		return 0;
	if (FILTER_ADDRS && !addr_wanted(family, sa) && !addr_wanted(family, da))
		return 0;
	return 1;
}

/* One token for a per-packet record: a GCRA bucket of RATE_BURST_NS depth. Racy across
 * CPUs by design (no lock on this path): at worst a few records more than the rate. */
static __always_inline int take_token(void)
{
	if (RATE_INTERVAL_NS == 0)
		return 0;
	__u32 zero = 0;
	__u64 *tat = bucket.lookup(&zero);
	if (!tat)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	__u64 t = *tat;
	if (t < now)
		t = now;
	if (t - now > RATE_BURST_NS)
		return 0;
	*tat = t + RATE_INTERVAL_NS;
	return 1;
}

static __always_inline void count_drop(__u32 reason, __u64 location, int matched)
{
	struct count_key k = {};
	k.location = location;
	k.reason = reason;
	struct count_val *v = counts.lookup(&k);
	if (!v) {
		struct count_val zero = {};
		counts.insert(&k, &zero);
		v = counts.lookup(&k);
		if (!v) {
			count_lost(3);
			return;
		}
	}
	__sync_fetch_and_add(&v->count, 1);
	if (matched)
		__sync_fetch_and_add(&v->matched, 1);
}
"""

C_HISTORY = r"""
/* Per-flow history: the last HISTORY packets of every filtered TCP flow crossing this host's
 * interfaces, kept in the kernel and read from user space only at the end, for the flows
 * active around a drop (see dump_history). Nothing is sent per packet. */
#define HISTORY %(history)d
#define FLOW_MAP_SIZE %(flow_map_size)d

struct hpkt {                /* one sighting, 32 bytes */
	__u64 ts;
	__u32 ifindex;
	__u32 seq;
	__u32 ack;
	__u32 len;
	__u16 win;
	__u16 ipid;
	__u8 ttl;
	__u8 flags;
	__u8 dir;                /* 0 ingress, 1 egress */
	__u8 fwd;                /* 1 when the packet goes from key.a to key.b */
};

struct hist {
	struct flow_key key;     /* for the dump (the map is keyed by its hash) */
	__u32 head;              /* next slot to write */
	__u32 count;
	__u64 last;              /* ts of the newest packet */
	struct hpkt ring[HISTORY];
};

/* Keyed by flow_hash of the canonical 5-tuple. */
BPF_F_TABLE("lru_hash", __u64, struct hist, flows, FLOW_MAP_SIZE, BPF_F_NO_COMMON_LRU);
BPF_ARRAY(hist_zero, struct hist, 1);

/* off: bytes before the IP header (14 on Ethernet, 0 on L3 devices), a constant per program */
static __always_inline int on_packet(struct __sk_buff *skb, __u8 dir, __u32 off)
{
	struct ebd_tcp t = {};
	if (!ebd_parse_tcp(skb, off, &t))
		return TC_ACT_UNSPEC;
	if (!flow_wanted(t.family, (__u8 *)t.saddr, (__u8 *)t.daddr, t.sport, t.dport))
		return TC_ACT_UNSPEC;
	struct flow_key k = {};
	__u8 fwd = flow_key_of(&t, &k);
	__u64 fk = flow_hash(&k);
	struct hist *h = flows.lookup(&fk);
	if (!h) {
		__u32 zero = 0;
		struct hist *z = hist_zero.lookup(&zero);
		if (!z)
			return TC_ACT_UNSPEC;
		flows.update(&fk, z);
		h = flows.lookup(&fk);
		if (!h)
			return TC_ACT_UNSPEC;
		__builtin_memcpy(&h->key, &k, sizeof(k));
	}
	__u32 i = h->head;
	if (i >= HISTORY)
		i = 0;
	struct hpkt *p = &h->ring[i];
	__u64 now = bpf_ktime_get_ns();
	p->ts = now;
	p->ifindex = skb->ifindex;
	p->seq = t.seq;
	p->ack = t.ack;
	p->len = t.len;
	p->win = t.win;
	p->ipid = t.ipid;
	p->ttl = t.ttl;
	p->flags = t.flags;
	p->dir = dir;
	p->fwd = fwd;
	h->head = i + 1 >= HISTORY ? 0 : i + 1;
	if (h->count < HISTORY)
		h->count++;
	h->last = now;
	return TC_ACT_UNSPEC;
}

"""


def c_drop_probe(plan: dict) -> str:
    """The kfree_skb program: drop test, namespace, count, filter, rate-limited record."""
    fmt = plan["tracepoints"]["kfree_skb"]
    fields = field_map(fmt)
    offsets = plan["offsets"]
    body = [c_tracepoint_struct("tp_kfree_skb", fmt)]
    body.append("int ebd_kfree_skb(void *ctx)\n{")
    body.append("\tstruct tp_kfree_skb rec = {};")
    body.append("\tif (bpf_probe_read_kernel(&rec, sizeof(rec), ctx) != 0)\n\t\treturn 0;")
    reason = fields.get("reason")
    if plan["reasons"]["has_field"] and reason and reason["size"] in (1, 2, 4):
        body.append("\t__u32 reason = 0;")
        body.append("\t__builtin_memcpy(&reason, &rec.reason, %d);" % reason["size"])
        body.append(
            "\tif (reason < FIRST_DROP_REASON || reason == CONSUMED_REASON)\n"
            "\t\treturn 0;                /* not a drop: consumed or not dropped yet */"
        )
    else:
        body.append("\t__u32 reason = NO_REASON;  /* this kernel has no drop reasons */")
    body.append("\t__u32 zero = 0;")
    body.append("\tstruct drop_event *ev = scratch.lookup(&zero);\n\tif (!ev)\n\t\treturn 0;")
    body.append("\t__builtin_memset(ev, 0, sizeof(*ev));")
    body.append("\tstruct drop_event e = {};")  # the namespace block writes e.netns
    body.append("\t__u64 skb = rec.skbaddr;")
    if offsets:
        sk = "rec.rx_sk" if "rx_sk" in fields else "0"
        body.append("\t__u64 sk = %s;" % sk)
        body.append(
            "\tif (!sk && skb)\n"
            "\t\tbpf_probe_read_kernel(&sk, sizeof(sk), (void *)(skb + OFF_SKB_SK));"
        )
        body.append(c_netns_lookup(offsets, "sk", "skb"))
        body.append(
            "\t__u64 dev = 0;\n"
            "\tif (skb)\n"
            "\t\tbpf_probe_read_kernel(&dev, sizeof(dev), (void *)(skb + OFF_SKB_DEV));\n"
            "\tif (dev)\n"
            "\t\tbpf_probe_read_kernel(&ev->ifindex, sizeof(ev->ifindex),"
            " (void *)(dev + OFF_DEV_IFINDEX));"
        )
        body.append("\tint have = skb ? read_packet(skb, rec.protocol, ev) : 0;")
        if knows_delivered(plan["reasons"], offsets):
            body.append(c_delivered(plan["reasons"], "reason", "ev", "have", "sk"))
    else:
        body.append("\tint have = 0;             /* no BTF offsets: headers unreadable */")
    body.append("\tint filtered = FILTER_PORTS || FILTER_ADDRS;")
    body.append(
        "\tint matched = !filtered ||\n"
        "\t\t(have && flow_wanted(ev->family, ev->saddr, ev->daddr, ev->sport, ev->dport));"
    )
    body.append("\tcount_drop(reason, rec.location, matched);")
    body.append("\tif (!matched)\n\t\treturn 0;")
    body.append("\tif (!take_token()) {\n\t\tcount_lost(2);\n\t\treturn 0;\n\t}")
    body.append("\tev->ts = bpf_ktime_get_ns();")
    body.append("\tev->location = rec.location;")
    body.append("\tev->reason = reason;")
    body.append("\tev->netns = e.netns;")
    body.append("\t" + c_submit(plan["buffer"], "drop_events", "ctx", "ev", LOST_DROPS))
    body.append("\treturn 0;\n}\n")
    return "\n".join(line for line in body if line)


def c_retrans_probe(probe: str, fmt: dict, probe_num: int, plan: dict) -> str:
    """A retransmit program: the tracepoint's own 4-tuple, kept only for filtered flows."""
    fields = field_map(fmt)
    sname = "tp_" + probe
    body = [c_tracepoint_struct(sname, fmt)]
    body.append("int ebd_%s(void *ctx)\n{" % probe)
    body.append("\tstruct %s rec = {};" % sname)
    body.append("\tif (bpf_probe_read_kernel(&rec, sizeof(rec), ctx) != 0)\n\t\treturn 0;")
    body.append("\tstruct retrans_event e = {};")
    body.append("\te.probe = %d;" % probe_num)
    body.append("\te.state = %s;" % ("rec.state" if "state" in fields else "-1"))
    body.append("\te.sport = rec.sport;\n\te.dport = rec.dport;")
    if "family" in fields:
        body.append("\te.family = rec.family == 2 ? 4 : (rec.family == 10 ? 6 : 0);")
    else:
        body.append("\te.family = 4;")
    if "saddr_v6" in fields:
        body.append(
            "\tif (e.family == 6) {\n"
            "\t\t__builtin_memcpy(e.saddr, rec.saddr_v6, 16);\n"
            "\t\t__builtin_memcpy(e.daddr, rec.daddr_v6, 16);\n"
            "\t} else {\n"
            "\t\t__builtin_memcpy(e.saddr, rec.saddr, 4);\n"
            "\t\t__builtin_memcpy(e.daddr, rec.daddr, 4);\n"
            "\t}"
        )
    else:
        body.append(
            "\t__builtin_memcpy(e.saddr, rec.saddr, 4);\n\t__builtin_memcpy(e.daddr, rec.daddr, 4);"
        )
    body.append("\tif (!flow_wanted(e.family, e.saddr, e.daddr, e.sport, e.dport))\n\t\treturn 0;")
    if plan["offsets"] and "skaddr" in fields:
        body.append(c_netns_lookup(plan["offsets"], "rec.skaddr", None))
    body.append("\te.ts = bpf_ktime_get_ns();")
    body.append("\t" + c_submit(plan["buffer"], "retrans_events", "ctx", "&e", LOST_RETRANS))
    body.append("\treturn 0;\n}\n")
    return "\n".join(line for line in body if line)


def build_program(plan: dict) -> str:
    """The whole C program for a plan (see make_plan)."""
    rate = plan["rate"]
    interval = int(1e9 / rate) if rate > 0 else 0
    reasons = plan["reasons"]
    consumed = reasons["consumed"]
    parts = [
        C_COMMON
        % {
            "first_drop": reasons["first_drop"],
            "consumed": NO_REASON if consumed is None else consumed,
            "interval": interval,
            "burst_ns": interval * (BURST - 1),
            "filter_ports": int(bool(plan["ports"])),
            "filter_addrs": int(bool(plan["addrs"])),
            "have_offsets": int(bool(plan["offsets"])),
            "own_netns": plan["own_netns"],
            "counts_size": COUNTS_SIZE,
            "packet_fields": C_SKB_PACKET_FIELDS,
        }
    ]
    if plan["offsets"]:
        parts.append(c_offsets(plan["offsets"]))
    if plan["buffer"] == "ringbuf":
        parts.append("BPF_RINGBUF_OUTPUT(drop_events, %d);" % plan["pages"])
        parts.append("BPF_RINGBUF_OUTPUT(retrans_events, 16);")
    else:
        parts.append("BPF_PERF_OUTPUT(drop_events);\nBPF_PERF_OUTPUT(retrans_events);")
    parts.append(C_LOST)
    parts.append(C_HELPERS)
    if plan["offsets"]:
        parts.append(c_read_packet("drop_event"))
    if "kfree_skb" in plan["tracepoints"]:
        parts.append(c_drop_probe(plan))
    for num, (_system, probe) in enumerate(RETRANS_PROBES, start=1):
        if probe in plan["tracepoints"]:
            parts.append(c_retrans_probe(probe, plan["tracepoints"][probe], num, plan))
    if plan["history"]:
        parts += [C_PACKET, C_FLOW_KEY]
        parts.append(C_HISTORY % {"history": plan["history"], "flow_map_size": FLOW_MAP_SIZE})
        parts.append(c_tc_entries(plan.get("l2")))
    return "\n".join(parts)


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def reason_fields(reason: int, names: dict) -> dict:
    if reason == NO_REASON:
        return {"reason": None, "reason_num": None}
    return {"reason": names.get(reason), "reason_num": reason}


def decode_drop(raw: bytes, names: dict, symbols, ifname) -> dict:
    """One drop_event -> a drop record. `ifname(ifindex)` names a device or None."""
    (ts, location, reason, ifindex, _netns, seq, ack, sport, dport, length, ipid, family,
     proto, flags, l4, saddr, daddr) = struct.unpack_from(DROP_FMT, raw, 0)  # fmt: skip
    record = {"type": "drop", "ts_ns": ts}
    record.update(reason_fields(reason, names))
    record.update(
        {
            "location": symbols.resolve(location) if location else None,
            "ifindex": ifindex,
            "ifname": ifname(ifindex) if ifindex else None,
            "family": family or None,
            "proto": proto if family else None,
            "saddr": addr_text(family, saddr) if family else None,
            "daddr": addr_text(family, daddr) if family else None,
            "sport": sport if l4 else None,
            "dport": dport if l4 else None,
            "flags": flags if l4 == 1 else None,
            "seq": seq if l4 == 1 else None,
            "ack": ack if l4 == 1 else None,
            "len": length if family else None,
            "ipid": ipid if family else None,
        }
    )
    return record


def decode_retrans(raw: bytes, state_names: dict) -> dict:
    ts, _netns, state, sport, dport, family, probe, saddr, daddr = struct.unpack_from(
        RETRANS_FMT, raw, 0
    )
    if family == 6 and saddr[:12] == b"\0" * 10 + b"\xff\xff":
        family, saddr, daddr = 4, saddr[12:], daddr[12:]
    return {
        "type": "retrans",
        "ts_ns": ts,
        "probe": RETRANS_PROBES[probe - 1][1],
        "family": family,
        "saddr": addr_text(family or 4, saddr),
        "sport": sport,
        "daddr": addr_text(family or 4, daddr),
        "dport": dport,
        "state": state_names.get(state, "UNKNOWN") if state > 0 else None,
    }


def decode_hist(raw: bytes, ifnames: dict) -> list:
    """One `flows` map value (struct hist) -> its packets as packet records (why
    "history"), oldest first."""
    at = struct.calcsize(FLOW_FMT)
    head, count, _last = struct.unpack_from(HIST_HEAD_FMT, raw, at)
    ring_at = at + struct.calcsize(HIST_HEAD_FMT)
    size = struct.calcsize(FLOW_PKT_FMT)
    slots = (len(raw) - ring_at) // size
    pkts = [
        (struct.unpack_from(FLOW_PKT_FMT, raw, ring_at + size * ((head - count + n) % slots)),
         "history")
        for n in range(min(count, slots))
    ]  # fmt: skip
    return flow_packet_records(raw, pkts, ifnames)


def add_window(windows: list, t0: int, t1: int) -> list:
    """[(t0, t1)] host ns -> merged and sorted with (t0, t1); beyond WINDOWS_MAX windows
    the closest neighbours merge (a wider window only emits more flows)."""
    merged = []
    for lo, hi in sorted(windows + [(min(t0, t1), max(t0, t1))]):
        if merged and lo <= merged[-1][1] + 2 * WINDOW_MARGIN_NS:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    while len(merged) > WINDOWS_MAX:
        gaps = [merged[i + 1][0] - merged[i][1] for i in range(len(merged) - 1)]
        i = gaps.index(min(gaps))
        merged[i : i + 2] = [(merged[i][0], merged[i + 1][1])]
    return merged


def parse_windows(text: str) -> list:
    """`T0-T1[,T0-T1...]` (host CLOCK_MONOTONIC ns) -> [(t0, t1)]; ValueError if malformed."""
    windows = []
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        if not sep:
            raise ValueError("window %r is not T0-T1" % part)
        windows.append((int(lo), int(hi)))
    return windows


def pick_flows(flows: list, windows: list) -> tuple:
    """[(records)] per flow -> (the flows with a packet within WINDOW_MARGIN_NS of a
    window, most recently active first, at most DUMP_FLOWS_MAX; how many were left out)."""
    chosen = []
    for records in flows:
        if any(
            lo - WINDOW_MARGIN_NS <= r["ts_ns"] <= hi + WINDOW_MARGIN_NS
            for r in records
            for lo, hi in windows
        ):
            chosen.append(records)
    chosen.sort(key=lambda recs: -recs[-1]["ts_ns"])
    return chosen[:DUMP_FLOWS_MAX], max(0, len(chosen) - DUMP_FLOWS_MAX)


def count_rows(items, names: dict, symbols) -> list:
    """[(count_key bytes, count_val bytes)] -> drop_counts rows, largest first."""
    rows = []
    for key, value in items:
        location, reason = struct.unpack_from(COUNT_KEY_FMT, key, 0)
        count, matched = struct.unpack_from(COUNT_VAL_FMT, value, 0)
        row = reason_fields(reason, names)
        row.update(
            {
                "location": symbols.resolve(location) if location else None,
                "count": count,
                "matched": matched,
            }
        )
        rows.append(row)
    rows.sort(key=lambda r: (-r["count"], r["reason_num"] or 0, r["location"] or ""))
    return rows


# --------------------------------------------------------------------------------------
# The session
# --------------------------------------------------------------------------------------


def make_plan(args, formats: dict, offsets, btf_enum, links=None) -> dict:
    """Everything the C program and the attach step depend on, decided up front; `links`
    are the interfaces the history programs go on (None: not known, every kind)."""
    missing = []
    for system, probe in (DROP_PROBE,) + RETRANS_PROBES:
        if probe not in formats:
            missing.append({"probe": probe, "why": "no tracepoint %s:%s" % (system, probe)})
    reasons = reason_table(formats.get("kfree_skb"), btf_enum)
    return {
        "buffer": "ringbuf" if kernel_version() >= RINGBUF_MIN_KERNEL else "perf",
        "pages": 64,
        "ports": args.port,
        "addrs": args.addr,
        "rate": args.rate,
        "history": args.history,
        "tracepoints": formats,
        "offsets": offsets,
        "reasons": reasons,
        "own_netns": own_netns(),
        "missing": missing,
        "l2": link_kinds(links),
    }


class Session(BufferCallbacks):
    """One run: compile, attach, stream records, and undo every attachment."""

    def __init__(self, args, out: Output, stop) -> None:
        self.args = args
        self.out = out
        self.stop = stop
        self.bpf = None
        self.plan = None
        self.attach = {}
        self.addrs = []
        self.ifnames = {}
        self.symbols = Symbols()
        self.netstat = None
        self.drops = 0
        self.lost_seen = [0, 0]
        self.perf_lost = [0, 0]
        self.last_counts = ([], 0)  # nothing to report until something is counted
        self.ready = False
        self.BPF = None
        self.clsact = Clsact()
        self.setup_times = None
        self.tc = None
        #: host-time windows whose flows' history is emitted at the end: this host's own
        #: drops, and those the controller names (`ctl drops`, from its stdin thread)
        self.windows = []
        self.window_lock = threading.Lock()

    def setup(self) -> None:
        """Discover, compile, attach, timed for hello.setup; pyroute2 is imported only for
        the clsact path."""
        times = self.setup_times = SetupTimes()
        ensure_tracefs()  # before importing bcc, which looks for tracefs once
        try:
            from bcc import BPF
        except ImportError:
            raise SetupError("BCC is not installed (python3-bpfcc)") from None
        self.BPF = BPF
        times.done("import")
        # The kernel's symbols name drop locations: read now, beside discovery and the
        # compile (which releases the GIL), rather than at the first drop, when the host is
        # busy dropping packets and the trace is meant to cost it little. Started before
        # the compile's private mount namespace (core/compile.py): it reads the real table.
        symbols = threading.Thread(target=self.symbols.load, name="kallsyms")
        symbols.daemon = True
        symbols.start()
        self.addrs = discover_addrs()
        self.ifnames = dict((i, n) for i, n in socket.if_nameindex())
        self.netstat = NetstatDelta()
        offsets, enum, whys = btf_facts(self.args.btf or BTF_VMLINUX)
        links = None
        if self.args.history:  # only their kinds of history program are compiled
            names, links = watched_links(None)
            self.ifnames.update(names)
        self.plan = make_plan(self.args, read_formats(None), offsets, enum, links)
        for why in whys:
            self.plan["missing"].append({"probe": "btf", "why": why})
        if "kfree_skb" not in self.plan["tracepoints"]:
            raise SetupError("no tracepoint skb:kfree_skb on this kernel")
        program = build_program(self.plan)
        times.done("discover")
        try:
            self.bpf = bpf_compile(BPF, program)
        except Exception as exc:
            raise SetupError("BPF compile failed: %s" % exc) from None
        times.done("compile")
        self._fill_filters()
        for system, probe in (DROP_PROBE,) + RETRANS_PROBES:
            if probe not in self.plan["tracepoints"]:
                continue
            try:
                self.bpf.attach_tracepoint(tp="%s:%s" % (system, probe), fn_name="ebd_" + probe)
            except Exception as exc:
                self.plan["missing"].append({"probe": probe, "why": str(exc)})
                continue
            self.attach[probe] = {"kind": "tracepoint", "tp": "%s:%s" % (system, probe)}
        if "kfree_skb" not in self.attach:
            raise SetupError("cannot attach skb:kfree_skb: %s" % self.plan["missing"][-1]["why"])
        if links is not None:  # the history programs, on every interface but lo
            attach_tool(self, links, "auto", self.clsact.hooks)
        self._open_buffers()
        symbols.join()
        times.done("attach")

    def _fill_filters(self) -> None:
        fill_filters(self.bpf, self.args.port, self.args.addr)

    def _open_buffers(self) -> None:
        b = self.bpf
        if self.plan["buffer"] == "ringbuf":
            b["drop_events"].open_ring_buffer(self._ring_cb(self._on_drop))
            b["retrans_events"].open_ring_buffer(self._ring_cb(self._on_retrans))
            return
        b["drop_events"].open_perf_buffer(
            self._perf_cb(self._on_drop), page_cnt=64, lost_cb=self._lost_cb(0)
        )
        b["retrans_events"].open_perf_buffer(
            self._perf_cb(self._on_retrans), page_cnt=16, lost_cb=self._lost_cb(1)
        )

    def _ifname(self, ifindex: int):
        if ifindex not in self.ifnames:
            try:
                self.ifnames[ifindex] = socket.if_indextoname(ifindex)
            except OSError:
                self.ifnames[ifindex] = None
        return self.ifnames[ifindex]

    def _on_drop(self, raw: bytes) -> None:
        if self.args.count and self.drops >= self.args.count:
            return
        names = self.plan["reasons"]["names"]
        record = decode_drop(raw, names, self.symbols, self._ifname)
        self.out.write(record)
        with self.window_lock:
            self.windows = add_window(self.windows, record["ts_ns"], record["ts_ns"])
        self.drops += 1
        if self.args.count and self.drops >= self.args.count:
            self.stop.reason = self.stop.reason or "count"

    def _on_retrans(self, raw: bytes) -> None:
        fmt = self.plan["tracepoints"].get("tcp_retransmit_skb") or {"symbols": {}}
        states = fmt["symbols"].get("state") or dict((v, k) for k, v in TCP_STATES.items())
        self.out.write(decode_retrans(raw, states))

    # -- periodic records --------------------------------------------------------------

    def _counts(self) -> tuple:
        items = []
        for key, value in self.bpf["counts"].items():
            items.append(
                (
                    ctypes.string_at(ctypes.addressof(key), ctypes.sizeof(key)),
                    ctypes.string_at(ctypes.addressof(value), ctypes.sizeof(value)),
                )
            )
        suppressed = sum(self.bpf["lost"][ctypes.c_int(SUPPRESSED)])
        return items, suppressed

    def report_counts(self, final: bool = False) -> None:
        """drop_counts when anything changed since the last one (always when final)."""
        items, suppressed = self._counts()
        snapshot = (sorted(items), suppressed)
        if not final and snapshot == self.last_counts:
            return
        self.last_counts = snapshot
        names = self.plan["reasons"]["names"]
        self.out.write(
            {
                "type": "drop_counts",
                "ts_ns": now_ns("monotonic"),
                "final": final,
                "counts": count_rows(items, names, self.symbols),
                "suppressed": suppressed,
            }
        )

    def report_netstat(self, final: bool = False) -> None:
        delta = self.netstat.delta() if final else self.netstat.changed()
        if delta is None:
            return
        self.out.write(
            {"type": "netstat", "ts_ns": now_ns("monotonic"), "final": final, "delta": delta}
        )

    def control(self, text: str) -> None:
        """A control line from the controller (bootstrap stdin thread): `drops T0-T1[,...]`
        names host-time windows around drops seen anywhere; the history of this host's flows
        active in them is emitted at the end."""
        word, _, rest = text.partition(" ")
        if word != "drops":
            sys.stderr.write("%s: control line not understood, ignored: %s\n" % (SCRIPT, text))
            return
        try:
            windows = parse_windows(rest.strip())
        except ValueError as exc:
            sys.stderr.write("%s: control line ignored: %s\n" % (SCRIPT, exc))
            return
        with self.window_lock:
            for lo, hi in windows:
                self.windows = add_window(self.windows, lo, hi)

    def dump_history(self) -> None:
        """Packet records (why "history") of the flows active around a drop, then a
        `history` summary. Bounded: DUMP_FLOWS_MAX flows of at most --history packets."""
        with self.window_lock:
            windows = list(self.windows)
        flows = []
        if windows:
            for _key, value in self.bpf["flows"].items():
                raw = ctypes.string_at(ctypes.addressof(value), ctypes.sizeof(value))
                records = decode_hist(raw, self.ifnames)
                if records:
                    flows.append(records)
        chosen, left_out = pick_flows(flows, windows)
        packets = 0
        for records in chosen:
            for record in records:
                self.out.write(record)
            packets += len(records)
        self.out.write(
            {
                "type": "history",
                "ts_ns": now_ns("monotonic"),
                "windows": len(windows),
                "flows": len(chosen),
                "packets": packets,
                "left_out": left_out,
            }
        )

    def _report_lost(self) -> None:
        totals = [sum(self.bpf["lost"][ctypes.c_int(i)]) for i in (LOST_DROPS, LOST_RETRANS)]
        for i, source in enumerate(("drops", "retrans")):
            count = totals[i] - self.lost_seen[i] + self.perf_lost[i]
            self.lost_seen[i] = totals[i]
            self.perf_lost[i] = 0
            if count:
                self.out.write(
                    {"type": "lost", "count": count, "source": source, "ts_ns": now_ns("monotonic")}
                )

    # -- running -----------------------------------------------------------------------

    def hello(self) -> dict:
        reasons = self.plan["reasons"]
        record = {
            "type": "hello",
            "script": SCRIPT,
            "version": VERSION,
            "kernel": os.uname().release,
            "mono_ns": now_ns("monotonic"),
            "real_ns": now_ns("time"),
            "netns": self.plan["own_netns"],
            "addrs": self.addrs,
            "interfaces": sorted(n for n in self.ifnames.values() if n and n != "lo"),
            "attach": self.attach,
            "missing": self.plan["missing"],
            "filter": {"ports": self.args.port, "addrs": self.args.addr},
            "buffer": self.plan["buffer"],
            "reasons": {"source": reasons["source"], "count": reason_count(reasons)},
            "rate": {"events_per_s": self.args.rate, "burst": BURST if self.args.rate else 0},
            "netstat": {"counters": self.netstat.names()},
            "history": self.plan["history"],
            "symbols": self.symbols.load(),
            "setup": self.setup_times.report(),
        }
        if reasons["source"] == "none":
            record["fallback"] = (
                "skb:kfree_skb has no reason field on this kernel: drops are named by "
                "location (kernel symbol)"
                if not reasons["has_field"]
                else "no names for drop reasons (no print table, no BTF): numbers and locations"
            )
        return record

    def run(self) -> str:
        deadline = time.monotonic() + self.args.duration if self.args.duration else None
        poll = (
            self.bpf.ring_buffer_poll
            if self.plan["buffer"] == "ringbuf"
            else self.bpf.perf_buffer_poll
        )
        next_report = time.monotonic() + 1.0
        while not self.stop.reason:
            timeout = 200
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.stop.reason = "duration"
                    break
                timeout = max(1, min(timeout, int(left * 1000)))
            poll(timeout)
            self._report_lost()
            if time.monotonic() >= next_report:
                next_report = time.monotonic() + 1.0
                self.report_counts()
                self.report_netstat()
            self.out.flush()
        return self.stop.reason

    def detach(self) -> list:
        errors = []
        if self.bpf is None:
            return errors
        for probe, how in sorted(self.attach.items()):
            if how["kind"] != "tracepoint":
                continue
            try:
                self.bpf.detach_tracepoint(tp=how["tp"])
            except Exception as exc:  # noqa: BLE001 - keep detaching the rest
                errors.append("detach %s: %s" % (probe, exc))
        if self.tc is not None:
            errors.extend(self.tc.close())
            self.tc = None
        return errors

    def cleanup(self) -> list:
        """Detach every probe, then (once it was ready) deliver what is buffered and the final
        counts, then free the programs and maps. Returns errors."""
        errors = self.detach()
        if self.ready and self.bpf is not None and not self.out.broken:
            try:
                if self.plan["buffer"] == "ringbuf":
                    self.bpf.ring_buffer_poll(0)
                else:
                    self.bpf.perf_buffer_poll(0)
                self._report_lost()
                if self.plan["history"]:
                    self.dump_history()
                self.report_counts(final=True)
                self.report_netstat(final=True)
                self.out.flush()
            except Stop:
                pass
            except Exception as exc:  # noqa: BLE001 - still free everything
                errors.append("final counts: %s" % exc)
        if self.bpf is not None:
            try:
                self.bpf.cleanup()
            except Exception as exc:  # noqa: BLE001
                errors.append("cleanup: %s" % exc)
            self.bpf = None
        self.clsact.close()
        return errors


# --------------------------------------------------------------------------------------
# Arguments, signals, main
# --------------------------------------------------------------------------------------


PARAMS = [
    {"name": "port", "type": "port", "multiple": True, "metavar": "PORT[,PORT]",
     "help": "only packets with this port on either side; repeatable"},
    {"name": "addr", "type": "addr", "multiple": True, "metavar": "ADDR[,ADDR]",
     "help": "only packets with this IPv4/IPv6 address on either side; repeatable"},
    {"name": "duration", "type": "float", "min": 0, "default": 0, "metavar": "SECONDS",
     "help": "stop after SECONDS (default 0: run until signalled)"},
    {"name": "count", "type": "int", "min": 0, "default": 0, "metavar": "N",
     "help": "stop after N drop records (default 0: no limit)"},
    {"name": "rate", "type": "int", "min": 0, "max": 1000000, "default": 1000, "metavar": "R",
     "help": "drop records per second at most (default 1000, burst 100; 0: counts only)"},
    {"name": "history", "type": "int", "min": 0, "max": 16, "default": 8,
     "metavar": "K", "help": "packets kept per flow for the cross-host join (0-16, default 8)"},
    {"name": "ebpf", "type": "flag", "local": True,
     "help": "print the generated C program and exit (needs no root)"},
    {"name": "format-dir", "type": "path", "local": True, "metavar": "DIR",
     "help": "with --ebpf: read tracepoint format files from DIR"},
    {"name": "btf", "type": "path", "local": True, "hidden": True, "metavar": "FILE",
     "help": "BTF file for offsets and reason names (tests)"},
]  # fmt: skip


def parse_args(argv):
    return parse_tool_args(PARAMS, argv, SCRIPT, __doc__)


def print_ebpf(args, out) -> int:
    """The C program for recorded formats (--format-dir) or this host's; BTF facts from
    --btf, else from this host unless the formats are recorded ones."""
    formats = read_formats(args.format_dir)
    if "kfree_skb" not in formats:
        sys.stderr.write("%s: no kfree_skb format found\n" % SCRIPT)
        return 2
    offsets, enum = None, None
    if args.btf or not args.format_dir:
        offsets, enum, _whys = btf_facts(args.btf or BTF_VMLINUX)
    plan = make_plan(args, formats, offsets, enum)
    out.write(build_program(plan) + "\n")
    for item in plan["missing"]:
        sys.stderr.write("%s: %s: %s\n" % (SCRIPT, item["probe"], item["why"]))
    return 0


def main(argv=None) -> int:
    return run_tool(SCRIPT, argv, parse_args, print_ebpf, Session)


if __name__ == "__main__":
    sys.exit(main())
