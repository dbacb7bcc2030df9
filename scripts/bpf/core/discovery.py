"""What this host (network namespace) has: interfaces, addresses, kernel features.
Python 3.6.
"""

import ipaddress
import json
import os
import re
import subprocess

from core.tracepoints import TRACEFS_DIRS

ETH_P_ALL = 0x0003
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
L3_LINK_TYPES = (768, 769, 776, 778, 823, 65534)  # ipip, ip6ip6, sit, gre, ip6gre, none


def own_netns() -> int:
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def discover_links(ipr) -> list:
    """[(ifindex, name, l2 header length or None when unsupported)] excluding loopback."""
    links = []
    for link in ipr.get_links():
        kind = link["ifi_type"]
        if kind == ARPHRD_LOOPBACK:
            continue
        l2 = 14 if kind == ARPHRD_ETHER else (0 if kind in L3_LINK_TYPES else None)
        links.append((link["index"], link.get_attr("IFLA_IFNAME"), l2))
    return links


def discover_addrs(ipr) -> list:
    """This namespace's non-loopback addresses (pyroute2, else `ip -j addr`)."""
    found = []
    if ipr is not None:
        for msg in ipr.get_addr():
            found.append(msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS"))
    else:
        try:
            proc = subprocess.run(
                ["ip", "-j", "addr", "show"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
            for link in json.loads(proc.stdout.decode() or "[]"):
                found.extend(a.get("local") for a in link.get("addr_info", []))
        except (OSError, ValueError):
            pass
    addrs = []
    for text in found:
        try:
            ip = ipaddress.ip_address(text)
        except (TypeError, ValueError):
            continue
        if not ip.is_loopback and str(ip) not in addrs:
            addrs.append(str(ip))
    return addrs


def kernel_version() -> tuple:
    nums = re.findall(r"\d+", os.uname().release)[:2]
    return tuple(int(n) for n in nums) if len(nums) == 2 else (0, 0)


def kprobes_available() -> bool:
    return any(os.path.exists(os.path.join(d, "kprobe_events")) for d in TRACEFS_DIRS)
