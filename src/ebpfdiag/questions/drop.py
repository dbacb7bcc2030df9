"""Where a flow's packets die, on which host, and why: drop evidence rules and records.

Packets, NAT and clocks come from ``ebpfdiag.trace``: each ``drop`` record becomes the
dropped packet's last sighting (``dir`` "drop"), so the one matcher joins it to the TC
sightings of the same packet on the other hosts. This module reads the flows built from
them, each host's kernel drop counts and netstat deltas, and says what they show and what
evidence is missing: a wrong verdict is worse than none. See docs/json.md (``trace drop``).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ebpfdiag.clock import FLAG_ERROR_NS, Alignment, ClockEstimate
from ebpfdiag.trace.flows import Flow, Hop, TimelineWarning, ms, trace_flows
from ebpfdiag.trace.match import DEFAULT_WINDOW_NS
from ebpfdiag.trace.sightings import DROP, drop_sighting, flag_names

DROP_PROBE = "kfree_skb"
"""The probe without which a host's silence says nothing about its drops."""

RETRANS_COUNTERS = ("TCPSynRetrans", "RetransSegs")
"""Netstat counters of retransmissions: the sender's side of a drop, not drops."""


def _tuple4(rec: Mapping[str, Any]) -> tuple:
    return (rec.get("saddr"), rec.get("sport"), rec.get("daddr"), rec.get("dport"))


def _norm(t: tuple) -> tuple:
    a, b = (t[0], t[1]), (t[2], t[3])
    return (*a, *b) if (str(a[0]), a[1] or 0) <= (str(b[0]), b[1] or 0) else (*b, *a)


def function_of(location: str | None) -> str | None:
    """``nf_hook_slow+0x9a`` -> ``nf_hook_slow``: what a reader recognises."""
    return location.split("+", 1)[0] if location else None


# ---------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class DropCount:
    """One host x reason x location row of the host's last ``drop_counts``: every drop
    there (``count``) and those of the traced traffic (``matched``)."""

    host: str
    reason: str | None
    reason_num: int | None
    location: str | None
    count: int
    matched: int
    label: str

    def to_json(self) -> dict[str, Any]:
        return {"type": "drop_count", "host": self.host, "reason": self.reason,
                "reason_num": self.reason_num, "reason_label": self.label,
                "location": self.location, "count": self.count,
                "matched": self.matched}  # fmt: skip


@dataclass(slots=True)
class HostEvidence:
    """What one host said about its drops and how far its word goes."""

    host: str
    #: "ok" (kfree_skb attached), "missing" (listed as missing), None (nothing says)
    probe: str | None = None
    probe_why: str | None = None
    #: where reason names came from: "format", "btf", "none" (locations only), None
    reasons: str | None = None
    rate: Mapping[str, Any] | None = None
    lost: int = 0
    #: None: no ``drop_counts`` record at all; else whether the last one was the final one
    counts_final: bool | None = None
    counts: list[DropCount] = field(default_factory=list)
    suppressed: int = 0
    netstat: dict[str, int] = field(default_factory=dict)
    netstat_final: bool | None = None
    retrans: int = 0
    syn_retrans: int = 0

    @property
    def location_only(self) -> bool:
        return self.reasons == "none"

    @property
    def kernel_drops(self) -> dict[str, int]:
        """Netstat drop counters that grew: drops the kernel counts but does not free
        with a reason (ListenOverflows, ...)."""
        return {k: v for k, v in self.netstat.items() if v and k not in RETRANS_COUNTERS}

    def gaps(self) -> list[str]:
        """Why this host's silence does not prove that nothing was dropped there."""
        out = []
        if self.probe == "missing":
            out.append(
                f"{self.host}: {DROP_PROBE} probe missing ({self.probe_why or 'no reason given'})"
            )
        elif self.probe is None:
            out.append(f"{self.host}: nothing says its {DROP_PROBE} probe was attached")
        if self.lost:
            out.append(f"{self.host}: lost {self.lost} events")
        if self.counts_final is None:
            out.append(f"{self.host}: sent no drop counts")
        elif not self.counts_final:
            out.append(f"{self.host}: no final drop counts (counts up to its last report)")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "netstat", "host": self.host, "final": self.netstat_final,
            "delta": dict(self.netstat), "kernel_drops": self.kernel_drops,
            "retrans": {"records": self.retrans, "syn": self.syn_retrans},
            "suppressed": self.suppressed, "counts_final": self.counts_final,
            "lost": self.lost, "probe": self.probe,
            "reasons": self.reasons,
        }  # fmt: skip


@dataclass(slots=True)
class Retransmission:
    """A tcp_retransmit_skb / tcp_retransmit_synack record of a flow with a drop."""

    host: str
    ts: int
    ts_ns: int
    probe: str | None
    state: str | None
    saddr: str | None
    sport: int | None
    daddr: str | None
    dport: int | None
    flow: int | None = None
    #: the clock error bound of ``ts`` (its host's alignment)
    err_ns: int = 0

    def to_json(self, origin_ts: int) -> dict[str, Any]:
        return {"kind": "retrans", "host": self.host, "ts": self.ts, "ts_ns": self.ts_ns,
                "rel_ms": ms(self.ts - origin_ts), "probe": self.probe, "state": self.state,
                "saddr": self.saddr, "sport": self.sport, "daddr": self.daddr,
                "dport": self.dport}  # fmt: skip


@dataclass(slots=True)
class DropEvent:
    """One dropped packet: where it was seen before (``path``, ending with the drop), the
    retransmissions of its flow that followed, what is missing to be sure, and one
    sentence."""

    host: str
    ts: int
    ts_ns: int
    err_ns: int
    reason: str | None
    reason_num: int | None
    location: str | None
    label: str
    rec: Mapping[str, Any]
    path: list[Hop] = field(default_factory=list)
    flow: int | None = None
    retrans: list[Retransmission] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    text: str = ""
    #: why its reason is not named (``_reason_gap``), None when it is
    gap: str | None = None

    def to_json(self) -> dict[str, Any]:
        origin = self.path[0].ts if self.path else self.ts
        r = self.rec
        return {
            "type": "drop", "host": self.host, "ts": self.ts, "ts_ns": self.ts_ns,
            "err_ns": self.err_ns, "reason": self.reason, "reason_num": self.reason_num,
            "reason_label": self.label, "location": self.location,
            "ifname": r.get("ifname"), "family": r.get("family"), "proto": r.get("proto"),
            "saddr": r.get("saddr"), "sport": r.get("sport"), "daddr": r.get("daddr"),
            "dport": r.get("dport"), "flags": r.get("flags"),
            "flag_names": flag_names(r["flags"]) if r.get("flags") is not None else None,
            "seq": r.get("seq"), "ack": r.get("ack"), "len": r.get("len"),
            "ipid": r.get("ipid"), "flow": self.flow,
            "path": [hop.to_json(origin) for hop in self.path],
            "since_first_ns": self.ts - origin if len(self.path) > 1 else None,
            "retrans": [x.to_json(self.ts) for x in self.retrans],
            "missing": self.missing, "text": self.text,
        }  # fmt: skip


@dataclass(slots=True)
class FlowDrops:
    """A flow's answer: its drops in order (``Flow.verdict``)."""

    drops: list[DropEvent]
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"drops": len(self.drops), "text": self.text}


@dataclass(slots=True)
class Summary:
    """``dropped`` (drop events, or kernel counts of traced traffic), ``unknown`` (none
    seen but some host could not have said), ``counted`` (none freed with a reason, but
    netstat drop counters grew), ``none``."""

    verdict: str
    text: str
    drops: int
    matched: int
    suppressed: int
    flows: int
    missing: list[str]
    kernel_drops: dict[str, dict[str, int]]

    def to_json(self) -> dict[str, Any]:
        return {"type": "summary", "verdict": self.verdict, "drops": self.drops,
                "matched": self.matched, "suppressed": self.suppressed, "flows": self.flows,
                "kernel_drops": self.kernel_drops, "missing": self.missing,
                "text": self.text}  # fmt: skip


@dataclass(slots=True)
class DropResult:
    """Flows with a drop (each with its ``verdict``), every drop event, per-host evidence,
    global warnings and the clocks used."""

    flows: list[Flow]
    drops: list[DropEvent]
    hosts: dict[str, HostEvidence]
    warnings: list[TimelineWarning]
    clocks: Alignment

    @property
    def counts(self) -> list[DropCount]:
        rows = [c for h in self.hosts.values() for c in h.counts]
        return sorted(rows, key=lambda c: (-c.matched, -c.count, c.host, c.label))

    def summary(self) -> Summary:
        return _summary(self)

    def records(self) -> Iterator[dict[str, Any]]:
        """NDJSON: warnings, drop counts, netstat per host, drops, flows, the summary."""
        for warning in self.warnings:
            yield warning.to_json()
        for count in self.counts:
            yield count.to_json()
        for evidence in self.hosts.values():
            yield evidence.to_json()
        for drop in self.drops:
            yield drop.to_json()
        for flow in self.flows:
            for warning in flow.warnings:
                yield warning.to_json()
            yield flow_record(flow)
        yield self.summary().to_json()


def flow_record(flow: Flow) -> dict[str, Any]:
    """The ``flow`` record of tcp-rst, its drop hops with reason and location, and the
    flow's retransmissions in the timeline."""
    rec = flow.to_json()
    verdict = flow.verdict
    if not isinstance(verdict, FlowDrops):
        return rec
    start = flow.start_ts
    by_key = {(d.host, d.ts_ns): d for d in verdict.drops}
    for ev in rec["events"]:
        drop = by_key.get((ev["host"], ev["ts_ns"])) if ev.get("dir") == DROP else None
        if drop is not None:
            ev.update(reason=drop.reason, reason_num=drop.reason_num,
                      reason_label=drop.label, location=drop.location)  # fmt: skip
    retrans = [x for d in verdict.drops for x in d.retrans]
    if retrans:
        rec["events"] += [x.to_json(start) for x in retrans]
        rec["events"].sort(key=lambda ev: ev["ts"])
    return rec


# ---------------------------------------------------------------- evidence


def _probe_state(hello: Mapping[str, Any]) -> tuple[str | None, str | None]:
    for item in hello.get("missing") or ():
        if isinstance(item, Mapping) and DROP_PROBE in str(item.get("probe")):
            return "missing", item.get("why")
    if any(DROP_PROBE in str(name) for name in hello.get("attach") or {}):
        return "ok", None
    return None, None


def reason_label(rec: Mapping[str, Any], evidence: HostEvidence) -> str:
    """The reason as shown: its name, ``location only`` (a kernel without reasons), or
    ``unknown`` (a number without a name, or none read)."""
    if rec.get("reason"):
        return str(rec["reason"])
    if evidence.location_only or "reason" not in rec:
        return "location only"
    return "unknown"


def _reason_gap(host: str, rec: Mapping[str, Any], label: str) -> str | None:
    if label == "location only":
        return f"{host}: its kernel names no drop reasons (location only)"
    if label == "unknown":
        num = rec.get("reason_num")
        if num is not None:
            return f"{host}: drop reason number {num} has no name there"
        return f"{host}: no drop reason read"
    return None


class _Evidence:
    """One pass over the records: per-host evidence, drop and retransmission records."""

    def __init__(self, hosts: Iterable[str], hellos: Mapping[str, Mapping[str, Any]]) -> None:
        self.hosts: dict[str, HostEvidence] = {h: HostEvidence(h) for h in hosts}
        self.drops: list[dict] = []
        self.retrans: list[dict] = []
        self.sightings: list[Mapping[str, Any]] = []
        self.ts_hint: dict[str, int] = {}
        self._counts: dict[str, tuple[int, Mapping[str, Any]]] = {}
        self._netstat: dict[str, tuple[int, Mapping[str, Any]]] = {}
        for host, hello in hellos.items():
            self.hello(host, hello)

    def host(self, name: str) -> HostEvidence:
        if name not in self.hosts:
            self.hosts[name] = HostEvidence(name)
        return self.hosts[name]

    def hello(self, host: str, hello: Mapping[str, Any]) -> None:
        ev = self.host(host)
        probe, why = _probe_state(hello)
        if probe is not None or ev.probe is None:
            ev.probe, ev.probe_why = probe, why
        reasons = hello.get("reasons")
        if isinstance(reasons, Mapping):
            ev.reasons = reasons.get("source")
        if isinstance(hello.get("rate"), Mapping):
            ev.rate = hello["rate"]

    def add(self, rec: Mapping[str, Any]) -> None:
        kind, host = rec.get("type"), rec.get("host")
        if not isinstance(host, str):
            return
        if kind in ("hello", "host"):
            self.hello(host, rec)
        elif kind == "packet":
            self.sightings.append(rec)
        elif kind == "drop" and isinstance(rec.get("ts_ns"), int):
            self.host(host)
            self.drops.append(dict(rec))
            self._hint(rec)
            packet = drop_sighting(rec)
            if packet is not None:
                self.sightings.append(packet)
        elif kind == "retrans" and isinstance(rec.get("ts_ns"), int):
            ev = self.host(host)
            ev.retrans += 1
            ev.syn_retrans += "SYN_SENT" in str(rec.get("state") or "")
            self.retrans.append(dict(rec))
            self._hint(rec)
        elif kind == "lost":
            self.host(host).lost += int(rec.get("count") or 0)
            self.sightings.append(rec)
        elif kind == "drop_counts":
            self._latest(self._counts, host, rec)
        elif kind == "netstat":
            self._latest(self._netstat, host, rec)

    def _hint(self, rec: Mapping[str, Any]) -> None:
        if rec["host"] not in self.ts_hint and isinstance(rec.get("ts"), int):
            self.ts_hint[rec["host"]] = rec["ts"] - rec["ts_ns"]

    @staticmethod
    def _latest(
        seen: dict[str, tuple[int, Mapping[str, Any]]], host: str, rec: Mapping[str, Any]
    ) -> None:
        """Counts are totals since start: the final record wins, else the latest."""
        key = (2 if rec.get("final") else 1) * 2**62 + int(rec.get("ts_ns") or 0)
        if host not in seen or key >= seen[host][0]:
            seen[host] = (key, rec)

    def finish(self) -> None:
        for host, (_, rec) in self._counts.items():
            ev = self.host(host)
            ev.counts_final = bool(rec.get("final"))
            ev.suppressed = int(rec.get("suppressed") or 0)
            for row in rec.get("counts") or ():
                label = reason_label(row, ev)
                ev.counts.append(
                    DropCount(
                        host,
                        row.get("reason"),
                        row.get("reason_num"),
                        row.get("location"),
                        int(row.get("count") or 0),
                        int(row.get("matched") or 0),
                        label,
                    )
                )
        for host, (_, rec) in self._netstat.items():
            ev = self.host(host)
            ev.netstat_final = bool(rec.get("final"))
            delta = rec.get("delta") or {}
            ev.netstat = {str(k): int(v) for k, v in delta.items() if isinstance(v, int)}


def _describe_hop(hop: Hop) -> str:
    verb = "left" if hop.dir == "egress" else "entered"
    return f"{verb} {hop.host} {hop.ifname}{' after NAT' if hop.nat else ''}"


def _drop_words(d: DropEvent) -> str:
    func = function_of(d.location)
    if d.label == "location only":
        at = f" at {func}" if func else ""
        return f"dropped on {d.host}{at} (location only: {d.host}'s kernel names no drop reasons)"
    if d.label == "unknown":
        at = f" at {func}" if func else ""
        return f"dropped on {d.host}{at}, reason unknown"
    return f"dropped on {d.host} by {d.reason}" + (f" ({func})" if func else "")


def _packet_words(p: Hop | Mapping[str, Any]) -> str:
    rec = p.to_json(0) if isinstance(p, Hop) else p
    t = f"{rec.get('saddr')}:{rec.get('sport')} > {rec.get('daddr')}:{rec.get('dport')}"
    if rec.get("flags") is None:
        return t
    return f"{flag_names(rec['flags'])} {t}"


def _fuzzy(d: DropEvent, clocks: Alignment) -> list[str]:
    """Hosts of a path across hosts whose clocks are too uncertain to trust its times."""
    hosts = sorted({h.host for h in d.path})
    if len(hosts) < 2:
        return []
    flagged = set(getattr(clocks, "flagged", ()))
    return [
        f"clock of {h} uncertain by +-{ms(clocks[h].error_ns):.3f} ms"
        for h in hosts
        if h in flagged
    ]


def span_words(span_ns: int, a: str, a_err: int, b: str, b_err: int) -> str:
    """``0.080 ms``, or ``< 0.090 ms`` when the two sightings are on different hosts
    and the span is below the sum of their clock errors: it is not measured then."""
    bound = a_err + b_err if a != b else 0
    if span_ns < bound:
        return f"< {ms(span_ns + bound):.3f} ms"
    return f"{ms(span_ns):.3f} ms"


def _text(d: DropEvent, lossy: list[str], fuzzy: list[str]) -> str:
    before = d.path[:-1]
    words = [_describe_hop(h) for h in before] + [_drop_words(d)]
    first = before[0] if before else d.rec  # the packet as it left its sender
    text = f"{_packet_words(first)}: " + ", ".join(words)
    if before:
        first_hop = before[0]
        span = span_words(d.ts - first_hop.ts, d.host, d.err_ns, first_hop.host, first_hop.err_ns)
        text += f", {span} later"
        if fuzzy:
            text += f" (times unsure: {', '.join(fuzzy)})"
    elif d.rec.get("seq") is not None:
        text += "; not seen on any other traced interface"
        if lossy:
            text += f" (unknown whether it was: {', '.join(lossy)})"
    if d.retrans:
        x = d.retrans[0]
        text += (
            f"; {x.host} retransmitted on this flow"
            f" {span_words(x.ts - d.ts, x.host, x.err_ns, d.host, d.err_ns)} later"
            f" ({x.state or '-'})"
        )
    if d.gap and d.label == "unknown":
        text += f" [unknown: {d.gap}]"
    return text


def _summary(result: DropResult) -> Summary:
    hosts = result.hosts
    counts = result.counts
    matched = sum(c.matched for c in counts)
    suppressed = sum(h.suppressed for h in hosts.values())
    kernel = {h.host: h.kernel_drops for h in hosts.values() if h.kernel_drops}
    gaps = [gap for h in hosts.values() for gap in h.gaps()]
    unnamed = sorted({d.gap for d in result.drops if d.gap})
    missing = gaps + unnamed
    parts: list[str] = []
    if result.drops or matched:
        verdict = "dropped"
        rows = [c for c in counts if c.matched]
        if rows:
            where = ", ".join(
                f"{c.host} {c.label}"
                + (f" at {function_of(c.location)}" if c.location else "")
                + f" x{c.matched}"
                for c in rows[:5]
            )
            parts.append(f"{matched} drops of the traced traffic: {where}")
            uncounted = [d.host for d in result.drops if hosts[d.host].counts_final is None]
            if uncounted:
                on = ", ".join(sorted(set(uncounted)))
                parts.append(f"{len(uncounted)} drop events on {on}, which sent no counts")
        else:
            on = sorted({d.host for d in result.drops})
            parts.append(
                f"{len(result.drops)} drop events of the traced traffic on {', '.join(on)}"
            )
        if suppressed:
            limited = ", ".join(f"{h.host} {h.suppressed}" for h in hosts.values() if h.suppressed)
            parts.append(
                f"{suppressed} of them not sent as events (rate limit: {limited}): "
                "the counts are complete, the timelines are not"
            )
    elif gaps:
        verdict = "unknown"
        parts.append("no drop seen on the traced traffic, but unknown")
    elif kernel:
        verdict = "counted"
        parts.append("no drop event on the traced flows")
    else:
        verdict = "none"
        named = ", ".join(hosts) or "no host"
        parts.append(f"no drop on the traced flows ({named})")
    if kernel:
        said = "; ".join(
            f"{host} " + ", ".join(f"{k} +{v}" for k, v in counters.items())
            for host, counters in kernel.items()
        )
        parts.append(
            f"the kernels counted drops they do not free with a reason: {said}"
            " (namespace-wide, not only the traced traffic)"
        )
    for h in hosts.values():
        syn = h.netstat.get("TCPSynRetrans")
        if h.retrans or syn:
            times = "time" if h.retrans == 1 else "times"
            said = f"{h.host} retransmitted {h.retrans} {times} on the traced flows"
            said += f" ({h.syn_retrans} SYN)"
            parts.append(said + (f", TCPSynRetrans +{syn}" if syn else ""))
    text = "; ".join(parts)
    if missing:
        text += "; missing evidence: " + "; ".join(missing)
    return Summary(verdict, text, len(result.drops), matched, suppressed, len(result.flows),
                   missing, kernel)  # fmt: skip


def correlate(
    events: Iterable[Mapping[str, Any]],
    clocks: Mapping[str, ClockEstimate],
    *,
    hellos: Mapping[str, Mapping[str, Any]] | None = None,
    hosts: Iterable[str] = (),
    window_ns: int = DEFAULT_WINDOW_NS,
    tighten_clocks: bool = True,
    flag_ns: int = FLAG_ERROR_NS,
) -> DropResult:
    """Host-tagged records of the drop tracer -> drops joined to the same packet's
    sightings on other hosts, per-host evidence and flows with a drop.

    ``hosts`` are every host asked to trace (one that never said hello is missing
    evidence); ``hellos`` (host -> its ``hello``) say which probes worked and where reason
    names came from; ``hello``/``host`` records inside ``events`` count too.
    """
    seen = _Evidence(hosts, hellos or {})
    for rec in events:
        seen.add(rec)
    seen.finish()
    traced = trace_flows(
        seen.sightings,
        clocks,
        select=lambda s: s.dir == DROP,
        window_ns=window_ns,
        tighten_clocks=tighten_clocks,
        flag_ns=flag_ns,
    )
    alignment = traced.clocks
    lossy = [f"{h.host} lost {h.lost} events" for h in seen.hosts.values() if h.lost]

    def aligned(rec: Mapping[str, Any]) -> tuple[int, int]:
        host, ts_ns = rec["host"], rec["ts_ns"]
        est = alignment.get(host) or clocks.get(host)
        if est is not None:
            return ts_ns + est.offset_ns, est.error_ns
        return ts_ns + seen.ts_hint.get(host, 0), 0

    by_key: dict[tuple, Mapping[str, Any]] = {
        (d["host"], d["ts_ns"], d.get("seq"), d.get("ack"), d.get("flags")): d for d in seen.drops
    }
    drops: list[DropEvent] = []
    joined: set[int] = set()
    flow_of: dict[tuple, int] = {}
    for flow in traced.flows:
        events_of_flow: list[DropEvent] = []
        for path in flow.paths:
            for i, hop in enumerate(path):
                if hop.dir != DROP:
                    continue
                rec = by_key.get((hop.host, hop.ts_ns, hop.seq, hop.ack, hop.flags))
                if rec is None:
                    continue
                joined.add(id(rec))
                d = _event(rec, seen.host(hop.host), hop.ts, hop.err_ns)
                d.path, d.flow = path[: i + 1], flow.id
                events_of_flow.append(d)
        for ev in flow.events:
            if isinstance(ev, Hop):
                flow_of[(ev.host, _norm((ev.saddr, ev.sport, ev.daddr, ev.dport)))] = flow.id
        events_of_flow.sort(key=lambda d: d.ts)
        flow.verdict = FlowDrops(events_of_flow, "")
        drops += events_of_flow
    for rec in seen.drops:
        if id(rec) not in joined:
            ts, err = aligned(rec)
            drops.append(_event(rec, seen.host(rec["host"]), ts, err))
    _tie_retrans(seen.retrans, drops, flow_of, aligned)
    for d in drops:
        d.gap = _reason_gap(d.host, d.rec, d.label)
        fuzzy = _fuzzy(d, alignment)
        d.missing = ([d.gap] if d.gap else []) + lossy + fuzzy
        d.text = _text(d, lossy, fuzzy)
    drops.sort(key=lambda d: d.ts)
    for flow in traced.flows:
        verdict = flow.verdict
        if isinstance(verdict, FlowDrops):
            verdict.text = _flow_text(verdict.drops)
    return DropResult(traced.flows, drops, seen.hosts, traced.warnings, alignment)


def _flow_text(drops: list[DropEvent]) -> str:
    if not drops:
        return "no drop record"
    more = f" ({len(drops)} drops in this flow, the first shown)" if len(drops) > 1 else ""
    return drops[0].text + more


def _event(rec: Mapping[str, Any], evidence: HostEvidence, ts: int, err_ns: int) -> DropEvent:
    return DropEvent(
        rec["host"], ts, rec["ts_ns"], err_ns, rec.get("reason"), rec.get("reason_num"),
        rec.get("location"), reason_label(rec, evidence), rec,
    )  # fmt: skip


def _tie_retrans(
    records: list[dict], drops: list[DropEvent], flow_of: dict[tuple, int], aligned: Any
) -> None:
    """Each retransmission of a flow with a drop goes to the latest drop of that flow
    before it: the retransmission that drop caused comes first in its list."""
    by_flow: dict[int, list[DropEvent]] = defaultdict(list)
    for d in drops:
        if d.flow is not None:
            by_flow[d.flow].append(d)
    for flow_drops in by_flow.values():
        flow_drops.sort(key=lambda d: d.ts)  # stable: equal times keep their order
    times = {flow: [d.ts for d in flow_drops] for flow, flow_drops in by_flow.items()}
    keyed = [(*aligned(rec), i, rec) for i, rec in enumerate(records)]
    keyed.sort(key=lambda k: (k[0], k[2]))  # aligned time, then arrival
    for ts, err, _, rec in keyed:
        flow = flow_of.get((rec["host"], _norm(_tuple4(rec))))
        if flow is None or flow not in times:
            continue
        at = times[flow]
        last = bisect_right(at, ts) - 1
        if last < 0:
            continue
        # the latest drop at or before it (of equal times, the first in drop order)
        target = by_flow[flow][bisect_left(at, at[last])]
        target.retrans.append(
            Retransmission(
                rec["host"],
                ts,
                rec["ts_ns"],
                rec.get("probe"),
                rec.get("state"),
                rec.get("saddr"),
                rec.get("sport"),
                rec.get("daddr"),
                rec.get("dport"),
                flow,
                err,
            )  # fmt: skip
        )
