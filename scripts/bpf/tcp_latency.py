#!/usr/bin/python3
"""tcp_latency: consistently sampled sightings of TCP packets, plus the kernel's TCP state.

Watches one host (network namespace) and prints NDJSON on stdout. A TC classifier on
ingress and egress of every interface but lo (a tcx link on Linux 6.6+, else a clsact
filter; observe only) reports a *sample* of the TCP packets that pass the --port/--addr
filter. The sample is the same on every host without coordination, so one packet can be
followed from host to host and hook to hook, however it is cut (TSO/GSO, GRO, BIG TCP):

- Sequence space is cut into blocks of B = 2**K bytes (K = --block-shift, default 16). A
  block is *chosen* when hash32(x >> K) % N == 0 (N = --sample) for its bytes x; every byte
  of a chosen block is a *chosen point*. hash32 is murmur3's fmix32: h ^= h >> 16;
  h *= 0x85ebca6b; h ^= h >> 13; h *= 0xc2b2ae35; h ^= h >> 16 (32-bit unsigned).
- data: a packet whose payload [seq, seq+len) (after the SYN's sequence number) holds a
  chosen point is kept; pt = the lowest one (seq itself when its block is chosen). Only the
  first 64 blocks a packet touches are examined (4 MiB at K=16: any GSO/BIG TCP packet).
- ack: a packet with payload and ACK is kept when its ack is the first, among such
  packets in its direction of the flow *at this hook*, to pass a chosen point:
  prev_ack <= c < ack (mod 2**32), prev_ack the last ack seen (per-hook LRU state:
  interface, direction, 4-tuple). apt = the highest such c (the request point this answer
  acknowledges); only the 64 highest blocks below ack are examined. A direction without
  state only records its ack; an ack that does not move forward changes nothing; a SYN
  starts its direction afresh (a new connection on the same 4-tuple) and a SYN-ACK starts
  it at its ack, so the answerer's first data gets its apt.
- pure ACK (no payload, no SYN/FIN/RST): kept when the block of ack - 1 is chosen, from
  the packet alone, so every hook keeps the same pure ACKs whatever order they pass in
  (two ACKs sent from two CPUs often swap places on the way); apt is null. About 1 in N
  pure ACKs is kept.
- ctl: a SYN is kept when its ISN's block is chosen, a SYN-ACK when the block of ack - 1
  is (the client's ISN), so a sampled handshake is kept on every host, together with the
  client's first bytes; a FIN when its own sequence number (seq + len) is chosen; every RST.
- why is the first rule that keeps the packet: ctl, data, ack. N = 1 chooses every byte
  (pt = seq; apt = ack - 1 on packets with payload) and keeps every packet: one no rule
  keeps is data (with payload) or ack (without).

Why whole blocks and these defaults (N = 32, K = 16): a message is sampled with
probability 1/N whatever its size (a small connection's bytes lie in one block, so 1 in N
connections is followed whole, with its FINs and tracepoint records; the others cost the
parse and the rule only), while a bulk packet of L bytes is kept with probability about
(1 + L/B)/N: at K = 16 a 64 KiB GSO packet touches one or two blocks, so about 1 in 16
bulk packets is kept, what the older default (a point every MiB) kept. The earlier rule
(block starts only) sampled a 200-byte request 1 time in 5,000 at its default, and a
12-byte one never even at N = 1. A smaller N samples more small connections and costs
bulk in proportion; a smaller K follows a long connection in shorter bursts but keeps
more bulk packets (about 17/N at K = 12). Measured: docs/benchmarks.md (datapath).

Counters per host: seen (packets passing the filter, at any hook), sampled (kept by the
rule), lost (kept but the buffer was full: packet records = sampled - lost), in a `counts`
record every second and once at the end. The kernel's own view comes from tracepoints,
filtered by the same ports/addresses and by network namespace (BTF offsets):
tcp:tcp_probe (RTT, windows) and sock:sock_recv_length (the application reading a flow's
socket, not MSG_PEEK; its 4-tuple from the socket via BTF offsets), each at most one record
per flow per 100 ms and, with N > 1, only for flows of which this host kept a packet
(an LRU map the packet hook fills), and every tcp:tcp_retransmit_skb. A v4-mapped IPv6
socket's events are IPv4. Records are read in batches every 20 ms (they wake no reader).
A control line `ctl port Q` (see docs/remote-protocol.md) adds Q to the port filter
and is answered by a `filter` record, as in tcp_rst.

Beyond the record schema the controller relies on: the ack state is per hook (a forwarded
packet is seen at two hooks of one host), counts.sampled includes the lost records, lost
records name their source, hello has scope (as tcp_rst), `filter` records answer control
lines.

Parameters:
  --port PORT[,PORT]      only flows with this port on either side; repeatable
  --addr ADDR[,ADDR]      only flows with this IPv4/IPv6 address on either side; repeatable
  --interfaces IF[,IF]    interfaces to watch (default: every interface except lo)
  --sample N              choose 1 sequence block in N (default 32; 1 keeps every packet)
  --block-shift K         sequence blocks of 2**K bytes (default 16: 64 KiB)
  --duration SECONDS      stop after SECONDS (default 0: run until signalled)
  --tc-mode MODE          packet hook: auto (tcx if the kernel has it), tcx or clsact
  --tp-mode MODE          socket tracepoints: auto (raw if kernel and BTF allow), raw or format
  --ebpf                  print the generated C program and exit (needs no root)
  --format-dir DIR        with --ebpf: read tracepoint format files from DIR
Fields:
  hello.script          str    "tcp_latency"
  hello.version         int    record schema version (1)
  hello.kernel          str    kernel release
  hello.mono_ns         int    CLOCK_MONOTONIC ns, sampled together with real_ns
  hello.real_ns         int    CLOCK_REALTIME ns
  hello.netns           int    inode of this network namespace
  hello.addrs           list   this namespace's non-loopback addresses
  hello.interfaces      list   interfaces carrying the packet classifier
  hello.attach          dict   per probe: kind (tracepoint, raw_tracepoint, tcx-link, tc-clsact)
                               and details
  hello.missing         list   probes not attached: {probe, why}
  hello.filter          dict   {ports, addrs} as requested
  hello.nat_ports       list   [[P, Q], ...]: nftables DNAT sends TCP port P on as port Q
  hello.scope           str    how other namespaces' tracepoint events are dropped: netns or addrs
  hello.buffer          str    ringbuf or perf
  hello.sample          dict   {n: N, block: B}: the sampling rule's parameters
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
  packet.len            int    TCP payload bytes as the hook sees the packet (GSO: all of it)
  packet.win            int    TCP window field (unscaled)
  packet.why            str    data, ack or ctl: the rule that kept it
  packet.pt             int    lowest chosen point in the payload, or null
  packet.apt            int    highest chosen point this ack newly acknowledges, or null
  counts.ts_ns          int    host CLOCK_MONOTONIC ns
  counts.seen           int    packets passing the filter, every hook, since the start
  counts.sampled        int    of those, kept by the sampling rule
  counts.lost           int    of those, lost because the buffer was full
  tcp_probe.ts_ns       int    host CLOCK_MONOTONIC ns
  tcp_probe.family      int    4 or 6
  tcp_probe.saddr       str    local address
  tcp_probe.sport       int    local port
  tcp_probe.daddr       str    remote address
  tcp_probe.dport       int    remote port
  tcp_probe.srtt_us     int    smoothed RTT, microseconds
  tcp_probe.snd_cwnd    int    congestion window, segments
  tcp_probe.snd_wnd     int    peer's receive window, bytes
  tcp_probe.rcv_wnd     int    own receive window, bytes
  tcp_probe.snd_una     int    oldest unacknowledged sequence number
  tcp_probe.snd_nxt     int    next sequence number to send
  retrans.ts_ns         int    host CLOCK_MONOTONIC ns
  retrans.family        int    4 or 6
  retrans.saddr         str    local address
  retrans.sport         int    local port
  retrans.daddr         str    remote address
  retrans.dport         int    remote port
  retrans.state         str    socket state name
  recv.ts_ns            int    host CLOCK_MONOTONIC ns
  recv.family           int    4 or 6
  recv.saddr            str    local address
  recv.sport            int    local port
  recv.daddr            str    remote address
  recv.dport            int    remote port
  recv.len              int    bytes the application read in that call
  lost.count            int    events lost because a buffer overflowed
  lost.ts_ns            int    host CLOCK_MONOTONIC ns
  lost.source           str    packets or socket (tracepoint events)
  filter.ports          list   ports the filter passes now ([]: every port, no filter)
  filter.added          list   ports this control line added
  filter.why            str    nat
  bye.reason            str    duration, signal, eof or error
  bye.error             str    error message (reason error only)
"""

import ctypes
import json
import os
import struct
import sys
import threading
import time

from core.btf import btf_offsets, c_netns_lookup, load_btf
from core.compile import bpf_compile
from core.discovery import discover_addrs, kernel_version, own_netns
from core.events import C_LOST, RINGBUF_MIN_KERNEL, BufferCallbacks, Output, c_submit, now_ns
from core.lifecycle import SetupError, Stop
from core.natports import start_nat_ports
from core.packet import (
    C_FILTER_MAPS,
    C_PACKET,
    DIR_NAMES,
    TCP_FMT,
    addr_text,
    c_filters,
    fill_filters,
    packet_head,
    tcp_fields,
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

SCRIPT = "tcp_latency"
VERSION = 2
#: probe name -> tracepoint category
SOCK_PROBES = {"tcp_probe": "tcp", "tcp_retransmit_skb": "tcp", "sock_recv_length": "sock"}
KIND_NUM = {"tcp_probe": 1, "tcp_retransmit_skb": 2, "sock_recv_length": 3}
KIND_RECORD = {1: "tcp_probe", 2: "retrans", 3: "recv"}
WHY_NAMES = {1: "data", 2: "ack", 3: "ctl"}
MAX_BLOCKS = 64  # block starts examined per packet / per ack
ACK_MAP_SIZE = 65536  # per-hook flow directions with ack state (LRU)
RATE_MAP_SIZE = 16384  # flows with a rate-limited tracepoint record (LRU)
RATE_NS = 100 * 1000 * 1000
PKT_PAGES, SOCK_PAGES = 256, 32
BATCH_MS = 20  # the ring buffers are read this often (1 MiB: ~12,000 records, 600,000/s)

# Userspace mirrors of the C structs (explicit padding, native order).
EVENT_FMT = TCP_FMT + "QIIIBBBB"
SOCK_FMT = "=QII16s16sHHHxxiIIIIIIi"
EVENT_STRUCT = struct.Struct(EVENT_FMT)
EVENT_SIZE = EVENT_STRUCT.size
SOCK_SIZE = struct.calcsize(SOCK_FMT)
STATE_NAMES = dict((v, k) for k, v in TCP_STATES.items())


# --------------------------------------------------------------------------------------
# The sampling rule, mirrored in Python (tests, and readers who want to check a point)
# --------------------------------------------------------------------------------------


def hash32(x: int) -> int:
    """murmur3 fmix32, as the C computes it (32-bit unsigned)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def is_chosen(x: int, n: int, shift: int) -> bool:
    """Byte x is a chosen point (its block is chosen) for --sample n, --block-shift shift."""
    return n == 1 or hash32((x & 0xFFFFFFFF) >> shift) % n == 0


def data_point(seq: int, length: int, n: int, shift: int):
    """pt of a payload [seq, seq+length): its lowest chosen byte, or None."""
    c = seq & 0xFFFFFFFF
    for _ in range(MAX_BLOCKS):
        if (c - seq) & 0xFFFFFFFF >= length:
            return None
        if is_chosen(c, n, shift):
            return c
        c = (((c >> shift) + 1) << shift) & 0xFFFFFFFF  # the next block's first byte
    return None


def ack_point(prev_ack: int, ack: int, n: int, shift: int):
    """apt of an ack after prev_ack: the highest chosen byte c with prev_ack <= c < ack."""
    span = (ack - prev_ack) & 0xFFFFFFFF
    if span == 0 or span >= 1 << 31:
        return None
    c = (ack - 1) & 0xFFFFFFFF
    for _ in range(MAX_BLOCKS):
        if (ack - 1 - c) & 0xFFFFFFFF >= span:
            return None
        if is_chosen(c, n, shift):
            return c
        c = (((c >> shift) << shift) - 1) & 0xFFFFFFFF  # the previous block's last byte
    return None


# --------------------------------------------------------------------------------------
# Tracepoint format files
# --------------------------------------------------------------------------------------


def read_formats(fmt_dir) -> dict:
    """The socket tracepoints' formats, from a directory of recorded files (named after
    the probe, optionally with `.format`) or tracefs. Absent probes are left out."""
    return read_tracepoint_formats(
        [(system, probe) for probe, system in SOCK_PROBES.items()], fmt_dir
    )


# --------------------------------------------------------------------------------------
# C generation
# --------------------------------------------------------------------------------------


C_COMMON = r"""
#define SAMPLE_N %(n)du
#define BLOCK_SHIFT %(shift)d
#define BLOCK ((__u32)1 << BLOCK_SHIFT)
#define MAX_BLOCKS %(max_blocks)d
#define RATE_NS %(rate_ns)dULL
#define WHY_DATA 1
#define WHY_ACK 2
#define WHY_CTL 3
#define OWN_NETNS %(netns)du
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define EBD_MAPPED_WORD 0xffff0000u  /* 00 00 ff ff as a 32-bit word */
#else
#define EBD_MAPPED_WORD 0x0000ffffu
#endif

struct lat_event {           /* one kept packet, 80 bytes */
	struct ebd_tcp t;
	__u64 ts;
	__u32 ifindex;
	__u32 pt;
	__u32 apt;
	__u8 dir;                /* 0 ingress, 1 egress */
	__u8 why;
	__u8 has_pt;
	__u8 has_apt;
};

struct sock_event {          /* tcp_probe, retransmit or recv */
	__u64 ts;
	__u32 netns;
	__u32 kind;              /* 1 tcp_probe, 2 retransmit, 3 recv */
	__u32 saddr[4];          /* local */
	__u32 daddr[4];          /* remote */
	__u16 sport;
	__u16 dport;
	__u16 family;            /* 4 or 6 (unmap_v4) */
	__u8 _pad[2];
	__s32 state;
	__u32 srtt_us;
	__u32 snd_cwnd;
	__u32 snd_wnd;
	__u32 rcv_wnd;
	__u32 snd_una;
	__u32 snd_nxt;
	__s32 len;
};

struct ack_state {           /* last ack of a packet with payload (or SYN-ACK) seen */
	__u32 prev;
	__u8 has;
	__u8 _pad[3];
};

BPF_PERCPU_ARRAY(counters, __u64, 2);        /* 0: seen, 1: sampled */
BPF_PERCPU_ARRAY(lost, __u64, 2);            /* 0: packets, 1: socket events (buffer full) */
BPF_F_TABLE("lru_hash", __u64, struct ack_state, acks, %(ack_map)d, BPF_F_NO_COMMON_LRU);
BPF_F_TABLE("lru_hash", __u64, __u64, rate, %(rate_map)d, 0);
BPF_F_TABLE("lru_hash", __u64, __u8, marked, %(rate_map)d, 0);  /* flows with a kept packet */

static __always_inline void count(__u32 idx)
{
	__u64 *v = counters.lookup(&idx);
	if (v)
		(*v)++;
}

/* murmur3 fmix32: the sampling hash, mirrored by hash32() in the tool */
static __always_inline __u32 fmix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline int chosen(__u32 x)
{
	return SAMPLE_N == 1 || fmix32(x >> BLOCK_SHIFT) %% SAMPLE_N == 0;
}

/* FNV-1a over a directional 4-tuple and a tag, folded to 64 bits */
static __always_inline __u64 tuple_hash(__u32 *s, __u32 *d, __u16 sp, __u16 dp, __u64 tag)
{
	const __u64 prime = 0x100000001b3ULL;
	__u64 h = 0xcbf29ce484222325ULL ^ tag;
#pragma unroll
	for (int i = 0; i < 4; i++)
		h = (h ^ (((__u64)s[i] << 32) | d[i])) * prime;
	h = (h ^ (((__u64)sp << 16) | dp)) * prime;
	return h ^ (h >> 31);
}

/* The same key for both directions of a flow */
static __always_inline __u64 flow_key(__u32 *s, __u32 *d, __u16 sp, __u16 dp)
{
	return tuple_hash(s, d, sp, dp, 0) ^ tuple_hash(d, s, dp, sp, 0);
}

/* A v4-mapped IPv6 socket (::ffff:a.b.c.d) carries an IPv4 flow: the filter and the record
 * see it as IPv4. Family 0 (a format without one) is settled here too. */
static __always_inline void unmap_v4(struct sock_event *e)
{
	if (e->family == 4)
		return;
	if (e->saddr[0] || e->saddr[1] || e->saddr[2] != EBD_MAPPED_WORD) {
		e->family = 6;
		return;
	}
	e->family = 4;
	e->saddr[0] = e->saddr[3];
	e->daddr[0] = e->daddr[3];
	e->saddr[2] = e->saddr[3] = e->daddr[2] = e->daddr[3] = 0;
}

/* 1 when a record of this flow and kind went out less than RATE_NS ago. A busy flow's
 * events end here, before the namespace reads and the marked lookup: rate_ok would refuse
 * them anyway. */
static __always_inline int rate_recent(__u64 key)
{
	__u64 *last = rate.lookup(&key);
	return last && bpf_ktime_get_ns() - *last < RATE_NS;
}

/* One record per flow and kind per RATE_NS: 1 when this one may go */
static __always_inline int rate_ok(__u64 key)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 *last = rate.lookup(&key);
	if (last && now - *last < RATE_NS)
		return 0;
	rate.update(&key, &now);
	return 1;
}

/* Raw tracepoints: a socket's verdict for one probe, kept RATE_NS: a record of it just
 * went out, or it is not wanted (another namespace's, or the filter's). Its next events
 * in that time end here, before any read of the socket: a busy socket and the other
 * namespaces' sockets (every host's program sees every socket event of a shared kernel)
 * cost one lookup. Keyed by the socket's address (8-byte aligned) | probe (< 8); a socket
 * freed and reused within RATE_NS keeps the old verdict for the rest of it. */
BPF_F_TABLE("lru_hash", __u64, __u64, settled, %(rate_map)d, 0);

static __always_inline int sk_settled(__u64 sk, __u64 kind)
{
	__u64 key = sk | kind;
	__u64 *until = settled.lookup(&key);
	return until && bpf_ktime_get_ns() < *until;
}

static __always_inline void sk_settle(__u64 sk, __u64 kind)
{
	__u64 key = sk | kind;
	__u64 until = bpf_ktime_get_ns() + RATE_NS;
	settled.update(&key, &until);
}
"""


C_TC = r"""
/* The lowest chosen byte in [start, start + len): 1 and *pt when there is one. */
static __always_inline int data_point(__u32 start, __u32 len, __u32 *pt)
{
	__u32 c = start;
	for (int i = 0; i < MAX_BLOCKS; i++) {
		if (c - start >= len)
			return 0;
		if (chosen(c)) {
			*pt = c;
			return 1;
		}
		c = (c & ~(BLOCK - 1)) + BLOCK;   /* the next block's first byte */
	}
	return 0;
}

/* The highest chosen byte c with prev <= c < ack (span = ack - prev > 0). */
static __always_inline int ack_point(__u32 ack, __u32 span, __u32 *apt)
{
	__u32 c = ack - 1;
	for (int i = 0; i < MAX_BLOCKS; i++) {
		if (ack - 1 - c >= span)
			return 0;
		if (chosen(c)) {
			*apt = c;
			return 1;
		}
		c = (c & ~(BLOCK - 1)) - 1;       /* the previous block's last byte */
	}
	return 0;
}

/* off: bytes before the IP header (14 on Ethernet, 0 on L3 devices), a constant per program */
static __always_inline int on_packet(struct __sk_buff *skb, __u8 dir, __u32 off)
{
	struct lat_event e = {};
	struct ebd_tcp *t = &e.t;
	if (!ebd_parse_tcp(skb, off, t))
		return TC_ACT_UNSPEC;
%(filters)s
	count(0);
	__u8 why = 0;
	__u8 syn = t->flags & TH_SYN;
	if (t->len) {
		/* the SYN takes one sequence number before the payload */
		e.has_pt = data_point(t->seq + (syn ? 1 : 0), t->len, &e.pt);
		if (e.has_pt)
			why = WHY_DATA;
	}
	if (t->len || syn) {   /* data carries an ack that may answer a request point */
		if (syn || (t->flags & TH_ACK)) {
			__u64 key = tuple_hash(t->saddr, t->daddr, t->sport, t->dport,
				((__u64)skb->ifindex << 8) | dir);
			struct ack_state *st = syn ? 0 : acks.lookup(&key);
			if (!st) {   /* SYN: afresh; SYN-ACK: at its ack, so the first answer gets an apt */
				struct ack_state fresh = {};
				if (t->flags & TH_ACK) {
					fresh.prev = t->ack;
					fresh.has = 1;
				}
				acks.update(&key, &fresh);
			} else if (!st->has) {
				st->prev = t->ack;
				st->has = 1;
			} else {
				__u32 span = t->ack - st->prev;
				if (span != 0 && span < 0x80000000u) {
					e.has_apt = ack_point(t->ack, span, &e.apt);
					st->prev = t->ack;
					if (e.has_apt && !why)
						why = WHY_ACK;
				}
			}
		}
	} else if ((t->flags & (TH_ACK | TH_FIN | TH_RST)) == TH_ACK && chosen(t->ack - 1)) {
		why = WHY_ACK;   /* a pure ACK: chosen by its own ack, the same at every hook */
	}
	if (t->flags & TH_RST) {
		why = WHY_CTL;
	} else if (t->flags & TH_FIN) {
		if (chosen(t->seq + t->len + (syn ? 1 : 0)))   /* the FIN's own sequence number */
			why = WHY_CTL;
	} else if (syn) {
		__u32 isn = (t->flags & TH_ACK) ? t->ack - 1 : t->seq;
		if (chosen(isn))   /* the ISN's block: the first bytes' block too */
			why = WHY_CTL;   /* else kept only for a point in its payload (TFO) */
	}
	if (!why && SAMPLE_N == 1)
		why = t->len ? WHY_DATA : WHY_ACK;
	if (!why)
		return TC_ACT_UNSPEC;
	count(1);
	if (SAMPLE_N > 1) {   /* the tracepoints report this flow on this host from now on */
		__u64 fk = flow_key(t->saddr, t->daddr, t->sport, t->dport);
		__u8 one = 1;
		if (!marked.lookup(&fk))   /* an LRU update takes locks: only for a new flow */
			marked.update(&fk, &one);
	}
	e.why = why;
	e.ts = bpf_ktime_get_ns();
	e.ifindex = skb->ifindex;
	e.dir = dir;
	%(submit)s
	return TC_ACT_UNSPEC;
}

"""


C_SOCK_TUPLE = r"""
#define OFF_SKC_FAMILY %(skc_family)d
#define OFF_SKC_NUM %(skc_num)d
#define OFF_INET_SPORT %(inet_sport)d
#define OFF_SKC_DPORT %(skc_dport)d
#define OFF_SKC_RCV_SADDR %(skc_rcv_saddr)d
#define OFF_SKC_DADDR %(skc_daddr)d
#define OFF_SKC_V6_RCV_SADDR %(skc_v6_rcv_saddr)d
#define OFF_SKC_V6_DADDR %(skc_v6_daddr)d

/* A socket's family and ports (local first), offsets from this kernel's BTF. Read apart
 * from the addresses, so that a socket the port filter refuses costs three reads, all in
 * sock_common's first cache line: the local port is skc_num (host order), and inet_sport,
 * further away, only once skc_num is 0 (the port put back at close). */
static __always_inline int sock_ports(struct sock_event *e, __u64 sk)
{
	__u16 family = 0, sport = 0, dport = 0;
	if (bpf_probe_read_kernel(&family, sizeof(family), (void *)(sk + OFF_SKC_FAMILY)) ||
		bpf_probe_read_kernel(&sport, sizeof(sport), (void *)(sk + OFF_SKC_NUM)) ||
		bpf_probe_read_kernel(&dport, sizeof(dport), (void *)(sk + OFF_SKC_DPORT)))
		return 0;
	if (family != 2 && family != 10)
		return 0;
	if (!sport) {
		if (bpf_probe_read_kernel(&sport, sizeof(sport), (void *)(sk + OFF_INET_SPORT)))
			return 0;
		sport = EBD_HTONS(sport);
	}
	e->family = family == 2 ? 4 : 6;
	e->sport = sport;
	e->dport = EBD_HTONS(dport);
	return 1;
}

/* Its addresses (local first), after sock_ports set the family. */
static __always_inline int sock_addrs(struct sock_event *e, __u64 sk)
{
	if (e->family == 4)
		return !bpf_probe_read_kernel(e->saddr, 4, (void *)(sk + OFF_SKC_RCV_SADDR)) &&
			!bpf_probe_read_kernel(e->daddr, 4, (void *)(sk + OFF_SKC_DADDR));
	return !bpf_probe_read_kernel(e->saddr, 16, (void *)(sk + OFF_SKC_V6_RCV_SADDR)) &&
		!bpf_probe_read_kernel(e->daddr, 16, (void *)(sk + OFF_SKC_V6_DADDR));
}
"""

#: raw tcp_probe: the tcp_sock fields the formatted record carries (srtt there is srtt_us
#: >> 3, as here), offsets from BTF
C_TCP_STATE = r"""
#define OFF_TP_SRTT_US %(srtt_us)d
#define OFF_TP_SND_CWND %(snd_cwnd)d
#define OFF_TP_SND_WND %(snd_wnd)d
#define OFF_TP_RCV_WND %(rcv_wnd)d
#define OFF_TP_SND_UNA %(snd_una)d
#define OFF_TP_SND_NXT %(snd_nxt)d

static __always_inline void tcp_state(struct sock_event *e, __u64 sk)
{
	__u32 srtt = 0;
	bpf_probe_read_kernel(&srtt, 4, (void *)(sk + OFF_TP_SRTT_US));
	e->srtt_us = srtt >> 3;
	bpf_probe_read_kernel(&e->snd_cwnd, 4, (void *)(sk + OFF_TP_SND_CWND));
	bpf_probe_read_kernel(&e->snd_wnd, 4, (void *)(sk + OFF_TP_SND_WND));
	bpf_probe_read_kernel(&e->rcv_wnd, 4, (void *)(sk + OFF_TP_RCV_WND));
	bpf_probe_read_kernel(&e->snd_una, 4, (void *)(sk + OFF_TP_SND_UNA));
	bpf_probe_read_kernel(&e->snd_nxt, 4, (void *)(sk + OFF_TP_SND_NXT));
}
"""


def submit(buffer: str, table: str, ctx: str, ptr: str, lost_idx: int) -> str:
    """c_submit, but a ring buffer record wakes no reader (BPF_RB_NO_WAKEUP): the reader
    takes what is there every BATCH_MS. One wakeup, write and SSH packet per record cost
    the hosts about 100 us of CPU each (measured with bulk traffic); in batches, a few."""
    return c_submit(buffer, table, ctx, ptr, lost_idx, ring_flags="1 /* BPF_RB_NO_WAKEUP */")


def c_tp_addrs(fmt: dict) -> str:
    """C that fills e.family/saddr/daddr/sport/dport from the tracepoint record `rec`:
    sockaddr_in/in6 fields (tcp_probe, 6.10+ layouts) or the legacy sport/saddr/saddr_v6.
    A v4-mapped IPv6 socket is left as family 6 and a format without a family field as 0:
    unmap_v4() settles both before the filter."""
    fields = field_map(fmt)
    if address_layout(fmt) == "sockaddr":
        return (
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
            "\t} else {\n"
            "\t\treturn 0;\n"
            "\t}"
        )
    lines = ["\te.sport = rec.sport;\n\te.dport = rec.dport;"]
    if "family" in fields:
        lines.append("\te.family = rec.family == 2 ? 4 : (rec.family == 10 ? 6 : 0);")
    if "saddr_v6" in fields and "family" in fields:
        lines.append(
            "\tif (e.family == 4) {\n"
            "\t\t__builtin_memcpy(e.saddr, rec.saddr, 4);\n"
            "\t\t__builtin_memcpy(e.daddr, rec.daddr, 4);\n"
            "\t} else {\n"
            "\t\t__builtin_memcpy(e.saddr, rec.saddr_v6, 16);\n"
            "\t\t__builtin_memcpy(e.daddr, rec.daddr_v6, 16);\n"
            "\t}"
        )
    elif "saddr_v6" in fields:
        lines.append(
            "\t__builtin_memcpy(e.saddr, rec.saddr_v6, 16);\n"
            "\t__builtin_memcpy(e.daddr, rec.daddr_v6, 16);"
        )
    else:
        lines.append(
            "\te.family = 4;\n"
            "\t__builtin_memcpy(e.saddr, rec.saddr, 4);\n"
            "\t__builtin_memcpy(e.daddr, rec.daddr, 4);"
        )
    return "\n".join(lines)


#: the socket tracepoints that can run as raw tracepoints: their arguments (TP_PROTO) in C
RAW_ARGS = {
    "tcp_probe": "\t__u64 sk = ctx->args[0];",
    "sock_recv_length": "\t__u64 sk = ctx->args[0];\n"
    "\tint ret = (int)ctx->args[1], flags = (int)ctx->args[2];",
}


def c_sock_probe(probe: str, fmt: dict, plan: dict) -> str:
    """One tracepoint program: read the event (the formatted record, or on a raw
    tracepoint the kernel's own arguments), filter (ports, then on a raw tracepoint the
    namespace, addresses, recent records, else the namespace), rate-limit (not
    retransmissions), emit a sock_event. Cheapest first: most events are other sockets',
    another namespace's or a busy flow's."""
    raw = probe in plan["raw"]
    fields = field_map(fmt)
    kind = KIND_NUM[probe]
    # on a raw tracepoint a socket that is not wanted is remembered so (see sk_settled)
    reject = "{ sk_settle(sk, %d); return 0; }" % kind if raw else "return 0;"
    ports = c_filters(plan["ports"], [], "e.family", "e.saddr", "e.daddr", "e.sport",
                      "e.dport", reject)  # fmt: skip
    addrs = c_filters([], plan["addrs"], "e.family", "e.saddr", "e.daddr", "e.sport",
                      "e.dport", reject)  # fmt: skip
    body = []
    if raw:
        body.append("int ebd_%s(struct bpf_raw_tracepoint_args *ctx)\n{" % probe)
        body.append(RAW_ARGS[probe])
    else:
        sname = "tp_" + probe
        body.append(c_tracepoint_struct(sname, fmt))
        body.append("int ebd_%s(void *ctx)\n{" % probe)
        body.append("\tstruct %s rec = {};" % sname)
        body.append("\tif (bpf_probe_read_kernel(&rec, sizeof(rec), ctx) != 0)\n\t\treturn 0;")
    body.append("\tstruct sock_event e = {};")
    body.append("\te.kind = %d;" % kind)
    body.append("\te.state = -1;")
    if probe == "sock_recv_length":
        if raw:
            body.append(
                "\tif (!sk || ret <= 0 || (flags & 2) || sk_settled(sk, %d))\n"
                "\t\treturn 0;               /* reads of data only; MSG_PEEK is no read */\n"
                "\t__u16 protocol = 0;\n"
                "\tbpf_probe_read_kernel(&protocol, 2, (void *)(sk + %d));\n"
                "\tif (protocol != 6)\n\t\t%s" % (kind, plan["sock_fields"]["sk_protocol"], reject)
            )
        else:
            body.append("\t__u64 sk = rec.sk;\n\tint ret = rec.ret, flags = rec.flags, "
                        "protocol = rec.protocol;")  # fmt: skip
            body.append(
                "\tif (protocol != 6 || ret <= 0 || (flags & 2))\n"
                "\t\treturn 0;               /* TCP reads of data only; MSG_PEEK is no read */"
            )
        sk = "sk"
        body.append("\tif (!sk || !sock_ports(&e, sk))\n\t\treturn 0;")
        body.append(ports)
        if raw:
            body.append(c_netns_lookup(plan["offsets"], sk, None, reject))
        body.append("\tif (!sock_addrs(&e, sk))\n\t\treturn 0;")
        body.append("\te.len = ret;")
    elif raw:  # tcp_probe
        sk = "sk"
        body.append("\tif (!sk || sk_settled(sk, %d) || !sock_ports(&e, sk))\n\t\treturn 0;"
                    % kind)  # fmt: skip
        body.append(ports)
        body.append(c_netns_lookup(plan["offsets"], sk, None, reject))
        body.append("\tif (!sock_addrs(&e, sk))\n\t\treturn 0;")
    else:
        sk = "rec.sk" if "sk" in fields else ("rec.skaddr" if "skaddr" in fields else None)
        body.append(c_tp_addrs(fmt))
        body.append(ports)
    body.append("\tunmap_v4(&e);")
    body.append(addrs)
    rated = probe != "tcp_retransmit_skb"
    if rated:
        body.append(
            "\t__u64 rk = tuple_hash(e.saddr, e.daddr, e.sport, e.dport, %d);\n"
            "\tif (rate_recent(rk))\n\t\treturn 0;" % kind
        )
    skb = "rec.skbaddr" if not raw and "skbaddr" in fields else None
    if not raw:
        body.append(c_netns_lookup(plan["offsets"], sk, skb))
    if probe == "tcp_probe" and not raw:
        for name, member in (
            ("srtt", "srtt_us"),
            ("snd_cwnd", "snd_cwnd"),
            ("snd_wnd", "snd_wnd"),
            ("rcv_wnd", "rcv_wnd"),
            ("snd_una", "snd_una"),
            ("snd_nxt", "snd_nxt"),
        ):
            if name in fields:
                body.append("\te.%s = rec.%s;" % (member, name))
    if "state" in fields:
        body.append("\te.state = rec.state;")
    if rated:
        body.append(
            "\tif (SAMPLE_N > 1) {   /* only flows with a kept packet on this host */\n"
            "\t\t__u64 fk = flow_key(e.saddr, e.daddr, e.sport, e.dport);\n"
            "\t\tif (!marked.lookup(&fk))\n\t\t\treturn 0;\n\t}"
        )
        body.append("\tif (!rate_ok(rk))\n\t\treturn 0;")
        if raw:
            body.append("\tsk_settle(sk, %d);   /* its next events in RATE_NS: one lookup */"
                        % kind)  # fmt: skip
    if probe == "tcp_probe" and raw:
        body.append("\ttcp_state(&e, sk);   /* read only for a record that goes out */")
    body.append("\te.ts = bpf_ktime_get_ns();")
    body.append("\t" + submit(plan["buffer"], "sock_events", "ctx", "&e", 1))
    body.append("\treturn 0;\n}\n")
    return "\n".join(line for line in body if line)


def build_program(plan: dict) -> str:
    """The whole C program for a plan (see make_plan): one compile covers every probe."""
    parts = [C_PACKET, C_FILTER_MAPS]
    parts.append(
        C_COMMON
        % {
            "n": plan["sample"],
            "shift": plan["block_shift"],
            "max_blocks": MAX_BLOCKS,
            "rate_ns": RATE_NS,
            "netns": plan["own_netns"],
            "ack_map": ACK_MAP_SIZE,
            "rate_map": RATE_MAP_SIZE,
        }
    )
    if plan["buffer"] == "ringbuf":
        parts.append(
            "BPF_RINGBUF_OUTPUT(pkt_events, %d);\nBPF_RINGBUF_OUTPUT(sock_events, %d);"
            % (PKT_PAGES, SOCK_PAGES)
        )
    else:
        parts.append("BPF_PERF_OUTPUT(pkt_events);\nBPF_PERF_OUTPUT(sock_events);")
    parts.append(C_LOST)
    filters = c_filters(plan["ports"], plan["addrs"], "t->family", "t->saddr", "t->daddr",
                        "t->sport", "t->dport", "return TC_ACT_UNSPEC;")  # fmt: skip
    parts.append(
        C_TC % {"filters": filters, "submit": submit(plan["buffer"], "pkt_events", "skb", "&e", 0)}
    )
    parts.append(c_tc_entries(plan.get("l2")))
    if "sock_recv_length" in plan["tracepoints"] or plan["raw"]:
        parts.append(C_SOCK_TUPLE % plan["tuple_offsets"])
    if "tcp_probe" in plan["raw"]:
        parts.append(C_TCP_STATE % plan["sock_fields"])
    for probe, fmt in sorted(plan["tracepoints"].items()):
        parts.append(c_sock_probe(probe, fmt, plan))
    return "\n".join(parts)


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def decode_packet(raw: bytes, ifnames: dict) -> dict:
    """One lat_event -> a packet record."""
    values = struct.unpack_from(EVENT_FMT, raw, 0)
    ts, ifindex, pt, apt, direction, why, has_pt, has_apt = values[12:]
    record = packet_head(ts, ifindex, direction, ifnames)
    record.update(tcp_fields(values[:12]))
    record["why"] = WHY_NAMES.get(why, "data")
    record["pt"] = pt if has_pt else None
    record["apt"] = apt if has_apt else None
    return record


#: decode_packet's record as json.dumps writes it (compact), built without the dict: a busy
#: host emits tens of thousands of these a second and json.dumps is most of their cost
PACKET_LINE = (
    '{"type":"packet","ts_ns":%d,"ifname":%s,"ifindex":%d,"dir":"%s","family":%d,'
    '"saddr":"%s","daddr":"%s","sport":%d,"dport":%d,"flags":%d,"seq":%d,"ack":%d,'
    '"ipid":%d,"ttl":%d,"len":%d,"win":%d,"why":"%s","pt":%s,"apt":%s}\n'
)
ADDR_CACHE_MAX = 4096


class PacketLines:
    """lat_event -> its NDJSON line, equal to json.dumps(decode_packet(...)) plus a newline.

    Interface names are JSON-quoted once; address texts are cached (a few flows carry most
    packets)."""

    def __init__(self, ifnames: dict) -> None:
        self.ifnames = dict((idx, json.dumps(name)) for idx, name in ifnames.items())
        self.addrs = {}

    def addr(self, family: int, raw: bytes) -> str:
        text = self.addrs.get(raw)
        if text is None:
            if len(self.addrs) >= ADDR_CACHE_MAX:
                self.addrs.clear()
            text = self.addrs[raw] = addr_text(family, raw)
        return text

    def line(self, raw: bytes) -> str:
        values = EVENT_STRUCT.unpack_from(raw)
        (saddr, daddr, seq, ack, length, sport, dport, win, ipid, ttl, flags, family, ts,
         ifindex, pt, apt, direction, why, has_pt, has_apt) = values  # fmt: skip
        ifname = self.ifnames.get(ifindex)
        if ifname is None:
            ifname = self.ifnames[ifindex] = json.dumps(str(ifindex))
        if family == 4:
            saddr, daddr = saddr[:4], daddr[:4]
        return PACKET_LINE % (
            ts, ifname, ifindex, DIR_NAMES.get(direction, "ingress"), family,
            self.addr(family, saddr), self.addr(family, daddr), sport, dport, flags, seq, ack,
            ipid, ttl, length, win, WHY_NAMES.get(why, "data"),
            pt if has_pt else "null", apt if has_apt else "null",
        )  # fmt: skip


def decode_sock(raw: bytes, state_names: dict) -> dict:
    """One sock_event -> a tcp_probe, retrans or recv record (local side first)."""
    (ts, netns, kind, saddr, daddr, sport, dport, family, state, srtt, cwnd, snd_wnd,
     rcv_wnd, snd_una, snd_nxt, length) = struct.unpack_from(SOCK_FMT, raw, 0)  # fmt: skip
    record = {
        "type": KIND_RECORD.get(kind, "tcp_probe"),
        "ts_ns": ts,
        "family": family,
        "saddr": addr_text(family, saddr),
        "sport": sport,
        "daddr": addr_text(family, daddr),
        "dport": dport,
    }
    if kind == 1:
        record.update(srtt_us=srtt, snd_cwnd=cwnd, snd_wnd=snd_wnd, rcv_wnd=rcv_wnd,
                      snd_una=snd_una, snd_nxt=snd_nxt)  # fmt: skip
    elif kind == 2:
        record["state"] = state_names.get(state, STATE_NAMES.get(state, "UNKNOWN"))
    else:
        record["len"] = length
    record["_netns"] = netns
    return record


# --------------------------------------------------------------------------------------
# The session: plan, attach, loop, clean up
# --------------------------------------------------------------------------------------


RECV_TUPLE_KEYS = ("skc_family", "skc_num", "inet_sport", "skc_dport", "skc_rcv_saddr", "skc_daddr",
                   "skc_v6_rcv_saddr", "skc_v6_daddr")  # fmt: skip


def recv_offsets(tuples):
    """BTF offsets sock_recv_length's socket tuple needs, or None."""
    if not tuples or any(k not in tuples for k in RECV_TUPLE_KEYS):
        return None
    return dict((k, tuples[k]) for k in RECV_TUPLE_KEYS)


#: raw tracepoints (bpf_raw_tracepoint_open) came with Linux 4.17
RAW_TP_MIN_KERNEL = (4, 17)
#: what the raw programs read from the socket besides its 4-tuple: name -> (struct, size)
SOCK_FIELDS = {
    "srtt_us": ("tcp_sock", 4),
    "snd_cwnd": ("tcp_sock", 4),
    "snd_wnd": ("tcp_sock", 4),
    "rcv_wnd": ("tcp_sock", 4),
    "snd_una": ("tcp_sock", 4),
    "snd_nxt": ("tcp_sock", 4),
    "sk_protocol": ("sock", 2),
}


def sock_fields(btf):
    """(SOCK_FIELDS' offsets, None) from a loaded Btf, or (None, why)."""
    if btf is None:
        return None, "no BTF"
    try:
        return dict((k, btf.field(st, (k,), size)) for k, (st, size) in SOCK_FIELDS.items()), None
    except (KeyError, IndexError, TypeError, struct.error) as exc:
        return None, "no BTF offsets (%s)" % exc


def raw_choice(mode: str, formats: dict, tuple_offsets, fields):
    """(probes to run as raw tracepoints, why the others are not). A raw tracepoint hands
    the program the kernel's arguments: the kernel builds no formatted record per event
    (tcp_probe fires for every segment a socket receives) and the program copies none."""
    if mode == "format":
        return [], "--tp-mode format"
    if kernel_version() < RAW_TP_MIN_KERNEL:
        return [], "no raw tracepoints before Linux 4.17"
    if tuple_offsets is None or fields is None:
        return [], "no BTF offsets for the socket's fields"
    return sorted(p for p in RAW_ARGS if p in formats), None


def make_plan(args, formats: dict, offsets, tuples, fields=None, links=None) -> dict:
    """Everything the C program and the attach step depend on, decided up front.
    `fields`: SOCK_FIELDS' offsets (None: the socket tracepoints keep their formats);
    `links`: the interfaces to watch (None: not known, every kind of packet program)."""
    missing = []
    formats = dict(formats)
    for probe, category in sorted(SOCK_PROBES.items()):
        if probe not in formats:
            missing.append({"probe": probe, "why": "no tracepoint %s:%s here" % (category, probe)})
    tuple_offsets = recv_offsets(tuples)
    if "sock_recv_length" in formats and tuple_offsets is None:
        del formats["sock_recv_length"]
        missing.append(
            {"probe": "sock_recv_length", "why": "no BTF offsets for the socket's 4-tuple"}
        )
    ringbuf = kernel_version() >= RINGBUF_MIN_KERNEL
    raw, raw_why = raw_choice(args.tp_mode, formats, tuple_offsets, fields)
    return {
        "sample": args.sample,
        "block_shift": args.block_shift,
        "buffer": "ringbuf" if ringbuf else "perf",
        "ports": args.port,
        "addrs": args.addr,
        "tracepoints": formats,
        "offsets": offsets,
        "tuple_offsets": tuple_offsets,
        "sock_fields": fields,
        "raw": raw,
        "raw_why": raw_why,
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
        self.BPF = None
        self.clsact = Clsact()
        self.setup_times = None
        self.tc = None
        self.plan = None
        self.attach = {}
        self.ifnames = {}
        self.lines = PacketLines({})
        self.addrs = []
        self.nat_ports = []
        self.lost_seen = [0, 0]
        self.perf_lost = [0, 0]
        self.lost_total = 0  # packet events lost, for counts.lost
        self.ready = False
        self.state_names = {}
        #: the port filter now ([]: none); control lines add to it from another thread
        self.ports = list(args.port)
        self.filter_lock = threading.Lock()

    # -- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Discover, compile, attach, timed for hello.setup; nft lists its ruleset during
        the compile, and pyroute2 is imported only for the clsact path."""
        times = self.setup_times = SetupTimes()
        ensure_tracefs()  # before importing bcc, which looks for tracefs once
        nat_ports = start_nat_ports()
        try:
            from bcc import BPF
        except ImportError:
            raise SetupError("BCC is not installed (python3-bpfcc)") from None
        self.BPF = BPF
        times.done("import")
        self.addrs = discover_addrs()
        btf = load_btf()
        (offsets, offsets_why), (tuples, _) = btf_offsets(loaded=btf)
        fields, _ = sock_fields(btf[0])
        self.ifnames, links = watched_links(self.args.interfaces)
        self.lines = PacketLines(self.ifnames)
        self.plan = make_plan(self.args, read_formats(None), offsets, tuples, fields, links)
        if self.args.tp_mode == "raw" and self.plan["raw_why"]:
            raise SetupError("--tp-mode raw: %s" % self.plan["raw_why"])
        if offsets_why:
            self.plan["missing"].append({"probe": "btf:netns", "why": offsets_why})
        retrans = self.plan["tracepoints"].get("tcp_retransmit_skb")
        if retrans:
            self.state_names = retrans["symbols"].get("state", {})
        program = build_program(self.plan)
        times.done("discover")
        try:
            self.bpf = bpf_compile(BPF, program)
        except Exception as exc:
            raise SetupError("BPF compile failed: %s" % exc) from None
        times.done("compile")
        self.nat_ports = nat_ports()
        with self.filter_lock:
            fill_filters(self.bpf, self.ports, self.args.addr)
        self._attach_tracepoints()
        attach_tool(self, links, self.args.tc_mode, self.clsact.hooks)
        self._open_buffers()
        times.done("attach")

    def _attach_tracepoints(self) -> None:
        for probe in sorted(self.plan["tracepoints"]):
            tp = "%s:%s" % (SOCK_PROBES[probe], probe)
            raw = probe in self.plan["raw"]
            try:
                if raw:
                    self.bpf.attach_raw_tracepoint(tp=probe, fn_name="ebd_" + probe)
                else:
                    self.bpf.attach_tracepoint(tp=tp, fn_name="ebd_" + probe)
            except Exception as exc:
                self.plan["missing"].append({"probe": probe, "why": str(exc)})
                continue
            self.attach[probe] = {"kind": "raw_tracepoint" if raw else "tracepoint",
                                  "tracepoint": tp}  # fmt: skip

    def _open_buffers(self) -> None:
        b = self.bpf
        if self.plan["buffer"] == "ringbuf":
            b["pkt_events"].open_ring_buffer(self._ring_cb(self._on_packet))
            b["sock_events"].open_ring_buffer(self._ring_cb(self._on_sock))
            return
        b["pkt_events"].open_perf_buffer(
            self._perf_cb(self._on_packet), page_cnt=PKT_PAGES, lost_cb=self._lost_cb(0)
        )
        b["sock_events"].open_perf_buffer(
            self._perf_cb(self._on_sock), page_cnt=SOCK_PAGES, lost_cb=self._lost_cb(1)
        )

    def _on_packet(self, raw: bytes) -> None:
        self.out.write_text(self.lines.line(raw))

    def _on_sock(self, raw: bytes) -> None:
        record = decode_sock(raw, self.state_names)
        netns = record.pop("_netns")
        if self.plan["offsets"] is None and record["saddr"] not in self.addrs:
            return  # no namespace offsets: another namespace's socket has other addresses
        if netns and netns != self.plan["own_netns"]:
            return
        self.out.write(record)

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

    # -- running ---------------------------------------------------------------------------

    def hello(self) -> dict:
        return {
            "type": "hello",
            "script": SCRIPT,
            "version": VERSION,
            "kernel": os.uname().release,
            "mono_ns": now_ns("monotonic"),
            "real_ns": now_ns("time"),
            "netns": self.plan["own_netns"],
            "addrs": self.addrs,
            "interfaces": sorted(self.attach.get("tc", {}).get("interfaces", [])),
            "attach": self.attach,
            "missing": self.plan["missing"],
            "filter": {"ports": self.args.port, "addrs": self.args.addr},
            "nat_ports": self.nat_ports,
            "scope": "netns" if self.plan["offsets"] is not None else "addrs",
            "buffer": self.plan["buffer"],
            "sample": {"n": self.args.sample, "block": 1 << self.args.block_shift},
            "setup": self.setup_times.report(),
        }

    def _poll(self, timeout_ms: int) -> None:
        if self.plan["buffer"] == "ringbuf":
            # records wake nobody (see submit): wait, then take the whole batch
            if timeout_ms:
                time.sleep(min(timeout_ms, BATCH_MS) / 1000.0)
            self.bpf.ring_buffer_consume()
        else:
            self.bpf.perf_buffer_poll(timeout_ms)

    def run(self) -> str:
        deadline = time.monotonic() + self.args.duration if self.args.duration else None
        next_counts = time.monotonic() + 1.0
        while not self.stop.reason:
            now = time.monotonic()
            timeout = min(200, max(1, int((next_counts - now) * 1000)))
            if deadline is not None:
                left = deadline - now
                if left <= 0:
                    self.stop.reason = "duration"
                    break
                timeout = max(1, min(timeout, int(left * 1000)))
            self._poll(timeout)
            self._report_lost()
            if time.monotonic() >= next_counts:
                self.write_counts()
                next_counts += 1.0
                if next_counts < time.monotonic():
                    next_counts = time.monotonic() + 1.0
            self.out.flush()
        return self.stop.reason

    def write_counts(self) -> None:
        seen, sampled = (sum(self.bpf["counters"][ctypes.c_int(i)]) for i in range(2))
        self.out.write(
            {
                "type": "counts",
                "ts_ns": now_ns("monotonic"),
                "seen": seen,
                "sampled": sampled,
                "lost": self.lost_total,
            }
        )

    def _report_lost(self) -> None:
        totals = [sum(self.bpf["lost"][ctypes.c_int(i)]) for i in range(2)]
        for i, source in enumerate(("packets", "socket")):
            count = totals[i] - self.lost_seen[i] + self.perf_lost[i]
            self.lost_seen[i] = totals[i]
            self.perf_lost[i] = 0
            if count:
                if i == 0:
                    self.lost_total += count
                record = {"type": "lost", "count": count, "ts_ns": now_ns("monotonic")}
                record["source"] = source
                self.out.write(record)

    def detach(self) -> list:
        """Take every program off its hook; programs and maps stay readable. Returns errors."""
        errors = []
        if self.tc is not None:
            errors.extend(self.tc.close())
            self.tc = None
        if self.bpf is None:
            return errors
        for probe, how in sorted(self.attach.items()):
            if how.get("kind") != "tracepoint":
                continue
            try:
                self.bpf.detach_tracepoint(tp=how["tracepoint"])
            except Exception as exc:  # noqa: BLE001 - keep detaching the rest
                errors.append("detach %s: %s" % (probe, exc))
        return errors

    def cleanup(self) -> list:
        """Detach every probe, then (once it was ready) deliver what is buffered and the last
        counts, then free the programs and maps. Returns errors."""
        errors = self.detach()
        if self.ready and self.bpf is not None and not self.out.broken:
            try:
                self._poll(0)
                self._report_lost()
                self.write_counts()
                self.out.flush()
            except Stop:
                pass
            except Exception as exc:  # noqa: BLE001 - still free everything
                errors.append("final counts: %s" % exc)
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
    {"name": "sample", "type": "int", "min": 1, "max": 65536, "default": 32, "metavar": "N",
     "help": "choose 1 sequence block in N (default 32; 1 keeps every packet)"},
    {"name": "block-shift", "type": "int", "min": 0, "max": 20, "default": 16, "metavar": "K",
     "help": "sequence blocks of 2**K bytes (default 16: 64 KiB)"},
    {"name": "duration", "type": "float", "min": 0, "default": 0, "metavar": "SECONDS",
     "help": "stop after SECONDS (default 0: run until signalled)"},
    {"name": "tc-mode", "type": "choice", "choices": ["auto", "tcx", "clsact"],
     "default": "auto", "metavar": "MODE",
     "help": "packet hook: auto (tcx if the kernel has it), tcx or clsact"},
    {"name": "tp-mode", "type": "choice", "choices": ["auto", "raw", "format"],
     "default": "auto", "metavar": "MODE",
     "help": "socket tracepoints: auto (raw if kernel and BTF allow), raw or format"},
    {"name": "ebpf", "type": "flag", "local": True,
     "help": "print the generated C program and exit (needs no root)"},
    {"name": "format-dir", "type": "path", "local": True, "metavar": "DIR",
     "help": "with --ebpf: read tracepoint format files from DIR"},
]  # fmt: skip
PORT_PARAM = next(p for p in PARAMS if p["name"] == "port")


def parse_args(argv):
    return parse_tool_args(PARAMS, argv, SCRIPT, __doc__)


def print_ebpf(args, out) -> int:
    """The C for this kernel (or for recorded formats, with placeholder BTF offsets)."""
    formats = read_formats(args.format_dir)
    fields = None  # recorded formats are another kernel's: their records, not raw arguments
    if args.format_dir:
        offsets, tuples = None, dict((k, 0) for k in RECV_TUPLE_KEYS)
    else:
        btf = load_btf()
        (offsets, _), (tuples, _) = btf_offsets(loaded=btf)
        fields, _ = sock_fields(btf[0])
    plan = make_plan(args, formats, offsets, tuples, fields)
    out.write(build_program(plan) + "\n")
    for item in plan["missing"]:
        sys.stderr.write("%s: %s: %s\n" % (SCRIPT, item["probe"], item["why"]))
    return 0


def main(argv=None) -> int:
    return run_tool(SCRIPT, argv, parse_args, print_ebpf, Session)


if __name__ == "__main__":
    sys.exit(main())
