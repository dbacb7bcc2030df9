"""Terminal and JSON views of a trace: live reset lines, per-flow timelines, summaries.

Records are built once (``trace_records``) and either written as NDJSON or drawn here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ebpfdiag.render.terminal import host_colour
from ebpfdiag.trace.flows import Flow, Hop, NatMapping
from ebpfdiag.trace.sightings import flag_names
from ebpfdiag.tracing import RST, HostTrace, TraceResult


def _tuple(rec: dict) -> str:
    src = f"{rec.get('saddr') or '?'}:{rec.get('sport')}"
    return f"{src} > {rec.get('daddr') or '?'}:{rec.get('dport')}"


def live_line(rec: dict, t0_ns: int | None) -> Text:
    """One line for a reset as it happens (RST packets and reset tracepoint hits)."""
    rel = ""
    if t0_ns is not None and rec.get("ts"):
        rel = f"+{(rec['ts'] - t0_ns) / 1e6:10.3f} ms "
    line = Text(rel, style="dim")
    line.append(f"{rec['host']:<8} ", style=host_colour(rec["host"]))
    if rec["type"] == "packet":
        line.append(f"{rec.get('ifname', '?')} {rec.get('dir', '?'):<7} ")
        line.append(f"{flag_names(rec.get('flags', 0)):<8}", style="bold red")
        line.append(_tuple(rec))
    else:
        line.append(f"{rec.get('probe', 'reset')} ", style="bold")
        line.append(_tuple(rec) + " ")
        line.append(f"reason={rec.get('reason') or '-'} state={rec.get('state') or '-'}")
    return line


def event_record(rec: dict) -> dict:
    """A host's packet/reset record as the controller's ``event`` record."""
    return {**rec, "type": "event", "kind": rec["type"]}


def host_record(ht: HostTrace, clock: dict | None) -> dict:
    hello = ht.hello or {}
    r = ht.result
    return {
        "type": "host",
        "host": ht.name,
        "status": r.status if r else "unknown",
        "error_kind": r.error_kind if r else None,
        "error": r.error if r else None,
        "kernel": hello.get("kernel"),
        "attach": hello.get("attach"),
        "missing": hello.get("missing", []),
        "interfaces": hello.get("interfaces", []),
        "ready": ht.ready,
        "lost": ht.lost,
        "bye": (ht.bye or {}).get("reason"),
        "clock": clock,
    }


def trace_records(result: TraceResult) -> Iterator[dict]:
    """Everything after the live events: hosts, warnings, flows, then the summary."""
    clocks = result.correlation.clocks
    flagged = set(getattr(clocks, "flagged", []))
    for name, ht in result.hosts.items():
        est = clocks.get(name)
        clock = (
            {
                "offset_ns": est.offset_ns,
                "error_ns": est.error_ns,
                "flagged": name in flagged,
                "model": result.clocks.get(name),
            }
            if est
            else None
        )
        yield host_record(ht, clock)
    for rec in result.correlation.records():
        if rec["type"] == "summary":
            failed = [n for n, h in result.hosts.items() if not (h.result and h.result.ok)]
            rec = {
                **rec,
                "hosts": len(result.hosts),
                "failed_hosts": failed,
                "interrupted": result.interrupted,
                "duration_s": round(result.duration_s, 3),
            }
        yield rec


def _hop_row(ev, start: int) -> list:
    rel = f"{(ev.ts - start) / 1e6:9.3f}"
    host = Text(ev.host, style=host_colour(ev.host))
    if isinstance(ev, Hop):
        flags = Text(flag_names(ev.flags), style="bold red" if ev.flags & RST else "")
        note = []
        if ev.nat:
            note.append("after NAT")
        if ev.hop_ns is not None:
            note.append(f"hop {ev.hop_ns / 1e6:.3f} ms")
        if ev.why == "history":
            note.append("before RST")
        elif ev.why == "kept":
            note.append("kept until the trace ended")
        return [
            rel,
            host,
            f"{ev.ifname} {ev.dir}",
            f"{ev.saddr}:{ev.sport} > {ev.daddr}:{ev.dport}",
            flags,
            f"seq={ev.seq} ack={ev.ack} len={ev.len}",
            ", ".join(note),
        ]
    return [
        rel,
        host,
        Text(ev.probe, style="bold"),
        f"{ev.saddr or '?'}:{ev.sport} > {ev.daddr or '?'}:{ev.dport}",
        "",
        f"reason={ev.reason or '-'} state={ev.state or '-'}",
        f"{ev.comm or ''}",
    ]


def nat_line(m: NatMapping) -> str:
    """One translating host as a user thinks of it: what came in, what went out."""
    before = f"{m.from_host} " if m.from_host and m.from_host != m.host else ""
    before += m.before.text()
    if m.host is not None:
        return f"  {before}  =>  {m.host} {m.after.text()}"
    after = f"{m.to_host} {m.after.text()}" if m.to_host else m.after.text()
    return (
        f"  {before}  =>  {after}  (the tuples differ between {m.from_host or '?'} and "
        f"{m.to_host or '?'}: the host translating them is not traced)"
    )


def render_flow(flow: Flow, console: Console) -> None:
    table = Table(show_edge=False, pad_edge=False, title_justify="left")
    for col in ("ms", "host", "where", "addresses", "flags", "tcp", "note"):
        table.add_column(col, overflow="fold")
    start = flow.start_ts
    for ev in flow.events:
        table.add_row(*_hop_row(ev, start))
    first = flow.endpoints[0] if flow.endpoints else None
    title = f"flow {flow.id}"
    if first:
        title += f": {first.saddr}:{first.sport} -> {first.daddr}:{first.dport} at {first.host}"
    console.print(Text(title, style="bold"))
    for m in flow.nat:
        console.print(nat_line(m), markup=False, highlight=False)
    console.print(table)
    if flow.verdict:
        console.print(Text(flow.verdict.text, style="bold yellow"), soft_wrap=True)
    for w in flow.warnings:
        console.print(Text(f"warning: {w.message}", style="red"), soft_wrap=True)
    console.print()


def render_result(result: TraceResult, console: Console, err: Console) -> None:
    for w in result.correlation.warnings:
        err.print(Text(f"warning: {w.message}", style="red"), soft_wrap=True)
    for flow in result.correlation.flows:
        render_flow(flow, console)
    summary = result.correlation.summary()
    if summary.resets:
        table = Table(title="resets by origin", show_edge=False, pad_edge=False)
        for col in ("origin host", "origin", "reason", "flows"):
            table.add_column(col)
        for r in summary.resets:
            table.add_row(r.origin_host or "?", r.origin_kind, r.reason or "-", str(r.count))
        console.print(table)
    else:
        console.print("no reset flows seen", style="green")
    print_clock_bounds(result.correlation.clocks, err)


def print_clock_bounds(clocks: Mapping[str, Any], err: Console) -> None:
    """``clock error bounds: a 0.01 ms, b 7.00 ms (uncertain)`` on ``err``, if any."""
    flagged = set(getattr(clocks, "flagged", []))
    parts = []
    for name, est in clocks.items():
        mark = " (uncertain)" if name in flagged else ""
        parts.append(f"{name} {est.error_ns / 1e6:.2f} ms{mark}")
    if parts:
        err.print("clock error bounds: " + ", ".join(parts), markup=False, highlight=False)
