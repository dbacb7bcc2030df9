"""Cross-host correlation: packet sightings -> hops -> flows -> RST verdicts.

The same packet is seen at several points (client egress, LB ingress, LB egress after
NAT, server ingress). Addresses and ports change at NAT hops, but TCP seq, ack, flags,
payload length and the IP ID do not, so those form the fingerprint. Sightings of one
fingerprint close together in aligned time are one *occurrence* of the packet; the
per-host 5-tuples of an occurrence belong to one connection, so a union-find over those
5-tuples yields flows across NAT. Everything is linear in the number of events: one pass
to bucket sightings by fingerprint, a small sort per bucket, then work only for the flows
that are reported. See docs/correlation.md.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ebpfdiag.clock import (
    FLAG_ERROR_NS,
    Alignment,
    ClockEstimate,
    Observation,
    flagged_hosts,
    tighten,
)

DEFAULT_WINDOW_NS = 1_000_000_000
"""Sightings of one fingerprint further apart than this are different occurrences."""

MISSING_CLOCK_ERROR_NS = 10**15
"""Error bound given to a host without any clock estimate: it constrains nothing."""

SYN, RST, ACK = 2, 4, 16
_FLAG_NAMES = ((1, "FIN"), (2, "SYN"), (4, "RST"), (8, "PSH"), (16, "ACK"), (32, "URG"),
               (64, "ECE"), (128, "CWR"))  # fmt: skip
SEND_RESET = "tcp_send_reset"
RECEIVE_RESET = "tcp_receive_reset"


def flag_names(flags: int) -> str:
    """TCP flag byte -> "SYN|ACK" (tables show names, JSON keeps the number)."""
    return "|".join(name for bit, name in _FLAG_NAMES if flags & bit) or "-"


class _Sighting:
    """One packet record, kept compact: a million of these must fit in memory."""

    __slots__ = ("host", "ifname", "dir", "ts_ns", "flags", "seq", "ack", "length", "ipid",
                 "saddr", "sport", "daddr", "dport", "why", "node", "occ")  # fmt: skip

    def __init__(self, rec: Mapping[str, Any], host: str, intern: dict[str, str]) -> None:
        self.host = host
        self.ifname = intern.setdefault(rec["ifname"], rec["ifname"])
        if rec["dir"] not in ("egress", "ingress"):
            raise ValueError(f"bad dir {rec['dir']!r}")
        self.dir = "egress" if rec["dir"] == "egress" else "ingress"
        self.ts_ns = int(rec["ts_ns"])
        self.flags = int(rec["flags"])
        self.seq = int(rec["seq"])
        self.ack = int(rec["ack"])
        self.length = int(rec["len"])
        self.ipid = int(rec.get("ipid") or 0)
        self.saddr = intern.setdefault(rec["saddr"], rec["saddr"])
        self.sport = int(rec["sport"])
        self.daddr = intern.setdefault(rec["daddr"], rec["daddr"])
        self.dport = int(rec["dport"])
        why = rec.get("why")
        self.why = intern.setdefault(why, why) if why else None
        self.node = -1
        self.occ = -1


class _Reset:
    """One tcp_send_reset / tcp_receive_reset record."""

    __slots__ = ("host", "ts_ns", "probe", "saddr", "sport", "daddr", "dport", "state",
                 "reason", "pid", "comm")  # fmt: skip

    def __init__(self, rec: Mapping[str, Any], host: str) -> None:
        self.host = host
        self.ts_ns = int(rec["ts_ns"])
        self.probe = rec["probe"]
        self.saddr = rec["saddr"]
        self.sport = int(rec["sport"])
        self.daddr = rec["daddr"]
        self.dport = int(rec["dport"])
        self.state = rec.get("state")
        self.reason = rec.get("reason")
        self.pid = rec.get("pid")
        self.comm = rec.get("comm")


# ---------------------------------------------------------------- output records


def _ms(delta_ns: int) -> float:
    return round(delta_ns / 1e6, 3)


@dataclass(slots=True)
class Hop:
    """One packet as seen at one (host, ifname, dir); ``ts`` is aligned controller ns."""

    host: str
    ifname: str
    dir: str
    ts: int
    ts_ns: int
    saddr: str
    sport: int
    daddr: str
    dport: int
    flags: int
    seq: int
    ack: int
    len: int
    ipid: int
    why: str | None
    packet: int
    hop_ns: int | None = None
    nat: bool = False

    def to_json(self, origin_ts: int) -> dict[str, Any]:
        return {
            "kind": "hop", "host": self.host, "ifname": self.ifname, "dir": self.dir,
            "ts": self.ts, "ts_ns": self.ts_ns, "rel_ms": _ms(self.ts - origin_ts),
            "saddr": self.saddr, "sport": self.sport, "daddr": self.daddr, "dport": self.dport,
            "flags": self.flags, "flag_names": flag_names(self.flags), "seq": self.seq,
            "ack": self.ack, "len": self.len, "ipid": self.ipid, "why": self.why,
            "packet": self.packet, "hop_ns": self.hop_ns, "nat": self.nat,
        }  # fmt: skip


@dataclass(slots=True)
class ResetEvent:
    """A tcp_send_reset / tcp_receive_reset record placed on the flow's timeline."""

    host: str
    probe: str
    ts: int
    ts_ns: int
    saddr: str
    sport: int
    daddr: str
    dport: int
    state: str | None
    reason: str | None
    pid: int | None
    comm: str | None

    def to_json(self, origin_ts: int) -> dict[str, Any]:
        return {
            "kind": "reset", "host": self.host, "probe": self.probe, "ts": self.ts,
            "ts_ns": self.ts_ns, "rel_ms": _ms(self.ts - origin_ts), "saddr": self.saddr,
            "sport": self.sport, "daddr": self.daddr, "dport": self.dport,
            "state": self.state, "reason": self.reason, "pid": self.pid, "comm": self.comm,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A flow's 5-tuple as one host sees it, oriented initiator -> responder."""

    host: str
    saddr: str
    sport: int
    daddr: str
    dport: int

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "saddr": self.saddr, "sport": self.sport,
                "daddr": self.daddr, "dport": self.dport}  # fmt: skip


@dataclass(frozen=True, slots=True)
class NatMapping:
    """A tuple rewrite on the path; ``host`` is None when it happened between traced hosts."""

    host: str | None
    before: Endpoint
    after: Endpoint
    kind: str

    def to_json(self) -> dict[str, Any]:
        def tup(e: Endpoint) -> dict[str, Any]:
            return {"saddr": e.saddr, "sport": e.sport, "daddr": e.daddr, "dport": e.dport}

        rec = {"host": self.host, "kind": self.kind,
               "before": tup(self.before), "after": tup(self.after)}  # fmt: skip
        if self.host is None:
            rec["between"] = [self.before.host, self.after.host]
        return rec


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

    def to_json(self) -> dict[str, Any]:
        origin_ts = self.path[0].ts if self.path else 0
        return {
            "origin_host": self.origin_host, "origin_kind": self.origin_kind,
            "reason": self.reason, "state": self.state,
            "path": [hop.to_json(origin_ts) for hop in self.path],
            "origin_to_client_ns": self.origin_to_client_ns,
            "accepted_by": self.accepted_by, "text": self.text,
        }  # fmt: skip


@dataclass(slots=True)
class TimelineWarning:
    """Something the reader of a timeline must know (effect before cause, fuzzy clocks)."""

    kind: str
    message: str
    flow: int | None = None
    hosts: list[str] = field(default_factory=list)
    by_ns: int | None = None

    def to_json(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"type": "warning", "kind": self.kind, "message": self.message}
        if self.flow is not None:
            rec["flow"] = self.flow
        if self.hosts:
            rec["hosts"] = self.hosts
        if self.by_ns is not None:
            rec["by_ns"] = self.by_ns
        return rec


@dataclass(slots=True)
class Flow:
    """One connection across hosts: its per-host tuples, NAT rewrites, timeline, verdict."""

    id: int
    endpoints: list[Endpoint]
    nat: list[NatMapping]
    verdict: Verdict | None
    events: list[Hop | ResetEvent]
    warnings: list[TimelineWarning]

    @property
    def start_ts(self) -> int:
        return self.events[0].ts if self.events else 0

    def to_json(self) -> dict[str, Any]:
        start = self.start_ts
        return {
            "type": "flow", "id": self.id,
            "endpoints": [e.to_json() for e in self.endpoints],
            "nat": [m.to_json() for m in self.nat],
            "verdict": self.verdict.to_json() if self.verdict else None,
            "events": [ev.to_json(start) for ev in self.events],
            "warnings": len(self.warnings),
        }  # fmt: skip


@dataclass(slots=True)
class Correlation:
    """Result of :func:`correlate`: reported flows, global warnings, the clocks used."""

    flows: list[Flow]
    warnings: list[TimelineWarning]
    clocks: Alignment

    def records(self) -> Iterator[dict[str, Any]]:
        """The NDJSON records the CLI prints: warnings, each flow (after its warnings),
        then the summary."""
        for warning in self.warnings:
            yield warning.to_json()
        for flow in self.flows:
            for warning in flow.warnings:
                yield warning.to_json()
            yield flow.to_json()
        yield summary(self.flows)


def summary(flows: Iterable[Flow]) -> dict[str, Any]:
    """Count RST verdicts by (origin host, kind, reason)."""
    counts: dict[tuple[str | None, str, str | None], int] = defaultdict(int)
    n = 0
    for flow in flows:
        n += 1
        if flow.verdict:
            v = flow.verdict
            counts[(v.origin_host, v.origin_kind, v.reason)] += 1
    resets = [
        {"origin_host": host, "origin_kind": kind, "reason": reason, "count": count}
        for (host, kind, reason), count in sorted(
            counts.items(), key=lambda item: (-item[1], str(item[0]))
        )
    ]
    return {"type": "summary", "resets": resets, "flows": n}


# ---------------------------------------------------------------- union-find


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


# ---------------------------------------------------------------- collection


class _Collector:
    """First pass: bucket packets by fingerprint and 5-tuples by (host, normalised tuple)."""

    def __init__(self) -> None:
        self.groups: dict[tuple[int, int, int, int, int], list[_Sighting]] = defaultdict(list)
        self.nodes: dict[tuple[str, str, int, str, int], int] = {}
        self.node_sightings: list[list[_Sighting]] = []
        self.node_resets: dict[int, list[_Reset]] = defaultdict(list)
        self.rst_nodes: set[int] = set()
        self.uf = _UnionFind()
        self.intern: dict[str, str] = {}
        self.ts_hints: dict[str, int] = {}
        self.no_send_probe: set[str] = set()
        self.lost: dict[tuple[str, str], int] = defaultdict(int)
        self.malformed = 0

    def node(self, host: str, saddr: str, sport: int, daddr: str, dport: int) -> int:
        if (saddr, sport) <= (daddr, dport):
            key = (host, saddr, sport, daddr, dport)
        else:
            key = (host, daddr, dport, saddr, sport)
        node = self.nodes.get(key)
        if node is None:
            node = self.nodes[key] = self.uf.add()
            self.node_sightings.append([])
        return node

    def add(self, rec: Mapping[str, Any]) -> None:
        kind = rec.get("type")
        host = rec.get("host")
        if kind not in ("packet", "reset", "hello", "lost") or not isinstance(host, str):
            return
        host = self.intern.setdefault(host, host)
        try:
            if kind == "packet":
                self._packet(rec, host)
            elif kind == "reset":
                self._reset(rec, host)
            elif kind == "hello":
                missing = {m.get("probe") for m in rec.get("missing") or ()}
                if SEND_RESET in missing:
                    self.no_send_probe.add(host)
            else:
                self.lost[(host, str(rec.get("source")))] += int(rec.get("count") or 0)
        except (KeyError, TypeError, ValueError):
            self.malformed += 1

    def _packet(self, rec: Mapping[str, Any], host: str) -> None:
        s = _Sighting(rec, host, self.intern)
        if host not in self.ts_hints and "ts" in rec:
            self.ts_hints[host] = int(rec["ts"]) - s.ts_ns
        s.node = self.node(host, s.saddr, s.sport, s.daddr, s.dport)
        self.node_sightings[s.node].append(s)
        if s.flags & RST:
            self.rst_nodes.add(s.node)
        self.groups[(s.seq, s.ack, s.flags, s.length, s.ipid)].append(s)

    def _reset(self, rec: Mapping[str, Any], host: str) -> None:
        r = _Reset(rec, host)
        if r.probe not in (SEND_RESET, RECEIVE_RESET):
            raise ValueError(r.probe)
        if host not in self.ts_hints and "ts" in rec:
            self.ts_hints[host] = int(rec["ts"]) - r.ts_ns
        self.node_resets[self.node(host, r.saddr, r.sport, r.daddr, r.dport)].append(r)


# ---------------------------------------------------------------- matching


def _path(members: list[_Sighting], offsets: Mapping[str, int]) -> list[_Sighting]:
    """Order one occurrence causally: hosts where the packet first leaves, then hosts it
    passes through (by aligned time), then hosts where it only arrives; within a host by
    that host's own clock, which needs no alignment."""
    by_host: dict[str, list[_Sighting]] = defaultdict(list)
    for s in members:
        by_host[s.host].append(s)
    keyed = []
    for host, seen in by_host.items():
        seen.sort(key=lambda s: s.ts_ns)
        if seen[0].dir == "egress":
            rank = 0
        elif any(s.dir == "egress" for s in seen):
            rank = 1
        else:
            rank = 2
        keyed.append(((rank, seen[0].ts_ns + offsets[host]), seen))
    keyed.sort(key=lambda item: item[0])
    return [s for _, seen in keyed for s in seen]


def _observe(members: list[_Sighting], bounds: dict[tuple[str, str], Observation]) -> None:
    """Record causality pairs of one occurrence that need no clock to be trusted: the sole
    host where the packet starts leaves before every other host sees it, the sole host
    where it ends sees it after every other host, and a packet arriving with the very
    4-tuple that only one other host sent it with came from that host (a link)."""
    sent: dict[tuple[str, int, str, int], list[_Sighting]] = defaultdict(list)
    first_in: dict[str, int] = {}
    first_out: dict[str, int] = {}
    last_in: dict[str, int] = {}
    last_out: dict[str, int] = {}
    for s in members:
        if s.dir == "egress":
            sent[(s.saddr, s.sport, s.daddr, s.dport)].append(s)
            if s.host not in first_out or s.ts_ns < first_out[s.host]:
                first_out[s.host] = s.ts_ns
            if s.host not in last_out or s.ts_ns > last_out[s.host]:
                last_out[s.host] = s.ts_ns
        else:
            if s.host not in first_in or s.ts_ns < first_in[s.host]:
                first_in[s.host] = s.ts_ns
            if s.host not in last_in or s.ts_ns > last_in[s.host]:
                last_in[s.host] = s.ts_ns
    starts = [h for h, t in first_out.items() if h not in first_in or t < first_in[h]]
    ends = [h for h, t in last_in.items() if h not in last_out or t > last_out[h]]
    pairs = []
    if len(starts) == 1:
        src = starts[0]
        pairs += [(src, first_out[src], dst, t) for dst, t in first_in.items() if dst != src]
    if len(ends) == 1:
        dst = ends[0]
        pairs += [(src, t, dst, last_in[dst]) for src, t in last_out.items() if src != dst]
    for s in members:
        if s.dir == "ingress":
            senders = [
                e for e in sent.get((s.saddr, s.sport, s.daddr, s.dport), ()) if e.host != s.host
            ]
            if senders and all(e.host == senders[0].host for e in senders):
                pairs.append((senders[0].host, min(e.ts_ns for e in senders), s.host, s.ts_ns))
    for src, a, dst, b in pairs:
        old = bounds.get((src, dst))
        if old is None or a - b > old.src_mono_ns - old.dst_mono_ns:
            bounds[(src, dst)] = Observation(src, a, dst, b)


def _match(
    col: _Collector, offsets: Mapping[str, int], window_ns: int
) -> dict[tuple[str, str], Observation]:
    """Split each fingerprint bucket into occurrences, union their 5-tuples, and collect
    the tightest causality observation per host pair."""
    bounds: dict[tuple[str, str], Observation] = {}
    union = col.uf.union
    occ = 0
    for bucket in col.groups.values():
        if len(bucket) == 1:
            bucket[0].occ = occ
            occ += 1
            continue
        bucket.sort(key=lambda s: s.ts_ns + offsets[s.host])
        members: list[_Sighting] = []
        points: set[tuple[str, str, str]] = set()
        start = 0
        for s in bucket:
            t = s.ts_ns + offsets[s.host]
            point = (s.host, s.ifname, s.dir)
            if members and (t - start > window_ns or point in points):
                _close(members, bounds, union)
                occ += 1
                members, points = [], set()
            if not members:
                start = t
            members.append(s)
            points.add(point)
            s.occ = occ
        _close(members, bounds, union)
        occ += 1
    return bounds


def _close(members: list[_Sighting], bounds: dict[tuple[str, str], Observation], union) -> None:
    """One occurrence is complete: its 5-tuples are one connection (NAT or not)."""
    if len(members) < 2:
        return
    first = members[0]
    for s in members[1:]:
        if s.node != first.node:
            union(first.node, s.node)
    if any(s.host != first.host for s in members):
        _observe(members, bounds)


# ---------------------------------------------------------------- flows and verdicts


def _orient(host: str, seen: list[_Sighting], resets: list[_Reset]) -> Endpoint:
    """Initiator -> responder: from a SYN, else a SYN-ACK, else the higher port initiates."""
    for s in seen:
        if s.flags & (SYN | ACK) == SYN:
            return Endpoint(host, s.saddr, s.sport, s.daddr, s.dport)
    for s in seen:
        if s.flags & (SYN | ACK) == SYN | ACK:
            return Endpoint(host, s.daddr, s.dport, s.saddr, s.sport)
    if seen:
        a, ap, b, bp = seen[0].saddr, seen[0].sport, seen[0].daddr, seen[0].dport
    else:
        a, ap, b, bp = resets[0].saddr, resets[0].sport, resets[0].daddr, resets[0].dport
    if ap >= bp:
        return Endpoint(host, a, ap, b, bp)
    return Endpoint(host, b, bp, a, ap)


def _nat_kind(before: Endpoint, after: Endpoint) -> str:
    kinds = []
    if (before.daddr, before.dport) != (after.daddr, after.dport):
        kinds.append("dnat")
    if (before.saddr, before.sport) != (after.saddr, after.sport):
        kinds.append("snat")
    return "+".join(kinds)


def _describe_hop(hop: Hop, is_last: bool) -> str:
    verb = "leaving" if hop.dir == "egress" else "reaching" if is_last else "entering"
    nat = " after NAT" if hop.nat else ""
    return f"{verb} {hop.host} {hop.ifname}{nat}"


class _FlowBuilder:
    """Builds the output record of one flow from its 5-tuple nodes."""

    def __init__(
        self,
        col: _Collector,
        offsets: Mapping[str, int],
        window_ns: int,
    ) -> None:
        self.col = col
        self.offsets = offsets
        self.window_ns = window_ns

    def build(self, nodes: list[int]) -> Flow:
        col, offsets = self.col, self.offsets
        occurrences: dict[int, list[_Sighting]] = defaultdict(list)
        resets: list[_Reset] = []
        for node in nodes:
            for s in col.node_sightings[node]:
                occurrences[s.occ].append(s)
            resets.extend(col.node_resets.get(node, ()))

        warnings: list[TimelineWarning] = []
        paths: list[list[Hop]] = []
        order: list[tuple[int, int, int, int, Hop | ResetEvent]] = []
        node_of: dict[int, int] = {}
        ordered = sorted(
            (_path(m, offsets) for m in occurrences.values()),
            key=lambda p: p[0].ts_ns + offsets[p[0].host],
        )
        for index, path in enumerate(ordered):
            hops: list[Hop] = []
            shown = None
            prev: _Sighting | None = None
            for pos, s in enumerate(path):
                ts = s.ts_ns + offsets[s.host]
                hop = Hop(s.host, s.ifname, s.dir, ts, s.ts_ns, s.saddr, s.sport, s.daddr,
                          s.dport, s.flags, s.seq, s.ack, s.length, s.ipid, s.why,
                          index)  # fmt: skip
                if prev is not None:
                    hop.hop_ns = ts - hops[-1].ts
                    hop.nat = (prev.saddr, prev.sport, prev.daddr, prev.dport) != (
                        s.saddr, s.sport, s.daddr, s.dport)  # fmt: skip
                    if prev.host != s.host and hop.hop_ns < 0:
                        warnings.append(self._causality(hops[-1], hop))
                shown = ts if shown is None else max(shown, ts)
                order.append((shown, 1, index, pos, hop))
                node_of[id(hop)] = s.node
                hops.append(hop)
                prev = s
            paths.append(hops)
        for r in resets:
            ts = r.ts_ns + offsets[r.host]
            ev = ResetEvent(r.host, r.probe, ts, r.ts_ns, r.saddr, r.sport, r.daddr, r.dport,
                            r.state, r.reason, r.pid, r.comm)  # fmt: skip
            order.append((ts, 0 if r.probe == SEND_RESET else 2, -1, 0, ev))
        order.sort(key=lambda item: item[:4])
        events = [item[4] for item in order]

        endpoints, nat = self._endpoints(nodes, events, paths, node_of, resets)
        verdict = self._verdict(paths, [e for e in events if isinstance(e, ResetEvent)])
        return Flow(0, endpoints, nat, verdict, events, warnings)

    @staticmethod
    def _causality(before: Hop, after: Hop) -> TimelineWarning:
        return TimelineWarning(
            "causality",
            f"{flag_names(after.flags)} packet seen entering {after.host} {after.ifname} "
            f"{_ms(-(after.hop_ns or 0)):.3f} ms before it left {before.host} {before.ifname} "
            "after clock alignment: the timeline across these hosts is unreliable",
            hosts=[before.host, after.host],
            by_ns=-(after.hop_ns or 0),
        )

    def _endpoints(
        self,
        nodes: list[int],
        events: list[Hop | ResetEvent],
        paths: list[list[Hop]],
        node_of: dict[int, int],
        resets: list[_Reset],
    ) -> tuple[list[Endpoint], list[NatMapping]]:
        col = self.col
        first_seen: dict[int, int] = {}
        for pos, ev in enumerate(events):
            if isinstance(ev, Hop):
                first_seen.setdefault(node_of[id(ev)], pos)
        by_node: dict[int, Endpoint] = {}
        for node in nodes:
            seen = col.node_sightings[node]
            node_resets = col.node_resets.get(node, [])
            host = seen[0].host if seen else node_resets[0].host
            by_node[node] = _orient(host, seen, node_resets)
        ordered = sorted(nodes, key=lambda n: first_seen.get(n, len(events)))
        endpoints = [by_node[n] for n in ordered]

        nat: list[NatMapping] = []
        done: set[frozenset[int]] = set()
        for hops in paths:
            for prev, hop in zip(hops, hops[1:], strict=False):
                a, b = node_of[id(prev)], node_of[id(hop)]
                pair = frozenset((a, b))
                if a == b or pair in done:
                    continue
                before, after = by_node[a], by_node[b]
                kind = _nat_kind(before, after)
                if not kind:
                    continue
                done.add(pair)
                host = prev.host if prev.host == hop.host else None
                nat.append(NatMapping(host, before, after, kind))
        return endpoints, nat

    def _verdict(self, paths: list[list[Hop]], resets: list[ResetEvent]) -> Verdict | None:
        rst_paths = [p for p in paths if p[0].flags & RST]
        sent = [r for r in resets if r.probe == SEND_RESET]
        if not rst_paths:
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

        path = rst_paths[0]
        first = path[0]
        origin_host = first.host if first.dir == "egress" else None
        kind, reason, state, why = "unknown", None, None, ""
        if origin_host is not None:
            match = self._send_reset(first, sent)
            if match is not None:
                kind, reason, state = "tcp-stack", match.reason, match.state
                why = f" ({_stack_words(match)})"
            elif origin_host in self.col.no_send_probe:
                why = f" (no {SEND_RESET} probe on {origin_host}: cannot tell stack from firewall)"
            else:
                kind = "firewall"
                why = (
                    f" (not its TCP stack: no {SEND_RESET} on {origin_host},"
                    " e.g. a firewall reject)"
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
            f"{_describe_hop(hop, i == len(path) - 1)} at +{_ms(hop.ts - first.ts):.3f} ms"
            for i, hop in enumerate(path)
        )
        if origin_host is None:
            text = f"RST from outside the traced hosts, seen {steps}"
        else:
            text = f"RST sent by {origin_host}{why}, seen {steps}"
        if accepted:
            text += f"; accepted by the TCP stack of {', '.join(accepted)}"
        if len(rst_paths) > 1:
            text += f" ({len(rst_paths)} RSTs in this flow, the first shown)"
        return Verdict(origin_host, kind, reason, state, path, to_client, accepted, text)

    def _send_reset(self, rst: Hop, sent: list[ResetEvent]) -> ResetEvent | None:
        """The tcp_send_reset on the RST's origin host for its source address, closest in
        that host's own time."""
        best = None
        for r in sent:
            if r.host != rst.host or (r.saddr, r.sport) != (rst.saddr, rst.sport):
                continue
            gap = abs(rst.ts_ns - r.ts_ns)
            if gap <= self.window_ns and (best is None or gap < abs(rst.ts_ns - best.ts_ns)):
                best = r
        return best


def _stack_words(r: ResetEvent) -> str:
    return f"TCP stack, reason {r.reason or '-'}, state {r.state or '-'}"


# ---------------------------------------------------------------- entry point


def _initial_clocks(
    clocks: Mapping[str, ClockEstimate], col: _Collector, warnings: list[TimelineWarning]
) -> dict[str, ClockEstimate]:
    """SSH estimates, plus a stand-in for hosts that have none (from the controller's
    ``ts`` when present), flagged so that nobody trusts their ordering."""
    hosts = {s.host for bucket in col.node_sightings for s in bucket[:1]}
    hosts |= {r.host for rs in col.node_resets.values() for r in rs}
    result = dict(clocks)
    for host in sorted(hosts - set(clocks)):
        result[host] = ClockEstimate(col.ts_hints.get(host, 0), MISSING_CLOCK_ERROR_NS)
        warnings.append(
            TimelineWarning(
                "clock-missing",
                f"no clock estimate for {host}: its events cannot be ordered against other hosts",
                hosts=[host],
            )
        )
    return result


def correlate(
    events: Iterable[Mapping[str, Any]],
    clocks: Mapping[str, ClockEstimate],
    *,
    window_ns: int = DEFAULT_WINDOW_NS,
    include_all: bool = False,
    tighten_clocks: bool = True,
    flag_ns: int = FLAG_ERROR_NS,
) -> Correlation:
    """Correlate host-tagged packet/reset records into flows with RST verdicts.

    ``clocks`` are the SSH estimates per host; they are tightened with the packets' own
    causality unless ``tighten_clocks`` is False, and every output ``ts`` is
    ``ts_ns + offset`` with the clocks actually used (``Correlation.clocks``). Only flows
    that contain a RST (packet or reset record) are reported unless ``include_all``.
    Records of other types and other hosts' bookkeeping are ignored, so a whole recorded
    stream can be passed as is.
    """
    col = _Collector()
    for rec in events:
        col.add(rec)

    warnings: list[TimelineWarning] = []
    if col.malformed:
        warnings.append(
            TimelineWarning("malformed", f"{col.malformed} records lacked required fields")
        )
    for (host, source), count in sorted(col.lost.items()):
        warnings.append(
            TimelineWarning(
                "lost",
                f"{host} lost {count} {source} records: flows there may be incomplete",
                hosts=[host],
            )
        )
    initial = _initial_clocks(clocks, col, warnings)
    offsets = {host: est.offset_ns for host, est in initial.items()}
    bounds = _match(col, offsets, window_ns)
    col.groups.clear()

    known = {h: e for h, e in initial.items() if e.error_ns < MISSING_CLOCK_ERROR_NS}
    if tighten_clocks:
        alignment = tighten(known, bounds.values(), flag_ns=flag_ns)
    else:
        alignment = Alignment(known, flagged=flagged_hosts(known, flag_ns))
    alignment.update((h, e) for h, e in initial.items() if h not in known)
    if not alignment.consistent:
        pairs = ", ".join(f"{a}->{b}" for a, b in alignment.conflicts) or "a cycle of hosts"
        warnings.append(
            TimelineWarning(
                "clock-inconsistent",
                f"packets contradict the SSH clock bounds ({pairs}); "
                "keeping the SSH estimates, timelines across hosts may show effects before causes",
                hosts=sorted({h for pair in alignment.conflicts for h in pair}),
            )
        )
    for host in alignment.flagged:
        warnings.append(
            TimelineWarning(
                "clock-uncertain",
                f"clock of {host} is uncertain by +-{_ms(alignment[host].error_ns):.3f} ms",
                hosts=[host],
            )
        )
    offsets = {host: est.offset_ns for host, est in alignment.items()}

    uf = col.uf
    wanted = {uf.find(n) for n in col.rst_nodes}
    wanted |= {uf.find(n) for n in col.node_resets}
    components: dict[int, list[int]] = defaultdict(list)
    for node in range(len(uf.parent)):
        root = uf.find(node)
        if include_all or root in wanted:
            components[root].append(node)

    builder = _FlowBuilder(col, offsets, window_ns)
    flows = [builder.build(nodes) for nodes in components.values()]
    flows.sort(key=lambda f: f.start_ts)
    for number, flow in enumerate(flows, 1):
        flow.id = number
        for warning in flow.warnings:
            warning.flow = number
    return Correlation(flows, warnings, alignment)
