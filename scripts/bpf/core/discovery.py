"""What this host (network namespace) has: interfaces, addresses, kernel features.

Interfaces and addresses come from one rtnetlink dump each over a plain socket (stdlib
only): importing pyroute2 costs more than the whole discovery, and only the clsact
fallback needs it. Python 3.6.
"""

import ipaddress
import json
import os
import re
import socket
import struct
import subprocess
import time

from core.tracepoints import TRACEFS_DIRS

ETH_P_ALL = 0x0003
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
L3_LINK_TYPES = (768, 769, 776, 778, 823, 65534)  # ipip, ip6ip6, sit, gre, ip6gre, none

# rtnetlink (include/uapi/linux/netlink.h, rtnetlink.h, if_link.h, if_addr.h)
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NETLINK_ROUTE = 0
RTA_HDR = struct.Struct("=HH")  # len, type
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_GETLINK, RTM_GETADDR = 18, 22
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
IFLA_IFNAME = 3
IFA_ADDRESS, IFA_LOCAL = 1, 2


def own_netns() -> int:
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def process_age():
    """Seconds since this process started (/proc, to a clock tick), or None: what the
    interpreter, the bootstrap and the script's transfer took before set-up began."""
    try:
        with open("/proc/self/stat") as f:
            after_comm = f.read().rsplit(")", 1)[1].split()
        start = int(after_comm[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
        boottime = getattr(time, "CLOCK_BOOTTIME", 7)  # Python 3.7+ names it
        return max(time.clock_gettime(boottime) - start, 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def netlink_dump(msg_type: int, body: bytes, protocol: int = NETLINK_ROUTE) -> list:
    """The messages of one netlink dump request (rtnetlink by default): [payload bytes]."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    try:
        sock.bind((0, 0))
        sock.send(NLMSG_HDR.pack(NLMSG_HDR.size + len(body), msg_type,
                                 NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)  # fmt: skip
        payloads = []
        while True:
            data = sock.recv(1 << 16)
            pos = 0
            while pos + NLMSG_HDR.size <= len(data):
                length, kind = NLMSG_HDR.unpack_from(data, pos)[:2]
                if kind == NLMSG_DONE or length < NLMSG_HDR.size:
                    return payloads
                if kind == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", data, pos + NLMSG_HDR.size)[0]
                    raise OSError(err, "netlink dump: %s" % os.strerror(err))
                payloads.append(data[pos + NLMSG_HDR.size : pos + length])
                pos += (length + 3) & ~3
            if not data:
                return payloads
    finally:
        sock.close()


def rtnl_attrs(payload: bytes, start: int) -> dict:
    """{attribute type: raw value} of one message (the first of each type)."""
    attrs = {}
    pos = start
    while pos + RTA_HDR.size <= len(payload):
        length, kind = RTA_HDR.unpack_from(payload, pos)
        if length < RTA_HDR.size:
            break
        attrs.setdefault(kind & 0x3FFF, payload[pos + RTA_HDR.size : pos + length])
        pos += (length + 3) & ~3
    return attrs


def _link_kind(kind: int):
    return 14 if kind == ARPHRD_ETHER else (0 if kind in L3_LINK_TYPES else None)


def discover_links() -> list:
    """[(ifindex, name, l2 header length or None when unsupported)] excluding loopback,
    from an rtnetlink dump."""
    links = []
    for payload in netlink_dump(RTM_GETLINK, IFINFOMSG.pack(0, 0, 0, 0, 0)):
        _family, kind, index, _flags, _change = IFINFOMSG.unpack_from(payload, 0)
        if kind == ARPHRD_LOOPBACK:
            continue
        name = rtnl_attrs(payload, IFINFOMSG.size).get(IFLA_IFNAME, b"").split(b"\0")[0]
        links.append((index, name.decode("utf-8", "replace"), _link_kind(kind)))
    return links


def discover_addrs() -> list:
    """This namespace's non-loopback addresses (an rtnetlink dump, else `ip -j addr`)."""
    try:
        found = _rtnl_addrs()
    except OSError:
        found = _ip_addrs()
    addrs = []
    for text in found:
        try:
            ip = ipaddress.ip_address(text)
        except (TypeError, ValueError):
            continue
        if not ip.is_loopback and str(ip) not in addrs:
            addrs.append(str(ip))
    return addrs


def _rtnl_addrs() -> list:
    found = []
    for payload in netlink_dump(RTM_GETADDR, IFADDRMSG.pack(0, 0, 0, 0, 0)):
        family = IFADDRMSG.unpack_from(payload, 0)[0]
        attrs = rtnl_attrs(payload, IFADDRMSG.size)
        raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
        if family in (socket.AF_INET, socket.AF_INET6) and raw:
            found.append(socket.inet_ntop(family, raw))
    return found


def _ip_addrs() -> list:
    found = []
    try:
        proc = subprocess.run(
            ["ip", "-j", "addr", "show"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        for link in json.loads(proc.stdout.decode() or "[]"):
            found.extend(a.get("local") for a in link.get("addr_info", []))
    except (OSError, ValueError):
        pass
    return found


def kernel_version() -> tuple:
    nums = re.findall(r"\d+", os.uname().release)[:2]
    return tuple(int(n) for n in nums) if len(nums) == 2 else (0, 0)


def kprobes_available() -> bool:
    return any(os.path.exists(os.path.join(d, "kprobe_events")) for d in TRACEFS_DIRS)
