"""Terminal view of ``trace latency``: the segment table, the verdicts, the slowest
exchanges as timelines (the same view as tcp-rst's), sampling and clock bounds.

Everything is drawn from the ``Latency`` records the NDJSON output is built from.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ebpfdiag.questions.latency import Latency, fmt_ms, shown_bound
from ebpfdiag.render.timeline import render_flow


def segment_table(result: Latency) -> Table:
    table = Table(show_edge=False, pad_edge=False, title_justify="left")
    for col in ("direction", "segment", "count", "p50", "p90", "p99", "max", "clock bound"):
        table.add_column(col, justify="right" if col not in ("direction", "segment") else "left")
    shown = None
    for seg in result.segments:
        f = seg.figures()
        bound = seg.bound_ns
        unbounded = seg.kind == "wire" and bound is None
        # an unbounded wire figure is shown within its hosts' SSH errors
        figure_bound = shown_bound(seg.kind, seg.src, seg.dst, bound, result.clocks)
        table.add_row(
            seg.direction if seg.direction != shown else "",
            seg.name,
            str(f["count"]),
            *(fmt_ms(f[k], figure_bound) for k in ("p50_ns", "p90_ns", "p99_ns", "max_ns")),
            Text("none (SSH only)", style="red") if unbounded else fmt_ms(bound) if bound else "",
        )
        shown = seg.direction
    return table


def render_latency(result: Latency, console: Console, err: Console) -> None:
    for w in result.warnings:
        err.print(Text(f"warning: {w.message}", style="red"), soft_wrap=True)
    for rank, flow in enumerate(result.slowest, 1):
        console.print(Text(f"slowest exchange {rank} of {len(result.slowest)}", style="bold"))
        render_flow(flow, console)
    if result.segments:
        console.print(segment_table(result))
        console.print()
    if result.rtt:
        table = Table(title="tcp_probe", show_edge=False, pad_edge=False, title_justify="left")
        for col in ("host", "probes", "srtt p50", "srtt p99", "srtt max", "cwnd p50", "cwnd min"):
            table.add_column(col, justify="left" if col == "host" else "right")
        for host, r in result.rtt.items():
            table.add_row(host, str(r["count"]),
                          *(f"{r[k] / 1000:.3f} ms" for k in ("srtt_p50_us", "srtt_p99_us",
                                                              "srtt_max_us")),
                          str(r["cwnd_p50"]), str(r["cwnd_min"]))  # fmt: skip
        console.print(table)
        console.print()
    for v in result.verdicts:
        style = "bold yellow" if v.culprit else "bold" if v.missing else "bold green"
        console.print(Text(v.text, style=style), soft_wrap=True)
    parts = []
    for host, s in result.sampling.items():
        if s["seen"] is None:
            parts.append(f"{host} (no counts)")
            continue
        rate = f", 1 in {s['sample_n']}" if s.get("sample_n") else ""
        parts.append(f"{host} {s['sampled']}/{s['seen']} packets kept{rate}, {s['lost']} lost")
    if parts:
        err.print("sampling: " + "; ".join(parts), markup=False, highlight=False)
    if result.pairs:
        err.print(
            "clock bounds (from the packets both ways): "
            + ", ".join(f"{p.a}<->{p.b} ±{fmt_ms(p.bound_ns)}" for p in result.pairs),
            markup=False,
            highlight=False,
        )
