"""Compiled programs kept by the controller: a tool started again on the same host loads
the BPF byte code of its last compile instead of compiling again. Python 3.6.

The compile (clang and LLVM, about half a second) is most of a tool's time to ready. Its
result depends only on inputs the host can name: the program text (which already holds
what discovery found), BCC's version, the kernel build and the kernel headers. Their
digest is the program's `key`. Before compiling, a tool asks the controller for that key
(`want-program KEY` on stderr, answered by `ctl program KEY DATA` or `ctl program KEY -`);
after a compile, just before `ready`, it offers what it compiled as one `program` record
on stdout, which the controller keeps and never shows (docs/remote-protocol.md).

What is kept: each program's instructions, with the map file descriptors BCC wrote into
them replaced by the map's index, the maps' kernel attributes, BCC's key/leaf type
descriptions, and the compile's BTF with each program's function record (its full name).
Loading creates the maps, writes their new descriptors into the instructions and loads
each program the tool loaded last time, with the type it had; BCC's own table classes
then serve the tool as after a compile. A program set that uses
anything this cannot rebuild (perf buffers, program arrays, BPF data other than map
references) is not offered, and any failure while loading falls back to the compile.

Only a host whose bootstrap says so (`EBPFDIAG_PROGRAMS=1`) asks: the root-owned runner
never does, since loading byte code sent by the user would bypass what it vets.
"""

import base64
import contextlib
import ctypes
import hashlib
import json
import os
import struct
import sys
import threading
import zlib

from core.tc import bpf_syscall, bpf_syscall_number

#: Set by the bootstrap when the controller may send programs (never by the runner).
ENV_FLAG = "EBPFDIAG_PROGRAMS"
PROGRAM_MARK = "\x1eebpfdiag:"
PROGRAM_FORMAT = 1
#: How long a tool waits for the controller's answer before it compiles anyway.
ANSWER_TIMEOUT_S = 3.0
#: Map types whose maps are rebuilt from their attributes alone (include/uapi/linux/bpf.h).
MAP_HASH, MAP_ARRAY, MAP_PERCPU_HASH, MAP_PERCPU_ARRAY = 1, 2, 5, 6
MAP_LRU_HASH, MAP_LRU_PERCPU_HASH, MAP_RINGBUF = 9, 10, 27
REBUILT_MAPS = (
    MAP_HASH,
    MAP_ARRAY,
    MAP_PERCPU_HASH,
    MAP_PERCPU_ARRAY,
    MAP_LRU_HASH,
    MAP_LRU_PERCPU_HASH,
    MAP_RINGBUF,
)
INSN = struct.Struct("<BBhi")  # opcode, dst/src registers, offset, immediate
LD_IMM64 = 0x18
PSEUDO_MAP_FD = 1
#: The kernel's bpf_map_info and bpf_prog_info start with these u32 fields.
MAP_INFO = struct.Struct("<6I16s")
INFO_SIZE = 256
#: bpf(2) commands and the bpf_prog_info offsets used (include/uapi/linux/bpf.h)
BPF_PROG_LOAD, BPF_BTF_LOAD, BPF_BTF_GET_FD_BY_ID = 5, 18, 19
PROG_INFO_BTF_ID, PROG_INFO_FUNC_REC, PROG_INFO_FUNC, PROG_INFO_NR_FUNC = 128, 132, 136, 144
#: union bpf_attr for BPF_PROG_LOAD up to attach_btf_id: type, insn_cnt, insns, license,
#: log_level, log_size, log_buf, kern_version, prog_flags, prog_name, prog_ifindex,
#: expected_attach_type, prog_btf_fd, func_info_rec_size, func_info, func_info_cnt
PROG_LOAD_ATTR = struct.Struct("<IIQQIIQII16sIIIIQI20x")


class _Answer:
    """The controller's answer to `want-program`, handed over by the stdin thread."""

    def __init__(self):
        self.key = None
        self.data = None
        self.done = threading.Event()


_ANSWER = _Answer()
#: The compile to offer before `ready` (key, bpf), and where the program came from.
_OFFER = {}
_SOURCE = {}
#: libbcc once its signatures are declared
_LIB = []


def programs_allowed():
    return os.environ.get(ENV_FLAG) == "1"


def program_answer(text):
    """`program KEY DATA|-` from the controller; True when the line was one."""
    parts = text.split()
    if len(parts) != 3 or parts[0] != "program":
        return False
    if parts[1] == _ANSWER.key:
        _ANSWER.data = None if parts[2] == "-" else parts[2]
        _ANSWER.done.set()
    return True


def program_key(bcc_module, text):
    """Digest of everything a BCC compile of `text` depends on, on this host."""
    h = hashlib.sha256()
    uname = os.uname()
    release = uname.release
    parts = [
        "ebpfdiag-program-%d" % PROGRAM_FORMAT,
        getattr(bcc_module, "__version__", "?"),
        release,
        uname.version,
        uname.machine,
        os.environ.get("BCC_KERNEL_SOURCE", ""),
        os.environ.get("BCC_LINUX_VERSION_CODE", ""),
    ]
    for path in (
        "/lib/modules/%s/build" % release,
        "/lib/modules/%s/source" % release,
        "/sys/kernel/kheaders.tar.xz",
        os.environ.get("BCC_KERNEL_SOURCE", ""),
    ):
        if not path:
            continue
        parts.append(_identity(path))
        parts.append(_identity(os.path.join(path, "include/generated/autoconf.h")))
        parts.append(_identity(os.path.join(path, "include/generated/uapi/linux/version.h")))
    parts.append(_identity(_loaded_libbcc()))
    for part in parts:
        h.update(part.encode("utf-8", "replace") + b"\0")
    h.update(text.encode("utf-8") if isinstance(text, str) else text)
    return h.hexdigest()


def _loaded_libbcc():
    """The libbcc this process mapped (it holds clang and LLVM)."""
    with contextlib.suppress(OSError), open("/proc/self/maps") as f:
        for line in f:
            if "/libbcc.so" in line:
                return line.split(None, 5)[-1].strip()
    return ""


def _identity(path):
    """A path as the compile sees it: where it leads, its size and change time."""
    try:
        st = os.stat(path)
    except OSError:
        return path + ":-"
    return "%s:%s:%d:%d" % (path, os.path.realpath(path), st.st_size, st.st_mtime_ns)


def fetch_program(key):
    """Ask the controller for `key`; the decoded program, or None (compile)."""
    _ANSWER.key = key
    _ANSWER.data = None
    _ANSWER.done.clear()
    try:
        os.write(2, ("%swant-program %s\n" % (PROGRAM_MARK, key)).encode())
    except OSError:
        return None
    if not _ANSWER.done.wait(ANSWER_TIMEOUT_S) or not _ANSWER.data:
        return None
    try:
        return json.loads(zlib.decompress(base64.b64decode(_ANSWER.data)).decode("utf-8"))
    except (ValueError, zlib.error):
        return None


def remember_compile(key, bpf):
    """Offer this compile to the controller once the tool is set up."""
    _OFFER["key"] = key
    _OFFER["bpf"] = bpf


def offer_program(out):
    """Write the `program` record for the compile remembered, if it can be rebuilt."""
    key, bpf = _OFFER.pop("key", None), _OFFER.pop("bpf", None)
    if key is None or getattr(bpf, "module", None) is None:
        return
    try:
        program = export_program(bpf)
    except Exception as exc:  # noqa: BLE001 - a cache that cannot be filled is no error
        sys.stderr.write("ebpfdiag: compiled program not kept: %s\n" % exc)
        return
    if program is None:
        return
    raw = json.dumps(program, separators=(",", ":"), sort_keys=True).encode()
    data = base64.b64encode(zlib.compress(raw, 6)).decode("ascii")
    out.write({"type": "program", "key": key, "data": data})
    out.flush()


def _lib():
    """libbcc with the signatures used here declared (once: loading calls it per program)."""
    from bcc.libbcc import lib

    if _LIB:
        return _LIB[0]
    fns = (
        ("bpf_num_tables", ctypes.c_ulonglong, [ctypes.c_void_p]),
        ("bpf_table_name", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_ulonglong]),
        ("bpf_table_fd_id", ctypes.c_int, [ctypes.c_void_p, ctypes.c_ulonglong]),
        ("bpf_table_key_desc_id", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_ulonglong]),
        ("bpf_table_leaf_desc_id", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_ulonglong]),
        ("bpf_function_size", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_char_p]),
        ("bpf_module_license", ctypes.c_char_p, [ctypes.c_void_p]),
        ("bpf_module_kern_version", ctypes.c_uint, [ctypes.c_void_p]),
        ("bpf_obj_get_info", ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]),
        (
            "bcc_create_map",
            ctypes.c_int,
            [ctypes.c_int, ctypes.c_char_p] + [ctypes.c_int] * 4,
        ),
        (
            "bcc_prog_load",
            ctypes.c_int,
            [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
            + [ctypes.c_uint, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint],
        ),
    )
    for name, restype, argtypes in fns:
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    _LIB.append(lib)
    return lib


def _info(lib, fd):
    buf = ctypes.create_string_buffer(INFO_SIZE)
    size = ctypes.c_uint32(INFO_SIZE)
    if lib.bpf_obj_get_info(fd, buf, ctypes.byref(size)) != 0:
        raise OSError(ctypes.get_errno(), "bpf_obj_get_info(%d) failed" % fd)
    return buf.raw


def export_program(bpf):
    """The compile of `bpf` as plain data, or None when it cannot be rebuilt from it."""
    lib = _lib()
    module = bpf.module
    tables, by_fd = [], {}
    for i in range(lib.bpf_num_tables(module)):
        fd = lib.bpf_table_fd_id(module, i)
        mtype, _id, key_size, value_size, max_entries, flags, _name = MAP_INFO.unpack_from(
            _info(lib, fd)
        )
        if mtype not in REBUILT_MAPS:
            return None
        by_fd[fd] = len(tables)
        tables.append(
            {
                "name": lib.bpf_table_name(module, i).decode(),
                "type": mtype,
                "key_size": key_size,
                "value_size": value_size,
                "max_entries": max_entries,
                "flags": flags,
                "key_desc": (lib.bpf_table_key_desc_id(module, i) or b"").decode(),
                "leaf_desc": (lib.bpf_table_leaf_desc_id(module, i) or b"").decode(),
            }
        )
    loaded = dict((name, fn.fd) for name, fn in bpf.funcs.items())
    funcs = []
    btf_ids = set()
    for i in range(lib.bpf_num_functions(module)):
        name = lib.bpf_function_name(module, i)
        start = lib.bpf_function_start(module, name)
        insns = _with_map_indexes(
            ctypes.string_at(start, lib.bpf_function_size(module, name)), by_fd
        )
        if insns is None:
            return None
        entry = {"name": name.decode(), "insns": base64.b64encode(insns).decode("ascii")}
        if name in loaded:
            info = _info(lib, loaded[name])
            entry["prog_type"] = struct.unpack_from("<I", info)[0]
            btf_id = struct.unpack_from("<I", info, PROG_INFO_BTF_ID)[0]
            func_info = _func_info(lib, loaded[name], info)
            if btf_id and func_info is not None:
                btf_ids.add(btf_id)
                entry["func_info"] = base64.b64encode(func_info[1]).decode("ascii")
                entry["func_info_rec_size"] = func_info[0]
        funcs.append(entry)
    program = {
        "format": PROGRAM_FORMAT,
        "license": lib.bpf_module_license(module).decode(),
        "kern_version": lib.bpf_module_kern_version(module),
        "tables": tables,
        "funcs": funcs,
    }
    btf = _btf_blob(lib, btf_ids.pop()) if len(btf_ids) == 1 else None
    if btf is not None:
        program["btf"] = base64.b64encode(btf).decode("ascii")
    else:  # no BTF to give: load without it (names cut at 15 characters)
        for entry in funcs:
            entry.pop("func_info", None)
    return program


def _func_info(lib, fd, info):
    """(record size, records) of a loaded program's BTF function info, or None."""
    rec, count = (
        struct.unpack_from("<I", info, PROG_INFO_FUNC_REC)[0],
        struct.unpack_from("<I", info, PROG_INFO_NR_FUNC)[0],
    )
    if not rec or not count:
        return None
    records = ctypes.create_string_buffer(rec * count)
    ask = ctypes.create_string_buffer(INFO_SIZE)
    struct.pack_into("<I", ask, PROG_INFO_FUNC_REC, rec)
    struct.pack_into("<Q", ask, PROG_INFO_FUNC, ctypes.addressof(records))
    struct.pack_into("<I", ask, PROG_INFO_NR_FUNC, count)
    size = ctypes.c_uint32(INFO_SIZE)
    if lib.bpf_obj_get_info(fd, ask, ctypes.byref(size)) != 0:
        return None
    return rec, records.raw


def _btf_blob(lib, btf_id):
    """The BTF the compile loaded with its programs (names, function records), or None."""
    nr = bpf_syscall_number()
    if nr is None:
        return None
    fd = bpf_syscall(nr, BPF_BTF_GET_FD_BY_ID, _attr(struct.pack("<I", btf_id)))
    if fd < 0:
        return None
    try:
        info = ctypes.create_string_buffer(32)  # bpf_btf_info: btf, btf_size, id, ...
        size = ctypes.c_uint32(32)
        if lib.bpf_obj_get_info(fd, info, ctypes.byref(size)) != 0:
            return None
        length = struct.unpack_from("<I", info, 8)[0]
        blob = ctypes.create_string_buffer(length)
        info = ctypes.create_string_buffer(32)
        struct.pack_into("<QI", info, 0, ctypes.addressof(blob), length)
        size = ctypes.c_uint32(32)
        if lib.bpf_obj_get_info(fd, info, ctypes.byref(size)) != 0:
            return None
        return blob.raw
    finally:
        os.close(fd)


def _attr(data):
    """A bpf(2) attribute buffer of exactly these bytes."""
    return ctypes.create_string_buffer(data, len(data))


def _load_btf(program):
    """The kept BTF loaded again, or None (the programs then load without it)."""
    nr = bpf_syscall_number()
    if nr is None or "btf" not in program:
        return None
    blob = ctypes.create_string_buffer(base64.b64decode(program["btf"]))
    size = ctypes.sizeof(blob) - 1  # create_string_buffer adds a NUL
    attr = _attr(struct.pack("<QQIII4x", ctypes.addressof(blob), 0, size, 0, 0))
    fd = bpf_syscall(nr, BPF_BTF_LOAD, attr)
    return fd if fd >= 0 else None


def _prog_load(prog_type, name, insns, license, kern_version, btf_fd, func_info):
    """BPF_PROG_LOAD with the kept BTF function records (full names in bpftool and
    /proc/kallsyms); without them when the kernel refuses them. A descriptor or -1."""
    nr = bpf_syscall_number()
    if nr is None:  # no raw syscall here: libbcc's loader, without BTF
        return _lib().bcc_prog_load(
            prog_type, name, insns, len(insns), license, kern_version, 0, None, 0
        )
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license)
    with_btf = btf_fd is not None and func_info is not None
    for info in (func_info, None) if with_btf else (None,):
        records = ctypes.create_string_buffer(info[1], len(info[1])) if info else None
        attr = PROG_LOAD_ATTR.pack(
            prog_type, len(insns) // INSN.size, ctypes.addressof(code), ctypes.addressof(lic),
            0, 0, 0, kern_version, 0, name[:15], 0, 0,
            btf_fd if info else 0, info[0] if info else 0,
            ctypes.addressof(records) if info else 0,
            len(info[1]) // info[0] if info else 0,
        )  # fmt: skip
        fd = bpf_syscall(nr, BPF_PROG_LOAD, _attr(attr))
        if fd >= 0:
            return fd
    return -1


def _with_map_indexes(insns, by_fd):
    """Map descriptors in `ld_imm64` replaced by map indexes; None for anything else
    that points outside the program (BPF data, kernel symbols)."""
    return _rewrite(insns, lambda fd: by_fd.get(fd))


def _with_map_fds(insns, fds):
    return _rewrite(insns, lambda index: fds[index] if 0 <= index < len(fds) else None)


def _rewrite(insns, swap):
    out = bytearray(insns)
    i = 0
    while i + INSN.size <= len(out):
        op, regs, off, imm = INSN.unpack_from(out, i)
        if op == LD_IMM64:
            src = regs >> 4
            if src == PSEUDO_MAP_FD:
                new = swap(imm)
                if new is None:
                    return None
                INSN.pack_into(out, i, op, regs, off, new)
            elif src != 0:
                return None
            i += 2 * INSN.size
            continue
        i += INSN.size
    return bytes(out)


def load_program(BPF, program):
    """A BPF object for `program` (from `export`), its maps created and its programs
    loaded as BCC would have after a compile. Raises when anything fails (every
    descriptor made so far closed)."""
    if program.get("format") != PROGRAM_FORMAT:
        raise ValueError("program format %r" % program.get("format"))
    lib = _lib()
    fds = []
    bpf = None
    try:
        for t in program["tables"]:
            fd = lib.bcc_create_map(
                t["type"],
                t["name"].encode(),
                t["key_size"],
                t["value_size"],
                t["max_entries"],
                t["flags"],
            )
            if fd < 0:
                raise OSError(ctypes.get_errno(), "cannot create map %s" % t["name"])
            fds.append(fd)
        bpf = _empty_bpf(BPF, lib)
        bpf._ebd_program = program
        bpf._ebd_fds = fds
        bpf._ebd_insns = {}
        bpf._ebd_btf = _load_btf(program)
        for f in program["funcs"]:
            insns = _with_map_fds(base64.b64decode(f["insns"]), fds)
            if insns is None:
                raise ValueError("program %s points at a map it does not have" % f["name"])
            info = None
            if "func_info" in f:
                info = (f["func_info_rec_size"], base64.b64decode(f["func_info"]))
            bpf._ebd_insns[f["name"].encode()] = (insns, info)
        for f in program["funcs"]:
            if "prog_type" in f:
                bpf.load_func(f["name"].encode(), f["prog_type"])
        return bpf
    except BaseException:
        if bpf is not None:
            bpf.cleanup()
        else:
            for fd in fds:
                os.close(fd)
        raise


def _empty_bpf(BPF, lib):
    """An instance of a BPF subclass whose every attribute is BCC's own (whatever this
    BCC version sets up), built by BPF.__init__ with a compile that returns no module;
    its tables and programs then come from the kept program."""

    class KeptBPF(BPF):
        def load_func(self, func_name, prog_type, device=None, attach_type=-1):
            func_name = func_name.encode() if isinstance(func_name, str) else func_name
            if func_name in self.funcs:
                return self.funcs[func_name]
            kept = self._ebd_insns.get(func_name)
            if kept is None:
                raise Exception("Unknown program %s" % func_name.decode())
            insns, func_info = kept
            license = self._ebd_program["license"].encode()
            kern_version = self._ebd_program["kern_version"]
            fd = _prog_load(
                prog_type, func_name, insns, license, kern_version, self._ebd_btf, func_info
            )
            if fd < 0:
                raise Exception(
                    "Failed to load BPF program %s: %s"
                    % (func_name.decode(), os.strerror(ctypes.get_errno()))
                )
            fn = BPF.Function(self, func_name, fd)
            self.funcs[func_name] = fn
            return fn

        def get_table(self, name, keytype=None, leaftype=None, reducer=None):
            name = name.decode() if isinstance(name, bytes) else name
            tables = self._ebd_program["tables"]
            index = next((i for i, t in enumerate(tables) if t["name"] == name), None)
            if index is None:
                raise KeyError(name)
            t = tables[index]
            if keytype is None and t["key_desc"]:
                keytype = BPF._decode_table_type(json.loads(t["key_desc"]))
            if leaftype is None:
                leaftype = BPF._decode_table_type(json.loads(t["leaf_desc"]))
            with _table_answers(_lib(), t):
                from bcc.table import Table

                return Table(
                    self,
                    index,
                    self._ebd_fds[index],
                    keytype,
                    leaftype,
                    name.encode(),
                    reducer=reducer,
                )

        def cleanup(self):
            BPF.cleanup(self)
            fds, self._ebd_fds = self._ebd_fds, []
            if self._ebd_btf is not None:
                fds.append(self._ebd_btf)
                self._ebd_btf = None
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    bpf = KeptBPF.__new__(KeptBPF)
    bpf._ebd_fds = []
    bpf._ebd_btf = None
    real = lib.bpf_module_create_c_from_string
    lib.bpf_module_create_c_from_string = lambda *args: None
    try:
        BPF.__init__(bpf, text=b"/* kept program */")
    except Exception as exc:  # noqa: BLE001 - the "failed to compile" that was asked for
        if bpf.module is not None or not hasattr(bpf, "funcs"):
            raise RuntimeError("BCC set up differently than expected: %s" % exc) from None
    finally:
        lib.bpf_module_create_c_from_string = real
    return bpf


@contextlib.contextmanager
def _table_answers(lib, table):
    """BCC's table classes ask the module for a map's type, flags and size when they are
    built; a kept program has no module, so these answer from its attributes meanwhile."""
    names = ("bpf_table_type_id", "bpf_table_flags_id", "bpf_table_max_entries_id")
    saved = dict((n, getattr(lib, n)) for n in names)
    lib.bpf_table_type_id = lambda module, map_id: table["type"]
    lib.bpf_table_flags_id = lambda module, map_id: table["flags"]
    lib.bpf_table_max_entries_id = lambda module, map_id: table["max_entries"]
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(lib, n, fn)


def kept_or_compiled(BPF, text, compile_text):
    """BPF for `text`: the controller's kept program when it has this very key and it
    loads, else `compile_text(text)` (then offered just before `ready`)."""
    if not programs_allowed():
        return compile_text(text)
    import bcc

    key = program_key(bcc, text)
    program = fetch_program(key)
    if program is not None:
        try:
            bpf = load_program(BPF, program)
            _SOURCE["program"] = "kept"
            return bpf
        except Exception as exc:  # noqa: BLE001 - compiling is always possible
            sys.stderr.write("ebpfdiag: kept program not loaded, compiling: %s\n" % exc)
    bpf = compile_text(text)
    _SOURCE["program"] = "compiled"
    remember_compile(key, bpf)
    return bpf


def program_source():
    """`kept` or `compiled` when the controller was asked, else None (for hello)."""
    return _SOURCE.get("program")
