"""Prometheus exposition of every host's totals, through prometheus_client.

A :class:`Fleet` holds the hosts' :class:`HostMetrics` behind one lock: the sessions update
them on the event loop while prometheus_client's HTTP thread (or the textfile writer)
collects. The collector builds its families on each scrape from the totals, so nothing
grows with the number of scrapes. Names: a script's counter family ``x`` is exposed as
``ebpfdiag_x_total``, a histogram ``x_seconds`` as ``ebpfdiag_x_seconds_bucket/_sum/_count``;
every series has a ``host`` label (and the inventory labels asked for with
``--host-label``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from ebpfdiag.metrics.accumulator import FamilySpec, HostMetrics

PREFIX = "ebpfdiag_"


def _shape(spec: FamilySpec) -> tuple:
    return (spec.type, spec.labels, spec.bounds)


def _exposed_shapes(hosts: Iterable[HostMetrics]) -> dict[str, tuple]:
    """Each family's shape as exposed: the first host's (in inventory order) that
    declared it. A host that declared it otherwise is left out of it."""
    shapes: dict[str, tuple] = {}
    for h in hosts:
        for name, spec in h.families.items():
            shapes.setdefault(name, _shape(spec))
    return shapes


class Fleet:
    """The hosts' totals and the lock that guards them; extra labels per host."""

    def __init__(self, names: list[str], extra: Mapping[str, Mapping[str, str]] | None = None):
        self.lock = threading.Lock()
        self.hosts = {name: HostMetrics(name) for name in names}
        #: host -> {label: value} added to every series of the host (inventory labels)
        self.extra = {name: dict((extra or {}).get(name, {})) for name in names}
        self.extra_names = sorted({k for labels in self.extra.values() for k in labels})
        #: (host, family) left out of the exposition: declared otherwise than exposed
        self.left_out: set[tuple[str, str]] = set()

    def record(self, host: str, rec: dict, now: float) -> None:
        with self.lock:
            self.hosts[host].on_record(rec, now)
            if rec.get("type") == "hello":
                self._count_left_out()

    def _count_left_out(self) -> None:
        """A host whose family is left out of the exposition (declared with other labels,
        type or buckets than the exposed one) has it counted once in its rejected rows
        when that starts, so the loss of its series is visible, never silent."""
        shapes = _exposed_shapes(self.hosts.values())
        left_out = {
            (h.name, name)
            for h in self.hosts.values()
            for name, spec in h.families.items()
            if _shape(spec) != shapes[name]
        }
        for host, _name in left_out - self.left_out:
            self.hosts[host].rejected += 1
        self.left_out = left_out

    def down(self, host: str, error: str | None = None) -> None:
        with self.lock:
            self.hosts[host].down(error)


class FleetCollector:
    """prometheus_client collector: the fleet's totals as metric families."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        fleet = self.fleet
        base = ["host", *fleet.extra_names]
        with fleet.lock:
            hosts = list(fleet.hosts.values())

            def labels(h: HostMetrics) -> list[str]:
                extra = fleet.extra[h.name]
                return [h.name, *(extra.get(k, "") for k in fleet.extra_names)]

            up = GaugeMetricFamily(
                PREFIX + "host_up",
                "1 while the host's metrics script runs and reports, 0 while it is away "
                "(its series keep their last values)",
                labels=base,
            )
            last = GaugeMetricFamily(
                PREFIX + "host_last_update_timestamp_seconds",
                "When the host's metrics script last reported (controller clock)",
                labels=base,
            )
            sessions = CounterMetricFamily(
                PREFIX + "host_sessions",
                "Runs of the host's metrics script that started (restarts and reconnects add)",
                labels=base,
            )
            lost = CounterMetricFamily(
                PREFIX + "events_lost",
                "Kernel updates the host's script could not count (a BPF map was full)",
                labels=base,
            )
            rejected = CounterMetricFamily(
                PREFIX + "rows_rejected",
                "Rows from the host's script that did not fit their family and were ignored",
                labels=base,
            )
            run_s = CounterMetricFamily(
                PREFIX + "bpf_run_seconds",
                "Time the host's metrics programs ran in the kernel (only where the kernel "
                "counts it: sysctl kernel.bpf_stats_enabled=1)",
                labels=base,
            )
            runs = CounterMetricFamily(
                PREFIX + "bpf_runs",
                "Runs of the host's metrics programs (kernel.bpf_stats_enabled=1 only)",
                labels=base,
            )
            for h in hosts:
                lv = labels(h)
                up.add_metric(lv, 1.0 if h.up else 0.0)
                if h.last_update is not None:
                    last.add_metric(lv, h.last_update)
                sessions.add_metric(lv, h.sessions)
                lost.add_metric(lv, h.lost)
                rejected.add_metric(lv, h.rejected)
                if h.bpf_stats or h.bpf_runs:
                    run_s.add_metric(lv, h.bpf_run_ns / 1e9)
                    runs.add_metric(lv, h.bpf_runs)
            families = [up, last, sessions, lost, rejected, run_s, runs]
            families += self._tool_families(hosts, base, labels)
        yield from families

    def _tool_families(self, hosts: list[HostMetrics], base: list[str], labels) -> list[Metric]:
        """The scripts' own families, merged across hosts by name (the first host's
        declaration names the labels; a host that declared it otherwise is left out, and
        counted in its rejected rows when it declared it: ``Fleet.record``)."""
        out: dict[str, Metric] = {}
        shapes = _exposed_shapes(hosts)
        for h in hosts:
            for name, spec in sorted(h.families.items()):
                if _shape(spec) != shapes[name]:
                    continue
                family = out.get(name)
                names = [*base, *spec.labels]
                if family is None:
                    if spec.type == "counter":
                        family = CounterMetricFamily(PREFIX + name, spec.help, labels=names)
                    else:
                        family = HistogramMetricFamily(PREFIX + name, spec.help, labels=names)
                    out[name] = family
                if spec.type == "counter":
                    for key, value in sorted(h.counters.get(name, {}).items()):
                        family.add_metric([*labels(h), *key], value)
                    continue
                bounds = [floatToGoString(b) for b in spec.bounds]
                for key, hist in sorted(h.histograms.get(name, {}).items()):
                    cumulative, total = [], 0
                    for bound, n in zip(bounds, hist.buckets, strict=True):
                        total += n
                        cumulative.append((bound, total))
                    cumulative.append(("+Inf", hist.count))
                    family.add_metric([*labels(h), *key], cumulative, hist.sum)
        return list(out.values())


def registry_for(fleet: Fleet) -> CollectorRegistry:
    """A registry with only the fleet's families (no process metrics of the controller)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet))
    return registry
