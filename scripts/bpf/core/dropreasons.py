"""Drop reason names of the running kernel, for every tool that counts drops.

The numbering of enum skb_drop_reason moves between kernels (a reason added in the middle
renumbers the rest), so names are read on the host: from the skb:kfree_skb format's
__print_symbolic table, completed by the BTF enum, never from a table here. Kernels
without the reason field (before 5.17) name a drop by its location instead: the caller of
kfree_skb, through /proc/kallsyms.

Not every free with a drop reason is a lost packet: after this side closed first, the
peer's FIN reached its socket, and the kernel still frees it with QUEUE_PURGE or, from a
time-wait socket, NOT_SPECIFIED (see C_DELIVERED). `c_read_packet` and `c_delivered` are
the C every drop-counting tool uses to tell it apart, so the tools agree on what a drop
is. Python 3.6.
"""

from core.tracepoints import field_map

REASON_PREFIX = "SKB_DROP_REASON_"


def short_reason(name: str) -> str:
    """BTF enumerator -> the name the tracepoint prints (SKB_DROP_REASON_X -> X)."""
    return name[len(REASON_PREFIX) :] if name.startswith(REASON_PREFIX) else name


def reason_table(fmt, btf_enum) -> dict:
    """Where this kernel's reason names come from, and which numbers are not drops.

    Returns {"source": "format" | "btf" | "none", "names": {num: name}, "has_field",
    "first_drop": the number of NOT_SPECIFIED (every enumerator before it, such as
    SKB_NOT_DROPPED_YET and SKB_CONSUMED, marks a packet that was not dropped),
    "consumed": the number of SKB_CONSUMED or None, "queue_purge" and "not_specified": the
    numbers of QUEUE_PURGE and NOT_SPECIFIED or None}.
    The print format is the tracepoint's own table; BTF fills in what it leaves out (6.18
    prints from NOT_SPECIFIED on).
    """
    has_field = fmt is not None and "reason" in field_map(fmt)
    table = {"source": "none", "names": {}, "has_field": has_field, "first_drop": 0}
    table["consumed"] = table["queue_purge"] = table["not_specified"] = None
    if not has_field:
        return table
    printed = dict(fmt["symbols"].get("reason", {}))
    from_btf = {}
    for num, name in (btf_enum or {}).items():
        if name.startswith(REASON_PREFIX) or name in ("SKB_CONSUMED", "SKB_NOT_DROPPED_YET"):
            if name.startswith(REASON_PREFIX + "SUBSYS_") or name == REASON_PREFIX + "MAX":
                continue
            from_btf[num] = short_reason(name)
    names = dict(from_btf)
    names.update(printed)
    names = dict((n, v) for n, v in names.items() if v != "MAX")
    if printed:
        table["source"] = "format"
    elif from_btf:
        table["source"] = "btf"
    table["names"] = names
    by_name = dict((v, n) for n, v in names.items())
    table["first_drop"] = by_name.get("NOT_SPECIFIED", 0)
    for consumed in ("SKB_CONSUMED", "CONSUMED"):
        if consumed in by_name:
            table["consumed"] = by_name[consumed]
    table["queue_purge"] = by_name.get("QUEUE_PURGE")
    table["not_specified"] = by_name.get("NOT_SPECIFIED")
    return table


def reason_count(table: dict) -> int:
    """Drop reasons named (the non-drop markers before NOT_SPECIFIED left out)."""
    return len([n for n in table["names"] if n >= table["first_drop"]])


def location_label(symbols, addr: int) -> str:
    """A drop location as a bounded label: the function's name (its offset left out, so one
    function is one label), or "unknown" when kallsyms cannot name it."""
    named = symbols.resolve(addr) if addr else None
    return named.split("+", 1)[0] if named else "unknown"


#: The skb's and the socket's fields (core/btf.py's TUPLE_PATHS) the C below reads; the
#: program defines each as OFF_<KEY> (c_offsets).
SKB_HEADER_OFFSETS = ("skb_head", "skb_nh")
SOCK_FIELDS = ("skc_num", "skc_dport", "inet_sport", "skc_state")
TCP_TIME_WAIT = 6

#: What read_packet fills, in this order: the tail of a tool's own record (after its own
#: fields), or struct skb_packet for a tool whose record has no such fields.
C_SKB_PACKET_FIELDS = r"""	__u32 seq;
	__u32 ack;
	__u16 sport;
	__u16 dport;
	__u16 len;
	__u16 ipid;
	__u8 family;             /* 0: headers unreadable */
	__u8 proto;
	__u8 flags;
	__u8 l4;                 /* 1 TCP fields valid, 2 UDP ports valid */
	__u8 saddr[16];
	__u8 daddr[16];
"""
C_SKB_PACKET = "struct skb_packet {\n" + C_SKB_PACKET_FIELDS + "};\n"

C_READ_PACKET = r"""
static __always_inline __u32 ebd_be32(__u8 *p)
{
	return ((__u32)p[0] << 24) | ((__u32)p[1] << 16) | ((__u32)p[2] << 8) | p[3];
}

/* The packet's addresses, ports and TCP fields, read through the skb with BTF offsets
 * (head + network_header; the L4 header right after the IP header, since transport_header
 * is not set yet on early receive paths). Returns 0 when there is no IP header to read. */
static __always_inline int read_packet(__u64 skb, __u16 protocol, struct %(record)s *e)
{
	if (protocol != 0x0800 && protocol != 0x86DD && protocol != 0)
		return 0;
	__u64 head = 0;
	__u16 nh = 0;
	if (bpf_probe_read_kernel(&head, sizeof(head), (void *)(skb + OFF_SKB_HEAD)) || !head)
		return 0;
	if (bpf_probe_read_kernel(&nh, sizeof(nh), (void *)(skb + OFF_SKB_NH)) || nh == 0xffff)
		return 0;
	__u8 ip[40];
	if (bpf_probe_read_kernel(ip, 20, (void *)(head + nh)))
		return 0;
	__u32 l4off, payload;
	int fragment = 0;
	if ((ip[0] >> 4) == 4 && protocol != 0x86DD) {
		__u32 ihl = (ip[0] & 0x0f) * 4;
		__u32 tot = ((__u32)ip[2] << 8) | ip[3];
		if (ihl < 20)
			return 0;
		e->family = 4;
		e->proto = ip[9];
		e->ipid = ((__u16)ip[4] << 8) | ip[5];
		__builtin_memcpy(e->saddr, &ip[12], 4);
		__builtin_memcpy(e->daddr, &ip[16], 4);
		l4off = nh + ihl;
		payload = tot > ihl ? tot - ihl : 0;
		fragment = (ip[6] & 0x1f) || ip[7];
	} else if ((ip[0] >> 4) == 6 && protocol != 0x0800) {
		if (bpf_probe_read_kernel(ip, 40, (void *)(head + nh)))
			return 0;
		e->family = 6;
		e->proto = ip[6];
		__builtin_memcpy(e->saddr, &ip[8], 16);
		__builtin_memcpy(e->daddr, &ip[24], 16);
		l4off = nh + 40;
		payload = ((__u32)ip[4] << 8) | ip[5];
	} else {
		return 0;
	}
	e->len = payload;
	if (fragment)
		return 1;
	if (e->proto == 6) {
		__u8 t[20];
		if (bpf_probe_read_kernel(t, sizeof(t), (void *)(head + l4off)))
			return 1;
		__u32 doff = (t[12] >> 4) * 4;
		e->sport = ((__u16)t[0] << 8) | t[1];
		e->dport = ((__u16)t[2] << 8) | t[3];
		e->seq = ebd_be32(&t[4]);
		e->ack = ebd_be32(&t[8]);
		e->flags = t[13];
		e->len = payload > doff ? payload - doff : 0;
		e->l4 = 1;
	} else if (e->proto == 17) {
		__u8 u[8];
		if (bpf_probe_read_kernel(u, sizeof(u), (void *)(head + l4off)))
			return 1;
		e->sport = ((__u16)u[0] << 8) | u[1];
		e->dport = ((__u16)u[2] << 8) | u[3];
		e->len = payload > 8 ? payload - 8 : 0;
		e->l4 = 2;
	}
	return 1;
}
"""

#: A TCP segment without payload (and no SYN: a SYN a time-wait socket answers reached no
#: listener) that reached the socket it was addressed to is not lost
#: (the socket's local port is the packet's destination port and its peer's the source: a
#: packet on its way out has them the other way round), though the kernel frees it with a
#: drop reason in two cases of a close by this side first:
#: - QUEUE_PURGE: the peer's FIN, purged unread when this side, having closed, destroyed the
#:   socket. By then the local port may be put back (skc_num 0): inet_sport still has it.
#: - NOT_SPECIFIED from a TIME_WAIT socket: once the peer acknowledged this side's FIN
#:   before sending its own (it closed later than its delayed ACK), the orphaned socket is
#:   a time-wait socket, which handles the peer's FIN (or a late ACK) and frees it so.
C_DELIVERED = r"""	if (%(maybe)s && %(have)s && %(pkt)s->l4 == 1 && !%(pkt)s->len
		&& !(%(pkt)s->flags & 0x02) && %(sk)s) {  /* no payload, no SYN */
		__u8 state = 0;
		__u16 local = 0;
		__u8 be[2] = {};     /* ports in network order, read as bytes */
		bpf_probe_read_kernel(&state, 1, (void *)(%(sk)s + OFF_SKC_STATE));
		bpf_probe_read_kernel(&local, sizeof(local), (void *)(%(sk)s + OFF_SKC_NUM));
		if (!local && state != %(time_wait)d) {  /* a time-wait socket has no inet_sport */
			bpf_probe_read_kernel(be, 2, (void *)(%(sk)s + OFF_INET_SPORT));
			local = ((__u16)be[0] << 8) | be[1];
		}
		bpf_probe_read_kernel(be, 2, (void *)(%(sk)s + OFF_SKC_DPORT));
		if (%(which)s && local && local == %(pkt)s->dport
			&& (((__u16)be[0] << 8) | be[1]) == %(pkt)s->sport)
			return 0;    /* delivered to its socket: no drop */
	}"""


def c_offsets(offsets) -> str:
    """#define OFF_<KEY> for every offset the C reads."""
    return "\n".join(
        "#define OFF_%s %d" % (key.upper(), value) for key, value in sorted(offsets.items())
    )


def c_read_packet(record: str) -> str:
    """read_packet() filling `struct <record>` (one that ends in C_SKB_PACKET_FIELDS)."""
    return C_READ_PACKET % {"record": record}


def knows_delivered(table: dict, offsets) -> bool:
    """Whether this kernel lets a program tell a delivered segment from a drop: a reason
    field naming QUEUE_PURGE or NOT_SPECIFIED, and BTF offsets for the headers and the
    socket's ports and state."""
    keys = SKB_HEADER_OFFSETS + SOCK_FIELDS
    named = table["queue_purge"] is not None or table["not_specified"] is not None
    return bool(table["has_field"] and named and offsets and all(k in offsets for k in keys))


def c_maybe_delivered(table: dict, reason: str) -> str:
    """C test of `reason` against the reasons a delivered segment can be freed with."""
    tests = ["%s == %du /* %s */" % (reason, table[key], name)
             for key, name in (("queue_purge", "QUEUE_PURGE"), ("not_specified", "NOT_SPECIFIED"))
             if table[key] is not None]  # fmt: skip
    return "(%s)" % " || ".join(tests)


def c_delivered(table: dict, reason: str, pkt: str, have: str, sk: str) -> str:
    """C that returns from the program when the drop at hand is a delivered segment.

    `reason`, `pkt` (a pointer to what read_packet filled), `have` (its result) and `sk`
    (the socket as an integer, 0 when none) are C expressions of the calling program."""
    which = []
    if table["queue_purge"] is not None:
        which.append("%s == %du" % (reason, table["queue_purge"]))
    if table["not_specified"] is not None:
        which.append("state == %d" % TCP_TIME_WAIT)
    return C_DELIVERED % {
        "maybe": c_maybe_delivered(table, reason), "have": have, "pkt": pkt, "sk": sk,
        "time_wait": TCP_TIME_WAIT, "which": "(%s)" % " || ".join(which),
    }  # fmt: skip
