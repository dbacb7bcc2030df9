"""Occurrences -> flows: one connection across hosts, its paths, NAT and clocks.

Each host's view of a connection is a *node*: its direction-normalised 4-tuple on that
host and the incarnation of that tuple (a SYN with another initial sequence number starts a
new one, so a reused source port never joins the older connection). All nodes of one
occurrence are the same connection, so a union-find over nodes joins the client's tuple,
the load balancer's tuples before and after NAT and the server's tuple into one flow.
Clocks are tightened with the occurrences' causality, then only the flows asked for are
built in full. Questions (``ebpfdiag.questions``) add their verdicts to these flows.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Protocol

from ebpfdiag.clock import (
    FLAG_ERROR_NS,
    Alignment,
    ClockEstimate,
    Observation,
    flagged_hosts,
    tighten,
)
from ebpfdiag.trace.match import DEFAULT_WINDOW_NS, Matcher, Ranges, tie_resets, unwrap
from ebpfdiag.trace.sightings import (
    ACK,
    SEND_RESET,
    SEQ_SPACE,
    SYN,
    Recorded,
    ResetRecord,
    Sighting,
    collect,
    flag_names,
)

MISSING_CLOCK_ERROR_NS = 10**15
"""Error bound given to a host without any clock estimate: it constrains nothing."""

Tuple4 = tuple[str, int, str, int]

_TS_NS = attrgetter("ts_ns")
"""Sort key of sightings in their host's own clock (a C call, not a Python frame)."""


def ms(delta_ns: int) -> float:
    return round(delta_ns / 1e6, 3)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Correlation allocates millions of small objects without cycles: the cyclic garbage
    collector would walk them all again and again and free nothing (a quarter of the time
    at a million sightings). Reference counting still frees everything as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# ---------------------------------------------------------------- records


@dataclass(slots=True)
class Hop:
    """One packet as seen at one (host, ifname, dir); ``ts`` is aligned controller ns and
    ``err_ns`` the clock error bound of that host's offset."""

    host: str
    ifname: str
    dir: str
    ts: int
    ts_ns: int
    err_ns: int
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
            "ts": self.ts, "ts_ns": self.ts_ns, "err_ns": self.err_ns,
            "rel_ms": ms(self.ts - origin_ts), "saddr": self.saddr, "sport": self.sport,
            "daddr": self.daddr, "dport": self.dport, "flags": self.flags,
            "flag_names": flag_names(self.flags), "seq": self.seq, "ack": self.ack,
            "len": self.len, "ipid": self.ipid, "why": self.why, "packet": self.packet,
            "hop_ns": self.hop_ns, "nat": self.nat,
        }  # fmt: skip


@dataclass(slots=True)
class ResetEvent:
    """A tcp_send_reset / tcp_receive_reset record placed on the flow's timeline;
    ``packet`` is the RST it was tied to (index into the flow's packets) or None."""

    host: str
    probe: str
    ts: int
    ts_ns: int
    err_ns: int
    saddr: str | None
    sport: int
    daddr: str | None
    dport: int
    state: str | None
    reason: str | None
    pid: int | None
    comm: str | None
    seq: int | None
    ack: int | None
    tuple_from: str | None
    sk_kind: str | None
    packet: int | None = None

    def to_json(self, origin_ts: int) -> dict[str, Any]:
        return {
            "kind": "reset", "host": self.host, "probe": self.probe, "ts": self.ts,
            "ts_ns": self.ts_ns, "err_ns": self.err_ns, "rel_ms": ms(self.ts - origin_ts),
            "saddr": self.saddr, "sport": self.sport, "daddr": self.daddr,
            "dport": self.dport, "state": self.state, "reason": self.reason, "pid": self.pid,
            "comm": self.comm, "seq": self.seq, "ack": self.ack,
            "tuple_from": self.tuple_from, "sk_kind": self.sk_kind,
            "packet": self.packet,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A flow's 4-tuple as one host sees it, oriented initiator -> responder."""

    host: str
    saddr: str
    sport: int
    daddr: str
    dport: int

    @property
    def tuple(self) -> Tuple4:
        return (self.saddr, self.sport, self.daddr, self.dport)

    def text(self) -> str:
        return f"{self.saddr}:{self.sport} > {self.daddr}:{self.dport}"

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "saddr": self.saddr, "sport": self.sport,
                "daddr": self.daddr, "dport": self.dport}  # fmt: skip


@dataclass(frozen=True, slots=True)
class NatMapping:
    """A tuple rewrite on the path, oriented initiator -> responder.

    ``host`` translated (all its interfaces are one translating point); None when the
    tuples differ between two traced hosts and the translating host is not traced.
    ``from_host``/``to_host``: traced hosts that saw the tuple before/after, if any.
    """

    host: str | None
    before: Endpoint
    after: Endpoint
    kind: str
    from_host: str | None
    to_host: str | None
    first_ts: int

    def to_json(self) -> dict[str, Any]:
        def tup(e: Endpoint) -> dict[str, Any]:
            return {"saddr": e.saddr, "sport": e.sport, "daddr": e.daddr, "dport": e.dport}

        rec = {"host": self.host, "kind": self.kind, "before": tup(self.before),
               "after": tup(self.after), "from_host": self.from_host,
               "to_host": self.to_host}  # fmt: skip
        if self.host is None:
            rec["between"] = [self.from_host, self.to_host]
        return rec


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


class Verdict(Protocol):
    def to_json(self) -> dict[str, Any]: ...


@dataclass(slots=True)
class Flow:
    """One connection across hosts: its per-host tuples, NAT rewrites, timeline and the
    answer a question gave about it (``verdict``). ``paths`` holds each packet's hops in
    causal order (``paths[i]`` is packet ``i``)."""

    id: int
    isn: tuple[int | None, int | None]
    endpoints: list[Endpoint]
    nat: list[NatMapping]
    events: list[Hop | ResetEvent]
    paths: list[list[Hop]]
    warnings: list[TimelineWarning]
    verdict: Verdict | None = None

    @property
    def start_ts(self) -> int:
        return self.events[0].ts if self.events else 0

    @property
    def resets(self) -> list[ResetEvent]:
        return [e for e in self.events if isinstance(e, ResetEvent)]

    def to_json(self) -> dict[str, Any]:
        start = self.start_ts
        return {
            "type": "flow", "id": self.id,
            "isn": {"initiator": self.isn[0], "responder": self.isn[1]},
            "endpoints": [e.to_json() for e in self.endpoints],
            "nat": [m.to_json() for m in self.nat],
            "verdict": self.verdict.to_json() if self.verdict else None,
            "events": [ev.to_json(start) for ev in self.events],
            "warnings": len(self.warnings),
        }  # fmt: skip


@dataclass(slots=True)
class Traced:
    """Flows built from a stream, global warnings, the clocks used, and what the hosts
    said about their probes (``probes``: host -> "ok" | "missing" | None)."""

    flows: list[Flow]
    warnings: list[TimelineWarning]
    clocks: Alignment
    probes: dict[str, str | None]


# ---------------------------------------------------------------- connections


def _norm(host: str, t: tuple) -> tuple:
    saddr, sport, daddr, dport = t
    if (str(saddr), sport) <= (str(daddr), dport):
        return (host, saddr, sport, daddr, dport)
    return (host, daddr, dport, saddr, sport)


def _initiator_isn(s: Sighting) -> int | None:
    if not s.flags & SYN:
        return None
    return (s.ack - 1) % SEQ_SPACE if s.flags & ACK else s.seq


class Connections:
    """Nodes (host, 4-tuple, incarnation) and the union-find that joins them into flows."""

    def __init__(self, recorded: Recorded) -> None:
        self.parent: list[int] = []
        self.sightings: list[list[Sighting]] = []
        self.resets: dict[int, list[ResetRecord]] = defaultdict(list)
        self.isn: list[list[int | None]] = []
        self.start: list[tuple[str, int]] = []
        self._starts: dict[tuple, list[tuple[int, int]]] = {}
        self._variants: dict[tuple[int, int], int] = {}
        self._moved: dict[int, list[Sighting]] = defaultdict(list)
        self._relocated = False
        by_tuple: dict[tuple, list[Sighting]] = defaultdict(list)
        for s in recorded.sightings:  # _norm, inlined: this runs once per sighting
            saddr, daddr = s.saddr, s.daddr
            if saddr < daddr or saddr == daddr and s.sport <= s.dport:
                by_tuple[(s.host, saddr, s.sport, daddr, s.dport)].append(s)
            else:
                by_tuple[(s.host, daddr, s.dport, saddr, s.sport)].append(s)
        for key, seen in by_tuple.items():
            self._split(key, seen)
        self._by_tuple = by_tuple

    def _new(self, start: tuple[str, int] = ("", 0)) -> int:
        self.parent.append(len(self.parent))
        self.sightings.append([])
        self.isn.append([None, None])
        self.start.append(start)
        return len(self.parent) - 1

    def join(self, members: list[Sighting], offsets: Mapping[str, int]) -> None:
        """One occurrence: its nodes are one connection. A tuple that never saw the newer
        connection's SYN (a reply-only view) still holds the older incarnation; members in
        a node of another initial sequence number than the occurrence's latest-started one
        move to that tuple's node for it."""
        isn = self.isn
        chosen, mixed, partial = None, False, False
        for s in members:
            known = isn[s.node][0]
            if known is None:
                partial = True
            elif chosen is None:
                chosen = known
            elif known != chosen:
                mixed = True
        if mixed:
            latest = max(
                (s.node for s in members if isn[s.node][0] is not None),
                key=lambda n: self.start[n][1] + offsets[self.start[n][0]],
            )
            chosen = isn[latest][0]
        if chosen is not None and (mixed or partial):
            for s in members:
                if isn[s.node][0] != chosen:
                    if isn[s.node][0] is None:
                        self._moved[s.node].append(s)
                    s.node = self._variant(s.node, chosen)
                    self._relocated = True
        parent = self.parent
        root = self.find(members[0].node)
        for s in members:
            if parent[s.node] != root:  # else joined already (the common case)
                root = self.union(root, s.node)

    def _variant(self, node: int, initiator_isn: int) -> int:
        key = (node, initiator_isn)
        found = self._variants.get(key)
        if found is None:
            found = self._variants[key] = self._new(self.start[node])
            self.isn[found][0] = initiator_isn
        return found

    def regroup(self) -> None:
        """Sightings per node again, after :meth:`join` moved some. The rest of a node
        without a SYN of its own follows its nearest moved sighting (in that host's own
        clock): nothing says it belongs to another connection. When nothing moved, the
        lists :meth:`_split` made are already these."""
        if not self._relocated:
            return
        for node, moved in self._moved.items():
            moved.sort(key=_TS_NS)
            times = [s.ts_ns for s in moved]
            for s in self.sightings[node]:
                if s.node == node:
                    at = bisect.bisect_left(times, s.ts_ns)
                    near = [moved[i] for i in (at - 1, at) if 0 <= i < len(moved)]
                    s.node = min(near, key=lambda m: abs(m.ts_ns - s.ts_ns)).node
        self.sightings = [[] for _ in self.parent]
        for seen in self._by_tuple.values():
            for s in seen:
                self.sightings[s.node].append(s)

    def _split(self, key: tuple, seen: list[Sighting]) -> None:
        """Cut one host's tuple into incarnations at SYNs with a new initial sequence
        number (in that host's own clock, which needs no alignment)."""
        seen.sort(key=_TS_NS)
        starts: list[tuple[int, int]] = []
        node, isn, others = -1, None, 0
        members: list[Sighting] = []
        for s in seen:
            if s.flags & SYN:
                syn_isn = _initiator_isn(s)
                if node < 0 or (syn_isn != isn and (isn is not None or others)):
                    node, others = self._new((s.host, s.ts_ns)), 0
                    starts.append((s.ts_ns, node))
                    members = self.sightings[node]
                isn = self.isn[node][0] = syn_isn
                if s.flags & ACK:
                    self.isn[node][1] = s.seq
            else:
                if node < 0:
                    node, isn, others = self._new((s.host, s.ts_ns)), None, 0
                    starts.append((s.ts_ns, node))
                    members = self.sightings[node]
                others += 1
            s.node = node
            members.append(s)
        self._starts[key] = starts

    def place(self, r: ResetRecord) -> bool:
        """Put a reset record on its RST's node, else on its own tuple's incarnation at
        that time; records without a full tuple and without a RST stay out of flows."""
        if r.sighting is not None:
            r.node = r.sighting.node
        elif r.full_tuple:
            key = _norm(r.host, r.tuple)
            starts = self._starts.get(key)
            if not starts:
                node = self._new()
                self._starts[key] = [(r.ts_ns, node)]
                r.node = node
            else:
                at = bisect.bisect_right(starts, (r.ts_ns, len(self.parent))) - 1
                r.node = starts[max(at, 0)][1]
        else:
            return False
        self.resets[r.node].append(r)
        return True

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> int:
        """Join the sets of ``a`` and ``b``; returns the root of the joined set."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
        return min(ra, rb)


# ---------------------------------------------------------------- building flows


def _path(members: list[Sighting], offsets: Mapping[str, int]) -> list[Sighting]:
    """Order one occurrence causally: hosts where the packet first leaves, then hosts it
    passes through (by aligned time), then hosts where it only arrives; within a host by
    that host's own clock, which needs no alignment."""
    by_host: dict[str, list[Sighting]] = defaultdict(list)
    for s in members:
        by_host[s.host].append(s)
    keyed = []
    for host, seen in by_host.items():
        seen.sort(key=_TS_NS)
        if seen[0].dir == "egress":
            rank = 0
        elif any(s.dir == "egress" for s in seen):
            rank = 1
        else:
            rank = 2
        keyed.append(((rank, seen[0].ts_ns + offsets[host]), seen))
    keyed.sort(key=lambda item: item[0])
    return [s for _, seen in keyed for s in seen]


def _previous(path: list[Sighting]) -> list[int | None]:
    """For each sighting, the point its bytes came from: the previous one for a packet
    without payload, else the latest earlier sighting at another point carrying some of
    them (each point's ranges are indexed, so a 45-piece packet costs no more than 45)."""
    if not path[0].length:
        return [None, *range(len(path) - 1)]
    ref = path[0].seq
    points: dict[tuple[str, str, str], Ranges] = {}
    found: list[int | None] = []
    for pos, s in enumerate(path):
        lo = unwrap(s.seq, ref)
        here = (s.host, s.ifname, s.dir)
        best = None
        for point, ranges in points.items():
            if point != here:
                k = ranges.find(lo, lo + s.length)
                if k is not None and (best is None or k > best):
                    best = k
        found.append(best)
        if here not in points:
            points[here] = Ranges()
        points[here].add(lo, lo + s.length, pos)
    return found


def _orient(host: str, seen: list[Sighting]) -> Endpoint | None:
    """Initiator -> responder from a SYN, else a SYN-ACK; None without either."""
    for s in seen:
        if s.flags & (SYN | ACK) == SYN:
            return Endpoint(host, s.saddr, s.sport, s.daddr, s.dport)
    for s in seen:
        if s.flags & (SYN | ACK) == SYN | ACK:
            return Endpoint(host, s.daddr, s.dport, s.saddr, s.sport)
    return None


def _orient_all(
    nodes: list[int], conns: Connections, paths: list[list[Hop]], node_of: dict[int, int]
) -> dict[int, Endpoint]:
    """Every node's tuple, initiator first. Nodes without a handshake packet take the
    direction of a matched packet in a node that has one (NAT keeps who initiated); the
    rest guess that the higher port initiates."""
    oriented: dict[int, Endpoint] = {}
    for node in nodes:
        found = _orient(_host_of(conns, node), conns.sightings[node])
        if found is not None:
            oriented[node] = found
    for _ in range(2):  # a chain of translations may need a second pass
        if len(oriented) == len(nodes):
            break
        for hops in paths:
            sure = next((h for h in hops if node_of[id(h)] in oriented), None)
            if sure is None:
                continue
            e = oriented[node_of[id(sure)]]
            forward = (sure.saddr, sure.sport) == (e.saddr, e.sport)
            for h in hops:
                n = node_of[id(h)]
                if n not in oriented:
                    src, dst = ((h.saddr, h.sport), (h.daddr, h.dport))
                    if not forward:
                        src, dst = dst, src
                    oriented[n] = Endpoint(h.host, *src, *dst)
    for node in nodes:
        if node not in oriented:
            seen = conns.sightings[node]
            if seen:
                a, ap, b, bp = seen[0].saddr, seen[0].sport, seen[0].daddr, seen[0].dport
            else:
                a, ap, b, bp = conns.resets[node][0].tuple
            host = _host_of(conns, node)
            oriented[node] = (
                Endpoint(host, a, ap, b, bp) if ap >= bp else Endpoint(host, b, bp, a, ap)
            )
    return oriented


def _host_of(conns: Connections, node: int) -> str:
    seen = conns.sightings[node]
    return seen[0].host if seen else conns.resets[node][0].host


def nat_kind(before: Endpoint, after: Endpoint) -> str:
    kinds = []
    if (before.daddr, before.dport) != (after.daddr, after.dport):
        kinds.append("dnat")
    if (before.saddr, before.sport) != (after.saddr, after.sport):
        kinds.append("snat")
    return "+".join(kinds)


class _FlowBuilder:
    """Builds the record of one flow from its nodes."""

    def __init__(self, conns: Connections, clocks: Alignment) -> None:
        self.conns = conns
        self.offsets = {host: est.offset_ns for host, est in clocks.items()}
        self.errors = {host: est.error_ns for host, est in clocks.items()}

    def build(self, nodes: list[int], only: set[int] | None = None) -> Flow:
        """The flow of these nodes; with ``only``, just those occurrences (no resets)."""
        conns, offsets, errors = self.conns, self.offsets, self.errors
        occurrences: dict[int, list[Sighting]] = defaultdict(list)
        resets: list[ResetRecord] = []
        for node in nodes:
            for s in conns.sightings[node]:
                if only is None or s.occ in only:
                    occurrences[s.occ].append(s)
            if only is None:
                resets.extend(conns.resets.get(node, ()))

        warnings: list[TimelineWarning] = []
        paths: list[list[Hop]] = []
        order: list[tuple[int, int, int, int, Hop | ResetEvent]] = []
        node_of: dict[int, int] = {}
        packet_of_occ: dict[int, int] = {}
        ordered = sorted(
            (_path(m, offsets) for m in occurrences.values()),
            key=lambda p: p[0].ts_ns + offsets[p[0].host],
        )
        for index, path in enumerate(ordered):
            packet_of_occ[path[0].occ] = index
            hops: list[Hop] = []
            shown = None
            sources = _previous(path)
            for pos, s in enumerate(path):
                ts = s.ts_ns + offsets[s.host]
                hop = Hop(s.host, s.ifname, s.dir, ts, s.ts_ns, errors[s.host], s.saddr,
                          s.sport, s.daddr, s.dport, s.flags, s.seq, s.ack, s.length, s.ipid,
                          s.why, index)  # fmt: skip
                prev = sources[pos]
                if prev is not None:
                    p = path[prev]
                    hop.hop_ns = ts - hops[prev].ts
                    hop.nat = p.tuple != s.tuple
                    if p.host != s.host and hop.hop_ns < 0:
                        warnings.append(_causality(hops[prev], hop))
                shown = ts if shown is None else max(shown, ts)
                order.append((shown, 1, index, pos, hop))
                node_of[id(hop)] = s.node
                hops.append(hop)
            paths.append(hops)
        for r in resets:
            ts = r.ts_ns + offsets[r.host]
            packet = packet_of_occ.get(r.sighting.occ) if r.sighting is not None else None
            ev = ResetEvent(r.host, r.probe, ts, r.ts_ns, errors[r.host], r.saddr, r.sport,
                            r.daddr, r.dport, r.state, r.reason, r.pid, r.comm, r.seq,
                            r.ack, r.tuple_from, r.sk_kind, packet)  # fmt: skip
            order.append((ts, 0 if r.probe == SEND_RESET else 2, -1, 0, ev))
        order.sort(key=lambda item: item[:4])
        events = [item[4] for item in order]

        by_node = _orient_all(nodes, conns, paths, node_of)
        first_seen: dict[int, int] = {}
        for pos, ev in enumerate(events):
            if isinstance(ev, Hop):
                first_seen.setdefault(node_of[id(ev)], pos)
        outer = _outer_nodes(paths, node_of)
        shown = [n for n in nodes if n in outer or n not in first_seen]
        endpoints = [
            by_node[n] for n in sorted(shown, key=lambda n: first_seen.get(n, len(events)))
        ]
        nat = _nat(paths, node_of, by_node, endpoints)
        initiator = next((conns.isn[n][0] for n in nodes if conns.isn[n][0] is not None), None)
        responder = next(
            (
                conns.isn[n][1]
                for n in nodes
                if conns.isn[n][1] is not None and conns.isn[n][0] == initiator
            ),
            None,
        )
        isn = (initiator, responder)
        return Flow(0, isn, endpoints, nat, events, paths, warnings)


def _causality(before: Hop, after: Hop) -> TimelineWarning:
    return TimelineWarning(
        "causality",
        f"{flag_names(after.flags)} packet seen entering {after.host} {after.ifname} "
        f"{ms(-(after.hop_ns or 0)):.3f} ms before it left {before.host} {before.ifname} "
        "after clock alignment: the timeline across these hosts is unreliable",
        hosts=[before.host, after.host],
        by_ns=-(after.hop_ns or 0),
    )


def _host_segments(hops: list[Hop]) -> list[list[Hop]]:
    """A path cut into its runs on one host (a path visits each host once)."""
    segments: list[list[Hop]] = []
    for hop in hops:
        if segments and segments[-1][0].host == hop.host:
            segments[-1].append(hop)
        else:
            segments.append([hop])
    return segments


def _outer_nodes(paths: list[list[Hop]], node_of: dict[int, int]) -> set[int]:
    """Nodes a packet had entering or leaving some host: the tuples a host really used.
    The others are views half way through a host's NAT (a bridge device between DNAT and
    SNAT) and stay in the events only."""
    outer = set()
    for hops in paths:
        for seg in _host_segments(hops):
            outer.add(node_of[id(seg[0])])
            outer.add(node_of[id(seg[-1])])
    return outer


def _nat(
    paths: list[list[Hop]],
    node_of: dict[int, int],
    by_node: dict[int, Endpoint],
    endpoints: list[Endpoint],
) -> list[NatMapping]:
    """One mapping per translating host and tuple pair: the tuple a packet had entering
    the host (its first sighting there) against the one it had leaving (its last), so the
    half-translated views inside a host (a bridge device between DNAT and SNAT) do not
    count. Between two traced hosts, differing tuples mean an untraced translator."""
    seen_at: dict[Tuple4, list[str]] = defaultdict(list)
    for e in endpoints:
        seen_at[e.tuple].append(e.host)

    def other(t: Tuple4, host: str | None) -> str | None:
        return next((h for h in seen_at.get(t, ()) if h != host), None)

    found: dict[tuple, NatMapping] = {}

    def add(host, a: Hop, b: Hop, up: str | None, down: str | None) -> None:
        ea, eb = by_node[node_of[id(a)]], by_node[node_of[id(b)]]
        forward = (a.saddr, a.sport) == (ea.saddr, ea.sport)
        before, after = (ea, eb) if forward else (eb, ea)
        if not forward:
            up, down = down, up
        kind = nat_kind(before, after)
        key = (host, before.tuple, after.tuple)
        if not kind or key in found:
            return
        if host is not None:
            up, down = other(before.tuple, host), other(after.tuple, host)
        found[key] = NatMapping(host, before, after, kind, up, down, min(a.ts, b.ts))

    for hops in paths:
        segments = _host_segments(hops)
        for i, seg in enumerate(segments):
            first, last = seg[0], seg[-1]
            inside = first.dir == "ingress" and last.dir == "egress"
            if inside and node_of[id(first)] != node_of[id(last)]:
                add(first.host, first, last, None, None)
            if i and segments[i - 1][-1].dir == "egress" and first.dir == "ingress":
                prev = segments[i - 1][-1]
                if node_of[id(prev)] != node_of[id(first)]:
                    add(None, prev, first, prev.host, first.host)
    return sorted(found.values(), key=lambda m: m.first_ts)


# ---------------------------------------------------------------- entry point


def _initial_clocks(
    clocks: Mapping[str, ClockEstimate], recorded: Recorded, warnings: list[TimelineWarning]
) -> dict[str, ClockEstimate]:
    """SSH estimates, plus a stand-in for hosts that have none (from the controller's
    ``ts`` when present), flagged so that nobody trusts their ordering."""
    result = dict(clocks)
    for host in sorted(recorded.hosts - set(clocks)):
        result[host] = ClockEstimate(recorded.ts_hints.get(host, 0), MISSING_CLOCK_ERROR_NS)
        warnings.append(
            TimelineWarning(
                "clock-missing",
                f"no clock estimate for {host}: its events cannot be ordered against other hosts",
                hosts=[host],
            )
        )
    return result


def _align(
    initial: dict[str, ClockEstimate],
    observations: Iterable,
    tighten_clocks: bool,
    flag_ns: int,
    warnings: list[TimelineWarning],
) -> Alignment:
    known = {h: e for h, e in initial.items() if e.error_ns < MISSING_CLOCK_ERROR_NS}
    if tighten_clocks:
        alignment = tighten(known, observations, flag_ns=flag_ns)
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
                f"clock of {host} is uncertain by +-{ms(alignment[host].error_ns):.3f} ms",
                hosts=[host],
            )
        )
    return alignment


@dataclass(slots=True)
class Prepared:
    """A stream after matching and clock tightening, before any flow is built: what a
    question reads when it needs the sightings themselves (``conns.find(s.node)`` is a
    sighting's flow, ``s.occ`` its occurrence). ``observations`` are the causality pairs
    the clocks were tightened with."""

    recorded: Recorded
    conns: Connections
    clocks: Alignment
    warnings: list[TimelineWarning]
    observations: list[Observation]

    def flows(self, select: Callable[[Sighting], bool] | None = None) -> list[Flow]:
        """The flows with a sighting ``select`` accepts, or with a reset record (all when
        ``select`` is None), numbered in time order."""
        conns = self.conns
        wanted = None
        if select is not None:
            wanted = {conns.find(s.node) for s in self.recorded.sightings if select(s)}
            wanted |= {conns.find(n) for n in conns.resets}
        components: dict[int, list[int]] = defaultdict(list)
        for node in range(len(conns.parent)):
            root = conns.find(node)
            if wanted is None or root in wanted:
                components[root].append(node)
        builder = _FlowBuilder(conns, self.clocks)
        flows = [builder.build(nodes) for nodes in components.values()]
        flows.sort(key=lambda f: f.start_ts)
        for number, flow in enumerate(flows, 1):
            flow.id = number
            for warning in flow.warnings:
                warning.flow = number
        return flows

    def excerpt(self, root: int, occurrences: set[int]) -> Flow:
        """One flow's timeline restricted to some of its occurrences (e.g. one exchange of
        a request and its response), with the flow's endpoints and NAT; ``id`` is 0."""
        conns = self.conns
        nodes = [n for n in range(len(conns.parent)) if conns.find(n) == root]
        return _FlowBuilder(conns, self.clocks).build(nodes, occurrences)


def prepare(
    events: Iterable[Mapping[str, Any]],
    clocks: Mapping[str, ClockEstimate],
    *,
    hellos: Mapping[str, Mapping[str, Any]] | None = None,
    window_ns: int = DEFAULT_WINDOW_NS,
    tighten_clocks: bool = True,
    flag_ns: int = FLAG_ERROR_NS,
    keep: Iterable[str] = (),
) -> Prepared:
    """Read, match and align a stream (see :func:`trace_flows`); records of the types in
    ``keep`` are kept as they are in ``recorded.kept``."""
    recorded = collect(events, hellos, keep)
    warnings: list[TimelineWarning] = []
    if recorded.malformed:
        warnings.append(
            TimelineWarning("malformed", f"{recorded.malformed} records lacked required fields")
        )
    for (host, source), count in sorted(recorded.lost.items()):
        warnings.append(
            TimelineWarning(
                "lost",
                f"{host} lost {count} {source} records: flows there may be incomplete",
                hosts=[host],
            )
        )
    initial = _initial_clocks(clocks, recorded, warnings)
    conns = Connections(recorded)
    offsets = {h: e.offset_ns for h, e in initial.items()}
    matcher = Matcher(offsets, window_ns)
    for members in matcher.occurrences(recorded.sightings):
        conns.join(members, offsets)
    conns.regroup()
    tie_resets(recorded.resets, recorded.sightings, window_ns)
    unplaced = [r for r in recorded.resets if not conns.place(r)]
    if unplaced:
        hosts = sorted({r.host for r in unplaced})
        warnings.append(
            TimelineWarning(
                "reset-unplaced",
                f"{len(unplaced)} reset records on {', '.join(hosts)} have no full 4-tuple "
                "and no RST packet leaving or entering their host to tie them to",
                hosts=hosts,
            )
        )
    observations = list(matcher.observations.values())
    alignment = _align(initial, observations, tighten_clocks, flag_ns, warnings)
    return Prepared(recorded, conns, alignment, warnings, observations)


def trace_flows(
    events: Iterable[Mapping[str, Any]],
    clocks: Mapping[str, ClockEstimate],
    *,
    hellos: Mapping[str, Mapping[str, Any]] | None = None,
    select: Callable[[Sighting], bool] | None = None,
    window_ns: int = DEFAULT_WINDOW_NS,
    tighten_clocks: bool = True,
    flag_ns: int = FLAG_ERROR_NS,
) -> Traced:
    """Host-tagged ``packet``/``reset`` records -> flows across hosts and NAT.

    ``clocks`` are the SSH estimates per host, tightened with the packets' own causality
    unless ``tighten_clocks`` is False; every output ``ts`` is ``ts_ns + offset`` with the
    clocks actually used. Only flows with a sighting ``select`` accepts, or with a reset
    record, are built (all flows when ``select`` is None). Records of other types are
    ignored, so a whole recorded stream can be passed as is.
    """
    with paused_gc():
        prepared = prepare(
            events,
            clocks,
            hellos=hellos,
            window_ns=window_ns,
            tighten_clocks=tighten_clocks,
            flag_ns=flag_ns,
        )
        return Traced(
            prepared.flows(select),
            prepared.warnings,
            prepared.clocks,
            dict(prepared.recorded.probes),
        )
