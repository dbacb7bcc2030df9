"""Packet hooks on interfaces: tcx links (Linux 6.6+) or clsact filters, always detached.

tcx links are BPF links the kernel removes when the process dies, even after SIGKILL;
clsact filters are added with priorities of our own and removed one by one, never touching
filters that were there before. Python 3.6.
"""

import ctypes
import errno
import os
import struct

from core.discovery import ETH_P_ALL, discover_links, kernel_version
from core.lifecycle import SetupError

TC_PARENTS = (("ingress", 0xFFFFFFF2), ("egress", 0xFFFFFFF3))
#: The packet programs per link-layer header length (bytes before the IP header), as
#: (ingress, egress) function names: Ethernet devices, and devices without a link-layer
#: header. A tool's C defines the pair of each variant it may attach.
TC_VARIANTS = {14: ("ebd_tc_ingress", "ebd_tc_egress"), 0: ("ebd_tc_in_l3", "ebd_tc_out_l3")}
TC_PRIO_BASE = 0xEBD0  # our filters' priorities start here, skipping any already in use

#: One entry per program of TC_VARIANTS, calling the tool's on_packet(skb, direction,
#: bytes before the IP header).
C_TC_ENTRY = r"""
int %(name)s(struct __sk_buff *skb)
{
	return on_packet(skb, %(dir)d, %(l2)d);
}
"""


def link_kinds(links):
    """The link-layer header lengths of these (ifindex, name, l2) links, for c_tc_entries;
    None (every kind) when the links are not known."""
    if links is None:
        return None
    return sorted(set(l2 for _, _, l2 in links if l2 is not None))


def c_tc_entries(kinds) -> str:
    """The packet programs' entry points for these kinds (see link_kinds; None: all). Each
    is a copy of on_packet for clang and the verifier, so a host without L3 devices
    compiles only the Ethernet pair (a quarter less compile time for tcp_rst)."""
    parts = []
    for l2 in sorted(TC_VARIANTS) if kinds is None else kinds:
        for direction, name in enumerate(TC_VARIANTS[l2]):
            parts.append(C_TC_ENTRY % {"name": name, "dir": direction, "l2": l2})
    return "".join(parts)


def watched_links(wanted):
    """({ifindex: name} of every interface but lo, [(ifindex, name, l2)] to put packet
    programs on: all of them, or those named in `wanted`, where an unknown name is a
    SetupError). OSError when the interfaces cannot be listed."""
    links = discover_links()
    ifnames = dict((idx, name) for idx, name, _ in links)
    if wanted:
        unknown = sorted(set(wanted) - set(ifnames.values()))
        if unknown:
            raise SetupError("no such interface: %s" % ",".join(unknown))
        links = [link for link in links if link[1] in wanted]
    return ifnames, links


# tcx links: union bpf_attr.link_create is prog_fd, target_ifindex, attach_type, flags, then
# tcx.relative_fd (u32) and tcx.expected_revision (u64, 8-aligned) (include/uapi/linux/bpf.h).
BPF_LINK_CREATE = 28
BPF_F_BEFORE = 1 << 3  # with no relative program: first in the chain
LINK_CREATE_FMT = "=IIIII4xQ"
TCX_ATTACH_TYPES = (("ingress", 46), ("egress", 47))  # BPF_TCX_INGRESS, BPF_TCX_EGRESS
TCX_UNSUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, 524)  # 524: the kernel's ENOTSUPP
TCX_MIN_KERNEL = (6, 6)
BPF_SYSCALLS = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}


def pick_prio(used) -> int:
    """A free filter priority, ahead of existing filters when there is room.

    Our program only observes (TC_ACT_UNSPEC), so running first costs the others nothing
    and lets us see packets they would redirect or drop.
    """
    if not used:
        return TC_PRIO_BASE
    ahead = [p for p in range(min(used) - 1, 0, -1) if p not in used]
    if ahead:
        return ahead[0]
    return next(p for p in range(TC_PRIO_BASE, 0xFFFF) if p not in used)


class TcHooks:
    """Adds our cls_bpf filters at free priorities; removes exactly those on close.

    The fallback for kernels without tcx: a filter holds its own program reference, so
    one left behind by a SIGKILLed run stays until removed by hand.
    """

    kind = "tc-clsact"

    def __init__(self, ipr) -> None:
        self.ipr = ipr
        self.filters = []  # (ifindex, parent, prio)
        self.created_clsact = []
        self.notes = []  # (direction, prio) where an existing filter runs before ours

    def attach(self, ifindex: int, progs: dict) -> None:
        # Each step is recorded before it is made, so a signal arriving mid-call still
        # leaves close() knowing what to remove.
        kinds = [q.get_attr("TCA_KIND") for q in self.ipr.get_qdiscs(index=ifindex)]
        if "clsact" not in kinds:
            self.created_clsact.append(ifindex)
            try:
                self.ipr.tc("add", "clsact", ifindex)
            except Exception:
                self.created_clsact.remove(ifindex)
                raise
        for direction, parent in TC_PARENTS:
            used = set(f["info"] >> 16 for f in self.ipr.get_filters(index=ifindex, parent=parent))
            prio = pick_prio(used)
            if used and prio > min(used):
                self.notes.append((direction, min(used)))
            fn = progs[direction]
            self.filters.append((ifindex, parent, prio))
            try:
                self.ipr.tc(
                    "add-filter",
                    "bpf",
                    ifindex,
                    prio,
                    fd=fn.fd,
                    name=fn.name.decode() if isinstance(fn.name, bytes) else fn.name,
                    parent=parent,
                    prio=prio,
                    protocol=ETH_P_ALL,
                    classid=1,
                    direct_action=True,
                )
            except Exception:
                self.filters.remove((ifindex, parent, prio))
                raise

    def close(self) -> list:
        """Remove our filters, then any clsact we created that is now empty. Returns errors."""
        errors = []
        for ifindex, parent, prio in reversed(self.filters):
            try:
                self.ipr.tc(
                    "del-filter",
                    "bpf",
                    ifindex,
                    prio,
                    parent=parent,
                    prio=prio,
                    protocol=ETH_P_ALL,
                )
            except Exception as exc:  # noqa: BLE001 - keep removing the rest
                errors.append("filter %d/%x/%d: %s" % (ifindex, parent, prio, exc))
        self.filters = []
        for ifindex in self.created_clsact:
            try:
                if not any(self.ipr.get_filters(index=ifindex, parent=p) for _, p in TC_PARENTS):
                    self.ipr.tc("del", "clsact", ifindex)
            except Exception as exc:  # noqa: BLE001
                errors.append("clsact %d: %s" % (ifindex, exc))
        self.created_clsact = []
        return errors


def bpf_syscall_number():
    """__NR_bpf for this machine's 64-bit ABI, or None (then the clsact path is used)."""
    if struct.calcsize("P") != 8:
        return None
    return BPF_SYSCALLS.get(os.uname().machine)


#: libc with syscall() declared, once per process
_LIBC = []


def bpf_syscall(nr, cmd, attr):
    """bpf(2) with `attr` (a ctypes buffer, its whole size passed): the result, or -1
    with errno set (ctypes.get_errno). `nr` from bpf_syscall_number()."""
    if not _LIBC:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        _LIBC.append(libc)
    return _LIBC[0].syscall(
        ctypes.c_long(nr), ctypes.c_long(cmd), attr, ctypes.c_long(ctypes.sizeof(attr))
    )


def kernel_has_tcx(kallsyms: str = "/proc/kallsyms") -> bool:
    """False only when the symbol table is readable and lacks tcx_prog_attach.

    An unreadable table proves nothing: BPF_LINK_CREATE is tried and its refusal decides.
    """
    try:
        with open(kallsyms, "rb") as f:
            return b" tcx_prog_attach\n" in f.read()
    except OSError:
        return True


def tcx_expected() -> bool:
    """Linux 6.6+ has tcx: no need to read the symbol table (tens of ms); older kernels
    may have it backported, which only the table tells."""
    return kernel_version() >= TCX_MIN_KERNEL or kernel_has_tcx()


class TcxLinks:
    """One tcx link per hook, first in the hook's chain.

    A link is owned by its file descriptor: when the process ends for any reason, SIGKILL
    included, the kernel closes the fd and detaches the program. No qdisc is created and
    legacy clsact filters are not touched; the program returns TC_ACT_UNSPEC (TCX_NEXT),
    so every program after it still runs.
    """

    kind = "tcx-link"

    def __init__(self, nr: int) -> None:
        self.nr = nr
        self.fds = []
        self.notes = []  # tcx links go first: nothing runs ahead of them

    def link_create(self, prog_fd: int, ifindex: int, attach_type: int) -> int:
        attr = ctypes.create_string_buffer(struct.calcsize(LINK_CREATE_FMT))
        struct.pack_into(
            LINK_CREATE_FMT, attr, 0, prog_fd, ifindex, attach_type, BPF_F_BEFORE, 0, 0
        )
        fd = bpf_syscall(self.nr, BPF_LINK_CREATE, attr)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, "BPF_LINK_CREATE: %s" % os.strerror(err))
        return fd

    def attach(self, ifindex: int, progs: dict) -> None:
        """Both hooks or neither: a half-attached interface is undone before raising."""
        made = []
        try:
            for direction, attach_type in TCX_ATTACH_TYPES:
                made.append(self.link_create(progs[direction].fd, ifindex, attach_type))
        except BaseException:
            for fd in made:
                os.close(fd)
            raise
        self.fds.extend(made)

    def close(self) -> list:
        """Close our links (the kernel detaches them). Returns errors."""
        errors = []
        for fd in reversed(self.fds):
            try:
                os.close(fd)
            except OSError as exc:
                errors.append("tcx link fd %d: %s" % (fd, exc))
        self.fds = []
        return errors


def pick_hooks(mode: str, clsact):
    """tcx links where the kernel has them (nothing survives the process), else clsact.

    ``mode`` is auto, tcx or clsact; ``clsact()`` makes the clsact hooks (only called on
    that path: it may import pyroute2, or raise SetupError without it). Returns (hooks,
    why clsact was chosen or None); tcx asked for on a kernel without raises SetupError.
    """
    if mode == "clsact":
        return clsact(), "--tc-mode clsact"
    nr = bpf_syscall_number()
    if nr is None:
        why = "no bpf syscall number known for %s" % os.uname().machine
    elif not tcx_expected():
        why = "kernel has no tcx (Linux < 6.6)"
    else:
        return TcxLinks(nr), None
    if mode == "tcx":
        raise SetupError("--tc-mode tcx: %s" % why)
    return clsact(), why


def attach_links(hooks, why, links, load, fallback, missing, keep) -> dict:
    """Attach the ingress and egress programs of every link; returns the hello's record.

    ``links``: (ifindex, name, l2), l2 None for a link type without programs; ``load(name)``
    loads a program; ``fallback()`` makes clsact hooks when the first tcx attach is refused
    as unsupported (None: no fallback, --tc-mode tcx); ``missing`` gets what was not
    attached, and why; ``keep(hooks)`` is called with fallback hooks before anything is
    attached through them, so the caller's cleanup knows them even if a signal comes.
    """
    loaded = {}
    done = []
    for ifindex, name, l2 in links:
        if l2 is None:
            missing.append({"probe": "tc:" + name, "why": "unsupported link type"})
            continue
        if l2 not in loaded:
            ingress, egress = TC_VARIANTS[l2]
            loaded[l2] = {"ingress": load(ingress), "egress": load(egress)}
        progs = loaded[l2]
        try:
            try:
                hooks.attach(ifindex, progs)
            except OSError as exc:
                refused = hooks.kind == TcxLinks.kind and exc.errno in TCX_UNSUPPORTED
                if not refused or done or fallback is None:
                    raise
                why = "tcx refused (%s); using tc-clsact" % exc
                missing.append({"probe": "tcx", "why": why})
                hooks = fallback()
                keep(hooks)
                hooks.attach(ifindex, progs)
            done.append(name)
        except Exception as exc:  # netlink refused (e.g. an `ingress` qdisc is present)
            missing.append({"probe": "tc:" + name, "why": str(exc)})
        for direction, first in hooks.notes:
            note = "runs after existing filter prio %d; packets it takes are not seen" % first
            missing.append({"probe": "tc:%s:%s" % (name, direction), "why": note})
        hooks.notes = []
    record = {"kind": hooks.kind, "interfaces": done}
    if why:
        record["why"] = why
    return record


class Clsact:
    """The clsact fallback's netlink handle: pyroute2's IPRoute, imported only when the
    fallback is taken (its import costs more than a tool's whole discovery). ``hooks`` is
    what ``attach_tool`` calls for clsact hooks; ``close`` at the tool's cleanup."""

    def __init__(self) -> None:
        self.ipr = None

    def hooks(self) -> TcHooks:
        if self.ipr is None:
            try:
                from pyroute2 import IPRoute
            except ImportError:
                raise SetupError(
                    "pyroute2 is not installed (python3-pyroute2); no packets"
                ) from None
            self.ipr = IPRoute()
        return TcHooks(self.ipr)

    def close(self) -> None:
        if self.ipr is not None:
            self.ipr.close()
            self.ipr = None


def attach_tool(tool, links, mode: str, clsact) -> None:
    """Pick the hooks and attach ``links`` for a packet tool: its ``bpf`` and ``BPF``
    (programs), ``plan["missing"]``, ``attach["tc"]`` (the hello's record) and ``tc``, which
    holds the hooks from the moment they exist, so the tool's cleanup always finds them.
    Hooks that cannot be had are a missing probe, unless tcx was asked for (SetupError)."""
    missing = tool.plan["missing"]
    try:
        tool.tc, why = pick_hooks(mode, clsact)
    except SetupError as exc:
        if mode == "tcx":
            raise
        missing.append({"probe": "tc", "why": str(exc)})
        return

    def keep(hooks) -> None:
        tool.tc = hooks

    def load(name: str):
        return tool.bpf.load_func(name, tool.BPF.SCHED_CLS)

    fallback = clsact if mode == "auto" else None
    tool.attach["tc"] = attach_links(tool.tc, why, links, load, fallback, missing, keep)
