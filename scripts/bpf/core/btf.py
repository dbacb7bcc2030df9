"""Kernel struct offsets from BTF (/sys/kernel/btf/vmlinux).

The headers BCC compiles against may be another kernel's, so their struct layouts cannot be
trusted; offsets that a program truly needs are read from the running kernel's BTF and
passed to the C as constants. Python 3.6.
"""

import bisect
import struct

BTF_VMLINUX = "/sys/kernel/btf/vmlinux"


def c_netns_lookup(offsets, sk, skb, reject="return 0;") -> str:
    """C that sets e.netns from the socket (or, without one, the skb's device) and runs
    `reject` (returning early) for another namespace's event.

    `sk` and `skb` are C expressions for the kernel pointers as integers (None when the
    probe has no such pointer); tracepoint and kprobe programs share this block.
    """
    if not offsets:
        return ""
    lines = ["\t__u64 net = 0;"]
    if sk:
        lines += [
            "\tif (%s)" % sk,
            "\t\tbpf_probe_read_kernel(&net, sizeof(net), (void *)(%s + %d));"
            % (sk, offsets["sk_net"]),
        ]
    if skb:
        lines += [
            "\t%sif (%s) {" % ("else " if sk else "", skb),
            "\t\t__u64 dev = 0;",
            "\t\tbpf_probe_read_kernel(&dev, sizeof(dev), (void *)(%s + %d));"
            % (skb, offsets["skb_dev"]),
            "\t\tif (dev)",
            "\t\t\tbpf_probe_read_kernel(&net, sizeof(net), (void *)(dev + %d));"
            % offsets["dev_net"],
            "\t}",
        ]
    lines += [
        "\tif (net)",
        "\t\tbpf_probe_read_kernel(&e.netns, sizeof(e.netns), (void *)(net + %d));"
        % offsets["net_inum"],
        "\tif (e.netns && e.netns != OWN_NETNS)",
        "\t\t%s    /* another namespace's event */" % reject,
    ]
    return "\n".join(lines)


BTF_STRUCT, BTF_UNION = 4, 5
BTF_MODIFIERS = (8, 9, 10, 11, 18)  # typedef, volatile, const, restrict, type_tag
BTF_EXTRA = {
    1: (4, 0),
    3: (12, 0),
    4: (0, 12),
    5: (0, 12),
    6: (0, 8),
    13: (0, 8),
    14: (4, 0),
    15: (0, 12),
    17: (4, 0),
    19: (0, 12),
}  # kind: (fixed bytes, bytes per vlen)
NETNS_PATHS = {
    "sk_net": ("sock_common", ("skc_net", "net")),
    "net_inum": ("net", ("ns", "inum")),
    "skb_dev": ("sk_buff", ("dev",)),
    "dev_net": ("net_device", ("nd_net", "net")),
}


# The RST's own 4-tuple: trigger packet headers, or the socket of an active reset.
TUPLE_PATHS = {
    "skb_head": ("sk_buff", ("head",), 8),
    "skb_nh": ("sk_buff", ("network_header",), 2),
    "skb_th": ("sk_buff", ("transport_header",), 2),
    "skc_family": ("sock_common", ("skc_family",), 2),
    "skc_state": ("sock_common", ("skc_state",), 1),
    "inet_sport": ("inet_sock", ("inet_sport",), 2),
    "skc_num": ("sock_common", ("skc_num",), 2),
    "skc_dport": ("sock_common", ("skc_dport",), 2),
    "skc_rcv_saddr": ("sock_common", ("skc_rcv_saddr",), 4),
    "skc_daddr": ("sock_common", ("skc_daddr",), 4),
    "skc_v6_rcv_saddr": ("sock_common", ("skc_v6_rcv_saddr",), 16),
    "skc_v6_daddr": ("sock_common", ("skc_v6_daddr",), 16),
    "snd_nxt": ("tcp_sock", ("snd_nxt",), 4),
    "rcv_nxt": ("tcp_sock", ("rcv_nxt",), 4),
}
BTF_PTR, BTF_INT, BTF_ENUM, BTF_ENUM64 = 2, 1, 6, 19


class Btf:
    """A minimal reader of a BTF blob: struct/union members and their bit offsets.

    Time to ready counts here: the walk over the ~130k types keeps only where each one
    starts, a type is decoded when asked for, and structs are found through their name's
    offset in the string section, never by decoding every name."""

    def __init__(self, data: bytes) -> None:
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != 0xEB9F:
            raise ValueError("not little-endian BTF")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self.data = data
        self.strings = hdr_len + str_off
        self.strings_end = self.strings + str_len
        self.type_start, self.type_end = hdr_len + type_off, hdr_len + type_off + type_len
        self._structs = {}
        fixed, per = [12] * 32, [0] * 32
        for kind, (extra, each) in BTF_EXTRA.items():
            fixed[kind], per[kind] = 12 + extra, each
        positions = [0]  # type id -> where its record starts (id 0 is void)
        append, info_at = positions.append, struct.Struct("<I").unpack_from
        pos, end = self.type_start, self.type_end
        while pos < end:
            append(pos)
            info = info_at(data, pos + 4)[0]
            kind = (info >> 24) & 0x1F
            pos += fixed[kind] + per[kind] * (info & 0xFFFF)
        self.positions = positions

    def type(self, tid: int):
        """(kind, name_off, size_or_type, members_pos, info) of type `tid`."""
        if tid == 0:
            return (0, 0, 0, 0, 0)
        pos = self.positions[tid]
        name_off, info, size_or_type = struct.unpack_from("<III", self.data, pos)
        return ((info >> 24) & 0x1F, name_off, size_or_type, pos + 12, info)

    def name(self, off: int) -> str:
        start = self.strings + off
        return self.data[start : self.data.index(b"\0", start)].decode()

    def find_struct(self, name: str) -> int:
        """The first struct of that name with members."""
        if name not in self._structs:
            self._structs[name] = self._find(name, (BTF_STRUCT,), "struct")
        return self._structs[name]

    def _find(self, name: str, kinds, what: str) -> int:
        """The first type of one of `kinds` with that name and members (or enumerators),
        found through the name's offset in the string section."""
        data = self.data
        at = data.find(b"\0" + name.encode() + b"\0", self.strings, self.strings_end)
        if at < 0:
            raise KeyError("%s %s not in BTF" % (what, name))
        key = struct.pack("<I", at + 1 - self.strings)
        pos = data.find(key, self.type_start, self.type_end)
        while pos >= 0:
            tid = bisect.bisect_left(self.positions, pos)
            if tid < len(self.positions) and self.positions[tid] == pos:
                kind, _n, _s, _m, info = self.type(tid)
                if kind in kinds and info & 0xFFFF:
                    return tid
            pos = data.find(key, pos + 1, self.type_end)
        raise KeyError("%s %s not in BTF" % (what, name))

    def resolve(self, tid: int) -> int:
        while self.type(tid)[0] in BTF_MODIFIERS:
            tid = self.type(tid)[2]
        return tid

    def member(self, tid: int, name: str):
        """(bit offset, type id) of member `name`, looking into anonymous members too."""
        kind, _n, _s, mpos, info = self.type(tid)
        if kind not in (BTF_STRUCT, BTF_UNION):
            return None
        kflag = info >> 31
        for i in range(info & 0xFFFF):
            m_name, m_type, m_off = struct.unpack_from("<III", self.data, mpos + 12 * i)
            bit = m_off & 0xFFFFFF if kflag else m_off
            label = self.name(m_name)
            if label == name:
                return bit, m_type
            if not label:
                found = self.member(self.resolve(m_type), name)
                if found:
                    return bit + found[0], found[1]
        return None

    def size(self, tid: int):
        """Byte size of a scalar, pointer, struct or union type; None for others."""
        kind, _n, size, _m, _i = self.type(self.resolve(tid))
        if kind == BTF_PTR:
            return 8
        return size if kind in (BTF_INT, BTF_ENUM, BTF_STRUCT, BTF_UNION) else None

    def field(self, struct_name: str, path, size: int) -> int:
        """Offset of a member that must be `size` bytes (else a layout we do not know)."""
        tid = self.find_struct(struct_name)
        for name in path[:-1]:
            tid = self.resolve(self.member(tid, name)[1])
        found = self.member(tid, path[-1])
        if not found or self.size(found[1]) != size:
            raise KeyError("%s.%s is not %d bytes" % (struct_name, ".".join(path), size))
        return self.offset(struct_name, path)

    def offset(self, struct_name: str, path) -> int:
        tid, bits = self.find_struct(struct_name), 0
        for name in path:
            found = self.member(tid, name)
            if not found:
                raise KeyError("%s has no member %s" % (struct_name, ".".join(path)))
            bits += found[0]
            tid = self.resolve(found[1])
        if bits % 8:
            raise KeyError("%s.%s is a bit field" % (struct_name, ".".join(path)))
        return bits // 8

    def enum(self, name: str) -> dict:
        """{value: name} of the first enum (32 or 64 bit) called `name`."""
        kind, _n, _size, mpos, info = self.type(self._find(name, (BTF_ENUM, BTF_ENUM64), "enum"))
        values = {}
        signed = info >> 31
        for i in range(info & 0xFFFF):
            if kind == BTF_ENUM:
                e_name, value = struct.unpack_from(
                    "<Ii" if signed else "<II", self.data, mpos + 8 * i
                )
            else:
                e_name, low, high = struct.unpack_from("<III", self.data, mpos + 12 * i)
                value = (high << 32) | low
            values[value] = self.name(e_name)
        return values


def netns_offsets(path: str = BTF_VMLINUX):
    """Offsets for sk->skc_net, net->ns.inum, skb->dev and dev->nd_net, or (None, why)."""
    return btf_offsets(path)[0]


def load_btf(path: str = BTF_VMLINUX):
    """(Btf, None) or (None, why): one read and parse of a BTF file, for every lookup a
    tool makes in it."""
    try:
        with open(path, "rb") as f:
            return Btf(f.read()), None
    except (OSError, ValueError, struct.error) as exc:
        return None, exc


def btf_offsets(path: str = BTF_VMLINUX, loaded=None):
    """((netns offsets, why), (tuple offsets, why)): each dict is None when BTF lacks it.
    `loaded`: what load_btf already returned, so the file is not read again."""
    btf, why = loaded or load_btf(path)
    results = []
    for paths, what in (
        (NETNS_PATHS, "no BTF namespace offsets (%s); filtering by local addresses"),
        (TUPLE_PATHS, "no BTF packet/socket offsets (%s); resets keep the tracepoint's tuple"),
    ):
        if btf is None:
            results.append((None, what % why))
            continue
        try:
            found = {}
            for key, spec in paths.items():
                if len(spec) == 3:
                    found[key] = btf.field(*spec)
                else:
                    found[key] = btf.offset(*spec)
            results.append((found, None))
        except (KeyError, IndexError, TypeError, struct.error) as exc:
            results.append((None, what % exc))
    return tuple(results)


def btf_enum(name: str, path: str = BTF_VMLINUX):
    """{value: enumerator name} of enum `name` in a BTF file, or (None, why).

    Returns (table, None) or (None, why). Enum numbering moves between kernels (drop
    reasons are renumbered whenever one is added), so names are read on the host.
    """
    btf, why = load_btf(path)
    if btf is None:
        return None, "no BTF enum %s (%s)" % (name, why)
    try:
        return btf.enum(name), None
    except (KeyError, struct.error) as exc:
        return None, "no BTF enum %s (%s)" % (name, exc)
