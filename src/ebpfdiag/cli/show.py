"""``ebpfdiag show``: render and re-analyse a saved trace without the hosts.

Reads what ``trace tcp-rst``, ``trace latency`` or ``trace drop --output FILE`` wrote, or
a ``--json`` stream of one of them saved with ``> FILE``, rebuilds each host's part (hello, SSH
clock estimate, outcome) and its raw records, correlates them again (with the question the
trace asked) and renders them like the live command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ebpfdiag.cli.app import App, json_option, pass_app
from ebpfdiag.errors import UsageError

if TYPE_CHECKING:
    from ebpfdiag.tracing import HostTrace, TraceResult

#: Host records the correlation reads (``event`` records of a saved stream are turned back
#: into these): tcp_rst's, and tcp_latency's own.
_RAW = ("packet", "reset", "lost", "counts", "tcp_probe", "recv", "retrans")
#: Records only ``trace latency`` writes: a saved stream with one of them is a latency trace.
_LATENCY = ("segment", "verdict", "sampling", "clock_pair")
#: The drop tracer's host records, read only as ``event``s: a ``--json`` stream of ``trace
#: drop`` also has controller records named ``drop`` and ``netstat``.
_DROP_RAW = ("drop", "drop_counts", "netstat")

EXAMPLES = """
\b
Examples:
  ebpfdiag trace tcp-rst --hosts client,lb,server --duration 1m --output rst.json
  ebpfdiag show rst.json
  ebpfdiag trace tcp-rst --hosts client,lb,server --duration 1m --json > rst.ndjson
  ebpfdiag show rst.ndjson --json | jq -r 'select(.type=="flow") | .verdict.text'
"""


@click.command(epilog=EXAMPLES)
@click.argument("file", type=click.Path(path_type=Path))
@json_option
@pass_app
def show(app: App, file: Path) -> int:
    """Render a saved trace again: correlate its records and show the timelines and verdicts.

    FILE is a document written by 'trace tcp-rst --output FILE' (or 'trace latency',
    'trace drop'), or the NDJSON of one of them saved from --json. Nothing is contacted.
    """
    from ebpfdiag.cli.trace import (
        DROP_TOTALS,
        drop_kept,
        emit_drop,
        emit_latency,
        emit_result,
        source_records,
    )
    from ebpfdiag.questions.drop import DropResult
    from ebpfdiag.questions.latency import Latency
    from ebpfdiag.render.timeline import event_record

    result, events = load_trace(file)
    if isinstance(result.correlation, DropResult):
        if app.as_json:
            for rec in events:
                if rec["type"] not in ("lost", *DROP_TOTALS):
                    app.json.write(event_record(rec))
        emit_drop(app, result, source_records(result), drop_kept(events))
        return 0
    if app.as_json:
        for rec in events:
            app.json.write(event_record(rec))
    if isinstance(result.correlation, Latency):
        emit_latency(app, result, source_records(result))
    else:
        emit_result(app, result, source_records(result))
    return 0


def read_records(path: Path) -> list[dict]:
    """A saved document or NDJSON stream as a flat list of records; anything else is a
    one-line usage error naming the file (and line)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not a text file"
        raise UsageError(f"cannot read {path}: {reason}") from None
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and doc.get("type") == "trace":
        try:
            return [
                *doc.get("latency", [])[:1],  # says which question it answered
                *doc.get("hellos", []),
                *doc.get("clocks", []),
                *doc["hosts"],
                *doc["events"],
                doc["summary"],
            ]
        except (KeyError, TypeError):
            raise UsageError(f"{path}: a trace document without hosts/events/summary") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            raise UsageError(f"{path}:{number}: not a trace record (expected one JSON object)")
        records.append(rec)
    return records


def load_trace(path: Path) -> tuple[TraceResult, list[dict]]:
    """The saved trace as the live command had it at the end, and its raw records."""
    from ebpfdiag.clock import ClockEstimate
    from ebpfdiag.fanout import HostResult
    from ebpfdiag.questions import drop, latency, rst
    from ebpfdiag.tracing import HostTrace, TraceResult

    hosts: dict[str, HostTrace] = {}
    events: list[dict] = []
    clocks: dict[str, ClockEstimate] = {}
    models: dict[str, dict] = {}
    tightened: dict[str, ClockEstimate] = {}
    listed: list[str] = []
    interrupted, duration_s = False, 0.0
    question = rst.correlate

    def host_of(rec: dict[str, Any]) -> HostTrace:
        name = rec.get("host")
        if not isinstance(name, str):
            raise UsageError(f"{path}: a '{rec.get('type')}' record without its host")
        return hosts.setdefault(name, HostTrace(name))

    for rec in read_records(path):
        rec.pop("v", None)
        kind = rec.get("type")
        raw = kind == "event"
        if raw:
            kind = rec.pop("kind", None)
            rec["type"] = kind
        try:
            if kind in _RAW or (raw and kind in _DROP_RAW):
                host_of(rec)
                events.append(rec)
            elif kind == "hello":
                host_of(rec).hello = rec
                if rec.get("script") == "tcp_latency":
                    question = latency.correlate
                elif rec.get("script") == "drop":
                    question = drop.correlate
            elif kind == "clock":
                clocks[host_of(rec).name] = ClockEstimate(
                    int(rec["offset_ns"]), int(rec["error_ns"])
                )
                if isinstance(rec.get("model"), dict):
                    models[rec["host"]] = rec["model"]
            elif kind == "host":
                ht = host_of(rec)
                listed.append(ht.name)
                ht.ready = bool(rec.get("ready"))
                ht.lost = int(rec.get("lost") or 0)
                ht.bye = {"reason": rec["bye"]} if rec.get("bye") else None
                if rec.get("status") not in (None, "unknown"):
                    ht.result = HostResult(
                        ht.name,
                        rec["status"],
                        exit_code=rec.get("exit_code"),
                        exit_signal=rec.get("exit_signal"),
                        error=rec.get("error"),
                        error_kind=rec.get("error_kind"),
                        duration_s=float(rec.get("duration_s") or 0.0),
                    )
                if rec.get("clock"):
                    est = rec["clock"]
                    tightened[ht.name] = ClockEstimate(int(est["offset_ns"]), int(est["error_ns"]))
            elif kind in _LATENCY:
                question = latency.correlate
            elif kind == "summary":
                interrupted = bool(rec.get("interrupted"))
                duration_s = float(rec.get("duration_s") or 0.0)
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{path}: a malformed '{kind}' record") from None
    if not events and not hosts:
        raise UsageError(f"{path}: not a saved trace (no packet, reset or host records)")
    # Hosts in the order the live command listed them (a stream has its events first).
    hosts = {name: hosts[name] for name in [*listed, *hosts] if name in hosts}
    # Streams saved before clock records existed carry only the tightened estimates.
    for name, est in tightened.items():
        clocks.setdefault(name, est)
    hellos = {name: ht.hello for name, ht in hosts.items() if ht.hello}
    if question is drop.correlate:
        correlation = drop.correlate(events, clocks, hellos=hellos, hosts=list(hosts))
    else:
        correlation = question(events, clocks, hellos=hellos)
    summaries = {
        name: models.get(name)
        or {"summary": {"offset_ns": est.offset_ns, "error_ns": est.error_ns}}
        for name, est in clocks.items()
    }
    return TraceResult(hosts, correlation, interrupted, duration_s, None, summaries), events
