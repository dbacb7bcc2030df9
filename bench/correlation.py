"""Correlation at scale: synthetic 3-host streams of 100k .. 1M events through ``correlate``.

Each size runs in its own interpreter (``python -m bench.correlation EVENTS``) so its peak
RSS is its own: the event list (as a decoded stream would be held) plus correlation.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import sys
import tempfile
import time

from bench.common import PYTHON, ROOT, Section, Target, fmt, median, run_measured

HOSTS = 3


def measure(n_events: int, profile: bool = False) -> dict:
    """Synthesize, then correlate; the two times apart (only the second is correlation)."""
    from bench.synth import events_per_flow, synth_clocks, synth_events
    from ebpfdiag.questions.rst import correlate

    n_flows = max(1, n_events // events_per_flow(HOSTS))
    t0 = time.perf_counter()
    events = list(synth_events(n_flows, HOSTS))
    t1 = time.perf_counter()
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    result = correlate(events, synth_clocks(HOSTS))
    if prof:
        prof.disable()
    t2 = time.perf_counter()
    out = {
        "events": len(events),
        "flows_reported": len(result.flows),
        "synth_s": t1 - t0,
        "correlate_s": t2 - t1,
    }
    if prof:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(12)
        out["profile"] = text.getvalue()
    return out


def run(sizes: tuple[int, ...] = (100_000, 300_000, 1_000_000), rounds: int = 2) -> Section:
    section = Section(
        "correlation",
        f"Correlation at scale ({HOSTS} hosts, synthetic streams)",
        [
            "events",
            "flows with RST",
            "median correlate s",
            "events/s",
            "synth s",
            "peak RSS MiB",
            "s per 100k events",
        ],  # fmt: skip
    )
    runs: dict[int, list[tuple[dict, float]]] = {n: [] for n in sizes}
    for _ in range(rounds):
        for n in sizes:
            with tempfile.TemporaryFile() as fh:
                m = run_measured([PYTHON, "-m", "bench.correlation", str(n)], stdout=fh,
                                 stderr=None, timeout=600, cwd=ROOT)  # fmt: skip
                fh.seek(0)
                data = json.loads(fh.read() or b"{}")
            if m.returncode != 0:
                raise RuntimeError(f"correlation worker for {n} events exited {m.returncode}")
            runs[n].append((data, m.maxrss_mb))
    per_100k = {}
    for n in sizes:
        corr = median([d["correlate_s"] for d, _ in runs[n]])
        data = runs[n][0][0]
        per_100k[n] = corr / data["events"] * 100_000
        section.rows.append([
            f"{data['events']:,}", f"{data['flows_reported']:,}", fmt(corr),
            f"{data['events'] / corr:,.0f}", fmt(median([d["synth_s"] for d, _ in runs[n]])),
            fmt(max(r for _, r in runs[n]), 0), fmt(per_100k[n], 3),
        ])  # fmt: skip
    big, small = max(sizes), min(sizes)
    corr_big = median([d["correlate_s"] for d, _ in runs[big]])
    rss_big = max(r for _, r in runs[big])
    growth = per_100k[big] / per_100k[small]
    section.targets += [
        Target(f"correlate {big:,} events", f"{corr_big:.1f} s", "< 20 s", corr_big < 20),
        Target(
            f"peak RSS at {big:,} events",
            f"{rss_big:,.0f} MiB",
            "< 2 GB",
            rss_big * 1.048576 < 2000,
        ),  # fmt: skip
        Target(
            f"time per event, {big:,} vs {small:,}",
            f"{growth:.2f}x",
            "near-linear (<= 1.5x)",
            growth <= 1.5,
        ),  # fmt: skip
    ]
    section.notes += [
        f"`synth_events` for {HOSTS} hosts (24 events per flow, every 10th flow ends with a "
        "server RST), materialised as a list first; the timed part is `correlate(events, "
        "clocks)` alone, including clock tightening and building the RST flows. "
        f"Median of {rounds} runs, each size in a fresh interpreter.",
        "Peak RSS is the worker's whole process: interpreter, the event list and correlation.",
    ]
    return section


def main() -> None:
    n = int(sys.argv[1])
    json.dump(measure(n, profile="--profile" in sys.argv), sys.stdout)


if __name__ == "__main__":
    main()
