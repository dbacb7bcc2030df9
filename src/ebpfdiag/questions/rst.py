"""Who sent a flow's TCP reset, and why: evidence rules and the verdict records.

Everything about packets, NAT and clocks comes from ``ebpfdiag.trace``; this module only
reads the flows it builds. See docs/correlation.md for the rules.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ebpfdiag.clock import FLAG_ERROR_NS, Alignment, ClockEstimate
from ebpfdiag.trace.flows import Flow, Hop, NatMapping, ResetEvent, TimelineWarning, ms, trace_flows
from ebpfdiag.trace.match import DEFAULT_WINDOW_NS
from ebpfdiag.trace.sightings import RECEIVE_RESET, RST, SEND_RESET, WILDCARD_ADDRS


@dataclass(slots=True)
class Moved:
    """A load balancer sent the same client-side tuple to another backend mid-flow;
    ``host`` is None when the translating host is not traced."""

    host: str | None
    source: str
    target: str

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "from": self.source, "to": self.target}


@dataclass(slots=True)
class Verdict:
    """Who sent the flow's RST and why, with the evidence."""

    origin_host: str | None
    origin_kind: str
    reason: str | None
    state: str | None
    path: list[Hop]
    origin_to_client_ns: int | None
    accepted_by: list[str]
    text: str
    moved: Moved | None = None

    def to_json(self) -> dict[str, Any]:
        origin_ts = self.path[0].ts if self.path else 0
        return {
            "origin_host": self.origin_host, "origin_kind": self.origin_kind,
            "reason": self.reason, "state": self.state,
            "path": [hop.to_json(origin_ts) for hop in self.path],
            "origin_to_client_ns": self.origin_to_client_ns,
            "accepted_by": self.accepted_by,
            "moved": self.moved.to_json() if self.moved else None, "text": self.text,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class ResetCount:
    origin_host: str | None
    origin_kind: str
    reason: str | None
    count: int

    def to_json(self) -> dict[str, Any]:
        return {"origin_host": self.origin_host, "origin_kind": self.origin_kind,
                "reason": self.reason, "count": self.count}  # fmt: skip


@dataclass(slots=True)
class Summary:
    """RST verdicts counted by (origin host, kind, reason), most frequent first."""

    resets: list[ResetCount]
    flows: int

    def to_json(self) -> dict[str, Any]:
        return {"type": "summary", "resets": [r.to_json() for r in self.resets],
                "flows": self.flows}  # fmt: skip


def summary(flows: Iterable[Flow]) -> Summary:
    counts: dict[tuple[str | None, str, str | None], int] = defaultdict(int)
    n = 0
    for flow in flows:
        n += 1
        v = flow.verdict
        if isinstance(v, Verdict):
            counts[(v.origin_host, v.origin_kind, v.reason)] += 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))
    return Summary([ResetCount(h, k, r, c) for (h, k, r), c in ranked], n)


@dataclass(slots=True)
class Correlation:
    """Reported flows (each with its ``verdict``), global warnings, the clocks used."""

    flows: list[Flow]
    warnings: list[TimelineWarning]
    clocks: Alignment

    def summary(self) -> Summary:
        return summary(self.flows)

    def records(self) -> Iterator[dict[str, Any]]:
        """The NDJSON records: warnings, each flow (after its warnings), the summary."""
        for warning in self.warnings:
            yield warning.to_json()
        for flow in self.flows:
            for warning in flow.warnings:
                yield warning.to_json()
            yield flow.to_json()
        yield self.summary().to_json()


# ---------------------------------------------------------------- evidence


def _stack_words(r: ResetEvent) -> str:
    return f"TCP stack, reason {r.reason or '-'}, state {r.state or '-'}"


def _describe_hop(hop: Hop, is_last: bool) -> str:
    verb = "leaving" if hop.dir == "egress" else "reaching" if is_last else "entering"
    nat = " after NAT" if hop.nat else ""
    return f"{verb} {hop.host} {hop.ifname}{nat}"


def _backend(m: NatMapping) -> str:
    return f"{m.after.daddr}:{m.after.dport}"


def _moved(flow: Flow) -> tuple[NatMapping, NatMapping] | None:
    """The first and the last backend when one host translated the same client-side tuple
    to different destinations."""
    by_before: dict[tuple, list[NatMapping]] = defaultdict(list)
    for m in flow.nat:
        by_before[(m.host, m.before.tuple)].append(m)
    for maps in by_before.values():
        targets = {(m.after.daddr, m.after.dport) for m in maps}
        if len(targets) > 1:
            return maps[0], maps[-1]
    return None


class _Rules:
    def __init__(self, probes: Mapping[str, str | None], window_ns: int) -> None:
        self.probes = probes
        self.window_ns = window_ns

    def verdict(self, flow: Flow) -> Verdict | None:
        resets = flow.resets
        rst_paths = [p for p in flow.paths if p[0].flags & RST]
        sent = [r for r in resets if r.probe == SEND_RESET]
        if not rst_paths:
            return self._without_packet(sent, resets)

        path = rst_paths[0]
        first = path[0]
        origin_host = first.host if first.dir == "egress" else None
        kind, reason, state, why, match = "unknown", None, None, "", None
        if origin_host is not None:
            match = self._send_reset(first, sent)
            probe = self.probes.get(origin_host)
            if match is not None:
                kind, reason, state = "tcp-stack", match.reason, match.state
                why = f" ({_stack_words(match)})"
            elif probe == "ok":
                kind = "firewall"
                why = (
                    f" (not its TCP stack: no {SEND_RESET} on {origin_host},"
                    " e.g. a firewall reject)"
                )
            elif probe == "missing":
                why = f" (no {SEND_RESET} probe on {origin_host}: cannot tell stack from firewall)"
            else:
                why = (
                    f" (nothing says {origin_host} had a working {SEND_RESET} probe:"
                    " cannot tell stack from firewall)"
                )
        last = path[-1]
        to_client = None
        if origin_host is not None and last.dir == "ingress" and len(path) > 1:
            to_client = last.ts - first.ts
        accepted = sorted(
            {
                r.host
                for r in resets
                if r.probe == RECEIVE_RESET and abs(r.ts - first.ts) <= self.window_ns
            }
        )
        steps = ", ".join(
            f"{_describe_hop(hop, i == len(path) - 1)} at +{ms(hop.ts - first.ts):.3f} ms"
            for i, hop in enumerate(path)
        )
        moved = None
        pair = _moved(flow)
        if origin_host is None:
            text = f"RST from outside the traced hosts, seen {steps}"
        else:
            text = f"RST sent by {origin_host}{why}, seen {steps}"
        if pair is not None:
            a, b = pair
            source = a.to_host or _backend(a)
            target = b.to_host or _backend(b)
            from_b = origin_host is not None and origin_host == b.to_host
            if from_b or (
                origin_host is None and (first.saddr, first.sport) == (b.after.daddr, b.after.dport)
            ):
                moved = Moved(b.host, source, target)
                who = b.host or "an untraced host"
                said = f"{who} moved the connection from {_named(a)} to {_named(b)} mid-flow"
                if from_b and match is not None:
                    reset_by = f"{target}'s TCP stack reset it ({_stack_reason(match)})"
                    text = f"{said}; {reset_by}, seen {steps}"
                else:
                    text = f"{said}; {text}"
        if accepted:
            text += f"; accepted by the TCP stack of {', '.join(accepted)}"
        if len(rst_paths) > 1:
            text += f" ({len(rst_paths)} RSTs in this flow, the first shown)"
        return Verdict(origin_host, kind, reason, state, path, to_client, accepted, text, moved)

    @staticmethod
    def _without_packet(sent: list[ResetEvent], resets: list[ResetEvent]) -> Verdict | None:
        if sent:
            r = sent[0]
            return Verdict(
                r.host, "tcp-stack", r.reason, r.state, [], None, [],
                f"RST sent by {r.host} ({_stack_words(r)}); "
                "the packet was not seen on any traced interface",
            )  # fmt: skip
        received = [r for r in resets if r.probe == RECEIVE_RESET]
        if received:
            hosts = sorted({r.host for r in received})
            return Verdict(
                None, "unknown", None, None, [], None, hosts,
                f"RST accepted by the TCP stack of {', '.join(hosts)}; "
                "the packet was not seen on any traced interface",
            )  # fmt: skip
        return None

    def _send_reset(self, rst: Hop, sent: list[ResetEvent]) -> ResetEvent | None:
        """The tcp_send_reset tied to this RST packet; else, for a record that could not
        be tied to any packet, one on the same host with the RST's source within the
        window, closest in that host's own time."""
        for r in sent:
            if r.packet == rst.packet and r.host == rst.host:
                return r
        best = None
        for r in sent:
            if r.packet is not None or r.host != rst.host or r.sport != rst.sport:
                continue
            if r.saddr not in (None, *WILDCARD_ADDRS) and r.saddr != rst.saddr:
                continue
            gap = abs(rst.ts_ns - r.ts_ns)
            if gap <= self.window_ns and (best is None or gap < abs(rst.ts_ns - best.ts_ns)):
                best = r
        return best


def _named(m: NatMapping) -> str:
    return f"{m.to_host} ({_backend(m)})" if m.to_host else _backend(m)


def _stack_reason(r: ResetEvent) -> str:
    return f"reason {r.reason or '-'}, state {r.state or '-'}"


def correlate(
    events: Iterable[Mapping[str, Any]],
    clocks: Mapping[str, ClockEstimate],
    *,
    hellos: Mapping[str, Mapping[str, Any]] | None = None,
    window_ns: int = DEFAULT_WINDOW_NS,
    include_all: bool = False,
    tighten_clocks: bool = True,
    flag_ns: int = FLAG_ERROR_NS,
) -> Correlation:
    """Correlate host-tagged packet/reset records into flows with RST verdicts.

    ``hellos`` (host -> its ``hello`` record) say whether tcp_send_reset was attached;
    ``hello`` or ``host`` records inside ``events`` count too. A RST is only blamed on a
    firewall when its origin host had that probe working. Only flows with a RST (packet or
    reset record) are reported unless ``include_all``.
    """
    traced = trace_flows(
        events,
        clocks,
        hellos=hellos,
        select=None if include_all else (lambda s: bool(s.flags & RST)),
        window_ns=window_ns,
        tighten_clocks=tighten_clocks,
        flag_ns=flag_ns,
    )
    rules = _Rules(traced.probes, window_ns)
    for flow in traced.flows:
        flow.verdict = rules.verdict(flow)
    return Correlation(traced.flows, traced.warnings, traced.clocks)
