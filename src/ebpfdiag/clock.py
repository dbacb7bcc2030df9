"""Per-host clock alignment: host CLOCK_MONOTONIC nanoseconds -> controller wall-clock ns.

Remote scripts stamp events with the host's monotonic clock, which has an arbitrary
origin per host. The controller pings each host over SSH and keeps the tightest round
trip (NTP-style), which bounds the offset to half a round trip. Packets seen leaving one
host and arriving at another then narrow that bound further: nothing arrives before it
was sent. Everything here is pure arithmetic on integers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ERROR_FLOOR_NS = 10_000
"""Added to every SSH estimate: the host's answer is stamped a little after it is read."""

FLAG_ERROR_NS = 5_000_000
"""Hosts whose offset is uncertain by more than this are reported as ``flagged``."""


@dataclass(frozen=True, slots=True)
class ClockSample:
    """One SSH ping: controller realtime before sending, host monotonic, controller after."""

    t_send_ns: int
    host_mono_ns: int
    t_recv_ns: int

    @property
    def rtt_ns(self) -> int:
        return self.t_recv_ns - self.t_send_ns


@dataclass(frozen=True, slots=True)
class ClockEstimate:
    """controller_realtime_ns ~= host_mono_ns + offset_ns, true value within +- error_ns."""

    offset_ns: int
    error_ns: int

    @property
    def low(self) -> int:
        return self.offset_ns - self.error_ns

    @property
    def high(self) -> int:
        return self.offset_ns + self.error_ns

    def align(self, host_mono_ns: int) -> int:
        """Host monotonic ns -> controller wall-clock ns."""
        return host_mono_ns + self.offset_ns


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
