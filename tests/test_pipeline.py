"""How script output travels from a host to ``run-script --json``, against real sshd hosts.

The host gathers what a script writes into chunks but holds a line only a few ms: these
tests pin down both halves (a lone line arrives at once, a burst arrives complete and in
order) and that nothing written before a stop is lost, whatever way the script ends.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ebpfdiag import records
from ebpfdiag.transport import Script
from tests.conftest import require, require_root_tools

HOSTS = ["h01", "h02", "h03"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ebpfdiag", *args], capture_output=True, text=True, timeout=timeout
    )


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ebpfdiag", *args], stdout=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def fleet():
    require_root_tools("ip", "/usr/sbin/sshd", "sudo", "ssh-keygen")
    from tests.fleet import Fleet

    f = Fleet("ebpl", len(HOSTS), subnet="198.19.41.0/24")
    f.up()
    try:
        yield f
    finally:
        f.down()


def run_json(fleet, script: Path, hosts: str, *extra: str) -> subprocess.CompletedProcess:
    return cli("run-script", str(script), "-i", str(fleet.inventory), "--hosts", hosts, "--json",
               *extra)  # fmt: skip


def write(tmp_path: Path, text: str, name: str = "probe.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def by_host(stdout: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for line in stdout.splitlines():
        rec = json.loads(line)
        if rec["type"] in ("record", "line"):
            out.setdefault(rec["host"], []).append(rec)
    return out


@pytest.mark.root
def test_a_line_arrives_before_the_next_is_printed(fleet, tmp_path):
    probe = write(
        tmp_path,
        "import time\n"
        "print('first', flush=True)\n"
        "time.sleep(1.5)\n"
        "print('second %d' % time.time_ns(), flush=True)\n",
    )
    proc = spawn("run-script", str(probe), "-i", str(fleet.inventory), "--hosts", "h01", "--json")
    first = json.loads(proc.stdout.readline())
    got_first = time.time_ns()
    rest = [json.loads(line) for line in proc.stdout.read().splitlines()]
    assert proc.wait(30) == 0
    assert first["text"] == "first"
    second = [r["text"] for r in rest if r["type"] == "line"]
    assert len(second) == 1 and second[0].startswith("second ")
    assert got_first < int(second[0].split()[1]), "the first line waited for the second"


@pytest.mark.root
def test_a_lone_line_is_not_held_for_the_next(fleet, tmp_path):
    """Lone lines go at once: none waits for the next line or the end of the script (how
    fast they go is a benchmark figure, bench/pipeline.py)."""
    gap = 0.2
    probe = write(
        tmp_path,
        "import sys, time\n"
        "for i in range(20):\n"
        "    time.sleep(float(sys.argv[1]))\n"
        "    print('{\"printed\": %d}' % time.time_ns(), flush=True)\n",
    )
    r = run_json(fleet, probe, "h01", "--", str(gap))
    assert r.returncode == 0, r.stderr
    recs = by_host(r.stdout)["h01"]
    delays_ms = sorted((x["ts"] - x["record"]["printed"]) / 1e6 for x in recs)
    assert len(delays_ms) == 20
    # Functional, not a speed target (bench/pipeline.py measures that): no line waits for
    # the next one or for the end of the script, which would take at least the gap.
    assert delays_ms[-1] < gap * 1000 / 2, delays_ms


@pytest.mark.root
def test_a_burst_then_exit_arrives_complete_and_in_order(fleet, tmp_path):
    probe = write(
        tmp_path,
        "import os, sys\n"
        "for i in range(100000):\n"
        "    print('{\"i\":%d}' % i, flush=True)\n"
        "sys.stdout.flush()\n"
        "os.system('echo from-a-child')\n"
        "sys.stdout.buffer.write(b'unflushed tail\\n')\n",
    )
    r = run_json(fleet, probe, ",".join(HOSTS))
    assert r.returncode == 0, r.stderr
    got = by_host(r.stdout)
    assert sorted(got) == HOSTS
    for host in HOSTS:
        recs = got[host]
        assert [x["record"]["i"] for x in recs[:-2]] == list(range(100000)), host
        assert [x.get("text") for x in recs[-2:]] == ["from-a-child", "unflushed tail"], host


@pytest.mark.root
def test_a_stalled_consumer_blocks_the_script_and_loses_nothing(fleet, tmp_path):
    """While nobody reads the controller's output, the host buffers a bounded amount (the
    script's writes block); once reading resumes every line arrives, in order."""
    progress = Path("/run") / f"ebpfdiag-pipeline-{os.getpid()}"
    probe = write(
        tmp_path,
        "import sys\n"
        "pad = 'x' * 1000\n"
        "for i in range(20000):\n"
        '    print(\'{"i":%d,"pad":"%s"}\' % (i, pad), flush=True)\n'
        "    if i % 100 == 0:\n"
        "        with open(sys.argv[1], 'w') as f:\n"
        "            f.write(str(i))\n",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "ebpfdiag", "run-script", str(probe), "-i", str(fleet.inventory),
         "--hosts", "h01", "--json", "--", str(progress)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        time.sleep(6)  # nobody reads: the controller's stdout pipe fills, then SSH, then host
        stalled_at = int(progress.read_text())
        time.sleep(1)
        assert int(progress.read_text()) == stalled_at, "the script kept writing"
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        progress.unlink(missing_ok=True)
    assert proc.returncode == 0
    # 20 MB in all; what is in flight (pipes, SSH window, socket buffers) is a few MB
    assert stalled_at < 10000, stalled_at
    seen = [rec["record"]["i"] for rec in by_host(out.decode())["h01"]]
    assert seen == list(range(20000))


@pytest.mark.root
def test_a_stop_mid_burst_loses_nothing_already_written(fleet, tmp_path):
    """The script ends by os._exit in its SIGTERM handler (no flushing at all): everything it
    wrote before is still on its way, and arrives."""
    probe = write(
        tmp_path,
        "import os, signal, sys\n"
        "n = 0\n"
        "def stop(*_):\n"
        "    os.write(2, b'printed %d\\n' % n)\n"
        "    os._exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "while True:\n"
        "    print('{\"i\":%d}' % n, flush=True)\n"
        "    n += 1\n",
    )
    r = run_json(fleet, probe, ",".join(HOSTS), "--duration", "2s")
    assert r.returncode == 0, r.stderr
    got = by_host(r.stdout)
    for host in HOSTS:
        said = [x["text"] for x in got[host] if x["type"] == "line" and x["stream"] == "stderr"]
        assert len(said) == 1 and said[0].startswith("printed "), said
        printed = int(said[0].split()[1])
        seen = [x["record"]["i"] for x in got[host] if x["type"] == "record"]
        assert printed > 1000, "the burst was not under way when the stop came"
        # the handler may run between a finished print and the count's increment
        assert len(seen) in (printed, printed + 1), (host, printed, len(seen))
        assert seen == list(range(len(seen))), host


@pytest.mark.root
def test_a_script_killed_by_sigterm_keeps_what_it_flushed(fleet, tmp_path):
    """No handler at all: SIGTERM's default action ends the script mid-stream."""
    probe = write(
        tmp_path,
        "import time\n"
        "print('before', flush=True)\n"
        "for i in range(5):\n"
        "    print('tick %d' % i, flush=True)\n"
        "time.sleep(600)\n",
    )
    r = run_json(fleet, probe, "h01", "--duration", "1s")
    assert r.returncode == 0, r.stderr
    texts = [x["text"] for x in by_host(r.stdout)["h01"] if x["stream"] == "stdout"]
    assert texts == ["before"] + [f"tick {i}" for i in range(5)]
    host = [json.loads(x) for x in r.stdout.splitlines() if '"type":"host"' in x][0]
    assert host["status"] == "ok" and host["exit_signal"] == "TERM"


@pytest.mark.root
def test_a_script_name_with_a_space_runs(fleet, tmp_path):
    probe = write(
        tmp_path,
        "import sys\nprint(sys.argv[0], __file__, sys.argv[1:], flush=True)\n",
        name="my probe.py",
    )
    r = run_json(fleet, probe, "h01", "--", "a b", "c")
    assert r.returncode == 0, r.stderr
    texts = [x["text"] for x in by_host(r.stdout)["h01"]]
    assert texts == ["my probe.py my probe.py ['a b', 'c']"]


@pytest.mark.root
def test_a_stock_bcc_tool_streams_its_events(fleet):
    """A BCC tool as Debian ships it (printb: a flush per event) streams while it runs."""
    tool = Path("/usr/sbin/tcpstates-bpfcc")
    require(tool.exists(), "needs bpfcc-tools")
    require(Path("/usr/lib/python3/dist-packages/bcc").is_dir(), "needs python3-bpfcc")
    build = Path(f"/lib/modules/{os.uname().release}/build")
    require(build.exists(), "needs kernel headers for BCC (ebpfdiag lab up --link-headers)")
    host = fleet.host("h02")
    proc = spawn("run-script", str(tool), "-i", str(fleet.inventory), "--hosts", "h02", "--json",
                 "--duration", "40s", "--", "-L", "22")  # fmt: skip
    out: queue.Queue[dict] = queue.Queue()
    threading.Thread(
        target=lambda: [out.put(json.loads(x)) for x in proc.stdout], daemon=True
    ).start()
    try:
        header = _next_stdout(out, 30)
        assert header is not None and header["text"].startswith("SKADDR"), header
        seen = False
        deadline = time.monotonic() + 15
        while not seen and time.monotonic() < deadline:
            with socket.create_connection((host.address, 22), timeout=2) as s:
                s.recv(64)  # the server's banner: the connection is established
            event = _next_stdout(out, 2)
            seen = event is not None and host.address in event["text"]
        assert seen, "no event line while the tool ran"
        assert proc.poll() is None, "the event must stream before the tool ends"
    finally:
        proc.terminate()
        proc.wait(30)


def _next_stdout(out: queue.Queue, seconds: float) -> dict | None:
    """The next line the script printed on stdout within ``seconds``, or None."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            rec = out.get(timeout=left)
        except queue.Empty:
            return None
        if rec.get("stream") == "stdout":
            return rec
    return None


# -- the controller's per-chunk JSON paths (pure) ------------------------------------------

MIXED = [
    b'{"type":"packet","seq":1,"nested":{"a":[1,2]}}',
    b'{"spaced": "yes"}  ',
    b'{"a":1} trailing',
    b'{"a":1},{"b":2}',
    b"[1,2,3]",
    b"",
    b'plain "quoted" \\ text \xc3\xa9 \xff',
    b"{broken",
    b'{"bad utf8 in a string":"\xff"}',
]


#: what each MIXED line must become: the object it holds, else its text (stated here, not
#: computed by the code under test)
MIXED_MEANING = [
    {"type": "packet", "seq": 1, "nested": {"a": [1, 2]}},
    {"spaced": "yes"},
    '{"a":1} trailing',
    '{"a":1},{"b":2}',
    "[1,2,3]",
    "",
    'plain "quoted" \\ text \u00e9 \ufffd',
    "{broken",
    {"bad utf8 in a string": "\ufffd"},  # invalid UTF-8 inside a string is shown replaced
]


def test_json_lines_match_the_line_by_line_meaning():
    cases = [
        (MIXED, MIXED_MEANING),
        ([MIXED[0]] * 3, [MIXED_MEANING[0]] * 3),
        ([MIXED[1]], [MIXED_MEANING[1]]),
        # every line an object, one with invalid UTF-8 in a string: the output stays UTF-8
        ([MIXED[0], MIXED[8]], [MIXED_MEANING[0], MIXED_MEANING[8]]),
        ([b'{"a":[{}', b'{}]},{"b":1}'], ['{"a":[{}', '{}]},{"b":1}']),
    ]
    for lines, meanings in cases:
        data = records.json_lines('web"01', 7, "stdout", lines)
        assert data.endswith(b"\n")
        out = [json.loads(x) for x in data.splitlines()]
        assert len(out) == len(lines)
        for rec, meaning in zip(out, meanings, strict=True):
            assert rec["host"] == 'web"01' and rec["ts"] == 7 and rec["v"] == 2
            if isinstance(meaning, dict):
                assert rec["type"] == "record" and rec["record"] == meaning
            else:
                assert rec["type"] == "line" and rec["stream"] == "stdout"
                assert rec["text"] == meaning
    err = [json.loads(x) for x in records.json_lines("h", 1, "stderr", [MIXED[0]]).splitlines()]
    assert err[0]["type"] == "line" and err[0]["stream"] == "stderr"


def test_lines_that_only_parse_together_are_not_objects():
    # joined they make a valid array of two objects; neither line is one on its own
    split = [b'{"a":[{}', b'{}]},{"b":1}']
    assert not records.all_objects(split)
    assert records.decode_objects(split) == [None, None]
    assert not records.all_objects([b'{"a":1},{"b":2}'])
    assert records.all_objects([b'{"a":1}', b'{"b":{"c":[{}]}}'])


def test_decode_objects_per_chunk_and_per_line():
    assert records.decode_objects([b'{"a":1}', b'{"b":[2]}']) == [{"a": 1}, {"b": [2]}]
    assert records.decode_objects([b'{"a":1}', b"text", b"[1]", b'{"c":3} ']) == [
        {"a": 1},
        None,
        None,
        {"c": 3},
    ]
    assert records.decode_objects([]) == []


def test_the_frame_header_keeps_a_name_with_spaces_on_one_line():
    head = Script("my\nprobe x.py", b"pass").frame().split(b"\n", 1)[0].decode()
    tag, length, _digest, name = head.split(" ", 3)
    assert (tag, length, name) == ("EBPFDIAG1", "4", "my probe x.py")


# -- the benchmark's decode-cost measurement (pure) ----------------------------------------


def test_the_decode_benchmark_rebuilds_each_hosts_stream_as_printed():
    from bench.pipeline import _chunks, host_streams

    printed = {"type": "packet", "ts_ns": 5, "seq": 1, "saddr": "198.18.1.10"}
    event = {"v": 2, "type": "event", "kind": "packet", "host": "lb", "ts": 9,
             "clock_error_ns": 3, "ts_clamped_ns": 1, **{k: v for k, v in printed.items()
                                                       if k != "type"}}  # fmt: skip
    other = {**event, "host": "client", "kind": "reset", "seq": 2}
    streams = host_streams([json.dumps(e).encode() for e in (event, other, event)])
    assert {h: [json.loads(x) for x in lines] for h, lines in streams.items()} == {
        "lb": [printed, printed],
        "client": [{**printed, "type": "reset", "seq": 2}],
    }
    lines = [b"x" * n for n in (10, 20, 30, 5, 100, 1)]
    chunks = _chunks(lines, 40)
    assert [line for c in chunks for line in c] == lines
    assert all(sum(len(x) + 1 for x in c) <= 40 or len(c) == 1 for c in chunks)
    assert chunks == [[lines[0], lines[1]], [lines[2], lines[3]], [lines[4]], [lines[5]]]
