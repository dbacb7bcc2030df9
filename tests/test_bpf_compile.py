"""core.compile: BCC compiles without scanning the symbol table, to the same program, and
nothing of it is seen outside the compiling thread.

Runs under the system python (BCC) as root, in a subprocess: the real BCC compiles a
program that uses both probe-read helpers, a hash map and a ring buffer once plainly and
once through bpf_compile, and the instructions must be identical (a stand-in table BCC
could not read would turn bpf_probe_read_kernel into bpf_probe_read). A stand-in for BPF
looks at what the compile sees: the short table in this thread, the real one in a thread
started earlier (as the bootstrap's is) and in PID 1's mounts.
"""

import json
import os
import subprocess

from tests.bpfstate import SYSTEM_PYTHON, TCP_RST
from tests.conftest import require

CHECK = r"""
import json, os, sys, threading
sys.path.insert(0, sys.argv[1])
import core.compile as cc
from bcc import BPF

TEXT = '''
#include <linux/sched.h>
BPF_HASH(seen, u64, u64, 64);
BPF_RINGBUF_OUTPUT(events, 1);
int ebd_probe(void *ctx) {
    u64 a = 0, b = 0;
    bpf_probe_read_kernel(&a, sizeof(a), ctx);
    bpf_probe_read_user(&b, sizeof(b), (void *)a);
    seen.increment(a);
    events.ringbuf_output(&b, sizeof(b), 0);
    return a + b;
}
'''

def insns(b):
    # each compile makes its own maps: blank the map fds the loads carry
    code, out = b.dump_func("ebd_probe"), b""
    i = 0
    while i < len(code):
        if code[i] == 0x18 and code[i + 1] >> 4 == 1:  # ld_imm64 of a map fd
            out += code[i:i + 4] + b"...." + code[i + 8:i + 16]
            i += 16
        else:
            out += code[i:i + 8]
            i += 8
    return out

def lines(path="/proc/kallsyms"):
    with open(path) as f:
        return sum(1 for _ in f)

def host_mounts():
    with open("/proc/1/mountinfo") as f:
        return f.read()

seen = {}
other, ask, done = {}, threading.Event(), threading.Event()
def watcher():  # a thread that exists before the compile, like the bootstrap's
    ask.wait(60)
    other["n"] = lines()
    done.set()
threading.Thread(target=watcher, daemon=True).start()
def spy(text, **kwargs):
    seen["inside"] = lines()
    ask.set()
    done.wait(10)
    seen["other_thread"] = other.get("n")
    seen["host_has_mount"] = "kallsyms" in host_mounts()
    seen["scratch_gone"] = "kallsyms" not in os.listdir("/tmp")
    return "compiled"

before_mounts = host_mounts()
plain = insns(BPF(text=TEXT))
fast = insns(cc.bpf_compile(BPF, TEXT))
result = cc.bpf_compile(spy, "x")
cc.kernel_version = lambda: (4, 19)
old = {}
cc.bpf_compile(lambda text: old.update(n=lines()), "x")
print(json.dumps({
    "same": plain == fast, "insns": len(plain) // 8, "result": result, "seen": seen,
    "after": lines(), "old_kernel": old["n"], "host_unchanged": host_mounts() == before_mounts,
}))
"""


def test_compile_without_symbol_scan_is_the_same_program_and_invisible_outside():
    require(os.geteuid() == 0, "needs root (BPF, mounts)")
    require(os.path.exists(SYSTEM_PYTHON), "needs the system python3")
    cmd = [SYSTEM_PYTHON, "-c", CHECK, str(TCP_RST.parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    require("No module named 'bcc'" not in proc.stderr, "needs python3-bpfcc")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["same"] and out["insns"] > 4, out
    assert out["result"] == "compiled"
    seen = out["seen"]
    assert seen["inside"] == 2, seen  # the stand-in: only the two helpers' names
    assert seen["other_thread"] > 1000 and out["after"] == seen["other_thread"], out
    assert not seen["host_has_mount"] and seen["scratch_gone"], seen
    assert out["host_unchanged"]
    assert out["old_kernel"] == out["after"]  # before 5.5: BCC's own scan, nothing masked
