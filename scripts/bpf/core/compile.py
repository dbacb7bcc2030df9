"""BCC compile without BCC's scan of the kernel symbol table. Python 3.6.

Every BCC compile reads all of /proc/kallsyms (over 100,000 lines) into a hash table, only
to ask whether `bpf_probe_read_kernel` and `bpf_probe_read_user` exist: about 0.2 s of the
0.4 s an empty program takes, on every host, on every trace start. Both helpers exist on
every kernel since 5.5, so there the answer is known. For the compile alone, this thread
moves to a private mount namespace (nothing it mounts is seen outside this process) where
/proc/kallsyms shows just those two names; BCC then emits exactly the program it would
have, and the real table is back the moment the compile returns. Older kernels, or a host
that refuses the mounts (no CAP_SYS_ADMIN, a security module), get BCC's own scan.
"""

import ctypes
import os

from core.discovery import kernel_version
from core.programs import kept_or_compiled

KALLSYMS_PATH = b"/proc/kallsyms"
#: Where a scratch tmpfs is mounted for a moment (in the private namespace) to hold the
#: stand-in table; the first that exists is used.
SCRATCH_DIRS = (b"/tmp", b"/run", b"/mnt")
#: Both helpers appeared in 5.5; BCC asks for nothing else during a compile.
HELPERS_MIN_KERNEL = (5, 5)
STAND_IN = b"".join(
    b"ffffffff81000000 T %s\n" % name for name in (b"bpf_probe_read_kernel", b"bpf_probe_read_user")
)
CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 2


def bpf_compile(BPF, text):
    """BPF(text=text): the controller's kept program for this very text and host when it
    has one (core/programs.py), else a compile."""
    return kept_or_compiled(BPF, text, lambda t: _compile(BPF, t))


def _compile(BPF, text):
    """BPF(text=text), without the symbol-table scan where that is safe.

    Debug information stays: without it clang is about a tenth faster on a large program,
    but the programs lose their BTF, and with it their full names in bpftool and
    /proc/kallsyms (the kernel keeps 15 characters: two programs would both show as
    ebd_tcp_retrans), which is how an operator tells what is attached to an interface.
    (A kept program, core/programs.py, is loaded with this same BTF.)"""
    masked = kernel_version() >= HELPERS_MIN_KERNEL and _mask_kallsyms()
    try:
        return BPF(text=text)
    finally:
        if masked:
            _libc().umount2(KALLSYMS_PATH, MNT_DETACH)


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _mask_kallsyms() -> bool:
    """Show the stand-in table at /proc/kallsyms to this thread; False (nothing changed
    that anyone else can see) when any step is refused."""
    libc = _libc()
    scratch = next((d for d in SCRATCH_DIRS if os.path.isdir(d)), None)
    if scratch is None or libc.unshare(CLONE_NEWNS) != 0:
        return False
    # Private first: without it the mounts below would propagate to the host's namespace.
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    if libc.mount(b"none", scratch, b"tmpfs", 0, b"size=16k,mode=0700") != 0:
        return False
    try:
        path = scratch + b"/kallsyms"
        with open(path, "wb") as f:
            f.write(STAND_IN)
        return libc.mount(path, KALLSYMS_PATH, None, MS_BIND, None) == 0
    except OSError:
        return False
    finally:
        libc.umount2(scratch, MNT_DETACH)  # the bind mount keeps the file alive
