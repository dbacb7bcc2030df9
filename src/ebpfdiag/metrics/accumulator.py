"""Per-host totals built from a metrics script's delta records (pure: no I/O, no clock).

The host's script counts from zero each time it starts and sends only increases, so the
totals here are the sums of every increase any run of the script ever sent: they continue
across script restarts and reconnects and never go back, which is what a Prometheus
counter promises. A host that is away keeps its totals as they were (``up`` says it is
away); nothing is extrapolated.

Bounded whatever a host sends: at most ``MAX_SERIES`` label sets per family per host (the
63 first seen keep their labels, every later one is summed into one series whose labels are
all ``other``), at most ``MAX_FAMILIES`` families per host, label values cut to
``MAX_LABEL_LEN`` characters. Rows that do not fit a family (wrong label count, a
decrease, not a number) are counted in ``rejected`` and otherwise ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

MAX_SERIES = 64
MAX_FAMILIES = 32
MAX_LABEL_LEN = 128
MAX_BUCKETS = 64
OTHER = "other"
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
#: label names the controller sets itself
RESERVED_LABELS = ("host", "le")


@dataclass(frozen=True)
class FamilySpec:
    """A family as the script declared it in hello: ``name`` without prefix or suffix."""

    name: str
    type: str  # counter | histogram
    labels: tuple[str, ...]
    help: str
    #: histogram only: upper bound of each slot (in exposed units), and the unit of sums
    bounds: tuple[float, ...] = ()
    scale: float = 1.0


def parse_family(name: str, raw: object) -> FamilySpec | None:
    """A hello ``families`` entry -> spec, or None when it is not well formed."""
    if not isinstance(raw, dict) or not NAME_RE.match(name):
        return None
    kind, labels = raw.get("type"), raw.get("labels", [])
    if kind not in ("counter", "histogram") or not isinstance(labels, list):
        return None
    if len(labels) > 8 or len(set(labels)) != len(labels):
        return None
    if not all(isinstance(lb, str) and NAME_RE.match(lb) for lb in labels):
        return None
    if any(lb in RESERVED_LABELS for lb in labels):
        return None
    bounds: tuple[float, ...] = ()
    scale = 1.0
    if kind == "histogram":
        try:
            bounds = tuple(float(b) for b in raw.get("bounds", []))
            scale = float(raw.get("scale", 1.0))
        except (TypeError, ValueError):
            return None
        if not bounds or len(bounds) > MAX_BUCKETS or list(bounds) != sorted(set(bounds)):
            return None
    return FamilySpec(name, kind, tuple(labels), str(raw.get("help", ""))[:500], bounds, scale)


@dataclass
class Histogram:
    """Per-slot counts (not cumulative), the sum in exposed units, and the count."""

    buckets: list[int]
    sum: float = 0.0
    count: int = 0


@dataclass
class HostMetrics:
    """Everything exposed for one host."""

    name: str
    up: bool = False
    #: epoch seconds of the last record from the host's script (None: never heard from)
    last_update: float | None = None
    #: runs of the script that said hello (1 + restarts and reconnects)
    sessions: int = 0
    #: delta records applied (heartbeats included)
    deltas: int = 0
    lost: int = 0
    bpf_stats: bool = False
    bpf_run_ns: int = 0
    bpf_runs: int = 0
    rejected: int = 0
    #: the error of the last attempt that failed, for status lines (None once up)
    error: str | None = None
    #: what the script's hello said it could not count: "probe: why"
    missing: list[str] = field(default_factory=list)
    families: dict[str, FamilySpec] = field(default_factory=dict)
    counters: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)
    histograms: dict[str, dict[tuple[str, ...], Histogram]] = field(default_factory=dict)
    max_series: int = MAX_SERIES

    def on_record(self, rec: dict, now: float) -> None:
        """One record of the host's script; ``now`` is the controller's epoch seconds."""
        kind = rec.get("type")
        if kind == "hello":
            self._hello(rec)
        elif kind == "ready":
            self.up = True
            self.error = None
        elif kind == "delta":
            self._delta(rec)
            self.up = True
            self.error = None
        else:
            return
        self.last_update = now

    def down(self, error: str | None = None) -> None:
        """The script or its connection ended: totals stay, ``up`` goes to 0."""
        self.up = False
        if error:
            self.error = error

    def _hello(self, rec: dict) -> None:
        self.sessions += 1
        self.bpf_stats = bool(rec.get("bpf_stats"))
        missing = rec.get("missing")
        self.missing = (
            [f"{m.get('probe')}: {m.get('why')}" for m in missing if isinstance(m, dict)][:16]
            if isinstance(missing, list)
            else []
        )
        families = rec.get("families")
        if not isinstance(families, dict):
            return
        for name, raw in families.items():
            spec = parse_family(name, raw)
            known = self.families.get(name)
            if spec is None or (known is not None and known != spec):
                self.rejected += 1  # a family cannot change shape under its series
                continue
            if known is None and len(self.families) >= MAX_FAMILIES:
                self.rejected += 1
                continue
            self.families[name] = spec

    def _delta(self, rec: dict) -> None:
        self.deltas += 1
        for name, rows in _items(rec.get("c")):
            spec = self.families.get(name)
            if spec is None or spec.type != "counter" or not isinstance(rows, list):
                self.rejected += 1
                continue
            series = self.counters.setdefault(name, {})
            for row in rows:
                self._add_counter(spec, series, row)
        for name, rows in _items(rec.get("h")):
            spec = self.families.get(name)
            if spec is None or spec.type != "histogram" or not isinstance(rows, list):
                self.rejected += 1
                continue
            series = self.histograms.setdefault(name, {})
            for row in rows:
                self._add_histogram(spec, series, row)
        lost = rec.get("lost")
        if _increase(lost):
            self.lost += int(lost)
        bpf = rec.get("bpf")
        if isinstance(bpf, list) and len(bpf) == 2 and all(_increase(v) for v in bpf):
            self.bpf_run_ns += int(bpf[0])
            self.bpf_runs += int(bpf[1])

    def _key(self, spec: FamilySpec, labels: list, series: dict) -> tuple[str, ...] | None:
        """The series a row goes to: its own while fewer than max_series - 1 exist, else
        the one ``other`` series."""
        if len(labels) != len(spec.labels):
            return None
        key = tuple(str(v)[:MAX_LABEL_LEN] for v in labels)
        if key in series or len(series) < self.max_series - 1:
            return key
        return (OTHER,) * len(spec.labels)

    def _add_counter(self, spec: FamilySpec, series: dict, row: object) -> None:
        if not isinstance(row, list) or not row or not _increase(row[-1]):
            self.rejected += 1
            return
        key = self._key(spec, row[:-1], series)
        if key is None:
            self.rejected += 1
            return
        series[key] = series.get(key, 0) + row[-1]

    def _add_histogram(self, spec: FamilySpec, series: dict, row: object) -> None:
        """Row: label values..., sum increase (script units), [[slot, increase], ...]."""
        if not isinstance(row, list) or len(row) < 2 or not _increase(row[-2]):
            self.rejected += 1
            return
        slots = row[-1]
        ok = isinstance(slots, list) and all(
            isinstance(s, list) and len(s) == 2 and isinstance(s[0], int) and _increase(s[1])
            for s in slots
        )
        key = self._key(spec, row[:-2], series) if ok else None
        if key is None:
            self.rejected += 1
            return
        hist = series.get(key)
        if hist is None:
            hist = series[key] = Histogram([0] * len(spec.bounds))
        for slot, n in slots:
            if 0 <= slot < len(spec.bounds):
                hist.buckets[slot] += int(n)
            hist.count += int(n)  # a slot past the last bound counts only in +Inf
        hist.sum += row[-2] * spec.scale


def _items(value: object) -> list[tuple[str, object]]:
    return list(value.items()) if isinstance(value, dict) else []


def _increase(value: object) -> bool:
    """A count that may be added: a finite number >= 0 (booleans are not counts)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )
