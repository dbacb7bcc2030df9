#!/usr/bin/env python3
"""Check what a BCC script needs on this host, one record per check.

Runs under the host's python3 (3.6 or newer), as root via sudo. It changes nothing on the
host: it reads files, imports bcc and compiles (but does not attach) one tiny program.

Parameters:
  --no-compile  skip the test compile (saves about 0.5 s of CPU)

Fields:
  check.name    str   python, kernel, btf, bcc, headers, compile, tracefs, kprobes,
                      tracepoint, raw_tracepoint, tc_bpf, ringbuf, pyroute2
  check.ok      bool  whether the check passed
  check.detail  str   what was found
  check.fix     str   how to fix a failed check (empty when ok)
"""

import json
import os
import platform
import sys

from core.params import ParamError, parse

PARAMS = [
    {"name": "no-compile", "type": "flag",
     "help": "skip the test compile (saves about 0.5 s of CPU)"},
]  # fmt: skip
TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def emit(name, ok, detail, fix=""):
    rec = {
        "type": "check",
        "name": name,
        "ok": bool(ok),
        "detail": detail,
        "fix": "" if ok else fix,
    }
    sys.stdout.write(json.dumps(rec, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def kallsyms(names):
    """Which of ``names`` the running kernel exports (needs root to be meaningful)."""
    found = set()
    try:
        with open("/proc/kallsyms") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] in names:
                    found.add(parts[2])
    except OSError:
        pass
    return found


def tracefs_root():
    for path in TRACEFS:
        if os.path.exists(os.path.join(path, "events")):
            return path
    return None


def check_headers(release):
    build = "/lib/modules/%s/build" % release
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return True, "BCC_KERNEL_SOURCE=%s" % os.environ["BCC_KERNEL_SOURCE"]
    if os.path.isdir(build):
        return True, "%s -> %s" % (build, os.path.realpath(build))
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return True, "in-kernel headers (/sys/kernel/kheaders.tar.xz)"
    return False, "no %s and no /sys/kernel/kheaders.tar.xz" % build


def check_compile():
    try:
        from bcc import BPF
    except ImportError as exc:
        return False, "bcc not importable: %s" % exc
    try:
        BPF(text="int ebpfdiag_doctor(void *ctx) { return 0; }")
    except Exception as exc:  # BCC raises bare Exception on compile failure
        return False, str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
    return True, "a test program compiled and loaded"


def main():
    try:
        args = parse(PARAMS, sys.argv[1:], "doctor", __doc__.split("\n\n", 1)[0])
    except ParamError as exc:
        sys.stderr.write("doctor: %s\n" % exc)
        return 2
    release = platform.release()
    emit("python", True, "%s %d.%d.%d" % ((sys.executable,) + tuple(sys.version_info[:3])))
    emit("kernel", True, "%s %s" % (release, platform.machine()))
    emit(
        "btf",
        os.path.exists("/sys/kernel/btf/vmlinux"),
        "/sys/kernel/btf/vmlinux",
        "a kernel built with CONFIG_DEBUG_INFO_BTF=y",
    )
    try:
        import bcc

        emit("bcc", True, "bcc %s" % getattr(bcc, "__version__", "?"))
        have_bcc = True
    except ImportError as exc:
        emit("bcc", False, str(exc), "apt-get install python3-bpfcc (or your distribution's BCC)")
        have_bcc = False
    ok, detail = check_headers(release)
    emit(
        "headers",
        ok,
        detail,
        "apt-get install linux-headers-%s; if none exist for this kernel, ebpfdiag lab up "
        "--link-headers links the nearest installed ones" % release,
    )
    if have_bcc and not args.no_compile:
        ok, detail = check_compile()
        emit("compile", ok, detail, "fix the headers check; see the message")
    root = tracefs_root()
    emit(
        "tracefs",
        root is not None,
        root or "not mounted",
        "mount -t tracefs tracefs /sys/kernel/tracing",
    )
    kprobes = root is not None and os.path.exists(os.path.join(root, "kprobe_events"))
    emit(
        "kprobes",
        kprobes,
        "kprobe_events present" if kprobes else "no kprobe_events (CONFIG_KPROBES off?)",
        "none needed: scripts fall back to tracepoints where they can",
    )
    tp = root is not None and os.path.isdir(os.path.join(root, "events/tcp/tcp_send_reset"))
    emit(
        "tracepoint",
        tp,
        "tcp:tcp_send_reset" + ("" if tp else " missing"),
        "a kernel with tcp tracepoints (4.15+)",
    )
    syms = kallsyms(
        {
            "bpf_find_raw_tracepoint",
            "bpf_get_raw_tracepoint",
            "cls_bpf_classify",
            "tcx_prog_attach",
            "bpf_ringbuf_output",
        }
    )
    raw = bool(syms & {"bpf_find_raw_tracepoint", "bpf_get_raw_tracepoint"})
    emit("raw_tracepoint", raw, "supported" if raw else "not supported", "kernel 4.17+")
    tc = "cls_bpf_classify" in syms
    emit(
        "tc_bpf",
        tc,
        "cls_bpf" + (", tcx" if "tcx_prog_attach" in syms else "") if tc else "cls_bpf missing",
        "a kernel with CONFIG_NET_CLS_BPF and CONFIG_NET_SCH_INGRESS",
    )
    rb = "bpf_ringbuf_output" in syms
    emit("ringbuf", rb, "BPF ring buffer" if rb else "perf buffer only", "kernel 5.8+")
    try:
        import pyroute2

        emit("pyroute2", True, "pyroute2 %s" % getattr(pyroute2, "__version__", "?"))
    except ImportError:
        emit(
            "pyroute2",
            False,
            "not importable (needed to attach TC programs)",
            "apt-get install python3-pyroute2",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
