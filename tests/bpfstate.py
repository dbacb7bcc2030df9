"""What BPF programs are attached to an interface, read from the kernel.

Shared by the script's tests and the lab's end-to-end tests. tcx attachments are queried
with BPF_PROG_QUERY because bpftool before 7.3 does not list them in ``net show``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import require

SYSTEM_PYTHON = "/usr/bin/python3"
TCP_RST = Path(__file__).resolve().parents[1] / "scripts" / "bpf" / "tcp_rst.py"


def _remote_path() -> None:
    if str(TCP_RST.parent) not in sys.path:
        sys.path.insert(0, str(TCP_RST.parent))


def load_core(name: str):
    """A shared remote module (``scripts/bpf/core/NAME.py``), for its pure functions."""
    _remote_path()
    return importlib.import_module(f"core.{name}")


def load_tcp_rst():
    """The remote script as a module, for its pure functions (it imports bcc lazily).

    Its folder goes on sys.path first, as when the script is run directly, so its
    ``from core.NAME import ...`` lines find the shared remote modules."""
    _remote_path()
    spec = importlib.util.spec_from_file_location("tcp_rst_script", TCP_RST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# BPF_PROG_QUERY (16) on a tcx hook: union bpf_attr.query is target_ifindex, attach_type,
# query_flags, attach_flags, prog_ids (u64 pointer), prog_cnt (u32), ...
QUERY_TCX = """
import ctypes, json, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
nr, ifindex = int(sys.argv[1]), socket.if_nametoindex(sys.argv[2])
out = {}
for hook, attach_type in (("ingress", 46), ("egress", 47)):
    ids = (ctypes.c_uint32 * 64)()
    attr = ctypes.create_string_buffer(64)
    struct.pack_into("=IIIIQI", attr, 0, ifindex, attach_type, 0, 0, ctypes.addressof(ids), 64)
    if libc.syscall(ctypes.c_long(nr), ctypes.c_long(16), attr, ctypes.c_long(64)) < 0:
        sys.exit("BPF_PROG_QUERY: " + os.strerror(ctypes.get_errno()))
    out[hook] = list(ids[: struct.unpack_from("=I", attr, 24)[0]])
print(json.dumps(out))
"""


def tcx_progs(ns: str, dev: str, syscall_nr: int | None) -> dict:
    """{"ingress": [prog ids], "egress": [...]} attached through tcx, in run order.

    Queried from the kernel because bpftool before 7.3 does not list tcx in `net show`.
    """
    require(syscall_nr is not None, "needs a known bpf syscall number for this machine")
    out = subprocess.run(
        ["ip", "netns", "exec", ns, SYSTEM_PYTHON, "-c", QUERY_TCX, str(syscall_nr), dev],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return json.loads(out)
