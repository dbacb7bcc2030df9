"""Where one flow's time goes: segments, exchanges and the verdict of ``trace latency``.

Everything about packets, NAT and clocks comes from ``ebpfdiag.trace``: a question adds
evidence rules, never its own matching. The rules (docs/correlation.md, "Latency"):

- an *exchange* is a sampled point ``c`` of a request (a byte offset inside the sightings'
  ``[seq, seq+len)``) and its *response*: the occurrence in the other direction of the
  same flow whose data sightings carry ``apt == c`` (a pure ACK with ``apt == c`` only
  acknowledges it, it does not answer it);
- a host's *entry* is its first ingress sighting holding the point, its *exit* the last
  egress one (a bridge port, not the bridge device); consecutive points of the path give
  the segments: on one host its own clock alone (no clock error), between hosts the pair's
  relative offset, tightened from the packets both ways (``clock.pair_bounds``), whose
  half-width is the segment's bound;
- the same point leaving the sender twice is a retransmission: the exchange starts at the
  first copy, and where that copy was last seen says where it was lost (or that it
  arrived), unless a host that could have seen it reported buffer loss in that window
  (then it is unknown).

A round trip is free of clock error: the pair offsets of the way out and back cancel, so
the parts of an exchange (hosts, total wire time, retransmission wait) add up exactly to
the time the sender measured, and the verdict rests on them alone.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from operator import attrgetter
from typing import Any

from ebpfdiag.clock import FLAG_ERROR_NS, Alignment, ClockEstimate, pair_bounds
from ebpfdiag.trace.flows import Flow, Prepared, TimelineWarning, paused_gc, prepare
from ebpfdiag.trace.match import DEFAULT_WINDOW_NS
from ebpfdiag.trace.sightings import ACK, SEQ_SPACE, SYN, Sighting

KEEP = ("counts", "lost", "tcp_probe", "recv", "hello")
"""The tracer's own records this question reads besides packets."""

SLOW_NS = 5_000_000
"""A direction whose p99 exchange takes less than this is healthy. A part is named the
culprit only when the median exchange takes this long too (a slow part slows the typical
exchange; a tail alone is the hosts' scheduling as often as not, measured: a healthy lab
load on a busy 2-core machine has a median of 1.6 ms and a p99 of 37 ms), or when the p99
exchange waited for a retransmission (a loss is never noise)."""

CULPRIT_SHARE = 0.5
"""A part is the culprit when it holds at least this share of the p99 exchange."""

_NEAR = 1 << 30
"""Sequence numbers of one byte stream this close (either way) belong together."""

_TOTAL_NS = attrgetter("total_ns")
"""Sort key of exchanges (a C call: there is one exchange per sampled request)."""


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile of sorted values (``q`` in hundredths: 0.5, 0.9, 0.99)."""
    rank = -(-len(values) * round(q * 100) // 100)  # ceil(n * q), in integers
    return values[max(rank - 1, 0)]


# ---------------------------------------------------------------- records


@dataclass(slots=True)
class Part:
    """One segment of one exchange. ``kind``: ``wire`` (between two hosts: ``src`` ->
    ``dst``), ``host`` (residence on ``src``), ``answer`` (the answering host, from the
    request's entry to the response's exit), ``retransmission`` (the sender's wait between
    the first copy and the one answered). ``bound_ns`` is the clock bound of a cross-host
    figure (None on one host's clock); ``phase`` is ``request`` or ``response``."""

    kind: str
    phase: str
    src: str
    dst: str
    ns: int
    bound_ns: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "wire":
            return f"{self.src}->{self.dst}"
        if self.kind == "host":
            return f"{self.src} ({self.phase})"
        if self.kind == "total":
            return "request->response"
        if self.kind in ("queue", "application"):
            return f"{self.src} {'receive queue' if self.kind == 'queue' else 'application'}"
        if self.kind == "handshake":
            return f"SYN->SYN-ACK at {self.src}"
        if self.kind == "retransmission":
            return "retransmission wait"
        return self.src

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "phase": self.phase, "from": self.src, "to": self.dst,
                "ns": self.ns, "bound_ns": self.bound_ns}  # fmt: skip


@dataclass(slots=True)
class Lost:
    """Where the first copy of a retransmitted request was last seen, and what that says."""

    host: str
    ifname: str
    dir: str
    next_host: str | None
    verdict: str
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "ifname": self.ifname, "dir": self.dir,
                "next_host": self.next_host, "verdict": self.verdict,
                "text": self.text}  # fmt: skip


@dataclass(slots=True)
class Exchange:
    """One sampled request and its response. ``total_ns`` is the sender's own measure:
    the first copy leaving to the response arriving."""

    root: int
    sender: str
    answerer: str
    point: int
    start_ts: int
    total_ns: int
    parts: list[Part]
    copies: int
    occurrences: set[int]
    queue_ns: int | None = None
    app_ns: int | None = None
    lost: Lost | None = None
    probes: dict[str, dict[str, int]] = field(default_factory=dict)
    text: str = ""

    @property
    def direction(self) -> str:
        return f"{self.sender}->{self.answerer}"

    def to_json(self) -> dict[str, Any]:
        return {
            "direction": self.direction, "sender": self.sender, "answerer": self.answerer,
            "point": self.point, "ts": self.start_ts, "total_ns": self.total_ns,
            "copies": self.copies, "queue_ns": self.queue_ns, "app_ns": self.app_ns,
            "parts": [p.to_json() for p in self.parts],
            "lost": self.lost.to_json() if self.lost else None, "tcp_probe": self.probes,
            "text": self.text,
        }  # fmt: skip


@dataclass(slots=True)
class SegmentStats:
    """count, p50, p90, p99 and max of one segment over all exchanges (or handshakes)."""

    direction: str
    kind: str
    phase: str
    src: str
    dst: str
    values: list[int]
    bound_ns: int | None

    @property
    def name(self) -> str:
        return Part(self.kind, self.phase, self.src, self.dst, 0).name

    def figures(self) -> dict[str, int]:
        v = self.values
        return {"count": len(v), "p50_ns": percentile(v, 0.5), "p90_ns": percentile(v, 0.9),
                "p99_ns": percentile(v, 0.99), "max_ns": v[-1]}  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"type": "segment", "direction": self.direction,
                               "kind": self.kind, "phase": self.phase, "name": self.name,
                               "from": self.src, "to": self.dst}  # fmt: skip
        if self.kind != "wire":
            rec["host"] = self.src
        return {**rec, **self.figures(), "bound_ns": self.bound_ns}


@dataclass(slots=True)
class DirectionVerdict:
    """Where the p99 exchange of one direction spent its time; ``culprit`` is None when
    the direction is healthy or the evidence is missing (``missing`` says what)."""

    direction: str
    exchanges: int
    p99_ns: int | None
    parts: list[tuple[str, int, int | None]]
    culprit: str | None
    missing: list[str]
    text: str

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "verdict", "direction": self.direction, "exchanges": self.exchanges,
            "p99_ns": self.p99_ns,
            "parts": [{"name": n, "ns": v, "bound_ns": b} for n, v, b in self.parts],
            "culprit": self.culprit, "missing": self.missing, "text": self.text,
        }  # fmt: skip


@dataclass(slots=True)
class ExchangeView:
    """What a slow exchange's timeline shows under its table (``Flow.verdict``)."""

    exchange: Exchange

    @property
    def text(self) -> str:
        return self.exchange.text

    def to_json(self) -> dict[str, Any]:
        return self.exchange.to_json()


@dataclass(slots=True)
class PairClock:
    """The relative offset of two hosts' clocks as the packets bound it."""

    a: str
    b: str
    offset_ns: int
    bound_ns: int

    def to_json(self) -> dict[str, Any]:
        return {"type": "clock_pair", "hosts": [self.a, self.b], "offset_ns": self.offset_ns,
                "bound_ns": self.bound_ns}  # fmt: skip


@dataclass(slots=True)
class Latency:
    """The answer of ``trace latency``: statistics, verdicts, the slowest exchanges as
    timelines, sampling per host and clocks. ``records()`` is the NDJSON."""

    segments: list[SegmentStats]
    verdicts: list[DirectionVerdict]
    slowest: list[Flow]
    exchanges: int
    flows: int
    sampling: dict[str, dict[str, Any]]
    rtt: dict[str, dict[str, int]]
    pairs: list[PairClock]
    warnings: list[TimelineWarning]
    clocks: Alignment

    def summary(self) -> dict[str, Any]:
        return {"type": "summary", "exchanges": self.exchanges, "flows": self.flows,
                "verdicts": [v.text for v in self.verdicts]}  # fmt: skip

    def records(self) -> Iterator[dict[str, Any]]:
        for w in self.warnings:
            yield w.to_json()
        for host, counts in self.sampling.items():
            yield {"type": "sampling", "host": host, **counts}
        for host, rtt in self.rtt.items():
            yield {"type": "rtt", "host": host, **rtt}
        for pair in self.pairs:
            yield pair.to_json()
        for seg in self.segments:
            yield seg.to_json()
        for rank, flow in enumerate(self.slowest, 1):
            assert isinstance(flow.verdict, ExchangeView)
            ex = flow.verdict.exchange
            yield {"type": "exchange", "rank": rank, **ex.to_json(),
                   "flow": flow.to_json()}  # fmt: skip
        for v in self.verdicts:
            yield v.to_json()
        yield self.summary()


# ---------------------------------------------------------------- evidence


class _Seen:
    """One transmission of a point along its path: per host the entry and exit (host
    clock), and where it was seen last."""

    __slots__ = ("hosts", "entry", "exit", "occ", "sightings")

    def __init__(self, sightings: list[Sighting], offsets: Mapping[str, int]) -> None:
        # hosts in causal order, as ``trace.flows`` orders a path: where the packet first
        # leaves, then hosts it passes through, then where it only arrives (aligned time
        # within each rank); entry/exit in each host's own clock
        entry: dict[str, int] = {}
        exit_: dict[str, int] = {}
        first: dict[str, Sighting] = {}
        for s in sightings:
            h, t = s.host, s.ts_ns
            if s.dir == "ingress":
                old = entry.get(h)
                if old is None or t < old:
                    entry[h] = t
            else:
                old = exit_.get(h)
                if old is None or t > old:
                    exit_[h] = t
            f = first.get(h)
            if f is None or t < f.ts_ns:
                first[h] = s

        if len(first) > 1:
            ranked = [
                (0 if f.dir == "egress" else 1 if h in exit_ else 2, f.ts_ns + offsets[h], h)
                for h, f in first.items()
            ]
            ranked.sort()
            self.hosts = [h for _, _, h in ranked]
        else:
            self.hosts = list(first)
        self.entry, self.exit = entry, exit_
        self.occ = sightings[0].occ
        self.sightings = sightings

    @property
    def sender(self) -> str:
        return self.hosts[0]

    @property
    def last(self) -> Sighting:
        """The latest sighting on the last host (the last of equal times); only a lost
        copy needs it, so it is found on demand."""
        host = self.hosts[-1]
        last = None
        for s in self.sightings:
            if s.host == host and (last is None or s.ts_ns >= last.ts_ns):
                last = s
        assert last is not None
        return last

    def points(self) -> list[tuple[str, str, int]]:
        """(host, "in"|"out", ts_ns) in path order."""
        out = []
        entry, exit_ = self.entry, self.exit
        for h in self.hosts:
            t_in = entry.get(h)
            if t_in is not None:
                out.append((h, "in", t_in))
            t_out = exit_.get(h)
            if t_out is not None and (t_in is None or t_out >= t_in):
                out.append((h, "out", t_out))
        return out


class _Evidence:
    """The tracer's other records, per host: buffer loss, receive calls, tcp_probe."""

    def __init__(self, kept: Iterable[Mapping[str, Any]]) -> None:
        self.counts: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.last_counts: dict[str, dict[str, int]] = {}
        self.lost: dict[str, list[int]] = defaultdict(list)
        self.recv: dict[tuple, list[int]] = defaultdict(list)
        self.probes: dict[tuple, list[tuple[int, int, int]]] = defaultdict(list)
        self.rtt: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for rec in kept:
            try:
                self._add(rec)
            except (KeyError, TypeError, ValueError):
                continue
        for seq in (*self.counts.values(), *self.lost.values(), *self.recv.values(),
                    *self.probes.values()):  # fmt: skip
            seq.sort()

    def _add(self, rec: Mapping[str, Any]) -> None:
        host, kind = rec["host"], rec["type"]
        if kind == "counts":
            ts = int(rec["ts_ns"])
            self.counts[host].append((ts, int(rec.get("lost") or 0)))
            last = self.last_counts.get(host)
            if last is None or ts >= last["ts_ns"]:
                self.last_counts[host] = {
                    "ts_ns": ts,
                    **{k: int(rec.get(k) or 0) for k in ("seen", "sampled", "lost")},
                }
        elif kind == "lost":
            if rec.get("ts_ns") is not None:
                self.lost[host].append(int(rec["ts_ns"]))
        elif kind == "recv":
            self.recv[(host, *_ends(rec))].append(int(rec["ts_ns"]))
        elif kind == "tcp_probe":
            entry = (int(rec["ts_ns"]), int(rec["srtt_us"]), int(rec["snd_cwnd"]))
            self.probes[(host, *_ends(rec))].append(entry)
            self.rtt[host].append(entry[1:])

    def loss_between(self, host: str, lo: int, hi: int) -> str | None:
        """Why ``host``'s tracer may have missed a sighting in [lo, hi] of its clock, or
        None when its counters prove it lost nothing there."""
        if any(lo <= t <= hi for t in self.lost.get(host, ())):
            return f"{host}'s tracer lost records in that window"
        counts = self.counts.get(host)
        if not counts:
            return f"{host} sent no counts"
        i = bisect.bisect_right(counts, (lo, 1 << 62)) - 1
        j = bisect.bisect_left(counts, (hi, -1))
        if j >= len(counts):
            return f"{host}'s counters end before the window does"
        before = counts[i][1] if i >= 0 else 0
        if counts[j][1] > before:
            return f"{host}'s tracer lost {counts[j][1] - before} records around then"
        return None

    def recv_after(self, host: str, tup: tuple, lo: int, hi: int) -> int | None:
        """The first receive call on this socket in [lo, hi] (host clock)."""
        times = self.recv.get((host, *_norm_ends(tup)))
        if not times:
            return None
        i = bisect.bisect_left(times, lo)
        return times[i] if i < len(times) and times[i] <= hi else None

    def probe_at(self, host: str, tup: tuple, ts: int) -> dict[str, int] | None:
        """The socket's last tcp_probe at or before ``ts`` (else its first)."""
        entries = self.probes.get((host, *_norm_ends(tup)))
        if not entries:
            return None
        i = max(bisect.bisect_right(entries, (ts, 1 << 62, 0)) - 1, 0)
        t, srtt, cwnd = entries[i]
        return {"ts_ns": t, "srtt_us": srtt, "snd_cwnd": cwnd}


def _norm_ends(tup: tuple) -> tuple:
    a, b = (tup[0], int(tup[1])), (tup[2], int(tup[3]))
    return (*min(a, b), *max(a, b))


def _ends(rec: Mapping[str, Any]) -> tuple:
    return _norm_ends((rec["saddr"], rec["sport"], rec["daddr"], rec["dport"]))


def _requested(
    points: list[int], responses: Mapping[int, tuple], seq: int, length: int, ack: int
) -> list[int]:
    """The answered points (sorted) that the data [seq, seq+length) acknowledging ``ack``
    requests: it holds them and flows the other way (its ack near each response's seq and
    its seq near that response's ack)."""
    n, hi, near = len(points), seq + length, _NEAR
    i = bisect.bisect_left(points, seq)
    found = []
    while i < n and points[i] < hi:
        found.append(points[i])
        i += 1
    if hi > SEQ_SPACE:  # the range wraps past 2**32
        i, wrap = 0, hi - SEQ_SPACE
        while i < n and points[i] < wrap:
            found.append(points[i])
            i += 1
    out = []
    for c in found:
        first = responses[c][2]
        if (ack - first.seq + near) % SEQ_SPACE < 2 * near and (
            seq - first.ack + near
        ) % SEQ_SPACE < 2 * near:
            out.append(c)
    return out


class _Rules:
    """Exchanges of one stream: requests, responses, segments, retransmissions."""

    def __init__(self, prepared: Prepared, evidence: _Evidence, flag_ns: int) -> None:
        self.p = prepared
        self.ev = evidence
        self.offsets = {h: e.offset_ns for h, e in prepared.clocks.items()}
        pairs = (
            pair_bounds(prepared.clocks, prepared.observations)
            if prepared.clocks.consistent
            else None
        )
        self.pairs: dict[tuple[str, str], tuple[int, int]] = {}
        if pairs:
            for (a, b), (lo, hi) in pairs.items():
                # pairs bounded less tightly than a flagged clock give no cross-host figures
                if hi - lo < 2 * flag_ns:
                    self.pairs[(a, b)] = ((lo + hi) // 2, (hi - lo + 1) // 2)
        self.handshakes: dict[tuple[str, str], list[int]] = defaultdict(list)

    def wire(self, a: str, ta: int, b: str, tb: int) -> tuple[int, int | None]:
        """From host a at ta to host b at tb (host clocks): the figure and its bound."""
        pair = self.pairs.get((a, b))
        if pair is None:  # no bound: the hosts' own offsets, flagged as unbounded
            return tb + self.offsets[b] - ta - self.offsets[a], None
        mid, bound = pair
        return tb - ta + mid, bound

    def exchanges(self) -> Iterator[Exchange]:
        by_root: dict[int, list[Sighting]] = defaultdict(list)
        conns = self.p.conns
        root_of = [conns.find(node) for node in range(len(conns.parent))]
        for s in self.p.recorded.sightings:
            by_root[root_of[s.node]].append(s)
        for root, seen in by_root.items():
            yield from self._flow(root, seen)

    def _flow(self, root: int, seen: list[Sighting]) -> Iterator[Exchange]:
        data: list[Sighting] = []
        syns: list[Sighting] = []
        answered: set[int] = set()
        for s in seen:
            if s.length:
                data.append(s)
                if s.apt is not None:
                    answered.add(s.occ)
            elif s.flags & SYN:
                syns.append(s)
        initiator = None
        if syns:
            self._handshake(syns)
            opened = [x for x in syns if x.flags & (SYN | ACK) == SYN]
            starts = {x.host for x in opened if x.dir == "egress"} - {
                x.host for x in opened if x.dir == "ingress"
            }
            initiator = next(iter(starts)) if len(starts) == 1 else None
        implied = self._first_answer(syns, data, answered) if syns else None
        if implied is not None:
            answered.add(implied[0])
        by_occ: dict[int, list[Sighting]] = defaultdict(list)
        for s in data:  # responses carry payload: their occurrences hold data sightings only
            if s.occ in answered:
                by_occ[s.occ].append(s)
        responses: dict[int, tuple[int, list[Sighting], Sighting, int]] = {}
        offsets = self.offsets
        for occ in answered:
            members = by_occ[occ]
            marked = []
            apts = set()
            for s in members:
                if s.apt is not None:
                    marked.append(s)
                    apts.add(s.apt)
            if implied is not None and occ == implied[0]:
                c = implied[1]
                marked = [s for s in members if s.seq == implied[2]]  # its first bytes
            elif len(apts) == 1:
                (c,) = apts
            else:  # hosts disagree (one lost its ack state): the most common, then highest
                votes = Counter(s.apt for s in marked)
                c = max(votes, key=lambda a: (votes[a], a))
            first, t = None, 0
            for s in marked:
                if (s.apt == c or s.apt is None) and (
                    first is None or s.ts_ns + offsets[s.host] < t
                ):
                    first, t = s, s.ts_ns + offsets[s.host]
            assert first is not None
            old = responses.get(c)
            if old is None or t < old[3]:
                responses[c] = (occ, members, first, t)
        if not responses:
            return
        points = sorted(responses)
        requests: dict[int, list[Sighting]] = defaultdict(list)
        # the copies of one packet along its path share seq, length and ack: the points
        # they request are looked up once per packet, not once per sighting
        held: dict[tuple[int, int, int], list[int]] = {}
        for s in data:
            key = (s.seq, s.length, s.ack)
            found = held.get(key)
            if found is None:
                found = held[key] = _requested(points, responses, s.seq, s.length, s.ack)
            for c in found:
                requests[c].append(s)
        for c, reqs in requests.items():
            ex = self._exchange(root, c, reqs, *responses[c][:3], initiator)
            if ex is not None:
                yield ex

    def _exchange(
        self,
        root: int,
        c: int,
        reqs: list[Sighting],
        resp_occ: int,
        resp_members: list[Sighting],
        first: Sighting,
        initiator: str | None,
    ) -> Exchange | None:
        offsets = self.offsets
        s0 = first.seq
        held = [s for s in resp_members if (s0 - s.seq) % SEQ_SPACE < s.length]  # holds s0
        if not held:  # a record with a negative length, say: nothing to time
            return None
        response = _Seen(held, offsets)
        # the requester is where the response ends up, the answerer where it starts
        sender = response.hosts[-1]
        if sender not in response.entry:
            return None
        if not self._from_initiator(sender, initiator, reqs):
            return None
        by_occ: dict[int, list[Sighting]] = defaultdict(list)
        for s in reqs:
            by_occ[s.occ].append(s)
        copies = []
        for m in by_occ.values():
            cp = _Seen(m, offsets)
            if sender in cp.exit:
                copies.append(cp)
        if not copies:
            return None
        if len(copies) > 1:
            copies.sort(key=lambda cp: cp.exit[sender])
        answerer = response.sender
        final = copies[-1]  # the last copy that reached the answerer, else the last one
        for cp in copies:
            if cp.hosts[-1] == answerer:
                final = cp
        start = copies[0].exit[sender]
        total = response.entry[sender] - start
        if total < 0:
            return None
        parts: list[Part] = []
        if final is not copies[0]:
            parts.append(Part("retransmission", "request", sender, sender,
                              final.exit[sender] - start))  # fmt: skip
        parts += self._parts(final.points(), "request")
        queue = app = None
        if answerer in final.entry and answerer in response.exit:
            t_in, t_out = final.entry[answerer], response.exit[answerer]
            parts.append(Part("answer", "answer", answerer, answerer, t_out - t_in))
            at = self._answer_socket(resp_members, answerer) if self.ev.recv else None
            got = self.ev.recv_after(answerer, at, t_in, t_out) if at else None
            if got is not None:
                queue, app = got - t_in, t_out - got
        parts += self._parts(response.points(), "response")
        occs = {cp.occ for cp in copies}
        occs.add(resp_occ)
        ex = Exchange(root, sender, answerer, c, start + offsets[sender], total, parts,
                      len(copies), occs, queue, app)  # fmt: skip
        if len(copies) > 1:
            ex.lost = self._lost(copies[0], copies[1], sender)
        for host, tup_src in ((sender, reqs), (answerer, resp_members)) if self.ev.probes else ():
            tup = next((s.tuple for s in tup_src if s.host == host), None)
            if tup is not None:
                probe = self.ev.probe_at(host, tup, response.entry[sender] - offsets[sender]
                                         + offsets[host])  # fmt: skip
                if probe is not None:
                    ex.probes[host] = probe
        return ex

    @staticmethod
    def _first_answer(
        syns: list[Sighting], data: list[Sighting], answered: set[int]
    ) -> tuple[int, int, int] | None:
        """The responder's first data carries no ``apt`` (the tracer has no ack state for
        a direction before its first packet), so a connection's first answer would never
        count. With the handshake seen it is known: the data starting right after the
        responder's ISN. It answers the highest sampled point of the initiator's bytes
        below its ack (a point some sighting reported as its ``pt``). Returns (its
        occurrence, that point, its first sequence number)."""
        synack = next((x for x in syns if x.flags & (SYN | ACK) == SYN | ACK), None)
        if synack is None:
            return None
        first_byte = (synack.seq + 1) % SEQ_SPACE
        heads = [s for s in data if s.seq == first_byte]
        if not heads or any(s.occ in answered for s in heads):
            return None
        start = synack.ack  # the initiator's first byte
        span = (heads[0].ack - start) % SEQ_SPACE
        points = [
            s.pt
            for s in data
            if s.pt is not None
            and (s.seq - start) % SEQ_SPACE < span
            and (s.pt - start) % SEQ_SPACE < span
        ]
        if not points:
            return None
        return heads[0].occ, max(points, key=lambda p: (p - start) % SEQ_SPACE), first_byte

    @staticmethod
    def _from_initiator(sender: str, initiator: str | None, reqs: list[Sighting]) -> bool:
        """Requests come from the side that opened the connection (its SYN's sender; without
        a handshake in the trace, the side with the higher, ephemeral port). Data of the
        other side acknowledged by the initiator's next request is the initiator's own pace
        (think time), not a delay of the path: never an exchange."""
        if initiator is not None:
            return sender == initiator
        sent = next((s for s in reqs if s.host == sender and s.dir == "egress"), None)
        return sent is not None and sent.sport >= sent.dport

    @staticmethod
    def _answer_socket(members: list[Sighting], host: str) -> tuple | None:
        return next((s.tuple for s in members if s.host == host), None)

    def _parts(self, points: list[tuple[str, str, int]], phase: str) -> list[Part]:
        """Consecutive points of one path -> its segments (a host's residence, or the way
        between two hosts, whatever untraced hops lie there)."""
        parts = []
        for (ha, _, ta), (hb, _, tb) in pairwise(points):
            if ha == hb:
                parts.append(Part("host", phase, ha, ha, tb - ta))
            else:
                ns, bound = self.wire(ha, ta, hb, tb)
                parts.append(Part("wire", phase, ha, hb, max(ns, 0), bound))
        return parts

    def _lost(self, first: _Seen, second: _Seen, sender: str) -> Lost:
        """Where the first copy was last seen; "lost on X" (or "arrived") only when the
        tracers that could have seen it prove they missed nothing in the window between
        that sighting and the retransmission, else unknown."""
        last = first.last
        host = last.host
        i = first.hosts.index(host)
        later = second.hosts[second.hosts.index(host) + 1 :] if host in second.hosts else []
        next_host = later[0] if later else None
        wait = second.exit[sender] - first.exit[sender]
        lo, hi = last.ts_ns, last.ts_ns + wait + DEFAULT_WINDOW_NS // 10
        where = f"{last.host} {last.ifname}"
        if i == len(first.hosts) - 1 and last.dir == "ingress" and next_host is None:
            # Checked on every host of its way: a lost sighting of the second copy could
            # have joined it to the first one.
            seen, sep = f"seen reaching {where}; its answer did not come back", "?"
            verdict, claim, suspects = "arrived", "", list(dict.fromkeys(first.hosts))
        elif last.dir == "ingress":
            seen, sep = f"last seen entering {where}, never left {host}", ":"
            verdict, claim, suspects = "lost", f": lost on {host}", [host]
        else:
            seen, sep = f"last seen leaving {where}", ":"
            seen += f", never reached {next_host}" if next_host else ""
            place = f"lost between {host} and {next_host}" if next_host else "lost after it"
            verdict, claim = "lost", f": {place}"
            suspects = [host] + ([next_host] if next_host else [])
        doubts = [d for h in suspects if (d := self._doubt(h, last, lo, hi))]
        if doubts:
            return Lost(host, last.ifname, last.dir, next_host, "unknown",
                        f"{seen}{sep} unknown ({'; '.join(doubts)})")  # fmt: skip
        return Lost(host, last.ifname, last.dir, next_host, verdict, seen + claim)

    def _doubt(self, host: str, last: Sighting, lo: int, hi: int) -> str | None:
        """Why ``host`` may have seen the copy unrecorded (window moved to its clock,
        widened by both clocks' errors: the offsets that move it are only estimates)."""
        shift = self.offsets[last.host] - self.offsets[host]
        widen = 0
        if host != last.host:
            clocks = self.p.clocks
            widen = clocks[host].error_ns + clocks[last.host].error_ns
        return self.ev.loss_between(host, lo + shift - widen, hi + shift + widen)

    def _handshake(self, syns: list[Sighting]) -> None:
        """SYN -> SYN-ACK per host: on the initiator from its SYN leaving to the SYN-ACK
        arriving, elsewhere from the SYN entering to the SYN-ACK leaving (the first of
        each, so a retransmitted SYN counts its timeout)."""
        syn_in: dict[str, int] = {}
        syn_out: dict[str, int] = {}
        isn = None
        synack: list[Sighting] = []
        for s in syns:
            kind = s.flags & (SYN | ACK)
            if kind == SYN:
                isn = s.seq if isn is None else isn
                times = syn_in if s.dir == "ingress" else syn_out
                times[s.host] = min(times.get(s.host, s.ts_ns), s.ts_ns)
            elif kind == SYN | ACK:
                synack.append(s)
        if isn is None:
            return
        answers = [s for s in synack if s.ack == (isn + 1) % SEQ_SPACE]
        for host in {*syn_in, *syn_out}:
            role, t = ("in", syn_in[host]) if host in syn_in else ("out", syn_out[host])
            want = "egress" if role == "in" else "ingress"
            times = [s.ts_ns for s in answers if s.host == host and s.dir == want and s.ts_ns >= t]
            if times:
                self.handshakes[(host, role)].append(min(times) - t)


# ---------------------------------------------------------------- statistics and verdicts


def _stats(exchanges: list[Exchange], handshakes: Mapping) -> list[SegmentStats]:
    groups: dict[tuple, SegmentStats] = {}
    for ex in exchanges:
        d = ex.direction
        key = (d, "total", "total", ex.sender, ex.answerer)
        stat = groups.get(key)
        if stat is None:
            stat = groups[key] = SegmentStats(d, "total", "total", ex.sender, ex.answerer, [],
                                              None)  # fmt: skip
        stat.values.append(ex.total_ns)
        for p in ex.parts:
            key = (d, p.kind, p.phase, p.src, p.dst)
            stat = groups.get(key)
            if stat is None:
                stat = groups[key] = SegmentStats(d, p.kind, p.phase, p.src, p.dst, [], p.bound_ns)
            stat.values.append(p.ns)
        for kind, value in (("queue", ex.queue_ns), ("application", ex.app_ns)):
            if value is not None:
                key = (d, kind, "answer", ex.answerer, ex.answerer)
                stat = groups.get(key)
                if stat is None:
                    stat = groups[key] = SegmentStats(
                        d, kind, "answer", ex.answerer, ex.answerer, [], None
                    )
                stat.values.append(value)
    for (host, role), values in sorted(
        handshakes.items(), key=lambda kv: (kv[0][1] != "out", kv[0][0])
    ):
        groups[("handshake", host, role)] = SegmentStats(
            "handshake", "handshake", "SYN->SYN-ACK", host, host, values, None
        )
    order = {"total": 0, "retransmission": 1, "request": 2, "answer": 3, "response": 4,
             "SYN->SYN-ACK": 5}  # fmt: skip
    out = list(groups.values())
    for st in out:
        st.values.sort()
    return sorted(out, key=lambda st: (st.direction == "handshake", st.direction, order[st.phase]))


def fmt_ms(ns: int, bound_ns: int | None = None) -> str:
    """A figure for people. A cross-host figure carries its clock bound; one smaller than
    its bound is never shown as a precise number: the truth lies in [0, ns + bound], so it
    is shown as "< ns + bound"."""
    if bound_ns is not None and ns < bound_ns:
        return f"< {_ms_text(ns + bound_ns)} ms"
    text = f"{_ms_text(ns)} ms"
    return f"{text} ± {_ms_text(bound_ns)}" if bound_ns else text


def shown_bound(
    kind: str, src: str, dst: str, bound_ns: int | None, clocks: Mapping[str, ClockEstimate]
) -> int | None:
    """The bound a figure is shown with: a wire figure no pair bounds rests on the SSH
    offsets of its two hosts, so both their errors (the records keep ``bound_ns`` None)."""
    if kind != "wire" or bound_ns is not None or src not in clocks or dst not in clocks:
        return bound_ns
    return clocks[src].error_ns + clocks[dst].error_ns


def _ms_text(ns: int) -> str:
    value = ns / 1e6
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3f}".rstrip("0").rstrip(".") if value else "0"


def _verdict(
    direction: str, exs: list[Exchange], clocks: Mapping[str, ClockEstimate]
) -> DirectionVerdict:
    """Where the p99 exchange of one direction spent its time (parts clock-free)."""
    missing: list[str] = []
    exs = sorted(exs, key=_TOTAL_NS)
    ex = exs[percentile(list(range(len(exs))), 0.99)]
    parts: dict[str, int] = defaultdict(int)
    names: list[str] = []
    wire = 0
    wire_pairs: Counter = Counter()
    bounds: dict[tuple[str, str], int | None] = {}
    for p in ex.parts:
        if p.kind == "wire":
            wire += p.ns
            wire_pairs[(p.src, p.dst)] += 1
            bounds[(p.src, p.dst)] = p.bound_ns
            continue
        key = {"answer": f"{p.src}", "host": p.src, "retransmission": "retransmission"}[p.kind]
        if key not in parts:
            names.append(key)
        parts[key] += p.ns
    # the way out and the way back share each pair's offset: it cancels in the total
    unbalanced = shown_unbalanced = 0
    for (a, b), n in wire_pairs.items():
        extra = n - wire_pairs.get((b, a), 0)
        if extra > 0:
            unbalanced += extra * (bounds[(a, b)] or 0)
            shown_unbalanced += extra * (shown_bound("wire", a, b, bounds[(a, b)], clocks) or 0)
    gap = ex.total_ns - sum(parts.values()) - wire
    listed: list[tuple[str, int, int | None]] = [(key, parts[key], None) for key in names]
    if wire_pairs:
        listed.append(("wire", wire, unbalanced or None))
    if ex.answerer not in parts:
        missing.append(f"{ex.answerer} was not seen both taking the request and answering")
    if abs(gap) > max(unbalanced, 1000):
        listed.append(("unaccounted", gap, None))
    listed.sort(key=lambda item: -item[1])
    words = []
    for key, value, bound in listed:
        label = key
        if key == "wire":
            bound = shown_unbalanced or None
        if key == ex.answerer:
            if ex.queue_ns is not None and ex.app_ns is not None:
                split = (f" (receive queue {fmt_ms(ex.queue_ns)}, "
                         f"application {fmt_ms(ex.app_ns)})")  # fmt: skip
            else:
                split = " (stack + application)"
            words.append(f"{label} {fmt_ms(value, bound)}{split}")
        elif key == "retransmission":
            words.append(f"retransmission wait {fmt_ms(value)}")
        else:
            words.append(f"{label} {fmt_ms(value, bound)}")
    text = f"{direction}: p99 request->response {fmt_ms(ex.total_ns)}: " + ", ".join(words)
    culprit = None
    median = exs[percentile(list(range(len(exs))), 0.5)].total_ns
    top = max(listed, key=lambda item: item[1]) if listed else ("", 0, None)
    typical = median >= SLOW_NS or top[0] == "retransmission"
    if ex.total_ns >= SLOW_NS and not missing and typical:
        if top[1] >= CULPRIT_SHARE * ex.total_ns and top[0] != "unaccounted":
            culprit = top[0]
            share = round(100 * top[1] / ex.total_ns)
            where = (
                "between the traced hosts (the wire and any untraced hop on it)"
                if culprit == "wire"
                else culprit
            )
            text += f"; most of it ({share}%) is {where}"
            if culprit == "retransmission" and ex.lost is not None:
                text += f" (the first copy was {ex.lost.text})"
    elif ex.total_ns < SLOW_NS:
        text += f"; nothing stands out (under {fmt_ms(SLOW_NS)})"
    elif not missing:
        text += (f"; only the tail is slow (median {fmt_ms(median)}, under "
                 f"{fmt_ms(SLOW_NS)}): no part slows the typical exchange")  # fmt: skip
    if missing:
        text += f"; culprit unknown: {', '.join(missing)}"
    return DirectionVerdict(direction, len(exs), ex.total_ns, listed, culprit, missing, text)


def _describe(ex: Exchange, clocks: Mapping[str, ClockEstimate]) -> str:
    bits = [f"{ex.direction} request->response {fmt_ms(ex.total_ns)}"]
    bits += [
        f"{p.name} {fmt_ms(p.ns, shown_bound(p.kind, p.src, p.dst, p.bound_ns, clocks))}"
        for p in ex.parts
    ]
    text = ": ".join(bits[:1]) + ": " + ", ".join(bits[1:])
    if ex.copies > 1:
        text += f"; sent {ex.copies} times"
    if ex.lost is not None:
        text += f"; first copy {ex.lost.text}"
    return text


def _unsampled_hint(sampling: Mapping[str, Mapping[str, Any]]) -> str:
    """What to do when nothing was sampled: a small connection's bytes lie in one block,
    so 1 connection (or 1 block of a long one) in N is followed; say so and how to see
    more."""
    ns = {v["sample_n"] for v in sampling.values() if isinstance(v.get("sample_n"), int)}
    if not ns or max(ns) <= 1:
        return ""
    n = max(ns)
    seen = sum(v.get("seen") or 0 for v in sampling.values())
    return (f"; the tracers kept 1 sequence block in {n} (about 1 small connection in {n}) "
            f"of {seen} packets seen: trace longer or more connections, or rerun with "
            "--sample 1 to keep every packet")  # fmt: skip


def correlate(
    events: Iterable[Mapping[str, Any]],
    clocks: Mapping[str, ClockEstimate],
    *,
    hellos: Mapping[str, Mapping[str, Any]] | None = None,
    slowest: int = 5,
    window_ns: int = DEFAULT_WINDOW_NS,
    flag_ns: int = FLAG_ERROR_NS,
) -> Latency:
    """Host-tagged tcp_latency records -> segment statistics, verdicts, slowest exchanges."""
    with paused_gc():
        return _correlate(events, clocks, hellos, slowest, window_ns, flag_ns)


def _correlate(
    events: Iterable[Mapping[str, Any]],
    clocks: Mapping[str, ClockEstimate],
    hellos: Mapping[str, Mapping[str, Any]] | None,
    slowest: int,
    window_ns: int,
    flag_ns: int,
) -> Latency:
    prepared = prepare(events, clocks, hellos=hellos, window_ns=window_ns, flag_ns=flag_ns,
                       keep=KEEP)  # fmt: skip
    evidence = _Evidence(prepared.recorded.kept)
    rules = _Rules(prepared, evidence, flag_ns)
    exchanges = list(rules.exchanges())
    segments = _stats(exchanges, rules.handshakes)
    by_dir: dict[str, list[Exchange]] = defaultdict(list)
    for ex in exchanges:
        by_dir[ex.direction].append(ex)
    bounded = {h for pair in rules.pairs for h in pair}
    # a host's own offset may stay uncertain while its pairs are tight: the pairs are what
    # cross-host figures use (``clock_pair`` records)
    warnings = [
        w
        for w in prepared.warnings
        if not (w.kind == "clock-uncertain" and set(w.hosts) <= bounded)
    ]
    unbounded = sorted(
        {(s.src, s.dst) for s in segments if s.kind == "wire" and s.bound_ns is None}
    )
    if unbounded:
        pairs = ", ".join(f"{a}->{b}" for a, b in unbounded)
        warnings.append(TimelineWarning(
            "clock-unbounded",
            f"no packets both ways bound the clocks of {pairs}: their wire figures use the "
            "SSH estimates", hosts=sorted({h for p in unbounded for h in p})))  # fmt: skip
    ranked = sorted(exchanges, key=_TOTAL_NS, reverse=True)[:slowest]  # ties keep their order
    flows = []
    for ex in ranked:
        ex.text = _describe(ex, prepared.clocks)
        flow = prepared.excerpt(ex.root, ex.occurrences)
        flow.verdict = ExchangeView(ex)
        flows.append(flow)
    roots = {ex.root for ex in exchanges}
    for i, flow in enumerate(flows, 1):
        flow.id = i
    sampling = {}
    hello_of = {r["host"]: r for r in prepared.recorded.kept if r.get("type") == "hello"}
    hello_of.update(hellos or {})
    for host in sorted(set(evidence.last_counts) | prepared.recorded.hosts):
        counts = evidence.last_counts.get(host, {})
        sample = (hello_of.get(host) or {}).get("sample")
        sample = sample if isinstance(sample, dict) else {}
        sampling[host] = {
            "seen": counts.get("seen"), "sampled": counts.get("sampled"),
            "lost": counts.get("lost"), "sample_n": sample.get("n"),
            "block": sample.get("block"),
        }  # fmt: skip
    verdicts = [_verdict(d, exs, prepared.clocks) for d, exs in sorted(by_dir.items())]
    if not exchanges:
        verdicts.append(DirectionVerdict(
            "-", 0, None, [], None, ["no sampled request with its response"],
            "unknown: no sampled request was seen with its response (no data packet whose "
            "apt names a sampled request point)" + _unsampled_hint(sampling)))  # fmt: skip
    rtt = {}
    for host, entries in sorted(evidence.rtt.items()):
        srtt = sorted(e[0] for e in entries)
        cwnd = sorted(e[1] for e in entries)
        rtt[host] = {"count": len(srtt), "srtt_p50_us": percentile(srtt, 0.5),
                     "srtt_p99_us": percentile(srtt, 0.99), "srtt_max_us": srtt[-1],
                     "cwnd_p50": percentile(cwnd, 0.5), "cwnd_min": cwnd[0]}  # fmt: skip
    pairs = [PairClock(a, b, mid, bound) for (a, b), (mid, bound) in sorted(rules.pairs.items())
             if a < b]  # fmt: skip
    return Latency(segments, verdicts, flows, len(exchanges), len(roots), sampling, rtt,
                   pairs, warnings, prepared.clocks)  # fmt: skip
