"""Thin wrappers around ``ip`` and ``/proc`` for namespaces, links and processes.

Everything the lab builds is made of these few calls, so teardown can undo each one and
a scan by name prefix can find what a crashed run left behind.
"""

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from ebpfdiag.errors import LabError

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000


def run(argv: list[str], *, check: bool = True, input: str | None = None) -> str:
    """Run a command and return its stdout; raise ``LabError`` with its stderr on failure."""
    proc = subprocess.run(argv, input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise LabError(f"{' '.join(argv)}: {detail[-1] if detail else f'exit {proc.returncode}'}")
    return proc.stdout


def netns_list() -> list[str]:
    """Names of all named network namespaces (those under /run/netns)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_add(name: str) -> None:
    """Create a namespace with ``lo`` up; a no-op if it already exists."""
    if not netns_exists(name):
        run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def netns_delete(name: str) -> None:
    """Kill every process inside the namespace, then delete it (its veth ends go with it)."""
    if not netns_exists(name):
        return
    kill_pids(netns_pids(name))
    run(["ip", "netns", "delete", name], check=False)


def netns_pids(name: str) -> list[int]:
    """Processes whose network namespace is ``name`` (what ``ip netns pids`` reports)."""
    out = run(["ip", "netns", "pids", name], check=False)
    return [int(tok) for tok in out.split() if tok.isdigit()]


def link_exists(name: str, netns: str | None = None) -> bool:
    argv = ["ip"] + (["-n", netns] if netns else []) + ["link", "show", "dev", name]
    return subprocess.run(argv, capture_output=True).returncode == 0


def link_names(netns: str | None = None) -> list[str]:
    """Interface names in the root namespace (or in ``netns``), without the ``@peer`` suffix."""
    argv = ["ip"] + (["-n", netns] if netns else []) + ["-o", "link", "show"]
    names = []
    for line in run(argv, check=False).splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def link_delete(name: str) -> None:
    if link_exists(name):
        run(["ip", "link", "delete", "dev", name], check=False)


def bridge_add(name: str, address_cidr: str) -> None:
    """Create (or reuse) a bridge in the root namespace with one address, and bring it up."""
    if not link_exists(name):
        run(["ip", "link", "add", "name", name, "type", "bridge"])
    run(["ip", "addr", "replace", address_cidr, "dev", name])
    run(["ip", "link", "set", name, "up"])


def veth_into_netns(
    outer: str, netns: str, inner: str, address_cidr: str | None, *, bridge: str | None = None
) -> None:
    """A veth pair: ``outer`` stays in the root namespace, ``inner`` moves into ``netns``."""
    if not link_exists(inner, netns):
        link_delete(outer)
        run(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", netns])
    if bridge:
        run(["ip", "link", "set", outer, "master", bridge])
    run(["ip", "link", "set", outer, "up"])
    if address_cidr:
        run(["ip", "-n", netns, "addr", "replace", address_cidr, "dev", inner])
    run(["ip", "-n", netns, "link", "set", inner, "up"])


def route_replace(netns: str, dest: str, via: str) -> None:
    run(["ip", "-n", netns, "route", "replace", dest, "via", via])


def ns_exec_argv(netns: str, argv: list[str]) -> list[str]:
    """The argv that runs ``argv`` inside ``netns``."""
    return ["ip", "netns", "exec", netns, *argv]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def pid_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def pids_with_arg(needle: str) -> list[int]:
    """Processes one of whose arguments contains ``needle`` (e.g. a lab config path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if any(needle in arg for arg in pid_cmdline(int(entry.name))):
            found.append(int(entry.name))
    return found


def kill_pids(pids: list[int], *, timeout: float = 3.0) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [pid for pid in pids if pid_alive(pid)]
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while live and time.monotonic() < deadline:
            live = [pid for pid in live if pid_alive(pid)]
            if live:
                time.sleep(0.02)
        if not live:
            return


def socket_in(netns: str) -> socket.socket:
    """A TCP socket that lives in ``netns``, for a scenario that steps a connection by hand.

    A socket keeps the namespace it was made in, so a short-lived thread enters the
    namespace (setns changes only the calling thread), makes the socket and ends; the
    socket is then used from any thread of this process.
    """
    made: list[socket.socket] = []
    failed: list[str] = []

    def make() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            with open(NETNS_DIR / netns) as handle:
                if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    failed.append(os.strerror(ctypes.get_errno()))
                    return
            made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        except OSError as exc:
            failed.append(exc.strerror or str(exc))

    thread = threading.Thread(target=make, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if not made:
        raise LabError(f"cannot make a socket in namespace {netns}: {failed[0]}")
    return made[0]
