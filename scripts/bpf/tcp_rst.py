#!/usr/bin/python3
"""tcp_rst: who sent a TCP reset on this host, and why.

Watches one host (network namespace) two ways at once and prints NDJSON on stdout:
packets, through a TC classifier on ingress and egress of every interface (a tcx link on
Linux 6.6+, which the kernel removes when the process dies; else a clsact filter), and
the kernel's own view of each reset through the tcp:tcp_send_reset / tcp:tcp_receive_reset
tracepoints (reason, socket state, current task). The tracepoint context is built from the
live format file, never from kernel headers, so it works across kernel versions.

Each tcp_send_reset record names the RST it sent: its 4-tuple, seq and ack are read from
the packet that triggered it (headers via BTF offsets, reversed) or, for an active reset,
from the socket; never a listener's wildcard addresses. When the run stops, every probe
is detached first, then the packets the kernel still keeps per flow (flows without a RST)
are emitted once with why "kept", then a `kept` summary, then `bye`.

hello lists the host's DNAT port rewrites (nftables) as nat_ports. While it runs, the
controller may widen the port filter with a control line `ctl port Q` (through the
bootstrap, see docs/remote-protocol.md): Q joins the in-kernel filter, and a `filter`
record says so. A control line it does not understand is reported on stderr and ignored.

Parameters:
  --port PORT[,PORT]      only flows with this port on either side; repeatable
  --addr ADDR[,ADDR]      only flows with this IPv4/IPv6 address on either side; repeatable
  --interfaces IF[,IF]    interfaces to watch (default: every interface except lo)
  --history K             packets remembered per flow, shown before its RST (0-8, default 4)
  --all-flows             also report handshake and close packets of flows without a RST
  --duration SECONDS      stop after SECONDS (default 0: run until signalled)
  --count N               stop after N reset records (RST packets when no reset probe)
  --tc-mode MODE          packet hook: auto (tcx if the kernel has it), tcx or clsact
  --ebpf                  print the generated C program and exit (needs no root)
  --format-dir DIR        with --ebpf: read tracepoint format files from DIR
Fields:
  hello.script          str    "tcp_rst"
  hello.version         int    record schema version (2)
  hello.kernel          str    kernel release
  hello.mono_ns         int    CLOCK_MONOTONIC ns, sampled together with real_ns
  hello.real_ns         int    CLOCK_REALTIME ns
  hello.netns           int    inode of this network namespace
  hello.addrs           list   this namespace's non-loopback addresses
  hello.interfaces      list   interfaces carrying the packet classifier
  hello.attach          dict   per probe: kind (tracepoint, kprobe, tcx-link, tc-clsact) and layout
  hello.missing         list   probes not attached: {probe, why}
  hello.filter          dict   {ports, addrs} as requested
  hello.nat_ports       list   [[P, Q], ...]: nftables DNAT sends TCP port P on as port Q
  hello.scope           str    how foreign namespaces' resets are dropped: netns or addrs
  hello.history         int    packets remembered per flow
  hello.all_flows       bool   whether packets of flows without a RST are reported too
  hello.buffer          str    ringbuf or perf
  hello.setup           dict   seconds this host took to become ready: process (from the
                               process start: interpreter, bootstrap, script transfer),
                               import (BCC), discover, compile (BCC/clang + maps), attach;
                               cpu: CPU seconds the process used until then
  packet.ts_ns          int    host CLOCK_MONOTONIC ns
  packet.ifname         str    interface name
  packet.ifindex        int    interface index
  packet.dir            str    ingress or egress
  packet.family         int    4 or 6
  packet.saddr          str    source address
  packet.daddr          str    destination address
  packet.sport          int    source port
  packet.dport          int    destination port
  packet.flags          int    TCP flag byte (FIN=1 SYN=2 RST=4 PSH=8 ACK=16 URG=32)
  packet.seq            int    TCP sequence number
  packet.ack            int    TCP acknowledgement number
  packet.ipid           int    IPv4 identification (0 for IPv6)
  packet.ttl            int    IPv4 TTL or IPv6 hop limit
  packet.len            int    TCP payload bytes
  packet.win            int    TCP window field (unscaled)
  packet.why            str    rst, handshake, close, history (before the RST), kept (at the end)
  reset.ts_ns           int    host CLOCK_MONOTONIC ns
  reset.probe           str    tcp_send_reset or tcp_receive_reset
  reset.family          int    4 or 6
  reset.saddr           str    local address (sending/receiving the RST), null when unknown
  reset.daddr           str    remote address, null when unknown
  reset.sport           int    local port, null when unknown
  reset.dport           int    remote port, null when unknown
  reset.seq             int    the RST's sequence number (tcp_send_reset), null when unknown
  reset.ack             int    the RST's ack field (0 when it has no ACK), null when unknown
  reset.tuple_from      str    4-tuple from: skb (trigger, reversed), socket, tracepoint, null
  reset.sk_kind         str    full, request, timewait, listener, or null (no socket/unknown)
  reset.state           str    socket state name, null without a socket
  reset.state_num       int    socket state number (Linux TCP states 1-12), null without one
  reset.reason          str    kernel reset reason name, null on kernels without reasons
  reset.reason_num      int    kernel reset reason number, null on kernels without reasons
  reset.pid             int    current task (meaningful in process context only)
  reset.comm            str    current task name
  reset.netns           int    network namespace inode of the event, null when unknown
  kept.flows            int    flows whose kept packets were emitted at the end
  kept.packets          int    packet records with why kept
  lost.count            int    events lost because a buffer overflowed
  lost.source           str    packets or resets
  filter.ports          list   ports the filter passes now ([]: every port, no filter)
  filter.added          list   ports this control line added
  filter.why            str    nat
  bye.reason            str    duration, count, signal, eof or error
  bye.error             str    error message (reason error only)
"""

import ctypes
import os
import struct
import sys
import threading
import time

from core.btf import btf_offsets, c_netns_lookup
from core.compile import bpf_compile
from core.discovery import discover_addrs, kernel_version, kprobes_available, own_netns
from core.events import (
    C_BUFFERS_PERF,
    C_BUFFERS_RINGBUF,
    C_LOST,
    RINGBUF_MIN_KERNEL,
    BufferCallbacks,
    Output,
    c_submit,
    now_ns,
)
from core.lifecycle import SetupError, Stop
from core.natports import start_nat_ports
from core.packet import (
    C_FILTER_MAPS,
    C_FLOW_KEY,
    C_PACKET,
    FLOW_FMT,
    FLOW_PKT_FMT,
    TH_ACK,
    TH_FIN,
    TH_SYN,
    addr_text,
    c_filters,
    fill_filters,
    flow_packet_records,
)
from core.params import ParamError, convert
from core.tc import Clsact, attach_tool, c_tc_entries, link_kinds, watched_links
from core.tool import (
    SetupTimes,
    ebpfdiag_control,  # noqa: F401 - the bootstrap's hook for ctl lines
    parse_tool_args,
    run_tool,
)
from core.tracepoints import (
    TCP_STATES,
    address_layout,
    c_tracepoint_struct,
    ensure_tracefs,
    field_map,
    read_tracepoint_formats,
)

SCRIPT = "tcp_rst"
VERSION = 2
RESET_PROBES = ("tcp_send_reset", "tcp_receive_reset")


WHY_NAMES = {1: "rst", 2: "handshake", 3: "close", 4: "history", 5: "kept"}
WHY_KEPT = 5
TUPLE_FROM = {1: "skb", 2: "socket"}  # reset_event.src; 0: the tracepoint's own fields
STATE_TIME_WAIT, STATE_LISTEN, STATE_NEW_SYN_RECV = 6, 10, 12

# Userspace mirrors of the C structs below (explicit padding, little/native endian).
PKT_SIZE = struct.calcsize(FLOW_PKT_FMT)
FLOW_SIZE = struct.calcsize(FLOW_FMT)
EVENT_HEAD_FMT = "=B3xIII"
RESET_FMT = "=QIIiiHHHH16s16s16sBBBxIII"
FLOW_MAP_SIZE = 16384  # entries of the kernel's per-flow LRU map (bounds the final dump)
HIST_HEAD_FMT = "=IIII"  # struct hist after its key: head, count, hs_mask, pad
V4_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"


# --------------------------------------------------------------------------------------
# Tracepoint format files
# --------------------------------------------------------------------------------------


def read_formats(fmt_dir) -> dict:
    """Load the reset tracepoints' formats from a directory of recorded files or tracefs.

    A recorded directory holds files named `tcp_send_reset` / `tcp_receive_reset`
    (optionally with a `.format` suffix). Returns {probe: parsed format}; absent probes
    are left out.
    """
    return read_tracepoint_formats([("tcp", probe) for probe in RESET_PROBES], fmt_dir)


# --------------------------------------------------------------------------------------
# C generation
# --------------------------------------------------------------------------------------


C_COMMON = r"""
#define WHY_RST 1
#define WHY_HANDSHAKE 2
#define WHY_CLOSE 3
#define HISTORY %(history)d
#define STREAM_ALL %(stream_all)d    /* 0: handshake and FIN wait in the map for a RST */
#define RING_SLOTS %(slots)d
#define FLOW_MAP_SIZE %(flow_map_size)d

struct pkt {                 /* one packet, 32 bytes */
	__u64 ts;
	__u32 ifindex;
	__u32 seq;
	__u32 ack;
	__u32 len;               /* 32 bits: GSO and BIG TCP packets exceed 64 KiB */
	__u16 win;
	__u16 ipid;
	__u8 ttl;
	__u8 flags;
	__u8 dir;                /* 0 ingress, 1 egress */
	__u8 fwd;                /* 1 when the packet goes from key.a to key.b */
};

struct hist {                /* the flow's last packets not otherwise reported */
	struct flow_key key;     /* for the dump at the end (the map is keyed by its hash) */
	__u32 head;              /* next slot to write */
	__u32 count;
	__u32 hs_mask;           /* bit 0: hs[0] holds the SYN, bit 1: hs[1] the SYN-ACK */
	__u32 _pad;
	struct pkt hs[2];
	struct pkt ring[RING_SLOTS];
};

struct pkt_event {
	struct flow_key key;
	struct pkt pkt;
	__u8 why;
	__u8 _pad[3];
	__u32 head;
	__u32 count;
	__u32 hs_mask;
	struct pkt hs[2];
	struct pkt ring[RING_SLOTS];
};

struct reset_event {
	__u64 ts;
	__u32 netns;
	__u32 pid;
	__s32 state;             /* -1: not in this kernel's format */
	__s32 reason;            /* -1: not in this kernel's format */
	__u16 probe;             /* 1 send, 2 receive */
	__u16 family;            /* 4, 6, or 0: infer from the v4-mapped address */
	__u16 sport;
	__u16 dport;
	__u8 saddr[16];
	__u8 daddr[16];
	char comm[16];
	__u8 src;                /* tuple from: 0 tracepoint fields, 1 trigger skb, 2 socket */
	__u8 tflags;             /* skb: the trigger's TCP flags */
	__u8 has_seq;            /* tseq/tack are valid */
	__u8 _pad;
	__u32 tseq;              /* skb: trigger seq; socket: snd_nxt */
	__u32 tack;              /* skb: trigger ack_seq; socket: rcv_nxt */
	__u32 tlen;              /* skb: trigger payload bytes */
};

BPF_PERCPU_ARRAY(lost, __u64, 2);            /* 0: packets, 1: resets (ring buffer full) */
"""


C_TC = r"""
/* Keyed by a 64-bit hash of the canonical 5-tuple: hashing 8 bytes instead of 40 on every
 * packet; two of 16384 live flows sharing a hash is vanishingly unlikely, and would only mix
 * their history. */
BPF_F_TABLE("lru_hash", __u64, struct hist, flows, FLOW_MAP_SIZE, BPF_F_NO_COMMON_LRU);
BPF_ARRAY(hist_zero, struct hist, 1);
BPF_PERCPU_ARRAY(scratch, struct pkt_event, 1);

static __always_inline struct hist *flow_entry(__u64 *k, struct flow_key *key)
{
	struct hist *h = flows.lookup(k);
	if (h)
		return h;
	__u32 zero = 0;
	struct hist *z = hist_zero.lookup(&zero);
	if (!z)
		return 0;
	flows.update(k, z);
	h = flows.lookup(k);
	if (h)
		__builtin_memcpy(&h->key, key, sizeof(*key));
	return h;
}

/* Keep a packet that is not streamed in its flow's entry: a SYN or SYN-ACK in the handshake
 * slots, any other in the history ring. One call site per program, so flow_entry (a map
 * lookup and maybe an insert) is inlined once. */
static __always_inline void keep(__u64 *k, struct flow_key *key, struct pkt *p, int handshake)
{
	if (HISTORY == 0 && !handshake)
		return;
	struct hist *h = flow_entry(k, key);
	if (!h)
		return;
	if (handshake) {
		__u32 slot = (p->flags & TH_ACK) ? 1 : 0;  /* a retransmission replaces the first */
		if (slot)
			__builtin_memcpy(&h->hs[1], p, sizeof(*p));
		else
			__builtin_memcpy(&h->hs[0], p, sizeof(*p));
		h->hs_mask |= 1 << slot;
		return;
	}
	__u32 i = h->head;
	if (i >= RING_SLOTS)
		i = 0;
	__builtin_memcpy(&h->ring[i], p, sizeof(*p));
	h->head = (i + 1 >= HISTORY) ? 0 : i + 1;
	if (h->count < HISTORY)
		h->count++;
}

/* off: bytes before the IP header (14 on Ethernet, 0 on L3 devices), a constant per program */
static __always_inline int on_packet(struct __sk_buff *skb, __u8 dir, __u32 off)
{
	struct ebd_tcp t = {};
	if (!ebd_parse_tcp(skb, off, &t))
		return TC_ACT_UNSPEC;
%(filters)s
	struct pkt p = {};
	struct flow_key k = {};
	p.seq = t.seq;
	p.ack = t.ack;
	p.len = t.len;
	p.win = t.win;
	p.ipid = t.ipid;
	p.ttl = t.ttl;
	p.flags = t.flags;
	p.ts = bpf_ktime_get_ns();
	p.ifindex = skb->ifindex;
	p.dir = dir;
	p.fwd = flow_key_of(&t, &k);
	__u64 fk = flow_hash(&k);

	__u8 why = 0;
	if (p.flags & TH_RST)
		why = WHY_RST;
#if STREAM_ALL
	else if (p.flags & TH_SYN)
		why = WHY_HANDSHAKE;
	else if (p.flags & TH_FIN)
		why = WHY_CLOSE;
	if (!why) {
		keep(&fk, &k, &p, 0);
		return TC_ACT_UNSPEC;
	}
#else
	if (!why) {          /* handshake and FIN too: sent to user space only if a RST follows */
		keep(&fk, &k, &p, p.flags & TH_SYN);
		return TC_ACT_UNSPEC;
	}
#endif

	__u32 zero = 0;
	struct pkt_event *e = scratch.lookup(&zero);
	if (!e)
		return TC_ACT_UNSPEC;
	__builtin_memcpy(&e->key, &k, sizeof(k));
	__builtin_memcpy(&e->pkt, &p, sizeof(p));
	e->why = why;
	e->head = 0;
	e->count = 0;
	e->hs_mask = 0;
	if (why == WHY_RST) {
		struct hist *h = flows.lookup(&fk);
		if (h) {
			e->head = h->head;
			e->count = h->count;
			e->hs_mask = h->hs_mask;
			__builtin_memcpy(e->hs, h->hs, sizeof(e->hs));
			__builtin_memcpy(e->ring, h->ring, sizeof(e->ring));
			flows.delete(&fk);
		}
	}
	%(submit_pkt)s
	return TC_ACT_UNSPEC;
}

"""

C_TUPLE = r"""
#define OFF_SKB_HEAD %(skb_head)d
#define OFF_SKB_NH %(skb_nh)d
#define OFF_SKB_TH %(skb_th)d
#define OFF_SKC_FAMILY %(skc_family)d
#define OFF_SKC_STATE %(skc_state)d
#define OFF_INET_SPORT %(inet_sport)d
#define OFF_SKC_DPORT %(skc_dport)d
#define OFF_SKC_RCV_SADDR %(skc_rcv_saddr)d
#define OFF_SKC_DADDR %(skc_daddr)d
#define OFF_SKC_V6_RCV_SADDR %(skc_v6_rcv_saddr)d
#define OFF_SKC_V6_DADDR %(skc_v6_daddr)d
#define OFF_TP_SND_NXT %(snd_nxt)d
#define OFF_TP_RCV_NXT %(rcv_nxt)d

static __always_inline __u32 ebd_be32(__u8 *b)
{
	return ((__u32)b[0] << 24) | ((__u32)b[1] << 16) | ((__u32)b[2] << 8) | b[3];
}

/* The RST answers `skb`: its 4-tuple is the trigger's reversed. Offsets are the running
 * kernel's (BTF); the headers are read where the kernel's ip_hdr()/tcp_hdr() find them. */
static __always_inline int tuple_from_skb(struct reset_event *e, __u64 skb)
{
	__u64 head = 0;
	__u16 nh = 0, th = 0;
	if (bpf_probe_read_kernel(&head, sizeof(head), (void *)(skb + OFF_SKB_HEAD)) || !head)
		return 0;
	if (bpf_probe_read_kernel(&nh, sizeof(nh), (void *)(skb + OFF_SKB_NH)) ||
		bpf_probe_read_kernel(&th, sizeof(th), (void *)(skb + OFF_SKB_TH)))
		return 0;
	if (nh == 0xffff || th == 0xffff || th <= nh)
		return 0;
	__u32 l3 = th - nh, tcp_len;
	__u8 ip[40];
	if (bpf_probe_read_kernel(ip, 20, (void *)(head + nh)))
		return 0;
	__u8 saddr[16] = {}, daddr[16] = {};
	__u16 family;
	if ((ip[0] >> 4) == 4) {
		__u32 tot = (ip[2] << 8) | ip[3];
		if (ip[9] != 6 || tot < l3)
			return 0;
		tcp_len = tot - l3;
		family = 4;
		__builtin_memcpy(saddr, &ip[16], 4);
		__builtin_memcpy(daddr, &ip[12], 4);
	} else if ((ip[0] >> 4) == 6) {
		if (bpf_probe_read_kernel(ip, 40, (void *)(head + nh)))
			return 0;
		__u32 payload = (ip[4] << 8) | ip[5];
		if (payload + 40 < l3)
			return 0;
		tcp_len = payload + 40 - l3;
		family = 6;
		__builtin_memcpy(saddr, &ip[24], 16);
		__builtin_memcpy(daddr, &ip[8], 16);
	} else {
		return 0;
	}
	__u8 t[20];
	if (bpf_probe_read_kernel(t, sizeof(t), (void *)(head + th)))
		return 0;
	__u32 doff = (t[12] >> 4) * 4;
	e->family = family;
	__builtin_memcpy(e->saddr, saddr, 16);
	__builtin_memcpy(e->daddr, daddr, 16);
	e->sport = (t[2] << 8) | t[3];
	e->dport = (t[0] << 8) | t[1];
	e->tseq = ebd_be32(&t[4]);
	e->tack = ebd_be32(&t[8]);
	e->tflags = t[13];
	e->tlen = tcp_len > doff ? tcp_len - doff : 0;
	e->has_seq = 1;
	e->src = 1;
	return 1;
}

/* An active reset (no trigger): the connected socket's own tuple and send position. */
static __always_inline int tuple_from_socket(struct reset_event *e, __u64 sk)
{
	__u16 family = 0, sport = 0, dport = 0;
	__u8 state = 0;
	if (bpf_probe_read_kernel(&family, sizeof(family), (void *)(sk + OFF_SKC_FAMILY)) ||
		bpf_probe_read_kernel(&state, sizeof(state), (void *)(sk + OFF_SKC_STATE)) ||
		bpf_probe_read_kernel(&sport, sizeof(sport), (void *)(sk + OFF_INET_SPORT)) ||
		bpf_probe_read_kernel(&dport, sizeof(dport), (void *)(sk + OFF_SKC_DPORT)))
		return 0;
	if (state == 6 || state == 10 || state == 12)
		return 0;                /* time-wait, listener, request: not a tcp_sock */
	__u8 saddr[16] = {}, daddr[16] = {};
	if (family == 2) {
		if (bpf_probe_read_kernel(saddr, 4, (void *)(sk + OFF_SKC_RCV_SADDR)) ||
			bpf_probe_read_kernel(daddr, 4, (void *)(sk + OFF_SKC_DADDR)))
			return 0;
		e->family = 4;
	} else if (family == 10) {
		if (bpf_probe_read_kernel(saddr, 16, (void *)(sk + OFF_SKC_V6_RCV_SADDR)) ||
			bpf_probe_read_kernel(daddr, 16, (void *)(sk + OFF_SKC_V6_DADDR)))
			return 0;
		e->family = 0;           /* 6, or 4 when v4-mapped: decided in user space */
	} else {
		return 0;
	}
	__builtin_memcpy(e->saddr, saddr, 16);
	__builtin_memcpy(e->daddr, daddr, 16);
	e->sport = EBD_HTONS(sport);   /* inet_sport: skc_num is 0 once the port is put */
	e->dport = EBD_HTONS(dport);
	__u32 snd = 0, rcv = 0;
	if (!bpf_probe_read_kernel(&snd, sizeof(snd), (void *)(sk + OFF_TP_SND_NXT)) &&
		!bpf_probe_read_kernel(&rcv, sizeof(rcv), (void *)(sk + OFF_TP_RCV_NXT))) {
		e->tseq = snd;
		e->tack = rcv;
		e->has_seq = 1;
	}
	e->src = 2;
	return 1;
}
"""


def c_tuple_choice(fields: dict) -> str:
    """C that replaces the tracepoint's tuple with the RST's own: from the trigger skb when
    there is one, else from a full socket (active reset). A trigger that cannot be read
    leaves the tracepoint's fields (the socket's seq would not be the RST's)."""
    lines = []
    if "skbaddr" in fields:
        lines.append("\tif (rec.skbaddr)\n\t\ttuple_from_skb(&e, rec.skbaddr);")
    if "skaddr" in fields:
        prefix = "else " if lines else ""
        lines.append("\t%sif (rec.skaddr)\n\t\ttuple_from_socket(&e, rec.skaddr);" % prefix)
    return "\n".join(lines)


def c_reset_probe(
    probe: str, fmt: dict, probe_num: int, offsets, buffer: str, tuples: bool = False
) -> str:
    """One tracepoint program that copies the record and emits a reset_event.

    With `tuples` (BTF offsets of this kernel), tcp_send_reset's 4-tuple, seq and ack are
    the RST's own, read from the trigger packet or the socket (see C_TUPLE).
    """
    fields = field_map(fmt)
    sname = "tp_" + probe
    body = [c_tracepoint_struct(sname, fmt)]
    body.append("int ebd_%s(void *ctx)\n{" % probe)
    body.append("\tstruct %s rec = {};" % sname)
    body.append("\tif (bpf_probe_read_kernel(&rec, sizeof(rec), ctx) != 0)\n\t\treturn 0;")
    body.append("\tstruct reset_event e = {};")
    body.append("\te.ts = bpf_ktime_get_ns();")
    body.append("\te.probe = %d;" % probe_num)
    body.append("\te.pid = bpf_get_current_pid_tgid() >> 32;")
    body.append("\tbpf_get_current_comm(&e.comm, sizeof(e.comm));")
    body.append("\te.state = %s;" % ("rec.state" if "state" in fields else "-1"))
    reason = fields.get("reason")
    if reason and reason["size"] in (1, 2, 4):
        body.append("\t__u32 reason = 0;")
        body.append("\t__builtin_memcpy(&reason, &rec.reason, %d);" % reason["size"])
        body.append("\te.reason = reason;")
    else:
        body.append("\te.reason = -1;")
    if address_layout(fmt) == "sockaddr":
        body.append(
            "\t__u16 fam = 0, sp = 0, dp = 0;\n"
            "\t__builtin_memcpy(&fam, &rec.saddr[0], 2);\n"
            "\t__builtin_memcpy(&sp, &rec.saddr[2], 2);\n"
            "\t__builtin_memcpy(&dp, &rec.daddr[2], 2);\n"
            "\te.sport = EBD_HTONS(sp);\n"
            "\te.dport = EBD_HTONS(dp);\n"
            "\tif (fam == 2) {\n"
            "\t\te.family = 4;\n"
            "\t\t__builtin_memcpy(e.saddr, &rec.saddr[4], 4);\n"
            "\t\t__builtin_memcpy(e.daddr, &rec.daddr[4], 4);\n"
            "\t} else if (fam == 10) {\n"
            "\t\te.family = 6;\n"
            "\t\t__builtin_memcpy(e.saddr, &rec.saddr[8], 16);\n"
            "\t\t__builtin_memcpy(e.daddr, &rec.daddr[8], 16);\n"
            "\t}"
        )
    else:
        body.append("\te.sport = rec.sport;\n\te.dport = rec.dport;")
        if "family" in fields:
            body.append("\te.family = rec.family == 2 ? 4 : (rec.family == 10 ? 6 : 0);")
        if "saddr_v6" in fields:
            body.append(
                "\t__builtin_memcpy(e.saddr, rec.saddr_v6, 16);\n"
                "\t__builtin_memcpy(e.daddr, rec.daddr_v6, 16);"
            )
        else:
            body.append(
                "\te.family = 4;\n"
                "\t__builtin_memcpy(e.saddr, rec.saddr, 4);\n"
                "\t__builtin_memcpy(e.daddr, rec.daddr, 4);"
            )
    if tuples and probe == "tcp_send_reset":
        body.append(c_tuple_choice(fields))
    sk = "rec.skaddr" if "skaddr" in fields else None
    skb = "rec.skbaddr" if "skbaddr" in fields else None
    body.append(c_netns_lookup(offsets, sk, skb))
    body.append("\t" + c_submit(buffer, "reset_events", "ctx", "&e", 1))
    body.append("\treturn 0;\n}\n")
    return "\n".join(line for line in body if line)


C_KPROBE_INCLUDES = """#include <uapi/linux/ptrace.h>
#include <net/sock.h>
#include <linux/skbuff.h>"""

C_KPROBE_COMMON = r"""
static __always_inline void kp_sock_addrs(struct reset_event *e, struct sock *sk)
{
	struct sock_common c = {};
	bpf_probe_read_kernel(&c, sizeof(c), sk);
	e->src = 2;
	e->state = c.skc_state;
	e->sport = c.skc_num;
	e->dport = EBD_HTONS(c.skc_dport);
	if (c.skc_family == 2) {
		e->family = 4;
		__builtin_memcpy(e->saddr, &c.skc_rcv_saddr, 4);
		__builtin_memcpy(e->daddr, &c.skc_daddr, 4);
	} else {
		e->family = 6;
		__builtin_memcpy(e->saddr, &c.skc_v6_rcv_saddr, 16);
		__builtin_memcpy(e->daddr, &c.skc_v6_daddr, 16);
	}
}
"""

C_KPROBE_SEND = r"""
static __always_inline int kp_send_reset(struct pt_regs *ctx, struct sock *sk,
	struct sk_buff *skb, __u16 family)
{
	struct reset_event e = {};
	e.ts = bpf_ktime_get_ns();
	e.probe = 1;
	e.pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(&e.comm, sizeof(e.comm));
	e.reason = -1;
	if (sk) {
		kp_sock_addrs(&e, sk);
	} else {
		/* No socket: the RST answers skb, so its destination is the local side. */
		unsigned char *head = 0;
		__u16 nh = 0, th = 0;
		__u16 ports[2] = {};
		bpf_probe_read_kernel(&head, sizeof(head), &skb->head);
		bpf_probe_read_kernel(&nh, sizeof(nh), &skb->network_header);
		bpf_probe_read_kernel(&th, sizeof(th), &skb->transport_header);
		bpf_probe_read_kernel(ports, sizeof(ports), head + th);
		e.src = 1;
		e.family = family;
		e.sport = EBD_HTONS(ports[1]);
		e.dport = EBD_HTONS(ports[0]);
		if (family == 4) {
			bpf_probe_read_kernel(e.daddr, 4, head + nh + 12);
			bpf_probe_read_kernel(e.saddr, 4, head + nh + 16);
		} else {
			bpf_probe_read_kernel(e.daddr, 16, head + nh + 8);
			bpf_probe_read_kernel(e.saddr, 16, head + nh + 24);
		}
	}
%(netns)s
	%(submit)s
	return 0;
}

int ebd_kp_v4_send_reset(struct pt_regs *ctx)
{
	return kp_send_reset(ctx, (struct sock *)PT_REGS_PARM1(ctx),
		(struct sk_buff *)PT_REGS_PARM2(ctx), 4);
}

int ebd_kp_v6_send_reset(struct pt_regs *ctx)
{
	return kp_send_reset(ctx, (struct sock *)PT_REGS_PARM1(ctx),
		(struct sk_buff *)PT_REGS_PARM2(ctx), 6);
}
"""

C_KPROBE_RECEIVE = r"""
int ebd_kp_tcp_reset(struct pt_regs *ctx)
{
	struct sock *sk = (struct sock *)PT_REGS_PARM1(ctx);
	struct reset_event e = {};
	e.ts = bpf_ktime_get_ns();
	e.probe = 2;
	e.pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(&e.comm, sizeof(e.comm));
	e.reason = -1;
	kp_sock_addrs(&e, sk);
%(netns)s
	%(submit)s
	return 0;
}
"""


def build_program(plan: dict) -> str:
    """The whole C program for a plan (see make_plan): one compile covers every probe."""
    history = plan["history"]
    parts = []
    if plan["kprobes"]:
        parts.append(C_KPROBE_INCLUDES)
    parts += [C_PACKET, C_FLOW_KEY, C_FILTER_MAPS]
    parts.append(
        C_COMMON
        % {
            "history": history,
            "slots": max(history, 1),
            "stream_all": int(plan["all_flows"]),
            "flow_map_size": FLOW_MAP_SIZE,
        }
    )
    parts.append("#define OWN_NETNS %du" % plan["own_netns"])
    if plan["buffer"] == "ringbuf":
        parts.append(C_BUFFERS_RINGBUF % {"pages": plan["pages"]})
    else:
        parts.append(C_BUFFERS_PERF)
    parts.append(C_LOST)
    filters = c_filters(
        plan["ports"], plan["addrs"], "t.family", "t.saddr", "t.daddr", "t.sport", "t.dport",
        "return TC_ACT_UNSPEC;",
    )  # fmt: skip
    parts.append(
        C_TC
        % {
            "filters": filters,
            "submit_pkt": c_submit(plan["buffer"], "pkt_events", "skb", "e", 0),
        }
    )
    parts.append(c_tc_entries(plan.get("l2")))
    num = {"tcp_send_reset": 1, "tcp_receive_reset": 2}
    tuples = plan.get("tuple_offsets")
    if tuples and "tcp_send_reset" in plan["tracepoints"]:
        parts.append(C_TUPLE % tuples)
    for probe, fmt in sorted(plan["tracepoints"].items()):
        parts.append(
            c_reset_probe(
                probe, fmt, num[probe], plan["offsets"], plan["buffer"], tuples=bool(tuples)
            )
        )
    submit_reset = c_submit(plan["buffer"], "reset_events", "ctx", "&e", 1)
    if plan["kprobes"]:
        parts.append(C_KPROBE_COMMON)
    if "tcp_send_reset" in plan["kprobes"]:
        netns = c_netns_lookup(plan["offsets"], "(__u64)sk", "(__u64)skb")
        parts.append(C_KPROBE_SEND % {"netns": netns, "submit": submit_reset})
    if "tcp_receive_reset" in plan["kprobes"]:
        netns = c_netns_lookup(plan["offsets"], "(__u64)sk", None)
        parts.append(C_KPROBE_RECEIVE % {"netns": netns, "submit": submit_reset})
    return "\n".join(parts)


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def decode_packets(raw: bytes, ifnames: dict) -> list:
    """One pkt_event -> packet records: the flow's kept handshake, its history (oldest
    first, FINs marked close), then the packet itself."""
    why, head, count, hs_mask = struct.unpack_from(EVENT_HEAD_FMT, raw, FLOW_SIZE + PKT_SIZE)
    hs_at = FLOW_SIZE + PKT_SIZE + struct.calcsize(EVENT_HEAD_FMT)
    pkts = _kept(raw, hs_at, head, count, hs_mask)
    pkts.append((struct.unpack_from(FLOW_PKT_FMT, raw, FLOW_SIZE), why))
    return _packet_records(raw, pkts, ifnames)


def decode_kept(raw: bytes, ifnames: dict) -> list:
    """One `flows` map value (struct hist) -> its packets as records with why kept,
    in time order: what the kernel still held for a flow when the run ended."""
    head, count, hs_mask, _pad = struct.unpack_from(HIST_HEAD_FMT, raw, FLOW_SIZE)
    pkts = _kept(raw, FLOW_SIZE + struct.calcsize(HIST_HEAD_FMT), head, count, hs_mask)
    pkts = [(pkt, WHY_KEPT) for pkt, _ in sorted(pkts, key=lambda p: p[0][0])]
    return _packet_records(raw, pkts, ifnames)


def _kept(raw: bytes, hs_at: int, head: int, count: int, hs_mask: int) -> list:
    """[(pkt tuple, why)]: the handshake slots by time, then the ring oldest first."""
    ring_at = hs_at + 2 * PKT_SIZE
    slots = (len(raw) - ring_at) // PKT_SIZE
    pkts = [
        (struct.unpack_from(FLOW_PKT_FMT, raw, hs_at + PKT_SIZE * i), 2)
        for i in (0, 1)
        if hs_mask & (1 << i)
    ]
    pkts.sort(key=lambda p: p[0][0])
    order = [(head - count + i) % slots for i in range(count)] if slots else []
    for i in order:
        pkt = struct.unpack_from(FLOW_PKT_FMT, raw, ring_at + PKT_SIZE * i)
        pkts.append((pkt, 3 if pkt[8] & 0x01 else 4))
    return pkts


def _packet_records(raw: bytes, pkts: list, ifnames: dict) -> list:
    """Packet records for [(pkt tuple, why)] of the flow whose key starts `raw`."""
    named = [(pkt, WHY_NAMES.get(kind, "rst")) for pkt, kind in pkts]
    return flow_packet_records(raw, named, ifnames)


def decode_reset(raw: bytes, symbols: dict) -> dict:
    """One reset_event -> a reset record, names taken from the live format's tables."""
    (ts, netns, pid, state, reason, probe, family, sport, dport, saddr, daddr, comm) = (
        struct.unpack_from(RESET_FMT, raw, 0)[:12]
    )
    src, tflags, has_seq, tseq, tack, tlen = struct.unpack_from(RESET_FMT, raw, 0)[12:]
    probe_name = RESET_PROBES[probe - 1]
    # Legacy formats carry IPv4 sockets v4-mapped in saddr_v6 and may have no family.
    mapped = saddr[:12] == V4_MAPPED_PREFIX
    if mapped:
        saddr, daddr = saddr[12:], daddr[12:]
    if family == 0:
        family = 4 if mapped or not any(saddr) else 6
    tables = symbols.get(probe_name, {})
    state_names = tables.get("state") or {v: k for k, v in TCP_STATES.items()}
    reason_names = tables.get("reason", {})
    tuple_from = TUPLE_FROM.get(src, "tracepoint")
    seq, ack = rst_seq_ack(src, tflags, has_seq, tseq, tack, tlen)
    record = {
        "type": "reset",
        "ts_ns": ts,
        "probe": probe_name,
        "family": family,
        "saddr": addr_text(family, saddr),
        "daddr": addr_text(family, daddr),
        "sport": sport,
        "dport": dport,
        "seq": seq,
        "ack": ack,
        "tuple_from": tuple_from,
        "sk_kind": sk_kind(probe_name, state, src, tflags),
        "state": state_names.get(state, "UNKNOWN") if state > 0 else None,
        "state_num": state if state > 0 else None,
        "reason": reason_names.get(reason, "UNKNOWN") if reason >= 0 else None,
        "reason_num": reason if reason >= 0 else None,
        "pid": pid,
        "comm": comm.split(b"\0", 1)[0].decode("utf-8", "replace"),
        "netns": netns or None,
    }
    if not any(daddr[: 4 if family == 4 else 16]) or not dport or not any(saddr):
        # A wildcard is a socket's, not a packet's (a listener: 0.0.0.0:PORT > 0.0.0.0:0).
        record.update(saddr=None, daddr=None, sport=None, dport=None, tuple_from=None)
    return record


def rst_seq_ack(src: int, tflags: int, has_seq: int, tseq: int, tack: int, tlen: int):
    """The RST's (seq, ack field) as the kernel builds it, or (None, None).

    Answering a packet (tcp_v4/v6_send_reset, RFC 793): a trigger with ACK gets seq = its
    ack_seq and no ACK; one without gets seq 0 and ack = its seq + SYN + FIN + payload.
    An active reset (tcp_send_active_reset) carries snd_nxt and rcv_nxt.
    """
    if not has_seq:
        return None, None
    if src == 1:
        if tflags & TH_ACK:
            return tack, 0
        end = tseq + bool(tflags & TH_SYN) + bool(tflags & TH_FIN) + tlen
        return 0, end % 2**32
    if src == 2:
        return tseq, tack
    return None, None


def sk_kind(probe: str, state: int, src: int, tflags: int):
    """What kind of socket the kernel reset with, from its state number (TCP_STATES).

    tcp_check_req sends a request socket's reset with the listener as socket (state
    TCP_LISTEN); a listener never answers a SYN with a RST itself, so a listener's reset
    of a SYN is a request socket's. tcp_receive_reset only fires on full sockets.
    """
    if probe == "tcp_receive_reset":
        return "full"
    if state <= 0:
        return None
    if state == STATE_LISTEN:
        syn_only = src == 1 and tflags & (TH_SYN | TH_ACK) == TH_SYN
        return "request" if syn_only else "listener"
    if state == STATE_NEW_SYN_RECV:
        return "request"
    if state == STATE_TIME_WAIT:
        return "timewait"
    return "full"


# --------------------------------------------------------------------------------------
# The session: plan, attach, loop, clean up
# --------------------------------------------------------------------------------------


def make_plan(args, formats: dict, offsets, tuple_offsets=None, links=None) -> dict:
    """Everything the C program and the attach step depend on, decided up front.

    `links` are the interfaces to watch (see discover_links): only their kinds of packet
    program are compiled; None compiles every kind (--ebpf without a host)."""
    missing = []
    kprobes = []
    for probe in RESET_PROBES:
        if probe in formats:
            continue
        if kprobes_available():
            kprobes.append(probe)
        else:
            missing.append(
                {"probe": probe, "why": "no tracepoint tcp:%s and no kprobes here" % probe}
            )
    ringbuf = kernel_version() >= RINGBUF_MIN_KERNEL
    return {
        "history": args.history,
        "all_flows": args.all_flows,
        "buffer": "ringbuf" if ringbuf else "perf",
        "pages": 64,
        "ports": args.port,
        "addrs": args.addr,
        "tracepoints": formats,
        "kprobes": kprobes,
        "offsets": offsets,
        "tuple_offsets": tuple_offsets,
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
        self.clsact = Clsact()
        self.tc = None
        self.plan = None
        self.attach = {}
        self.ifnames = {}
        self.addrs = []
        self.lost_seen = [0, 0]
        self.perf_lost = [0, 0]
        self.resets = 0
        self.rst_packets = 0
        self.ready = False
        #: the port filter now ([]: none); control lines add to it from another thread
        self.ports = list(args.port)
        self.nat_ports = []
        self.filter_lock = threading.Lock()
        self.link_error = None
        self.setup_times = None

    # -- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Discover, compile, attach: what hello.setup times. For time to ready, only what
        the C depends on is discovered before the compile (most of the time), nft lists
        its ruleset meanwhile, only the watched interfaces' kinds of packet program are
        compiled, and pyroute2 is imported only for the clsact path."""
        times = self.setup_times = SetupTimes()
        ensure_tracefs()  # before importing bcc, which looks for tracefs once
        nat_ports = start_nat_ports()
        try:
            from bcc import BPF
        except ImportError:
            raise SetupError("BCC is not installed (python3-bpfcc)") from None
        self.BPF = BPF
        times.done("import")
        links = self._watched_links()
        self.addrs = discover_addrs()
        (offsets, _), (tuples, tuples_why) = btf_offsets()
        self.plan = make_plan(self.args, read_formats(None), offsets, tuples, links)
        if tuples_why and "tcp_send_reset" in self.plan["tracepoints"]:
            self.plan["missing"].append({"probe": "btf:reset-tuple", "why": tuples_why})
        program = build_program(self.plan)
        times.done("discover")
        try:
            self.bpf = bpf_compile(BPF, program)
        except Exception as exc:
            raise SetupError("BPF compile failed: %s" % exc) from None
        times.done("compile")
        self.nat_ports = nat_ports()
        self._fill_filters()
        self._attach_resets()
        self._attach_tc(links)
        self._open_buffers()
        times.done("attach")

    def _watched_links(self):
        """[(ifindex, name, l2)] to put the packet programs on, or None when the
        interfaces cannot be listed (then no packets, said in missing)."""
        try:
            self.ifnames, links = watched_links(self.args.interfaces)
        except OSError as exc:
            self.link_error = "cannot list interfaces: %s; no packets" % exc
            return None
        return links

    def _fill_filters(self) -> None:
        with self.filter_lock:
            fill_filters(self.bpf, self.ports, self.args.addr)

    def _attach_resets(self) -> None:
        for probe in sorted(self.plan["tracepoints"]):
            fmt = self.plan["tracepoints"][probe]
            try:
                self.bpf.attach_tracepoint(tp="tcp:" + probe, fn_name="ebd_" + probe)
            except Exception as exc:
                self.plan["missing"].append({"probe": probe, "why": str(exc)})
                continue
            self.attach[probe] = {"kind": "tracepoint", "layout": address_layout(fmt)}
        kprobe_fns = {
            "tcp_send_reset": (
                ("tcp_v4_send_reset", "ebd_kp_v4_send_reset"),
                ("tcp_v6_send_reset", "ebd_kp_v6_send_reset"),
            ),
            "tcp_receive_reset": (("tcp_reset", "ebd_kp_tcp_reset"),),
        }
        for probe in self.plan["kprobes"]:
            done = []
            for event, fn in kprobe_fns[probe]:
                try:
                    self.bpf.attach_kprobe(event=event, fn_name=fn)
                    done.append(event)
                except Exception as exc:
                    self.plan["missing"].append({"probe": event, "why": str(exc)})
            if done:
                self.attach[probe] = {"kind": "kprobe", "functions": done}

    def _attach_tc(self, links) -> None:
        if links is None:
            self.plan["missing"].append({"probe": "tc", "why": self.link_error})
            return
        attach_tool(self, links, self.args.tc_mode, self.clsact.hooks)

    def _open_buffers(self) -> None:
        b = self.bpf
        if self.plan["buffer"] == "ringbuf":
            b["pkt_events"].open_ring_buffer(self._ring_cb(self._on_packet))
            b["reset_events"].open_ring_buffer(self._ring_cb(self._on_reset))
            return
        b["pkt_events"].open_perf_buffer(
            self._perf_cb(self._on_packet), page_cnt=64, lost_cb=self._lost_cb(0)
        )
        b["reset_events"].open_perf_buffer(
            self._perf_cb(self._on_reset), page_cnt=16, lost_cb=self._lost_cb(1)
        )

    def _on_packet(self, raw: bytes) -> None:
        for record in decode_packets(raw, self.ifnames):
            self.out.write(record)
            if record["why"] == "rst":
                self.rst_packets += 1
        self._check_count()

    def _on_reset(self, raw: bytes) -> None:
        record = decode_reset(raw, {p: f["symbols"] for p, f in self.plan["tracepoints"].items()})
        if not self._is_local(record) or not self._wanted(record):
            return
        self.out.write(record)
        self.resets += 1
        self._check_count()

    def _is_local(self, record: dict) -> bool:
        """Kernel-side netns filtering already ran when offsets exist; else compare addresses."""
        if record["netns"] is not None:
            return record["netns"] == self.plan["own_netns"]
        return record["saddr"] in self.addrs

    def control(self, text: str) -> None:
        """A control line from the controller (bootstrap stdin thread): `port Q` adds Q to
        the port filter, both directions, as --port does; answered by a `filter` record."""
        words = text.split()
        if len(words) != 2 or words[0] != "port":
            sys.stderr.write("%s: control line not understood, ignored: %s\n" % (SCRIPT, text))
            return
        try:
            port = convert(PORT_PARAM, words[1])
        except ParamError as exc:
            sys.stderr.write("%s: control line ignored: %s\n" % (SCRIPT, exc))
            return
        added = []
        with self.filter_lock:
            if self.args.port and port not in self.ports:  # no --port: every port passes
                if self.bpf is not None:
                    try:
                        fill_filters(self.bpf, [port], [])
                    except Exception as exc:  # noqa: BLE001 - the run is ending
                        sys.stderr.write("%s: control: port %d: %s\n" % (SCRIPT, port, exc))
                        return
                self.ports = sorted(self.ports + [port])
                added.append(port)
            ports = self.ports
        self.out.write({"type": "filter", "ports": ports, "added": added, "why": "nat"})
        self.out.flush()

    def _wanted(self, record: dict) -> bool:
        ports, addrs = self.ports, self.args.addr
        if ports and record["sport"] not in ports and record["dport"] not in ports:
            return False
        return not addrs or record["saddr"] in addrs or record["daddr"] in addrs

    def _check_count(self) -> None:
        limit = self.args.count
        if not limit:
            return
        seen = (
            self.resets
            if self.attach.get("tcp_send_reset") or self.attach.get("tcp_receive_reset")
            else self.rst_packets
        )
        if seen >= limit:
            self.stop.reason = self.stop.reason or "count"

    # -- running ---------------------------------------------------------------------------

    def hello(self) -> dict:
        offsets_ok = self.plan["offsets"] is not None
        return {
            "type": "hello",
            "script": SCRIPT,
            "version": VERSION,
            "kernel": os.uname().release,
            "mono_ns": now_ns("monotonic"),
            "real_ns": now_ns("time"),
            "netns": self.plan["own_netns"],
            "addrs": self.addrs,
            "interfaces": sorted(self.ifnames.values()),
            "attach": self.attach,
            "missing": self.plan["missing"],
            "filter": {"ports": self.args.port, "addrs": self.args.addr},
            "nat_ports": self.nat_ports,
            "scope": "netns" if offsets_ok else "addrs",
            "history": self.args.history,
            "all_flows": self.args.all_flows,
            "buffer": self.plan["buffer"],
            "setup": self.setup_times.report(),
        }

    def run(self) -> str:
        deadline = time.monotonic() + self.args.duration if self.args.duration else None
        poll = (
            self.bpf.ring_buffer_poll
            if self.plan["buffer"] == "ringbuf"
            else self.bpf.perf_buffer_poll
        )
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
            self.out.flush()
        # Deliver what is already buffered, e.g. the RST packet after the counted reset.
        reason = self.stop.reason
        if reason != "eof":
            poll(0)
            self._report_lost()
            self.out.flush()
        return self.stop.reason if self.stop.reason == "eof" else reason

    def detach(self) -> list:
        """Take every program off its hook; programs and maps stay readable. Returns errors."""
        errors = []
        if self.tc is not None:
            errors.extend(self.tc.close())
            self.tc = None
        if self.bpf is None:
            return errors
        for probe, how in sorted(self.attach.items()):
            try:
                if how.get("kind") == "tracepoint":
                    self.bpf.detach_tracepoint(tp="tcp:" + probe)
                elif how.get("kind") == "kprobe":
                    for event in how["functions"]:
                        self.bpf.detach_kprobe(event=event)
            except Exception as exc:  # noqa: BLE001 - keep detaching the rest
                errors.append("detach %s: %s" % (probe, exc))
        return errors

    def drain(self) -> None:
        """Deliver the events already in the buffers (nothing new can arrive once detached)."""
        if self.plan["buffer"] == "ringbuf":
            self.bpf.ring_buffer_poll(0)
        else:
            self.bpf.perf_buffer_poll(0)
        self._report_lost()
        self.out.flush()

    def dump_kept(self) -> None:
        """Emit the packets the kernel still keeps per flow (handshakes, history, FINs of
        flows without a RST), then a `kept` summary.

        A RST moves its flow's entry to user space and deletes it in the same program run,
        and an entry only ever holds packets not streamed, so none is emitted twice. Read
        after detach and drain: no program can add to or flush an entry meanwhile. Bounded
        by the map: FLOW_MAP_SIZE flows of at most 2 + --history packets.
        """
        flows = []
        for _key, value in self.bpf["flows"].items():
            raw = ctypes.string_at(ctypes.addressof(value), ctypes.sizeof(value))
            records = decode_kept(raw, self.ifnames)
            if records:
                flows.append(records)
        flows.sort(key=lambda records: records[0]["ts_ns"])
        packets = 0
        for records in flows:
            for record in records:
                self.out.write(record)
                packets += 1
        self.out.write({"type": "kept", "flows": len(flows), "packets": packets})
        self.out.flush()

    def _report_lost(self) -> None:
        totals = [sum(self.bpf["lost"][ctypes.c_int(i)]) for i in range(2)]
        for i, source in enumerate(("packets", "resets")):
            count = totals[i] - self.lost_seen[i] + self.perf_lost[i]
            self.lost_seen[i] = totals[i]
            self.perf_lost[i] = 0
            if count:
                self.out.write({"type": "lost", "count": count, "source": source})

    def cleanup(self) -> list:
        """Detach every probe and filter, then (once it was ready) emit what the kernel kept,
        then free the programs and maps. Returns errors."""
        errors = self.detach()
        if self.ready and self.bpf is not None and not self.out.broken:
            try:
                self.drain()
                self.dump_kept()
            except Stop:
                pass
            except Exception as exc:  # noqa: BLE001 - still free everything
                errors.append("kept: %s" % exc)
        if self.bpf is not None:
            try:
                self.bpf.cleanup()
            except Exception as exc:  # noqa: BLE001
                errors.append("detach: %s" % exc)
            self.bpf = None
        self.clsact.close()
        return errors


# --------------------------------------------------------------------------------------
# Arguments, signals, main
# --------------------------------------------------------------------------------------


PARAMS = [
    {"name": "port", "type": "port", "multiple": True, "metavar": "PORT[,PORT]",
     "help": "only flows with this port on either side; repeatable"},
    {"name": "addr", "type": "addr", "multiple": True, "metavar": "ADDR[,ADDR]",
     "help": "only flows with this IPv4/IPv6 address on either side; repeatable"},
    {"name": "interfaces", "type": "ifname", "multiple": True, "metavar": "IF[,IF]",
     "help": "interfaces to watch (default: every interface except lo)"},
    {"name": "history", "type": "int", "min": 0, "max": 8, "default": 4, "metavar": "K",
     "help": "packets remembered per flow, shown before its RST (0-8, default 4)"},
    {"name": "all-flows", "type": "flag",
     "help": "also report handshake and close packets of flows without a RST"},
    {"name": "duration", "type": "float", "min": 0, "default": 0, "metavar": "SECONDS",
     "help": "stop after SECONDS (default 0: run until signalled)"},
    {"name": "count", "type": "int", "min": 0, "default": 0, "metavar": "N",
     "help": "stop after N reset records (RST packets when no reset probe)"},
    {"name": "tc-mode", "type": "choice", "choices": ["auto", "tcx", "clsact"],
     "default": "auto", "metavar": "MODE",
     "help": "packet hook: auto (tcx if the kernel has it), tcx or clsact"},
    {"name": "ebpf", "type": "flag", "local": True,
     "help": "print the generated C program and exit (needs no root)"},
    {"name": "format-dir", "type": "path", "local": True, "metavar": "DIR",
     "help": "with --ebpf: read tracepoint format files from DIR"},
]  # fmt: skip
PORT_PARAM = next(p for p in PARAMS if p["name"] == "port")


def parse_args(argv):
    return parse_tool_args(PARAMS, argv, SCRIPT, __doc__)


def print_ebpf(args, out) -> int:
    formats = read_formats(args.format_dir)
    (offsets, _), (tuples, _) = ((None, None), (None, None)) if args.format_dir else btf_offsets()
    plan = make_plan(args, formats, offsets, tuples)
    if args.format_dir:
        plan["kprobes"] = []
    out.write(build_program(plan) + "\n")
    for item in plan["missing"]:
        sys.stderr.write("%s: %s: %s\n" % (SCRIPT, item["probe"], item["why"]))
    return 0


def main(argv=None) -> int:
    return run_tool(SCRIPT, argv, parse_args, print_ebpf, Session)


if __name__ == "__main__":
    sys.exit(main())
