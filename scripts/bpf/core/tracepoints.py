"""Tracepoint formats: parse the live format files and generate the context struct.

Fields and their offsets come from the running kernel's format file, never from kernel
headers, so one program works across kernel versions; symbolic values (reset reasons,
socket states) are read from the file's print fmt. Python 3.6.
"""

import ctypes
import os
import re

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


# Linux TCP state numbers are ABI (include/net/tcp_states.h); format files may name them.
TCP_STATES = {
    "TCP_ESTABLISHED": 1,
    "TCP_SYN_SENT": 2,
    "TCP_SYN_RECV": 3,
    "TCP_FIN_WAIT1": 4,
    "TCP_FIN_WAIT2": 5,
    "TCP_TIME_WAIT": 6,
    "TCP_CLOSE": 7,
    "TCP_CLOSE_WAIT": 8,
    "TCP_LAST_ACK": 9,
    "TCP_LISTEN": 10,
    "TCP_CLOSING": 11,
    "TCP_NEW_SYN_RECV": 12,
}
SYMBOL_CONSTANTS = dict(TCP_STATES, AF_INET=2, AF_INET6=10)


FIELD_RE = re.compile(
    r"^\s*field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
    r"\s*signed:(?P<signed>\d+);"
)
SYMBOLIC_RE = re.compile(r"__print_symbolic\(\s*REC->(\w+)\s*,((?:\s*,?\s*\{[^}]*\})+)\s*\)")
SYMBOL_ENTRY_RE = re.compile(r"\{\s*([^,{}]+?)\s*,\s*\"([^\"]*)\"\s*\}")


def parse_format(text: str) -> dict:
    """Parse a tracefs `format` file into its fields and `__print_symbolic` tables.

    Returns {"name", "id", "fields": [{name, type, offset, size, signed, count}],
    "symbols": {field: {number: name}}}. Symbol keys that are constant names (TCP_CLOSE,
    AF_INET) are mapped through the ABI tables; unknown names are skipped.
    """
    fmt = {"name": None, "id": None, "fields": [], "symbols": {}}
    print_fmt = ""
    for line in text.splitlines():
        if line.startswith("name:"):
            fmt["name"] = line.split(":", 1)[1].strip()
        elif line.startswith("ID:"):
            fmt["id"] = int(line.split(":", 1)[1])
        elif line.startswith("print fmt:"):
            print_fmt = line.split(":", 1)[1]
        else:
            m = FIELD_RE.match(line)
            if m:
                fmt["fields"].append(_parse_field(m))
    for field, table in SYMBOLIC_RE.findall(print_fmt):
        symbols = fmt["symbols"].setdefault(field, {})
        for key, name in SYMBOL_ENTRY_RE.findall(table):
            number = _symbol_number(key)
            if number is not None:
                symbols[number] = name
    return fmt


def _parse_field(m) -> dict:
    decl = m.group("decl").strip()
    count = None
    arr = re.match(r"^(.*?)\s*\[(\d*)\]$", decl)
    if arr:
        decl, count = arr.group(1), int(arr.group(2) or 0)
    name_m = re.match(r"^(.*?)[\s*]*\b(\w+)$", decl)
    ctype, name = (name_m.group(1).strip(), name_m.group(2)) if name_m else (decl, decl)
    if "*" in decl.rsplit(name, 1)[0]:
        ctype = ctype + " *" if not ctype.endswith("*") else ctype
    return {
        "name": name,
        "type": ctype,
        "offset": int(m.group("offset")),
        "size": int(m.group("size")),
        "signed": m.group("signed") == "1",
        "count": count,
    }


def _symbol_number(key: str):
    key = key.strip()
    try:
        return int(key, 0)
    except ValueError:
        return SYMBOL_CONSTANTS.get(key)


def field_map(fmt: dict) -> dict:
    return {f["name"]: f for f in fmt["fields"]}


def address_layout(fmt: dict) -> str:
    """`sockaddr` (6.10+: saddr/daddr hold a sockaddr_in/in6) or `legacy` (sport, saddr_v6...)."""
    saddr = field_map(fmt).get("saddr")
    return "sockaddr" if saddr and saddr["size"] >= 16 else "legacy"


SCALAR_TYPES = {
    ("__u8", 1): "__u8",
    ("u8", 1): "__u8",
    ("unsigned char", 1): "__u8",
    ("char", 1): "char",
    ("__u16", 2): "__u16",
    ("u16", 2): "__u16",
    ("unsigned short", 2): "__u16",
    ("__u32", 4): "__u32",
    ("u32", 4): "__u32",
    ("unsigned int", 4): "__u32",
    ("int", 4): "__s32",
    ("__s32", 4): "__s32",
    ("pid_t", 4): "__s32",
    ("__u64", 8): "__u64",
    ("u64", 8): "__u64",
    ("unsigned long", 8): "__u64",
    ("long", 8): "__s64",
}


def c_tracepoint_struct(struct_name: str, fmt: dict) -> str:
    """A C struct whose members sit exactly at the format file's offsets.

    Known scalars keep a C type; pointers become __u64; anything else (enums, unknown
    typedefs) becomes a char array of the recorded size. Gaps get explicit padding, and a
    static assertion per member pins each offset.
    """
    lines = ["struct %s {" % struct_name]
    asserts = []
    pos = 0
    for i, f in enumerate(fmt["fields"]):
        if f["offset"] < pos:
            continue  # overlapping/duplicate field: keep the first
        if f["offset"] > pos:
            lines.append("\tchar __pad%d[%d];" % (i, f["offset"] - pos))
        where = (f["offset"], f["size"], f["type"])
        lines.append("\t%s;\t/* offset %d size %d: %s */" % ((_c_member(f),) + where))
        asserts.append(
            '_Static_assert(__builtin_offsetof(struct %s, %s) == %d, "%s.%s offset");'
            % (struct_name, f["name"], f["offset"], struct_name, f["name"])
        )
        pos = f["offset"] + f["size"]
    lines.append("} __attribute__((packed));")
    return "\n".join(lines + asserts) + "\n"


def _c_member(f: dict) -> str:
    base = f["type"].replace("const ", "").replace("volatile ", "").strip()
    if f["count"] is not None:
        elem = SCALAR_TYPES.get((base, f["size"] // f["count"])) if f["count"] else None
        if elem and f["size"] % f["count"] == 0:
            return "%s %s[%d]" % (elem, f["name"], f["count"])
        return "char %s[%d]" % (f["name"], f["size"])
    if base.endswith("*") and f["size"] == 8:
        return "__u64 %s" % f["name"]
    scalar = SCALAR_TYPES.get((base, f["size"]))
    if scalar:
        return "%s %s" % (scalar, f["name"])
    return "char %s[%d]" % (f["name"], f["size"])


def read_tracepoint_formats(probes, fmt_dir) -> dict:
    """{probe: parsed format} for (system, probe) pairs, from a directory of recorded files
    named after the probe (optionally with `.format`) or from tracefs. Absent probes are
    left out: the tool decides what it can do without them."""
    formats = {}
    for system, probe in probes:
        if fmt_dir:
            candidates = [os.path.join(fmt_dir, probe), os.path.join(fmt_dir, probe + ".format")]
        else:
            candidates = [os.path.join(d, "events", system, probe, "format") for d in TRACEFS_DIRS]
        for path in candidates:
            try:
                with open(path) as f:
                    formats[probe] = parse_format(f.read())
                break
            except OSError:
                continue
    return formats


def ensure_tracefs() -> str:
    """Where tracefs is; mount it privately when this mount namespace lacks it.

    `ip netns exec` (and containers) give a fresh /sys without tracefs. A private mount
    namespace for this process alone makes it visible again without changing the host.
    Returns "" when there is none and it cannot be mounted.
    """
    for path in TRACEFS_DIRS:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    libc = ctypes.CDLL(None, use_errno=True)
    ms_rec_private = 0x4000 | 0x40000
    if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
        return ""
    if libc.mount(b"none", b"/", None, ms_rec_private, None) != 0:
        return ""
    if libc.mount(b"tracefs", TRACEFS_DIRS[0].encode(), b"tracefs", 0, None) != 0:
        return ""
    return TRACEFS_DIRS[0]
