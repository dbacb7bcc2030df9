"""Per-host clock alignment: host CLOCK_MONOTONIC ns -> controller time (ns since the epoch).

Remote scripts stamp events with the host's monotonic clock, which has an arbitrary origin
per host. The controller pings each host over SSH, stamping each ping with its own
``time.monotonic_ns()`` before sending and after the answer: the host read its clock
somewhere in between, so every sample bounds the offset ``controller - host`` to an
interval, whatever the delays on the way (NTP-style, but never trusting a midpoint more
than its interval). Alignment uses the controller's monotonic clock, never its wall clock,
so an NTP step on the controller during a trace cannot move events; output ``ts`` is still
ns since the epoch through ONE :class:`EpochAnchor` (a monotonic/wall pair taken once per
run), a constant shift applied to every sample.

Offsets change over a long trace (the hosts' oscillators drift against the controller's;
a suspended or paused host jumps), so :class:`HostClock` keeps pinging results as a model:
segments in which the offset is linear in host time, with the drift bounded by the samples
themselves, and a new segment when a sample contradicts the model (a step). ``at(h)``
gives the offset valid at host time ``h`` with the error bound that holds there.

Packets seen leaving one host and arriving at another then narrow the constant summary
bounds further (:func:`tighten`): nothing arrives before it was sent. Everything here is
pure arithmetic on integers, except the anchor.
"""

from __future__ import annotations

import bisect
import math
import operator
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from math import ceil, floor

ERROR_FLOOR_NS = 10_000
"""Added to every sample's interval: the host's reading and the controller's stamps are
not taken at the exact instants the bytes pass, and clock rates differ over one round trip."""

FLAG_ERROR_NS = 5_000_000
"""Hosts whose offset is uncertain by more than this are reported as ``flagged``."""

MAX_DRIFT = 200e-6
"""Largest rate difference assumed between a host's and the controller's monotonic clock
(200 ppm, twice a common oscillator's tolerance) until the samples bound it tighter."""

BEST_WINDOW_NS = 4_000_000_000
"""Per window of this much host time, only the sample with the narrowest interval is kept
to interpolate between: slow round trips (a busy host) never set the bounds."""


@dataclass(frozen=True, slots=True)
class ClockSample:
    """One SSH ping: controller time before sending, host monotonic, controller time after.

    The controller's times are from ``time.monotonic_ns()`` (see :class:`EpochAnchor`)."""

    t_send_ns: int
    host_mono_ns: int
    t_recv_ns: int

    @property
    def rtt_ns(self) -> int:
        return self.t_recv_ns - self.t_send_ns


@dataclass(frozen=True, slots=True)
class EpochAnchor:
    """The one controller monotonic -> epoch conversion of a run.

    Taken once (the tightest of a few back-to-back readings), then only added: a wall-clock
    step later in the run changes nothing, and all hosts share the same shift, so their
    relative alignment never depends on it."""

    mono_ns: int
    epoch_ns: int

    @classmethod
    def now(cls) -> EpochAnchor:
        best: tuple[int, int, int] | None = None
        for _ in range(5):
            before = time.monotonic_ns()
            wall = time.time_ns()
            after = time.monotonic_ns()
            if best is None or after - before < best[0]:
                best = (after - before, (before + after) // 2, wall)
        assert best is not None
        return cls(best[1], best[2])

    @property
    def shift_ns(self) -> int:
        return self.epoch_ns - self.mono_ns

    def to_epoch(self, mono_ns: int) -> int:
        return mono_ns + self.shift_ns

    def sample(self, sample: ClockSample) -> ClockSample:
        """A sample with the controller's stamps moved from monotonic to epoch ns."""
        shift = self.shift_ns
        return ClockSample(sample.t_send_ns + shift, sample.host_mono_ns, sample.t_recv_ns + shift)


@dataclass(frozen=True, slots=True)
class ClockEstimate:
    """controller_ns ~= host_mono_ns + offset_ns, true value within +- error_ns."""

    offset_ns: int
    error_ns: int

    @property
    def low(self) -> int:
        return self.offset_ns - self.error_ns

    @property
    def high(self) -> int:
        return self.offset_ns + self.error_ns

    def align(self, host_mono_ns: int) -> int:
        """Host monotonic ns -> controller ns."""
        return host_mono_ns + self.offset_ns

    @classmethod
    def between(cls, low: int, high: int) -> ClockEstimate:
        """The estimate whose interval covers [low, high] (rounded outwards)."""
        mid = (low + high) // 2
        return cls(mid, max(high - mid, mid - low))


@dataclass(frozen=True, slots=True)
class Observation:
    """One packet seen leaving host ``src`` and later arriving at host ``dst`` (host clocks)."""

    src: str
    src_mono_ns: int
    dst: str
    dst_mono_ns: int


class Alignment(dict[str, ClockEstimate]):
    """Estimates per host, plus what tightening found.

    ``flagged``: hosts whose error exceeds the threshold (their timelines are fuzzy).
    ``consistent``: False when the packet constraints contradict the SSH bounds; the SSH
    estimates are kept then and ``conflicts`` lists the (src, dst) pairs at fault.
    """

    def __init__(
        self,
        estimates: Mapping[str, ClockEstimate],
        *,
        flagged: Iterable[str] = (),
        consistent: bool = True,
        conflicts: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(estimates)
        self.flagged: list[str] = sorted(flagged)
        self.consistent = consistent
        self.conflicts: list[tuple[str, str]] = sorted(conflicts)


def estimate(samples: Iterable[ClockSample], floor_ns: int = ERROR_FLOOR_NS) -> ClockEstimate:
    """Offset from the sample with the smallest round trip: the host read its clock
    somewhere inside that round trip, so its midpoint is off by at most half of it."""
    best: ClockSample | None = None
    for sample in samples:
        if sample.rtt_ns < 0:
            raise ValueError(f"clock sample answered before it was sent: {sample}")
        if best is None or sample.rtt_ns < best.rtt_ns:
            best = sample
    if best is None:
        raise ValueError("no clock samples")
    half = best.rtt_ns // 2
    midpoint = best.t_send_ns + half
    return ClockEstimate(midpoint - best.host_mono_ns, best.rtt_ns - half + floor_ns)


def flagged_hosts(
    estimates: Mapping[str, ClockEstimate], flag_ns: int = FLAG_ERROR_NS
) -> list[str]:
    """Hosts whose offset is too uncertain to order events against other hosts."""
    return sorted(host for host, est in estimates.items() if est.error_ns > flag_ns)


def tighten(
    estimates: Mapping[str, ClockEstimate],
    observations: Iterable[Observation],
    *,
    min_latency_ns: int = 0,
    flag_ns: int = FLAG_ERROR_NS,
) -> Alignment:
    """Narrow each host's offset interval with causality.

    A packet leaving A at a (A's clock) and arriving at B at b (B's clock) gives
    offset_B - offset_A >= a - b + min_latency. These difference constraints are
    propagated over the SSH intervals [offset - error, offset + error] (Bellman-Ford on
    lower and upper bounds) to a fixed point; the results are the interval midpoints.
    Observations naming hosts without an estimate are ignored.
    """
    edges: dict[tuple[str, str], int] = {}
    for obs in observations:
        if obs.src == obs.dst or obs.src not in estimates or obs.dst not in estimates:
            continue
        bound = obs.src_mono_ns - obs.dst_mono_ns + min_latency_ns
        pair = (obs.src, obs.dst)
        if pair not in edges or bound > edges[pair]:
            edges[pair] = bound

    low = {host: est.low for host, est in estimates.items()}
    high = {host: est.high for host, est in estimates.items()}
    settled = False
    for _ in range(len(estimates) + 1):
        changed = False
        for (src, dst), bound in edges.items():
            if low[src] + bound > low[dst]:
                low[dst] = low[src] + bound
                changed = True
            if high[dst] - bound < high[src]:
                high[src] = high[dst] - bound
                changed = True
        if not changed:
            settled = True
            break

    if not settled or any(low[host] > high[host] for host in estimates):
        conflicts = [
            (src, dst)
            for (src, dst), bound in edges.items()
            if estimates[dst].high - estimates[src].low < bound
        ]
        return Alignment(
            estimates,
            flagged=flagged_hosts(estimates, flag_ns),
            consistent=False,
            conflicts=conflicts,
        )

    tightened = {}
    for host in estimates:
        mid = (low[host] + high[host]) // 2
        tightened[host] = ClockEstimate(mid, high[host] - mid)
    return Alignment(tightened, flagged=flagged_hosts(tightened, flag_ns))


# ---------------------------------------------------------------- offset over time


@dataclass(frozen=True, slots=True)
class _Point:
    """What one sample proves: at host time ``h`` the offset lies in [lo, hi]."""

    h: int
    lo: int
    hi: int


_host_time = operator.attrgetter("h")
#: [low, high] of the offset at a host time (``_Segment.between``)
_Bounds = Callable[[int], tuple[int, int]]


@dataclass
class _Segment:
    """Samples consistent with one offset line; slope bounds proven by pairs of samples."""

    best: list[_Point]
    slope_lo: float
    slope_hi: float
    samples: int

    @property
    def first_h(self) -> int:
        return self.best[0].h

    @property
    def last_h(self) -> int:
        return self.best[-1].h

    def bounds(self, h: int) -> tuple[int, int]:
        """[low, high] of the offset at host time h, from the neighbouring best samples."""
        return self.between(bisect.bisect_right(self.best, h, key=_host_time))(h)

    def between(self, i: int) -> Callable[[int], tuple[int, int]]:
        """``bounds`` for the host times after the first ``i`` best samples and before the
        others, as a function with those samples bound once: a batch of events falls
        between the same two samples (it is not kept: the segment changes with samples).

        Offsets are epoch-sized (~2**61): only the small terms go through floats, each
        rounded outwards, so no precision is lost where it would shrink a bound. Between
        two best samples three bounds each way meet (their tightest, or their envelope
        where the model bends); beyond them one does."""
        slope_lo, slope_hi = self.slope_lo, self.slope_hi
        if i == 0:  # before the first best sample
            first = self.best[0]
            f_h, f_lo, f_hi = first.h, first.lo, first.hi

            def before(h: int) -> tuple[int, int]:
                d = f_h - h
                return f_lo - ceil(slope_hi * d), f_hi - floor(slope_lo * d)

            return before
        p_h, p_lo, p_hi = self.best[i - 1].h, self.best[i - 1].lo, self.best[i - 1].hi
        if i == len(self.best):  # after the last one

            def after(h: int) -> tuple[int, int]:
                d = h - p_h
                return p_lo + floor(slope_lo * d), p_hi + ceil(slope_hi * d)

            return after
        q_h, q_lo, q_hi = self.best[i].h, self.best[i].lo, self.best[i].hi
        span, rise_lo, fall_hi = q_h - p_h, q_lo - p_lo, p_hi - q_hi

        def inside(h: int) -> tuple[int, int]:
            d, e = h - p_h, q_h - h
            low_p, high_p = p_lo + floor(slope_lo * d), p_hi + ceil(slope_hi * d)
            low_q, high_q = q_lo - ceil(slope_hi * e), q_hi - floor(slope_lo * e)
            low_i, high_i = p_lo + rise_lo * d // span, p_hi - fall_hi * d // span
            # the tightest bound each way (compared, not max/min calls: this runs per event)
            low = low_p if low_p > low_q else low_q
            if low_i > low:
                low = low_i
            high = high_p if high_p < high_q else high_q
            if high_i < high:
                high = high_i
            if low > high:  # the model bends here: give the honest envelope instead
                return min(low_p, low_q, low_i), max(high_p, high_q, high_i)
            return low, high

        return inside

    def slopes_with(self, point: _Point) -> tuple[float, float]:
        """Slope bounds once ``point`` joins: every pair of samples bounds the drift."""
        lo, hi = self.slope_lo, self.slope_hi
        for p in self.best:
            d = point.h - p.h
            if d == 0:
                continue
            if d < 0:
                d, first, second = -d, point, p
            else:
                first, second = p, point
            lo = max(lo, (second.lo - first.hi) / d)
            hi = min(hi, (second.hi - first.lo) / d)
        return lo, hi


class HostClock:
    """One host's offset over time, from its SSH samples (all in controller epoch ns).

    Within a segment the offset is modelled as linear in host time (constant drift); its
    slope is bounded by every pair of samples (and by ``max_drift``), and the offset at a
    host time is bounded by the neighbouring best samples: interpolated between them,
    extrapolated with the slope bounds beyond them. A sample whose interval misses what
    the model allows at its time starts a new segment (a step: host paused or suspended,
    or a rate change the line cannot follow). Host times between the last sample before a
    step and the first after it get the union of both segments' bounds, since the step
    happened somewhere in between. A step smaller than the bounds goes unseen and is
    covered only as far as the bounds reach.
    """

    def __init__(
        self,
        *,
        floor_ns: int = ERROR_FLOOR_NS,
        max_drift: float = MAX_DRIFT,
        window_ns: int = BEST_WINDOW_NS,
    ) -> None:
        self.floor_ns = floor_ns
        self.max_drift = max_drift
        self.window_ns = window_ns
        self.segments: list[_Segment] = []
        self.samples = 0

    def __bool__(self) -> bool:
        return bool(self.segments)

    def add(self, sample: ClockSample) -> None:
        if sample.rtt_ns < 0:
            raise ValueError(f"clock sample answered before it was sent: {sample}")
        h = sample.host_mono_ns
        point = _Point(
            h, sample.t_send_ns - h - self.floor_ns, sample.t_recv_ns - h + self.floor_ns
        )
        self.samples += 1
        seg = self.segments[-1] if self.segments else None
        if seg is not None and point.h >= seg.last_h:
            low, high = seg.bounds(point.h)
            slope_lo, slope_hi = seg.slopes_with(point)
            if point.lo <= high and point.hi >= low and slope_lo <= slope_hi:
                seg.slope_lo, seg.slope_hi = slope_lo, slope_hi
                seg.samples += 1
                self._keep_best(seg, point)
                return
        elif seg is not None:  # out of order (never from one SSH channel): keep it simple
            return
        self.segments.append(_Segment([point], -self.max_drift, self.max_drift, samples=1))

    def _keep_best(self, seg: _Segment, point: _Point) -> None:
        """One sample per window: the narrowest. The first one stays (it starts the segment)."""
        last = seg.best[-1]
        window = self.window_ns
        if (
            len(seg.best) > 1
            and (point.h - seg.first_h) // window == (last.h - seg.first_h) // window
        ):
            if point.hi - point.lo < last.hi - last.lo:
                seg.best[-1] = point
            return
        seg.best.append(point)

    def bounds(self, host_mono_ns: int) -> tuple[int, int]:
        """[low, high] of the offset at this host time."""
        if not self.segments:
            raise ValueError("no clock samples")
        starts = [s.first_h for s in self.segments]
        k = max(bisect.bisect_right(starts, host_mono_ns) - 1, 0)
        low, high = self.segments[k].bounds(host_mono_ns)
        if k + 1 < len(self.segments) and host_mono_ns > self.segments[k].last_h:
            nlow, nhigh = self.segments[k + 1].bounds(host_mono_ns)
            low, high = min(low, nlow), max(high, nhigh)
        return low, high

    def at(self, host_mono_ns: int) -> ClockEstimate:
        """Offset and error bound valid at this host time."""
        return ClockEstimate.between(*self.bounds(host_mono_ns))

    def offsets(self, hosts_ns: Iterable[int]) -> list[tuple[int, int]]:
        """``(offset_ns, error_ns)`` of ``at(h)`` for each host time ``h``, with the same
        arithmetic: a batch of events falls in a few intervals between samples, so the
        lookups are done once per interval, not once per event."""
        if not self.segments:
            raise ValueError("no clock samples")
        starts = [s.first_h for s in self.segments]
        out: list[tuple[int, int]] = []
        lo = hi = 0  # the host times [lo, hi) that share the lookup below (none yet)
        for h in hosts_ns:
            if not lo <= h < hi:
                bounds, gap, lo, hi = self._interval(h, starts)
            low, high = bounds(h)
            if gap is not None:
                nlow, nhigh = gap(h)
                low, high = min(low, nlow), max(high, nhigh)
            mid = (low + high) // 2  # ClockEstimate.between
            error = high - mid
            if mid - low > error:
                error = mid - low
            out.append((mid, error))
        return out

    def _interval(self, h: int, starts: list[int]) -> tuple[_Bounds, _Bounds | None, float, float]:
        """What ``bounds(h)`` looks up: the bounds between the segment's best samples around
        ``h``, those of the next segment when ``h`` is in a step (after the segment's last
        sample: both hold there, ``h`` being before all of the next one's samples), and
        the host times [lo, hi) for which both are the same."""
        segments = self.segments
        k = max(bisect.bisect_right(starts, h) - 1, 0)
        seg = segments[k]
        best = seg.best
        i = bisect.bisect_right(best, h, key=_host_time)
        lo = best[i - 1].h if i else -math.inf  # i == 0 only before the first segment
        if i < len(best):
            return seg.between(i), None, lo, best[i].h
        if k + 1 == len(segments):
            return seg.between(i), None, lo, math.inf
        if h == lo:  # the segment's last sample itself: no step yet
            return seg.between(i), None, lo, h + 1
        return seg.between(i), segments[k + 1].between(0), lo + 1, starts[k + 1]

    def summary(self, first_ns: int, last_ns: int) -> ClockEstimate:
        """One constant estimate valid for every host time in [first_ns, last_ns]: what
        correlation tightens. Between two best samples the bounds stay within theirs, and
        elsewhere they are linear, so the span's ends, both sides of the segments' ends and
        the best samples in and around the span bound it."""
        lows: list[int] = []
        highs: list[int] = []
        times = [first_ns, last_ns]
        for seg in self.segments:
            if seg.first_h > last_ns or seg.last_h < first_ns:
                continue
            times += [
                h
                for h in (seg.first_h - 1, seg.first_h, seg.last_h, seg.last_h + 1)
                if first_ns <= h <= last_ns
            ]
            i = max(bisect.bisect_left(seg.best, first_ns, key=lambda p: p.h) - 1, 0)
            j = bisect.bisect_right(seg.best, last_ns, key=lambda p: p.h) + 1
            lows += [p.lo for p in seg.best[i:j]]
            highs += [p.hi for p in seg.best[i:j]]
        for h in times:
            low, high = self.bounds(h)
            lows.append(low)
            highs.append(high)
        return ClockEstimate.between(min(lows), max(highs))

    def report(self) -> dict:
        """The model as plain data (per segment: where it starts and ends in host time,
        offset at its start, drift in ppm, error there, samples used)."""
        segments = []
        for seg in self.segments:
            est = self.at(seg.first_h)
            drift = (seg.slope_lo + seg.slope_hi) / 2
            segments.append(
                {
                    "first_host_ns": seg.first_h,
                    "last_host_ns": seg.last_h,
                    "offset_ns": est.offset_ns,
                    "error_ns": est.error_ns,
                    "drift_ppm": round(drift * 1e6, 3),
                    "drift_error_ppm": round((seg.slope_hi - seg.slope_lo) / 2 * 1e6, 3),
                    "samples": seg.samples,
                }
            )
        return {"samples": self.samples, "segments": segments}


# ---------------------------------------------------------------- host pairs


def pair_bounds(
    estimates: Mapping[str, ClockEstimate], observations: Iterable[Observation]
) -> dict[tuple[str, str], tuple[int, int]] | None:
    """For every ordered pair (a, b): the interval [low, high] that offset_b - offset_a
    must lie in, given the SSH intervals and the packets' causality; None when they
    contradict each other.

    A pair's relative offset is what a segment between its hosts needs, and it can be far
    tighter than either host's own bound: packets both ways between a and b give NTP-style
    four-timestamp bounds (a request a->b says offset_b - offset_a >= a_out - b_in, its
    answer b->a says it is <= a_in - b_out), whatever the SSH round trips were. Shortest
    paths over the difference constraints (Floyd-Warshall; hosts are few) combine all of
    them, through other hosts and through the SSH reference too.
    """
    ref = ""  # the controller's clock: offset 0
    hosts = [h for h in estimates if h != ref]
    nodes = [ref, *hosts]
    inf = math.inf
    # dist[u][v]: the largest offset_v - offset_u can be
    dist: dict[str, dict[str, float]] = {u: {v: 0 if u == v else inf for v in nodes} for u in nodes}
    for h in hosts:
        est = estimates[h]
        dist[ref][h] = min(dist[ref][h], est.high)
        dist[h][ref] = min(dist[h][ref], -est.low)
    for obs in observations:
        if obs.src == obs.dst or obs.src not in estimates or obs.dst not in estimates:
            continue
        # offset_dst - offset_src >= src - dst  <=>  offset_src - offset_dst <= dst - src
        w = obs.dst_mono_ns - obs.src_mono_ns
        if w < dist[obs.dst][obs.src]:
            dist[obs.dst][obs.src] = w
    for k in nodes:
        dk = dist[k]
        for u in nodes:
            du = dist[u]
            via = du[k]
            if via == inf:
                continue
            for v in nodes:
                if via + dk[v] < du[v]:
                    du[v] = via + dk[v]
    if any(dist[u][u] < 0 for u in nodes):
        return None
    return {(a, b): (int(-dist[b][a]), int(dist[a][b])) for a in hosts for b in hosts if a != b}
