"""The same packet across hosts and NAT: sightings -> occurrences, resets -> their RST.

Addresses and ports change at NAT hops; TCP seq, ack and flags do not. Segmentation
offload (TSO/GSO) and GRO cut the same bytes into different packets on different hops (one
65,160-byte packet leaving the client, 45 of 1,448 bytes reaching the server), so a
sighting with payload covers the sequence range [seq, seq+len): sightings with the same
ack and SYN/RST/ACK flags whose ranges overlap are the same bytes. A sighting without
payload (SYN, pure ACK, FIN, RST) is matched exactly on seq, ack, flags and IP ID (which
tells duplicate ACKs apart and survives forwarding and NAT).

Matching sightings close together in aligned time are one *occurrence*: one transmission
seen at several points. A point (host, interface, direction) seeing the same bytes again
starts a new occurrence (a retransmission); copies of one unsegmented range are first told
apart by IP ID where the IP IDs can show them. Everything is one pass to bucket, a sort per
bucket, and an interval sweep inside buckets with payload. See docs/correlation.md.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ebpfdiag.clock import Observation
from ebpfdiag.trace.sightings import ACK, RST, SEND_RESET, SEQ_SPACE, SYN, ResetRecord, Sighting

DEFAULT_WINDOW_NS = 1_000_000_000
"""Matching sightings further apart than this are different occurrences."""

RESET_TIE_NS = 10_000_000
"""A reset record known only by its port is tied to a RST at most this far away in its own
host's clock (the tracepoint and the TC hook see one RST microseconds apart)."""

_DATA_FLAGS = SYN | RST | ACK
"""Flags every piece of a segmented packet keeps (PSH, FIN and CWR go to one piece only)."""


def unwrap(seq: int, ref: int) -> int:
    """``seq`` on a line around ``ref``: the bytes of one occurrence span far less than
    2**31, so their order survives the wrap at 2**32."""
    return (seq - ref + (1 << 31)) % SEQ_SPACE


class Ranges:
    """Disjoint byte ranges seen at one point, sorted: which one overlaps [lo, hi)?"""

    __slots__ = ("starts", "ends", "items")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.items: list[Any] = []

    def find(self, lo: int, hi: int) -> Any:
        i = bisect.bisect_left(self.starts, hi) - 1
        if i >= 0 and self.ends[i] > lo:
            return self.items[i]
        return None

    def add(self, lo: int, hi: int, item: Any) -> None:
        i = bisect.bisect_left(self.starts, lo)
        self.starts.insert(i, lo)
        self.ends.insert(i, hi)
        self.items.insert(i, item)


def _overlapping(bucket: list[Sighting]) -> list[list[Sighting]]:
    """Split a bucket into groups connected by overlapping ranges: an interval sweep, with
    a range that wraps past 2**32 entered a second time below zero."""
    if len(bucket) == 1:
        return [bucket]
    entries = []
    for i, s in enumerate(bucket):
        end = s.seq + s.length
        entries.append((s.seq, end, i))
        if end > SEQ_SPACE:
            entries.append((s.seq - SEQ_SPACE, end - SEQ_SPACE, i))
    entries.sort()
    parent = list(range(len(bucket)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    reach, first = None, -1
    for start, end, i in entries:
        if reach is not None and start < reach:
            ra, rb = find(first), find(i)
            if ra != rb:
                parent[rb] = ra
            reach = max(reach, end)
        else:
            reach, first = end, i
    groups: dict[int, list[Sighting]] = defaultdict(list)
    for i, s in enumerate(bucket):
        groups[find(i)].append(s)
    return list(groups.values())


class Matcher:
    """Cuts sightings into occurrences and keeps the tightest causality observation per
    pair of hosts (for clock tightening)."""

    def __init__(self, offsets: Mapping[str, int], window_ns: int = DEFAULT_WINDOW_NS) -> None:
        self.offsets = offsets
        self.window_ns = window_ns
        self.observations: dict[tuple[str, str], Observation] = {}
        #: per pair the largest departure - arrival seen so far (the observation's bound)
        self._best: dict[tuple[str, str], int] = {}
        self.count = 0

    def occurrences(self, sightings: Iterable[Sighting]) -> Iterator[list[Sighting]]:
        """Set every sighting's ``occ``; yield the occurrences seen at two points or more."""
        exact: dict[tuple[int, int, int, int], list[Sighting]] = defaultdict(list)
        ranged: dict[tuple[int, int], list[Sighting]] = defaultdict(list)
        for s in sightings:
            if s.length:
                ranged[(s.ack, s.flags & _DATA_FLAGS)].append(s)
            else:
                exact[(s.seq, s.ack, s.flags, s.ipid)].append(s)
        for bucket in exact.values():
            if len(bucket) == 1:
                bucket[0].occ = self.count
                self.count += 1
            else:
                yield from self._cut_exact(bucket)
        exact.clear()
        for bucket in ranged.values():
            if len(bucket) > 1 and _one_range(bucket):
                # one range everywhere (no segmentation on the way): seeing it again at a
                # point is what a retransmission looks like, as without payload
                for copies in _by_ipid(bucket):
                    yield from self._cut_exact(copies)
                continue
            for group in _overlapping(bucket):
                if len(group) == 1:
                    group[0].occ = self.count
                    self.count += 1
                else:
                    yield from self._cut(group)

    def _cut_exact(self, group: list[Sighting]) -> Iterator[list[Sighting]]:
        """:meth:`_cut` for sightings of one fingerprint (or one byte range): a point that
        sees it again starts a new occurrence. The common case, so kept lean: each aligned
        time is computed once, and a stable sort of the indices by it takes the sightings
        in the order sorting them by that time would."""
        offsets, window = self.offsets, self.window_ns
        times = [s.ts_ns + offsets[s.host] for s in group]
        members: list[Sighting] = []
        points: set[tuple[str, str, str]] = set()
        start = 0
        for i in sorted(range(len(group)), key=times.__getitem__):
            s, t = group[i], times[i]
            point = (s.host, s.ifname, s.dir)
            if members and (t - start > window or point in points):
                if self._close(members):
                    yield members
                members, points = [], set()
            if not members:
                start = t
            members.append(s)
            points.add(point)
            s.occ = self.count
        if self._close(members):
            yield members

    def _cut(self, group: list[Sighting]) -> Iterator[list[Sighting]]:
        """Cut a time-sorted group of overlapping byte ranges at the window and wherever a
        point sees some of the same bytes again."""
        offsets, window = self.offsets, self.window_ns
        group.sort(key=lambda s: s.ts_ns + offsets[s.host])
        ref = group[0].seq
        members: list[Sighting] = []
        points: dict[tuple[str, str, str], Ranges] = {}
        start = 0
        for s in group:
            t = s.ts_ns + offsets[s.host]
            point = (s.host, s.ifname, s.dir)
            lo = unwrap(s.seq, ref)
            seen = points.get(point)
            again = seen is not None and seen.find(lo, lo + s.length) is not None
            if members and (t - start > window or again):
                if self._close(members):
                    yield members
                members, points = [], {}
            if not members:
                start = t
            members.append(s)
            ranges = points.get(point)
            if ranges is None:
                ranges = points[point] = Ranges()
            ranges.add(lo, lo + s.length, s)
            s.occ = self.count
        if self._close(members):
            yield members

    def _close(self, members: list[Sighting]) -> bool:
        """Count one occurrence and observe its causality; True when it is to be yielded
        (seen at two points or more). A plain call: this runs once per occurrence."""
        self.count += 1
        if len(members) < 2:
            return False
        host = members[0].host
        for s in members:
            if s.host != host:
                _observe(members, self.observations, self._best)
                break
        return True


def _by_ipid(bucket: list[Sighting]) -> list[list[Sighting]]:
    """The copies of one byte range, told apart by IP ID where the IP IDs show them: every
    transmission gets its own IP ID, which survives forwarding and NAT, so when the bucket
    holds as many IP IDs as the busiest point saw copies, each IP ID is one copy. Aligned
    times cannot do this when a copy that died early is followed by one that got through
    sooner after it than the clocks' error (the later host's sighting would join the first
    copy). Anything else (IP ID 0, a host rewriting IP IDs) keeps the one bucket."""
    first = bucket[0].ipid
    for s in bucket:  # the common case, one IP ID: nothing to split (a loop, as _one_range)
        if s.ipid != first:
            break
    else:
        return [bucket]
    by_id: dict[int, list[Sighting]] = defaultdict(list)
    per_point: dict[tuple[str, str, str], int] = defaultdict(int)
    for s in bucket:
        if not s.ipid:
            return [bucket]
        by_id[s.ipid].append(s)
        per_point[(s.host, s.ifname, s.dir)] += 1
    return list(by_id.values()) if len(by_id) == max(per_point.values()) else [bucket]


def _one_range(bucket: list[Sighting]) -> bool:
    """Do all sightings of the bucket carry the same byte range? (A loop: ``all()`` of a
    generator costs more, and this runs once per data sighting.)"""
    first = bucket[0]
    seq, length = first.seq, first.length
    for s in bucket:  # noqa: SIM110 - see the docstring
        if s.seq != seq or s.length != length:
            return False
    return True


def _sole(times: dict[str, int], other: dict[str, int], earlier: bool) -> str | None:
    """The one host whose time in ``times`` comes before (``earlier``) or after its time in
    ``other`` (or that has none there): the first sender, or the last receiver. None when
    no host or more than one does."""
    found = None
    for h, t in times.items():
        o = other.get(h)
        if o is None or (t < o if earlier else t > o):
            if found is not None:
                return None
            found = h
    return found


def _observe(
    members: list[Sighting],
    bounds: dict[tuple[str, str], Observation],
    best: dict[tuple[str, str], int],
) -> None:
    """Record causality pairs of one occurrence that need no clock to be trusted: the sole
    host where the packet starts leaves before every other host sees it, the sole host
    where it ends sees it after every other host, and a packet arriving with the very
    4-tuple that only one other host sent it with came from that host (a link). With
    segmented bytes the earliest departure and the latest arrival are used, which keeps
    every bound true. Runs once per occurrence: plain dicts, one pass, no defaults."""
    sent: dict[tuple[str, int, str, int], dict[str, int]] = {}
    first_in: dict[str, int] = {}
    first_out: dict[str, int] = {}
    last_in: dict[str, int] = {}
    last_out: dict[str, int] = {}
    arrivals = []
    for s in members:
        h, t = s.host, s.ts_ns
        if s.dir == "egress":
            key = (s.saddr, s.sport, s.daddr, s.dport)
            by_host = sent.get(key)
            if by_host is None:
                sent[key] = {h: t}
            elif t < by_host.get(h, t + 1):
                by_host[h] = t
            old = first_out.get(h)
            if old is None:
                first_out[h] = last_out[h] = t
            elif t < old:
                first_out[h] = t
            elif t > last_out[h]:
                last_out[h] = t
        else:
            arrivals.append(s)
            old = first_in.get(h)
            if old is None:
                first_in[h] = last_in[h] = t
            elif t < old:
                first_in[h] = t
            elif t > last_in[h]:
                last_in[h] = t
    pairs = []
    start = _sole(first_out, first_in, earlier=True)
    if start is not None:
        a = first_out[start]
        pairs += [(start, a, dst, t) for dst, t in first_in.items() if dst != start]
    end = _sole(last_in, last_out, earlier=False)
    if end is not None:
        b = last_in[end]
        pairs += [(src, t, end, b) for src, t in last_out.items() if src != end]
    for s in arrivals:
        senders = sent.get((s.saddr, s.sport, s.daddr, s.dport))
        if senders and (len(senders) == 1 or len(senders) == 2 and s.host in senders):
            h = s.host
            for src, ts in senders.items():
                if src != h:
                    pairs.append((src, ts, h, s.ts_ns))
    for src, a, dst, b in pairs:
        key = (src, dst)
        if a - b > best.get(key, -(1 << 80)):
            best[key] = a - b
            bounds[key] = Observation(src, a, dst, b)


def tie_resets(
    resets: list[ResetRecord], sightings: Iterable[Sighting], window_ns: int = DEFAULT_WINDOW_NS
) -> None:
    """Tie each reset record to the RST packet it made (send: leaving its host) or took
    (receive: entering its host): by 4-tuple and seq when the record has them, else by
    port and closeness in that host's own clock. Each RST occurrence on a host is tied to
    one record at most. Sets ``ResetRecord.sighting``."""
    if not resets:  # nothing to tie: spare a pass over every sighting
        return
    by_tuple: dict[tuple, list[Sighting]] = defaultdict(list)
    by_seq: dict[tuple, list[Sighting]] = defaultdict(list)
    by_port: dict[tuple, list[Sighting]] = defaultdict(list)
    for s in sightings:
        if not s.flags & RST:
            continue
        out = s.dir == "egress"
        local = (
            (s.saddr, s.sport, s.daddr, s.dport) if out else (s.daddr, s.dport, s.saddr, s.sport)
        )
        by_tuple[(s.host, out, local)].append(s)
        by_seq[(s.host, out, s.seq)].append(s)
        by_port[(s.host, out, local[1])].append(s)
    port_times: dict[tuple, list[int]] = {}
    for key, cands in by_port.items():
        cands.sort(key=lambda s: s.ts_ns)
        port_times[key] = [s.ts_ns for s in cands]
    claimed: set[tuple[str, int]] = set()
    for r in sorted(resets, key=lambda r: r.ts_ns):
        out = r.probe == SEND_RESET
        if r.full_tuple:
            cands, limit = by_tuple.get((r.host, out, r.tuple), ()), window_ns
        elif r.seq is not None:
            cands, limit = by_seq.get((r.host, out, r.seq), ()), window_ns
        elif r.sport:
            key = (r.host, out, r.sport)
            cands = _near(by_port.get(key, []), port_times.get(key, []), r.ts_ns, RESET_TIE_NS)
            limit = RESET_TIE_NS
        else:
            continue
        best = None
        for s in cands:
            if r.seq is not None and s.seq != r.seq:
                continue
            if r.sport and (s.sport if out else s.dport) != r.sport:
                continue
            gap = abs(s.ts_ns - r.ts_ns)
            closer = best is None or gap < abs(best.ts_ns - r.ts_ns)
            if gap <= limit and closer and (s.host, s.occ) not in claimed:
                best = s
        if best is not None:
            claimed.add((best.host, best.occ))
            r.sighting = best


def _near(cands: list[Sighting], times: list[int], ts_ns: int, limit: int) -> list[Sighting]:
    """The time-sorted candidates within ``limit`` of ``ts_ns``."""
    lo = bisect.bisect_left(times, ts_ns - limit)
    hi = bisect.bisect_right(times, ts_ns + limit)
    return cands[lo:hi]
