"""TCP packets as a TC classifier sees them: parse eth -> IPv4/IPv6 -> TCP from a
`struct __sk_buff`, filter by port/address in the kernel, and decode on the way out.

Only the stable parts are used: `struct __sk_buff` fields, packet bytes (read directly
when they are in the linear part, else with bpf_skb_load_bytes), never a kernel header's
struct layout. One parse per program variant: `off` (bytes before the IP header: 14 on
Ethernet, 0 on L3 devices) is a constant, so no map lookup is needed for it. Python 3.6.
"""

import ctypes
import ipaddress
import socket
import struct

TH_FIN, TH_SYN, TH_RST, TH_PSH, TH_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
DIR_NAMES = {0: "ingress", 1: "egress"}
FILTER_ADDRS_MAX = 64


#: Constants, helpers and the parser. `struct ebd_tcp` is what one packet yields.
C_PACKET = r"""
#define TC_ACT_UNSPEC (-1)       /* observe only: never end the filter chain */
#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_ACK 0x10
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define EBD_HTONS(x) ((__u16)__builtin_bswap16(x))
#else
#define EBD_HTONS(x) ((__u16)(x))
#endif

struct ebd_tcp {             /* one TCP packet, header fields in host order */
	__u32 saddr[4];          /* IPv4 in saddr[0], network byte order */
	__u32 daddr[4];
	__u32 seq;
	__u32 ack;
	__u32 len;               /* TCP payload bytes; 32 bits: GSO and BIG TCP exceed 64 KiB */
	__u16 sport;
	__u16 dport;
	__u16 win;
	__u16 ipid;              /* IPv4 identification, 0 for IPv6 */
	__u8 ttl;                /* IPv4 TTL or IPv6 hop limit */
	__u8 flags;
	__u8 family;             /* 4 or 6 */
	__u8 _pad;
};

/* Copy header bytes: straight from the packet when they are in its linear part (no helper
 * call), else through bpf_skb_load_bytes. off is bounded so the verifier can check it. */
static __always_inline int load_hdr(struct __sk_buff *skb, __u32 off, void *to, __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	if (off > 128)
		return -1;
	if (data + off + len <= data_end) {
		__builtin_memcpy(to, data + off, len);
		return 0;
	}
	return bpf_skb_load_bytes(skb, off, to, len);
}

/* 1 when skb holds a TCP packet (first fragment or unfragmented), with *t filled in.
 * An IP length of 0 (BIG TCP: more than 64 KiB in one packet) takes the length from
 * skb->len; IPv6 BIG TCP's hop-by-hop jumbo header is stepped over, other IPv6 extension
 * headers are not followed. */
static __always_inline int ebd_parse_tcp(struct __sk_buff *skb, __u32 off, struct ebd_tcp *t)
{
	__u32 proto = skb->protocol;
	__u32 l4, l3len;
	if (proto == EBD_HTONS(0x0800)) {
		__u8 ip[20];
		if (load_hdr(skb, off, ip, sizeof(ip)) < 0)
			return 0;
		__u32 ihl = (ip[0] & 0x0f) * 4;
		if ((ip[0] >> 4) != 4 || ip[9] != 6 || ihl < 20)
			return 0;
		if (((ip[6] & 0x1f) | ip[7]) != 0)
			return 0;                /* a later fragment: no TCP header */
		l3len = (ip[2] << 8) | ip[3];
		if (l3len == 0 && skb->len > off)
			l3len = skb->len - off;  /* BIG TCP */
		if (l3len < ihl)
			return 0;
		l3len -= ihl;
		t->ipid = (ip[4] << 8) | ip[5];
		t->ttl = ip[8];
		__builtin_memcpy(&t->saddr[0], &ip[12], 4);
		__builtin_memcpy(&t->daddr[0], &ip[16], 4);
		t->family = 4;
		l4 = off + ihl;
	} else if (proto == EBD_HTONS(0x86DD)) {
		__u8 ip[40];
		if (load_hdr(skb, off, ip, sizeof(ip)) < 0)
			return 0;
		if ((ip[0] >> 4) != 6)
			return 0;
		__u8 next = ip[6];
		l3len = (ip[4] << 8) | ip[5];
		l4 = off + 40;
		if (l3len == 0 && next == 0) {
			/* BIG TCP: an 8-byte hop-by-hop header holding the jumbo payload option */
			__u8 hbh[8];
			if (load_hdr(skb, off + 40, hbh, sizeof(hbh)) < 0 || hbh[1] != 0 || hbh[2] != 0xc2)
				return 0;
			next = hbh[0];
			l4 = off + 48;
		}
		if (next != 6)
			return 0;                /* other extension headers are not followed */
		if (l3len == 0)
			l3len = skb->len > l4 ? skb->len - l4 : 0;  /* BIG TCP */
		else
			l3len -= l4 - off - 40;
		t->ttl = ip[7];
		__builtin_memcpy(t->saddr, &ip[8], 16);
		__builtin_memcpy(t->daddr, &ip[24], 16);
		t->family = 6;
	} else {
		return 0;
	}
	__u8 th[20];
	if (load_hdr(skb, l4, th, sizeof(th)) < 0)
		return 0;
	t->sport = (th[0] << 8) | th[1];
	t->dport = (th[2] << 8) | th[3];
	t->seq = ((__u32)th[4] << 24) | ((__u32)th[5] << 16) | ((__u32)th[6] << 8) | th[7];
	t->ack = ((__u32)th[8] << 24) | ((__u32)th[9] << 16) | ((__u32)th[10] << 8) | th[11];
	__u32 doff = (th[12] >> 4) * 4;
	t->flags = th[13];
	t->win = (th[14] << 8) | th[15];
	t->len = l3len > doff ? l3len - doff : 0;
	return 1;
}
"""


#: The filter maps and their lookup; filled from user space with fill_filters().
C_FILTER_MAPS = r"""
struct addr_key {
	__u32 family;
	__u32 a[4];
};

BPF_ARRAY(ports, __u8, 65536);               /* port -> 1 when wanted (array: cheapest lookup) */
BPF_HASH(addrs, struct addr_key, __u8, %(addrs_max)d);

static __always_inline int port_wanted(__u16 port)
{
	__u32 pk = port;
	__u8 *want = ports.lookup(&pk);
	return want && *want;
}

static __always_inline int addr_wanted(__u32 family, __u32 *a)
{
	struct addr_key k = {};
	k.family = family;
	__builtin_memcpy(k.a, a, 16);
	return addrs.lookup(&k) != 0;
}
""" % {"addrs_max": FILTER_ADDRS_MAX}


C_FLOW_KEY = r"""
struct flow_key {            /* canonical 5-tuple: (a, pa) sorts before (b, pb) */
	__u32 a[4];
	__u32 b[4];
	__u16 pa;
	__u16 pb;
	__u8 family;
	__u8 _pad[3];
};

static __always_inline int ep_before(__u32 *a, __u16 pa, __u32 *b, __u16 pb)
{
#pragma unroll
	for (int i = 0; i < 4; i++) {
		if (a[i] != b[i])
			return a[i] < b[i];
	}
	return pa < pb;
}

/* The packet's flow as its canonical key; 1 when the packet goes from key.a to key.b. */
static __always_inline __u8 flow_key_of(struct ebd_tcp *t, struct flow_key *k)
{
	__u8 fwd = ep_before(t->saddr, t->sport, t->daddr, t->dport);
	/* one copy of each end, from whichever side sorts first (not a copy per branch) */
	__u32 *lo = fwd ? t->saddr : t->daddr, *hi = fwd ? t->daddr : t->saddr;
	__builtin_memcpy(k->a, lo, 16);
	__builtin_memcpy(k->b, hi, 16);
	k->pa = fwd ? t->sport : t->dport;
	k->pb = fwd ? t->dport : t->sport;
	k->family = t->family;
	return fwd;
}

/* A flow's map key: a 64-bit hash of its canonical key (8 bytes hashed per lookup, not 40). */
static __always_inline __u64 flow_hash(struct flow_key *k)
{
	const __u64 prime = 0x100000001b3ULL;
	__u64 h = 0xcbf29ce484222325ULL ^ k->family;
#pragma unroll
	for (int i = 0; i < 4; i++)
		h = (h ^ (((__u64)k->a[i] << 32) | k->b[i])) * prime;
	h = (h ^ (((__u64)k->pa << 16) | k->pb)) * prime;
	return h ^ (h >> 31);
}
"""
"""Per-flow keys for the tools that keep packet history in the kernel (after C_PACKET)."""


def c_filters(ports, addrs, family, saddr, daddr, sport, dport, reject) -> str:
    """C statements that run `reject` (e.g. `return TC_ACT_UNSPEC;`) for a flow the
    filter does not pass: a wanted port on either side, and a wanted address on either
    side; with both filters a flow must pass both. The rest are C expressions. Empty
    when nothing is filtered (the maps are then not even looked at)."""
    lines = []
    if ports:
        lines.append("\tif (!port_wanted(%s) && !port_wanted(%s))\n\t\t%s" % (sport, dport, reject))
    if addrs:
        lines.append(
            "\tif (!addr_wanted(%s, %s) && !addr_wanted(%s, %s))\n\t\t%s"
            % (family, saddr, family, daddr, reject)
        )
    return "\n".join(lines)


def fill_filters(bpf, ports, addrs) -> None:
    """Put --port/--addr values into the kernel maps of C_FILTER_MAPS."""
    for port in ports:
        bpf["ports"][ctypes.c_int(port)] = ctypes.c_uint8(1)
    for text in addrs:
        ip = ipaddress.ip_address(text)
        key = bpf["addrs"].Key()
        key.family = ip.version
        raw = ip.packed
        ctypes.memmove(ctypes.addressof(key.a), raw, len(raw))
        bpf["addrs"][key] = ctypes.c_uint8(1)


#: struct ebd_tcp for struct.unpack: saddr, daddr, seq, ack, len, sport, dport, win,
#: ipid, ttl, flags, family (native order, as the kernel wrote it)
TCP_FMT = "=16s16sIIIHHHHBBBx"


def addr_text(family: int, raw: bytes) -> str:
    """An address as bytes (4 or 16 significant) -> its text form."""
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw[:16])


def header_fields(family, saddr, daddr, sport, dport, flags, seq, ack, ipid, ttl, length,
                  win) -> dict:  # fmt: skip
    """The packet record's header fields, in their documented order (addresses as text)."""
    return {
        "family": family,
        "saddr": saddr,
        "daddr": daddr,
        "sport": sport,
        "dport": dport,
        "flags": flags,
        "seq": seq,
        "ack": ack,
        "ipid": ipid,
        "ttl": ttl,
        "len": length,
        "win": win,
    }


def tcp_fields(values) -> dict:
    """The unpacked TCP_FMT tuple -> the packet record's header fields."""
    saddr, daddr, seq, ack, length, sport, dport, win, ipid, ttl, flags, family = values
    return header_fields(family, addr_text(family, saddr), addr_text(family, daddr), sport,
                         dport, flags, seq, ack, ipid, ttl, length, win)  # fmt: skip


def packet_head(ts: int, ifindex: int, direction: int, ifnames: dict) -> dict:
    """A packet record's first fields: when and where it was seen."""
    return {
        "type": "packet",
        "ts_ns": ts,
        "ifname": ifnames.get(ifindex, str(ifindex)),
        "ifindex": ifindex,
        "dir": DIR_NAMES.get(direction, "ingress"),
    }


#: struct flow_key for struct.unpack: a, b, pa, pb, family
FLOW_FMT = "=16s16sHHB3x"
#: one packet of a flow's history: ts, ifindex, seq, ack, len, win, ipid, ttl, flags, dir, fwd
FLOW_PKT_FMT = "=QIIIIHHBBBB"


def flow_packet_records(key: bytes, pkts, ifnames: dict) -> list:
    """Packet records for [(FLOW_PKT_FMT tuple, why)] of the flow whose struct flow_key
    is ``key`` (its first bytes): each packet's direction comes from its fwd flag."""
    a, b, pa, pb, family = struct.unpack_from(FLOW_FMT, key, 0)
    ends = ((addr_text(family, a), pa), (addr_text(family, b), pb))
    records = []
    for (ts, ifindex, seq, ack, length, win, ipid, ttl, flags, direction, fwd), why in pkts:
        src, dst = ends if fwd else ends[::-1]
        record = packet_head(ts, ifindex, direction, ifnames)
        record.update(header_fields(family, src[0], dst[0], src[1], dst[1], flags, seq, ack,
                                    ipid, ttl, length, win))  # fmt: skip
        record["why"] = why
        records.append(record)
    return records
