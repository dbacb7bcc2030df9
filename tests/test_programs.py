"""Kept compiled programs: the controller's store, its part of the conversation with a
host (RemoteRun), and the host side's pure parts (core/programs.py); a real BCC compile
exported and loaded again on this kernel."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import subprocess

import pytest

from ebpfdiag import programs
from ebpfdiag.catalog import script_path
from ebpfdiag.programs import ProgramStore, default_store
from ebpfdiag.transport import StopSignal
from tests.bpfstate import SYSTEM_PYTHON, load_core
from tests.conftest import require
from tests.test_remote_run import MARK, Conn, Script, new_run

core = load_core("programs")
KEY = "ab" * 32
OTHER_KEY = "cd" * 32
DATA = base64.b64encode(b"compiled").decode()


def test_the_store_gives_back_what_one_host_offered_and_only_to_it(tmp_path):
    store = ProgramStore(tmp_path)
    assert store.get("web1", KEY) is None
    assert store.put("web1", KEY, DATA)
    assert store.get("web1", KEY) == DATA
    assert store.get("web2", KEY) is None  # never another host's byte code
    assert store.get("web1", OTHER_KEY) is None


@pytest.mark.parametrize(
    ("key", "data"),
    [("../etc/passwd", DATA), ("AB" * 32, DATA), (KEY, "not base64!"), (KEY, ""), (KEY, "A" * 8)],
)
def test_the_store_refuses_what_is_not_a_plausible_entry(tmp_path, key, data):
    store = ProgramStore(tmp_path, max_bytes=4)
    assert not store.put("web1", key, data)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_the_store_keeps_the_most_recently_used_entries_per_host(tmp_path):
    store = ProgramStore(tmp_path, per_host=2)
    keys = [f"{i:064x}" for i in range(3)]
    store.put("web1", keys[0], DATA)
    store.put("web1", keys[1], DATA)
    os.utime(store._dir("web1") / keys[1], ns=(1, 1))  # keys[1] least recently used
    store.put("web1", keys[2], DATA)
    assert [k for k in keys if store.get("web1", k)] == [keys[0], keys[2]]
    store.put("web2", keys[1], DATA)  # another host's entries count on their own
    assert store.get("web1", keys[0]) == DATA and store.get("web2", keys[1]) == DATA


def test_a_store_that_cannot_be_written_costs_nothing_but_the_entry(tmp_path):
    (tmp_path / "file").write_text("")
    store = ProgramStore(tmp_path / "file" / "below")
    assert not store.put("web1", KEY, DATA)
    assert store.get("web1", KEY) is None


def test_the_environment_chooses_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv(programs.ENV, "off")
    assert default_store() is None
    monkeypatch.setenv(programs.ENV, str(tmp_path / "here"))
    assert default_store().root == tmp_path / "here"
    monkeypatch.delenv(programs.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_store().root == tmp_path / "cache" / "ebpfdiag" / "programs"


class KeyedConn(Conn):
    def get_server_host_key(self):
        return None


def converse(tmp_path, host_says, via_runner: bool = False):
    """A run whose host asks for a program and offers one; what the controller wrote and
    what reached the output."""
    script = Script.from_path(script_path("tcp_rst")) if via_runner else Script("p.py", b"")
    lines: list = []

    async def scenario():
        conn, stop = KeyedConn(), StopSignal()
        run = new_run(script, lines)
        run.programs = ProgramStore(tmp_path)
        task = asyncio.ensure_future(run.run(conn, stop))
        await conn.ready.wait()
        chan = conn.chan
        chan.stderr(MARK + (b"want-request 3.11.2 1 tcp_rst\n" if via_runner else
                            b"want-script 3.11.2\n"))  # fmt: skip
        chan.stderr(MARK + b"running 42\n")
        sent = len(chan.data)
        host_says(chan, run)
        chan.exit(0)
        await task
        return chan.data[sent:], run

    written, run = asyncio.run(scenario())
    return written, lines, run


def test_a_host_gets_its_kept_program_and_a_new_compile_is_kept_unseen(tmp_path):
    def host(chan, run):
        chan.stderr(MARK + f"want-program {KEY}\n".encode())
        record = json.dumps(
            {"type": "program", "key": OTHER_KEY, "data": DATA}, separators=(",", ":")
        )
        chan.stdout(b'{"type":"hello"}\n' + record.encode() + b'\n{"type":"bye"}\n')

    ProgramStore(tmp_path).put("web1 198.18.0.1 -", KEY, DATA)
    written, lines, run = converse(tmp_path, host)
    assert written == f"ctl program {KEY} {DATA}\n".encode()
    out = [line for stream, batch in lines if stream == "stdout" for line in batch]
    assert out == [b'{"type":"hello","via":"sudo"}', b'{"type":"bye"}']  # the record is not output
    assert ProgramStore(tmp_path).get("web1 198.18.0.1 -", OTHER_KEY) == DATA


def test_a_host_without_a_kept_program_is_told_to_compile(tmp_path):
    written, _, _ = converse(tmp_path, lambda chan, run: chan.stderr(
        MARK + f"want-program {KEY}\n".encode()))  # fmt: skip
    assert written == f"ctl program {KEY} -\n".encode()


def test_nothing_is_kept_for_or_sent_to_a_host_through_the_runner(tmp_path):
    ProgramStore(tmp_path).put("web1 198.18.0.1 -", KEY, DATA)

    def host(chan, run):
        chan.stderr(MARK + f"want-program {KEY}\n".encode())
        record = {"type": "program", "key": OTHER_KEY, "data": DATA}
        chan.stdout(json.dumps(record, separators=(",", ":")).encode() + b"\n")

    written, _, run = converse(tmp_path, host, via_runner=True)
    assert run.via == "runner"
    assert written == f"ctl program {KEY} -\n".encode()
    assert ProgramStore(tmp_path).get("web1 198.18.0.1 -", OTHER_KEY) is None


def ld_imm64(src: int, imm: int) -> bytes:
    return struct.pack("<BBhi", 0x18, (src << 4) | 1, 0, imm) + struct.pack("<BBhi", 0, 0, 0, 0)


def test_map_descriptors_become_indexes_and_back():
    exit_insn = struct.pack("<BBhi", 0x95, 0, 0, 0)
    insns = ld_imm64(1, 7) + ld_imm64(0, 7) + ld_imm64(1, 9) + exit_insn
    indexed = core._with_map_indexes(insns, {7: 0, 9: 1})
    assert indexed == ld_imm64(1, 0) + ld_imm64(0, 7) + ld_imm64(1, 1) + exit_insn
    assert core._with_map_fds(indexed, [30, 31]) == (
        ld_imm64(1, 30) + ld_imm64(0, 7) + ld_imm64(1, 31) + exit_insn
    )
    assert core._with_map_indexes(insns, {7: 0}) is None  # a map it does not know
    assert core._with_map_indexes(ld_imm64(2, 7), {7: 0}) is None  # BPF data: not rebuilt
    assert core._with_map_fds(ld_imm64(1, 2), [30]) is None


def test_only_the_awaited_answer_is_taken():
    core._ANSWER.key = KEY
    core._ANSWER.done.clear()
    assert core.program_answer(f"program {OTHER_KEY} {DATA}")
    assert not core._ANSWER.done.is_set()
    assert not core.program_answer("port 80")
    assert core.program_answer(f"program {KEY} -")
    assert core._ANSWER.done.is_set() and core._ANSWER.data is None


def test_the_key_follows_the_text():
    class Bcc:
        __version__ = "0.26.0"

    assert core.program_key(Bcc, "int a;") == core.program_key(Bcc, "int a;")
    assert core.program_key(Bcc, "int a;") != core.program_key(Bcc, "int b;")
    Bcc.__version__ = "0.29.1"
    assert core.program_key(Bcc, "int a;") != core.program_key(type("B", (), {}), "int a;")


ROUND_TRIP = r"""
import base64, ctypes, json, os, re, subprocess, sys, zlib
sys.path.insert(0, sys.argv[1])
from bcc import BPF
from core.compile import _compile
from core.programs import export_program, load_program

TEXT = '''
BPF_ARRAY(counts, u64, 1);
BPF_PERCPU_ARRAY(percpu, u64, 1);
BPF_HASH(seen, u32, u64, 16);
BPF_RINGBUF_OUTPUT(events, 8);
int on_raw_syscalls_enter(struct tracepoint__raw_syscalls__sys_enter *args) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != PID || args->id != 39)   /* getpid on x86_64 */
        return 0;
    u32 zero = 0;
    counts.increment(zero);
    percpu.increment(zero);
    u64 one = 1;
    seen.update(&pid, &one);
    events.ringbuf_output(&pid, sizeof(pid), 0);
    return 0;
}
'''.replace("PID", str(os.getpid()))

def prog_id(fd):
    with open("/proc/self/fdinfo/%d" % fd) as f:
        return int(re.search(r"prog_id:\s+(\d+)", f.read()).group(1))

def exercise(b):
    b.attach_tracepoint(tp="raw_syscalls:sys_enter", fn_name="on_raw_syscalls_enter")
    got = []
    b["events"].open_ring_buffer(lambda ctx, data, size: got.append(size))
    for _ in range(3):
        os.getpid()
    b.ring_buffer_poll(100)
    zero = ctypes.c_int(0)
    return [b["counts"][zero].value, sum(b["percpu"][zero]),
            [(k.value, v.value) for k, v in b["seen"].items()], got]

compiled = _compile(BPF, TEXT)
first = exercise(compiled)
kept = json.loads(zlib.decompress(zlib.compress(json.dumps(export_program(compiled)).encode())))
compiled.cleanup()
loaded = load_program(BPF, kept)
second = exercise(loaded)
names = sorted(f.decode() for f in loaded.funcs)
fd = loaded.funcs[b"on_raw_syscalls_enter"].fd
info = subprocess.run(["bpftool", "-j", "prog", "show", "id",
                       str(prog_id(fd))], capture_output=True, text=True).stdout
loaded.cleanup()
print(json.dumps({"first": first, "second": second, "names": names,
                  "bpftool_name": json.loads(info)["name"],
                  "types": sorted(t["type"] for t in kept["tables"])}))
"""


@pytest.mark.root
def test_a_real_compile_loads_again_from_what_was_kept():
    """BCC compiles a program with an array, a per-CPU array, a hash and a ring buffer;
    what was kept of it, loaded in its place (no compile), counts and reports the same."""
    require(os.geteuid() == 0, "needs root (BPF)")
    require(os.path.exists(SYSTEM_PYTHON), "needs the system python3")
    remote = str(load_core("programs").__file__).rsplit("/core/", 1)[0]
    proc = subprocess.run(
        [SYSTEM_PYTHON, "-c", ROUND_TRIP, remote], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    pid_rows = got["first"][2]
    assert got["first"][:2] == [3, 3] and len(pid_rows) == 1 and got["first"][3] == [4] * 3
    assert got["second"] == [3, 3, pid_rows, [4] * 3]
    assert got["names"] == ["on_raw_syscalls_enter"]
    # loaded with the compile's BTF: its full name, not the kernel's 15 characters
    assert got["bpftool_name"] == "on_raw_syscalls_enter"
    assert got["types"] == [1, 2, 6, 27]


def test_after_ready_a_program_looking_line_is_output_like_any_other(tmp_path):
    line = json.dumps({"type": "program", "key": KEY, "data": DATA}, separators=(",", ":"))

    def host(chan, run):
        chan.stdout(b'{"type":"hello"}\n{"type":"ready"}\n' + line.encode() + b"\n")

    _, lines, _ = converse(tmp_path, host)
    out = [line for stream, batch in lines if stream == "stdout" for line in batch]
    assert out[-1] == line.encode()
    assert ProgramStore(tmp_path).get("web1 198.18.0.1 -", KEY) is None


def test_a_script_that_is_not_a_tool_gets_every_line_through(tmp_path):
    """Without a hello first (run-script of any script), nothing is looked for."""
    line = json.dumps({"type": "program", "key": KEY, "data": DATA}, separators=(",", ":"))
    _, lines, _ = converse(tmp_path, lambda chan, run: chan.stdout(line.encode() + b"\n"))
    assert [line for stream, batch in lines if stream == "stdout" for line in batch] == [
        line.encode()
    ]
    assert ProgramStore(tmp_path).get("web1 198.18.0.1 -", KEY) is None
