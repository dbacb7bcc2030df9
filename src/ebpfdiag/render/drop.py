"""Terminal view of ``trace drop``: live drop lines, the counts by host/reason/location,
the kernel counters next to them, then the timelines of the flows with a drop.

Everything is drawn from the records ``questions.drop`` built once; ``--json`` writes the
same objects' records instead (``render.timeline.trace_records``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ebpfdiag.questions.drop import (
    DropEvent,
    DropResult,
    FlowDrops,
    Retransmission,
    function_of,
    span_words,
)
from ebpfdiag.render.terminal import host_colour
from ebpfdiag.render.timeline import nat_line, print_clock_bounds
from ebpfdiag.trace.flows import Flow, Hop
from ebpfdiag.trace.sightings import DROP, flag_names


def _addresses(rec: Mapping[str, Any]) -> str:
    src = f"{rec.get('saddr') or '?'}:{rec.get('sport')}"
    return f"{src} > {rec.get('daddr') or '?'}:{rec.get('dport')}"


def live_line(rec: Mapping[str, Any], t0_ns: int | None) -> Text:
    """One line for a drop or a retransmission as it happens."""
    rel = ""
    if t0_ns is not None and rec.get("ts"):
        rel = f"+{(rec['ts'] - t0_ns) / 1e6:10.3f} ms "
    line = Text(rel, style="dim")
    line.append(f"{rec['host']:<8} ", style=host_colour(rec["host"]))
    if rec["type"] == "drop":
        line.append("drop ", style="bold red")
        line.append(f"{rec.get('reason') or '?'} ", style="bold")
        line.append(f"{rec.get('location') or '-'} ")
        if rec.get("flags") is not None:
            line.append(f"{flag_names(rec['flags'])} ")
        line.append(_addresses(rec))
    else:
        line.append(f"{rec.get('probe') or 'retrans'} ", style="bold yellow")
        line.append(f"{rec.get('state') or '-'} ")
        line.append(_addresses(rec))
    return line


def counts_table(result: DropResult, console: Console) -> None:
    """Drops by host x reason x location, from each host's last ``drop_counts``."""
    rows = result.counts
    if not rows:
        unknown = [h.host for h in result.hosts.values() if h.gaps()]
        if unknown:
            console.print(
                "no drops counted by the hosts that reported; unknown on "
                f"{', '.join(unknown)} (see missing evidence)",
                style="yellow", markup=False, highlight=False, soft_wrap=True,
            )  # fmt: skip
        else:
            console.print("no drops counted on any host", style="green")
    else:
        table = Table(title="drops by host, reason, location", show_edge=False, pad_edge=False)
        for col in ("host", "reason", "location", "drops", "traced"):
            table.add_column(col, overflow="fold")
        for c in rows:
            table.add_row(
                Text(c.host, style=host_colour(c.host)),
                Text(c.label, style="" if c.reason else "yellow"),
                c.location or "-",
                str(c.count),
                Text(str(c.matched), style="bold red" if c.matched else ""),
            )
        console.print(table)
    for h in result.hosts.values():
        if h.suppressed:
            rate = (h.rate or {}).get("events_per_s")
            limit = f" (limit {rate}/s)" if rate else ""
            console.print(
                f"{h.host}: {h.suppressed} drops of the traced traffic not sent as events"
                f"{limit}: counted above, missing from the timelines",
                style="yellow", markup=False, highlight=False, soft_wrap=True,
            )  # fmt: skip


def counters_table(result: DropResult, console: Console) -> None:
    """Per host: netstat drop counters that grew (drops the kernel counts but does not
    free with a reason) and retransmissions."""
    table = Table(title="kernel counters (deltas)", show_edge=False, pad_edge=False)
    for col in ("host", "drops counted, no reason", "retransmissions"):
        table.add_column(col, overflow="fold")
    for h in result.hosts.values():
        # without a netstat record, "-" would say that its counters did not grow
        none = "unknown (no netstat)" if h.netstat_final is None else "-"
        drops = ", ".join(f"{k} +{v}" for k, v in h.kernel_drops.items()) or none
        retrans = [f"{h.retrans} traced ({h.syn_retrans} SYN)"] if h.retrans else []
        retrans += [
            f"{k} +{h.netstat[k]}" for k in ("TCPSynRetrans", "RetransSegs") if h.netstat.get(k)
        ]
        style = "bold red" if h.kernel_drops else "yellow" if h.netstat_final is None else ""
        table.add_row(
            Text(h.host, style=host_colour(h.host)),
            Text(drops, style=style),
            Text(", ".join(retrans) or none, style="yellow" if none != "-" and not retrans else ""),
        )
    console.print(table)


def _hop_row(hop: Hop, start: int, drop: DropEvent | None, prev: Hop | None) -> list:
    note = []
    if drop is not None:
        note.append(f"{drop.label} at {drop.location or '?'}")
    if hop.nat:
        note.append("after NAT")
    if hop.hop_ns is not None:
        if prev is None:
            note.append(f"hop {hop.hop_ns / 1e6:.3f} ms")
        else:
            note.append(
                f"hop {span_words(hop.hop_ns, hop.host, hop.err_ns, prev.host, prev.err_ns)}"
            )
    dropped = hop.dir == DROP
    return [
        f"{(hop.ts - start) / 1e6:9.3f}",
        Text(hop.host, style=host_colour(hop.host)),
        Text(
            f"{hop.ifname} {'dropped' if dropped else hop.dir}", style="bold red" if dropped else ""
        ),
        f"{hop.saddr}:{hop.sport} > {hop.daddr}:{hop.dport}",
        flag_names(hop.flags),
        f"seq={hop.seq} ack={hop.ack} len={hop.len}",
        Text(", ".join(note), style="bold red" if dropped else ""),
    ]


def _retrans_row(x: Retransmission, start: int) -> list:
    return [
        f"{(x.ts - start) / 1e6:9.3f}",
        Text(x.host, style=host_colour(x.host)),
        Text(x.probe or "retransmit", style="bold yellow"),
        f"{x.saddr}:{x.sport} > {x.daddr}:{x.dport}",
        "",
        f"state {x.state or '-'}",
        "retransmission",
    ]


def _previous_hops(flow: Flow) -> dict[int, Hop]:
    """id(hop) -> the sighting its ``hop_ns`` is counted from (same packet, earlier)."""
    out: dict[int, Hop] = {}
    for path in flow.paths:
        for pos, hop in enumerate(path):
            if hop.hop_ns is None:
                continue
            since = hop.ts - hop.hop_ns
            prev = next((p for p in reversed(path[:pos]) if p.ts == since), None)
            if prev is not None:
                out[id(hop)] = prev
    return out


def render_flow(flow: Flow, console: Console) -> None:
    """A flow's timeline (as tcp-rst draws it), its drops named with reason and location
    and its retransmissions in time order."""
    verdict = flow.verdict
    drops = verdict.drops if isinstance(verdict, FlowDrops) else []
    by_key = {(d.host, d.ts_ns): d for d in drops}
    retrans = sorted((x for d in drops for x in d.retrans), key=lambda x: x.ts)
    table = Table(show_edge=False, pad_edge=False)
    for col in ("ms", "host", "where", "addresses", "flags", "tcp", "note"):
        table.add_column(col, overflow="fold")
    start = flow.start_ts
    previous = _previous_hops(flow)
    for ev in flow.events:
        if not isinstance(ev, Hop):
            continue
        while retrans and retrans[0].ts < ev.ts:
            table.add_row(*_retrans_row(retrans.pop(0), start))
        drop = by_key.get((ev.host, ev.ts_ns)) if ev.dir == DROP else None
        table.add_row(*_hop_row(ev, start, drop, previous.get(id(ev))))
    for x in retrans:
        table.add_row(*_retrans_row(x, start))
    first = flow.endpoints[0] if flow.endpoints else None
    title = f"flow {flow.id}"
    if first:
        title += f": {first.saddr}:{first.sport} -> {first.daddr}:{first.dport} at {first.host}"
    console.print(Text(title, style="bold"))
    for m in flow.nat:
        console.print(nat_line(m), markup=False, highlight=False)
    console.print(table)
    if verdict is not None:
        console.print(Text(verdict.text, style="bold yellow"), soft_wrap=True)
    for w in flow.warnings:
        console.print(Text(f"warning: {w.message}", style="red"), soft_wrap=True)
    console.print()


def render(result: DropResult, console: Console, err: Console) -> None:
    for w in result.warnings:
        err.print(Text(f"warning: {w.message}", style="red"), soft_wrap=True)
    counts_table(result, console)
    counters_table(result, console)
    console.print()
    for flow in result.flows:
        render_flow(flow, console)
    alone = [d for d in result.drops if d.flow is None]
    if alone:
        console.print(Text("drops not joined to any flow", style="bold"))
        for d in alone:
            where = function_of(d.location) or "-"
            console.print(
                Text(f"  {d.host:<8} ", style=host_colour(d.host)).append(f"{where}: {d.text}"),
                soft_wrap=True,
            )
        console.print()
    summary = result.summary()
    style = {"none": "green", "unknown": "yellow"}.get(summary.verdict, "bold yellow")
    console.print(Text(f"{summary.verdict}: {summary.text}", style=style), soft_wrap=True)
    print_clock_bounds(result.clocks, err)
