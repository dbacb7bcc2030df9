"""``trace latency`` on the command line: help, bad input, and the end of a run (the live
session fed a synthetic 3-host tcp_latency stream) saved and shown again."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from bench.latency import simple_stream
from ebpfdiag.cli.app import App
from ebpfdiag.cli.trace import LATENCY_KEEP, conclude_latency
from ebpfdiag.clock import ClockSample
from ebpfdiag.fanout import HostResult
from ebpfdiag.questions.latency import correlate
from ebpfdiag.render.timeline import event_record
from ebpfdiag.tracing import TraceSession

MS = 1_000_000


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ebpfdiag", *args], capture_output=True, text=True, timeout=60
    )


def test_help_has_examples():
    r = cli("trace", "latency", "--help")
    assert r.returncode == 0, r.stderr
    assert "Examples:" in r.stdout and "ebpfdiag trace latency --hosts" in r.stdout
    for option in ("--sample", "--slowest", "--port", "--duration", "--output", "--pcap"):
        assert option in r.stdout


def test_help_states_the_tools_default_sampling():
    """--help says the default the remote tool applies (the CLI passes none of its own)."""
    from ebpfdiag.catalog import script_path
    from ebpfdiag.remote.schema import load_params

    params = {p["name"]: p for p in load_params(script_path("tcp_latency"))}
    n, shift = params["sample"]["default"], params["block-shift"]["default"]
    text = " ".join(cli("trace", "latency", "--help").stdout.split())
    assert f"Keep 1 sequence block ({(1 << shift) // 1024} KiB) in N" in text
    assert (
        f"Default {n}: a small request/response connection is followed whole 1 time in {n}" in text
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--sample", "0"], "--sample"),
        (["--slowest", "-1"], "--slowest"),
        (["--duration", "soon"], "--duration"),
    ],  # fmt: skip
)
def test_bad_input_is_one_line_exit_2(args, needle):
    r = cli("trace", "latency", "--hosts", "198.18.250.1", *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ebpfdiag: ") and needle in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


def _session(records: list[dict], on_event=lambda rec: None) -> TraceSession:
    """A finished live session whose hosts printed ``records`` (one clock ping each, its
    bounds +-60 ms around the stream's base, knowing nothing of the hosts' offsets)."""
    names = ["client", "lb", "server"]
    session = TraceSession(
        names, on_event=on_event, correlate=lambda *a, **kw: correlate(*a, slowest=2, **kw),
        keep=LATENCY_KEEP,
    )  # fmt: skip
    for host in names:
        hello = {"type": "hello", "script": "tcp_latency", "kernel": "6.18.0",
                 "interfaces": ["eth0"], "attach": {}, "missing": [],
                 "sample": {"n": 1, "block": 1024}}  # fmt: skip
        session.lines(host, "stdout", [json.dumps(hello).encode(), b'{"type":"ready"}'])
        first = min(r["ts_ns"] for r in records if r["host"] == host)
        base = 1_795_000_000_000_000_000
        session.hosts[host].clock.add(ClockSample(first + base - 60 * MS, first,
                                                  first + base + 60 * MS))  # fmt: skip
    for r in records:
        line = {k: v for k, v in r.items() if k != "host"}
        session.lines(r["host"], "stdout", [json.dumps(line).encode()])
    for host in names:
        session.result(HostResult(host, "ok", exit_code=0))
    return session


def test_saved_latency_trace_shows_the_same_answer(tmp_path):
    stream = simple_stream(12, 20 * MS, offsets={"lb": 1_795_000_000_000_000_000 + 7 * MS})
    out = io.StringIO()
    app = App(stdout=out, stderr=io.StringIO())
    app.as_json = True
    session = _session(stream.records, on_event=lambda e: app.json.write(event_record(e)))
    doc = tmp_path / "latency.json"
    assert conclude_latency(app, session, False, doc) == 0
    app.json.flush()
    recs = [json.loads(line) for line in out.getvalue().splitlines()]
    kinds = {r["type"] for r in recs}
    assert {"segment", "exchange", "sampling", "clock_pair", "verdict", "summary"} <= kinds
    assert all("host" in r for r in recs if r["type"] in ("sampling", "host", "event"))
    # the tool's counts came through the session to the question
    assert [r["seen"] for r in recs if r["type"] == "sampling"] == [100, 100, 100]
    (verdict,) = [r for r in recs if r["type"] == "verdict"]
    assert verdict["culprit"] == "server" and verdict["text"].startswith("client->server")
    summary = recs[-1]
    assert summary["type"] == "summary" and summary["exchanges"] == 12
    assert {"hosts", "ok", "failed", "failed_hosts", "interrupted"} <= set(summary)
    saved = json.loads(doc.read_text())
    assert saved["question"] == "latency" and saved["summary"]["exchanges"] == 12
    ndjson = tmp_path / "latency.ndjson"
    ndjson.write_text(out.getvalue())
    for path in (doc, ndjson):
        r = cli("show", str(path), "--json")
        assert r.returncode == 0, r.stderr
        shown = [json.loads(line) for line in r.stdout.splitlines()]
        assert [x for x in shown if x["type"] == "verdict"] == [{"v": 2, **verdict}]
        r = cli("show", str(path))
        assert r.returncode == 0, r.stderr
        assert "most of it (99%) is server" in r.stdout and "slowest exchange 1" in r.stdout


def test_pcap_holds_every_sampled_packet(tmp_path):
    """--pcap on trace latency: one pcapng packet per packet record of every host."""
    stream = simple_stream(4, 20 * MS)
    app = App(stdout=io.StringIO(), stderr=io.StringIO())
    app.as_json = True
    session = _session(stream.records)
    pcap = tmp_path / "latency.pcapng"
    assert conclude_latency(app, session, False, None, pcap) == 0
    data = pcap.read_bytes()
    assert data[:4] == bytes.fromhex("0a0d0d0a")  # section header block
    packets = sum(1 for r in stream.records if r["type"] == "packet")
    assert packets > 0 and data.count(b"hook=") == packets
