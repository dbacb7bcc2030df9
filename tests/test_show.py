"""``ebpfdiag show``: a saved trace renders and re-analyses without the hosts.

The saved files are made by the live command's own end-of-run code from lab recordings:
each recorded host stream is fed to a ``TraceSession`` as the hosts' stdout lines.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ebpfdiag.cli.app import App
from ebpfdiag.cli.trace import conclude
from ebpfdiag.clock import ClockSample
from ebpfdiag.fanout import HostResult
from ebpfdiag.render.timeline import event_record
from ebpfdiag.tracing import TraceSession

STREAMS = Path(__file__).parent / "fixtures" / "streams"
EXPECTED = {
    "rst-no-listener": "RST sent by server (TCP stack, reason NO_SOCKET",
    "rst-abort": "RST sent by server (TCP stack, reason TCP_STATE",
    "rst-lb-reject": "RST sent by lb (not its TCP stack",
}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ebpfdiag", *args], capture_output=True, text=True, timeout=60
    )


def ndjson(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def replay(name: str, on_event=lambda rec: None) -> TraceSession:
    """A finished live session that saw the recorded scenario ``name``."""
    recs = ndjson((STREAMS / f"lab-{name}.ndjson").read_text())
    names = [r["host"] for r in recs if r["type"] == "clock"]
    session = TraceSession(names, on_event=on_event)
    for host in names:
        attach = {p: {"kind": "tracepoint"} for p in ("tcp_send_reset", "tcp_receive_reset")}
        hello = {"type": "hello", "kernel": "6.18.0", "attach": attach, "missing": []}
        session.lines(host, "stdout", [json.dumps({**hello, "interfaces": ["eth0"]}).encode()])
        session.lines(host, "stdout", [b'{"type":"ready"}'])
    first = {}
    for r in recs:
        if r["type"] in ("packet", "reset"):
            first.setdefault(r["host"], r["ts_ns"])
    for r in recs:
        if r["type"] == "clock":  # one ping whose round trip gives the recorded estimate
            at, off, err = first.get(r["host"], 0), r["offset_ns"], r["error_ns"]
            session.hosts[r["host"]].clock.add(ClockSample(at + off - err, at, at + off + err))
    for r in recs:
        if r["type"] in ("packet", "reset"):
            host = r["host"]
            line = {k: v for k, v in r.items() if k not in ("host", "ts")}
            session.lines(host, "stdout", [json.dumps(line).encode()])
    session.lines("lb", "stdout", [b'{"type":"lost","source":"packets","count":2}'])
    for host in names:
        session.result(HostResult(host, "ok", exit_code=0))
    return session


def live(name: str, tmp_path: Path) -> tuple[list[dict], Path, Path]:
    """The live ``--json`` stream of a replayed run, and where its document and stream were
    saved (``--output`` and ``> FILE``)."""
    out = io.StringIO()
    app = App(stdout=out, stderr=io.StringIO())
    app.as_json = True
    # events go out as the session releases them, as in the live command
    session = replay(name, on_event=lambda e: app.json.write(event_record(e)))
    doc = tmp_path / "trace.json"
    assert conclude(app, session, False, doc) == 0
    app.json.flush()
    stream = tmp_path / "trace.ndjson"
    stream.write_text(out.getvalue())
    return ndjson(out.getvalue()), doc, stream


def by_type(recs: list[dict], kind: str) -> list[dict]:
    return [r for r in recs if r["type"] == kind]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_saved_document_and_stream_give_the_live_answer(name, tmp_path):
    stream_recs, doc, stream = live(name, tmp_path)
    saved = json.loads(doc.read_text())
    assert saved["type"] == "trace" and saved["v"] == 2
    # the document holds the records of the --json stream, as they are
    assert saved["summary"] == by_type(stream_recs, "summary")[0]
    assert saved["flows"] == by_type(stream_recs, "flow") and saved["flows"]
    assert saved["hosts"] == by_type(stream_recs, "host")
    assert {c["host"] for c in saved["clocks"]} == {"client", "lb", "server"}
    assert {h["host"] for h in saved["hellos"]} == {"client", "lb", "server"}
    assert {e["kind"] for e in saved["events"]} >= {"packet", "reset"}
    assert all("host" in e for e in saved["events"])
    assert all("ts_ns" in e for e in saved["events"] if e["kind"] in ("packet", "reset"))
    # host and summary records have the shape they have in run-script and doctor
    assert {"hosts", "ok", "failed", "failed_hosts", "interrupted", "duration_s"} <= set(
        saved["summary"]
    )
    assert saved["summary"]["failed_hosts"] == [] and saved["summary"]["ok"] == 3
    assert all(h["exit_code"] == 0 and "duration_s" in h for h in saved["hosts"])
    for path in (doc, stream):
        r = cli("show", str(path), "--json")
        assert r.returncode == 0, r.stderr
        shown = ndjson(r.stdout)
        for kind in ("flow", "host", "warning", "summary", "clock", "hello", "event"):
            live_recs = by_type(stream_recs, kind)
            assert live_recs and by_type(shown, kind) == live_recs, (path.name, kind)
        assert all(x["v"] == 2 for x in shown)
        assert by_type(shown, "warning")[0]["kind"] == "lost"
        r = cli("show", str(path))
        assert r.returncode == 0, r.stderr
        assert EXPECTED[name] in " ".join(r.stdout.split()), r.stdout


def test_a_shown_stream_can_be_shown_again(tmp_path):
    _recs, doc, _stream = live("rst-abort", tmp_path)
    again = tmp_path / "again.ndjson"
    again.write_text(cli("show", str(doc), "--json").stdout)
    first = ndjson(cli("show", str(doc), "--json").stdout)
    second = ndjson(cli("show", str(again), "--json").stdout)
    assert by_type(second, "flow") == by_type(first, "flow") and by_type(first, "flow")


def test_recorded_lab_stream_shows_its_verdict():
    r = cli("show", str(STREAMS / "lab-rst-no-listener.ndjson"))
    assert r.returncode == 0, r.stderr
    assert EXPECTED["rst-no-listener"] in " ".join(r.stdout.split())


def assert_one_line_usage_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ebpfdiag: "), r.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    assert r.stdout == ""


def test_bad_files_are_one_line_usage_errors(tmp_path):
    assert_one_line_usage_error(cli("show", str(tmp_path / "none.json")), "none.json")
    text = tmp_path / "notes.txt"
    text.write_text('{"type":"packet","host":"a"}\nnot json\n')
    assert_one_line_usage_error(cli("show", str(text)), "notes.txt:2")
    other = tmp_path / "run.ndjson"
    other.write_text('{"type":"line","host":"a","text":"hi"}\n{"type":"summary","hosts":1}\n')
    assert_one_line_usage_error(cli("show", str(other)), "run.ndjson", "not a saved trace")
    doc = tmp_path / "doc.json"
    doc.write_text('{"type": "trace", "flows": []}')
    assert_one_line_usage_error(cli("show", str(doc)), "doc.json")
    assert_one_line_usage_error(cli("show", str(tmp_path)), str(tmp_path))


def test_output_that_fails_at_the_end_exits_1(tmp_path):
    err = io.StringIO()
    app = App(stdout=io.StringIO(), stderr=err)
    app.as_json = True
    gone = tmp_path / "gone"
    assert conclude(app, replay("rst-abort"), False, gone / "trace.json") == 1
    assert err.getvalue().startswith(f"ebpfdiag: cannot write {gone / 'trace.json'}")
    assert conclude(app, replay("rst-abort"), False, None) == 0
