"""A live trace over many hosts: collect each host's records, align, correlate at the end.

``TraceSession`` is the fan-out sink of ``trace`` commands. It never prints: the CLI gives
it callbacks for what to show live (readiness, each event as it is released) and renders
the ``TraceResult`` it builds at the end.

Time: every clock sample is moved from the controller's monotonic clock to epoch ns by the
run's one :class:`EpochAnchor` (taken when the session starts), and each host's samples
build a :class:`HostClock`. An event is aligned once, when it is released: ``ts`` is its
host time plus the offset valid at that host time, ``clock_error_ns`` the bound that holds
for it. An event that arrives before its host's first clock sample waits (it is kept, not
dropped) until the host has one; at the end, events of a host that never answered a ping
have no ``ts``.

Live order: events are held until the streams pause for ``LIVE_SETTLE_S``, so that the
other hosts' sightings of the same packets (and fresher clock samples) join them; then the
batch is released sorted by ``ts``. Streams that never pause are cut every ``MAX_HOLD_S``
after what arrived a settle time ago, pulling in the departures of the arrivals that go.

Before a batch goes, causality corrects the clocks, not single events: a packet leaving
host A and arriving at host B says B's clock cannot put the arrival before the departure.
Each host gets one correction, the smallest that keeps every departure first, inside the
interval that ``tighten`` leaves of its bound (the batch's cross-host sightings, with what
is already shown as fixed limits); all the host's events move by it, so its own order
stays. ``clock_error_ns`` becomes the distance to the far end of that interval, or grows
by the correction when a shown limit forced it. When no correction within the bounds
exists (a bound is wrong, or a shown event is in the way), each host's events move forward
just far enough and carry ``ts_clamped_ns`` (how far). Either way no live line shows an
arrival before its departure or a host's event before its earlier one; only a departure
that reaches the controller more than a settle time after its arrival was shown escapes.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ebpfdiag.clock import (
    Alignment,
    ClockEstimate,
    ClockSample,
    EpochAnchor,
    HostClock,
    Observation,
    tighten,
)
from ebpfdiag.fanout import Fanout, HostResult
from ebpfdiag.records import decode_objects

if TYPE_CHECKING:
    from ebpfdiag.questions.rst import Correlation

RST = 0x04
#: After a reset is seen, wait this long for the other hosts' sightings before counting flows.
COUNT_SETTLE_S = 0.3
#: Live events wait this long before they are shown (see the module docstring).
LIVE_SETTLE_S = 0.25
#: ... unless the stream never pauses that long: then a batch goes at least this often.
MAX_HOLD_S = 2.0
#: Sightings of one packet further apart than this (aligned) are different packets.
MATCH_WINDOW_NS = 1_000_000_000
#: Shown sightings kept to hold later ones to causality, per packet fingerprint.
RECENT_S = 5.0
#: How long ready hosts get to confirm the ports a NAT adds to the filter before tracing
#: is announced anyway (naming the hosts that did not).
CONFIRM_TIMEOUT_S = 3.0


@dataclass
class HostTrace:
    """What one host's script said about itself."""

    name: str
    hello: dict | None = None
    ready: bool = False
    lost: int = 0
    #: seconds from the run's start (``TraceSession.launched``) to this host's ``ready``
    ready_after_s: float | None = None
    bye: dict | None = None
    #: the host's offset over time, from its samples (epoch ns); read for every event
    clock: HostClock = field(default_factory=HostClock)
    diagnostics: list[str] = field(default_factory=list)
    result: HostResult | None = None
    #: the port filter the script last confirmed (``filter`` records), None before any
    ports: list[int] | None = None


@dataclass
class TraceResult:
    hosts: dict[str, HostTrace]
    #: what the question's correlate function returned (a ``Correlation`` for tcp-rst)
    correlation: Correlation | Any
    interrupted: bool
    duration_s: float
    #: the run's one controller monotonic -> epoch pair (None for a trace read from a file)
    anchor: EpochAnchor | None
    #: per host: the clock model (``HostClock.report``) and the constant ``summary`` given
    #: to correlation (before tightening); hosts without samples are absent
    clocks: dict[str, dict]


def _fingerprint(rec: dict) -> tuple | None:
    """What a packet keeps across NAT hops (as correlation matches it)."""
    if rec.get("type") != "packet":
        return None
    try:
        return (rec["seq"], rec["ack"], rec["flags"], rec["len"], rec.get("ipid") or 0)
    except KeyError:
        return None


def _ignore(*_args: object) -> None:
    """The default of every callback: a session that nobody watches live."""


class TraceSession:
    """Sink + stop logic for one trace run (duration counted from 'all hosts ready').

    Any tool's ``ready`` record makes its host ready: ``on_host_ready(host, seconds since
    the run began, the host's hello)`` is called then, before the others are."""

    wants_clock = True  # every event is aligned to the hosts' clocks

    def __init__(
        self,
        names: list[str],
        *,
        duration: float | None = None,
        count: int | None = None,
        on_event: Callable[[dict], None] = _ignore,
        on_ready: Callable[[list[str], list[str]], None] = _ignore,
        on_state: Callable[[str, str], None] = _ignore,
        on_diagnostic: Callable[[str, str], None] = _ignore,
        on_host_ready: Callable[[str, float, dict], None] = _ignore,
        settle_s: float = LIVE_SETTLE_S,
        launched: float | None = None,
        correlate: Callable[..., Any] | None = None,
        keep: tuple[str, ...] = (),
        held: tuple[str, ...] = ("packet", "reset"),
    ):
        """``correlate(events, clocks, hellos=...)`` answers the question at the end (and
        for ``count``; default: the reset question); ``held``: the record types held,
        aligned and shown in time order live (their host times are the span ``clocks()``
        covers); ``keep``: the tool's other record types, kept with the events as they
        came (not aligned live)."""
        self.hosts = {n: HostTrace(n) for n in names}
        self._correlate = correlate
        self.keep = keep
        self.held = held
        #: records in the order they were shown (``lost`` records where they came)
        self._released: list[dict] = []
        self.duration = duration
        self.count = count
        self.on_event = on_event
        self.on_ready = on_ready
        self.on_state = on_state
        self.on_diagnostic = on_diagnostic
        self.on_host_ready = on_host_ready
        self.settle_s = settle_s
        self.fanout: Fanout | None = None
        self.all_ready = False
        #: the effective port filter once tracing ([]: every port)
        self.ports: list[int] = []
        #: ready hosts that did not confirm the ports added for a NAT in time
        self.unconfirmed: list[str] = []
        #: host -> ports sent to it and not yet confirmed
        self._awaiting: dict[str, set[int]] = {}
        self._confirm_timer: asyncio.TimerHandle | None = None
        self.anchor = EpochAnchor.now()
        self._count_check: asyncio.TimerHandle | None = None
        self._release_timer: asyncio.TimerHandle | None = None
        #: (arrival monotonic s, record) not yet aligned and shown
        self._held: list[tuple[float, dict]] = []
        #: fingerprint -> shown packet records, with when they were shown
        self._shown: dict[tuple, list[tuple[float, dict]]] = defaultdict(list)
        #: host -> latest ts shown for it (later events of the host are not shown before it)
        self._last_ts: dict[str, int] = {}
        self.started = time.monotonic()
        #: when the run began, for each host's time to ready (the process start, when the
        #: command knows it; else now)
        self.launched = self.started if launched is None else launched

    @property
    def events(self) -> list[dict]:
        """Every packet, reset, lost (and ``keep``) record so far: the shown ones in the
        order they were shown, then those still held (all shown once the session
        finished)."""
        return self._released + [rec for _, rec in self._held]

    # -- FanoutSink ------------------------------------------------------------------
    def state(self, host: str, state: str) -> None:
        self.on_state(host, state)

    def lines(self, host: str, stream: str, lines: list[bytes]) -> None:
        if stream != "stdout":
            for line in lines:
                self._diagnostic(host, line.decode(errors="replace"))
            return
        for line, rec in zip(lines, decode_objects(lines), strict=True):
            if rec is not None:
                self._record(host, rec)
            else:
                self._diagnostic(host, line.decode(errors="replace"))
        self._release()

    def _diagnostic(self, host: str, text: str) -> None:
        self.hosts[host].diagnostics.append(text)
        self.on_diagnostic(host, text)

    def clock(self, host: str, sample: ClockSample) -> None:
        """A sample in controller monotonic ns (see ``EpochAnchor``)."""
        self.hosts[host].clock.add(self.anchor.sample(sample))
        self._release()

    def result(self, result: HostResult) -> None:
        self.hosts[result.host].result = result
        self._check_ready()
        self._confirmed(result.host)

    # -- records ---------------------------------------------------------------------
    def _record(self, host: str, rec: dict) -> None:
        kind = rec.get("type")
        ht = self.hosts[host]
        if kind in self.held:
            rec["host"] = host
            self._held.append((time.monotonic(), rec))
            if self.count and (kind == "reset" or kind == "packet" and rec.get("flags", 0) & RST):
                self._schedule_count_check()
        elif kind == "hello":
            ht.hello = rec
        elif kind == "ready":
            if not ht.ready:
                # Each host says so as it comes: with one slow host, the others listen already.
                ht.ready = True
                ht.ready_after_s = time.monotonic() - self.launched
                self.on_state(host, "ready")
                self.on_host_ready(host, ht.ready_after_s, ht.hello or {})
            self._check_ready()
        elif kind == "lost":
            ht.lost += int(rec.get("count", 0))
            rec["host"] = host
            self._released.append(rec)
        elif kind in self.keep:
            rec["host"] = host
            self._released.append(rec)
        elif kind == "bye":
            ht.bye = rec
        elif kind == "filter" and isinstance(rec.get("ports"), list):
            ht.ports = rec["ports"]
            self._confirmed(host)

    # -- live release ----------------------------------------------------------------
    def _release(self, final: bool = False) -> None:
        """Align, correct and show the held events that have settled (all when final)."""
        if not self._held:
            return
        now = time.monotonic()
        quiet = now - self._held[-1][0] >= self.settle_s
        if final or quiet:
            cut = len(self._held)
        elif now - self._held[0][0] >= MAX_HOLD_S:  # never quiet: cut, keeping pairs whole
            cut = self._cut(now - self.settle_s)
        else:
            cut = 0
        due: list[dict] = []
        kept: list[tuple[float, dict]] = []
        for arrived, rec in self._held[:cut]:
            if final or self.hosts[rec["host"]].clock:
                due.append(rec)
            else:
                kept.append((arrived, rec))
        self._held = kept + self._held[cut:]
        if due:
            for rec in due:
                self._align(rec)
            self._correct(due)
            due.sort(key=lambda r: (r.get("ts") is None, r.get("ts") or 0, r.get("ts_ns", 0)))
            self._remember(due, now)
            self._released += due
            for rec in due:
                self.on_event(rec)
        self._schedule_release()

    def _cut(self, before: float) -> int:
        """How many held records to release when the streams never pause: those that
        arrived before ``before``, plus every later departure whose arrival on another
        host goes now (with what its host sent before it), so no pair is split."""
        held = self._held
        cut = next((i for i, (arrived, _) in enumerate(held) if arrived >= before), len(held))
        while True:
            arrivals: dict[tuple, set[str]] = defaultdict(set)
            for _, rec in held[:cut]:
                if rec.get("dir") == "ingress" and (fp := _fingerprint(rec)) is not None:
                    arrivals[fp].add(rec["host"])
            hosts = {
                rec["host"]
                for _, rec in held[cut:]
                if rec.get("dir") == "egress"
                and (fp := _fingerprint(rec)) in arrivals
                and arrivals[fp] - {rec["host"]}
            }
            if not hosts:
                return cut
            last = max(i for i, (_, rec) in enumerate(held) if rec["host"] in hosts)
            cut = last + 1

    def _align(self, rec: dict) -> None:
        clock = self.hosts[rec["host"]].clock
        if not clock or "ts_ns" not in rec:
            return
        try:
            est = clock.at(int(rec["ts_ns"]))
        except (TypeError, ValueError):
            return
        rec["ts"] = est.align(int(rec["ts_ns"]))
        rec["clock_error_ns"] = est.error_ns

    def _correct(self, batch: list[dict]) -> None:
        """One causal correction per host for this batch (see the module docstring)."""
        by_fp: dict[tuple, list[dict]] = defaultdict(list)
        first: dict[str, int] = {}  # host -> its earliest aligned ts in the batch
        for rec in batch:
            if "ts" not in rec:
                continue
            host = rec["host"]
            first[host] = min(first.get(host, rec["ts"]), rec["ts"])
            fp = _fingerprint(rec)
            if fp is not None:
                by_fp[fp].append(rec)
        observations: list[Observation] = []
        # Limits from what is already shown: fixed, so they bind this batch's hosts alone.
        floor = {h: self._last_ts[h] - ts for h, ts in first.items() if h in self._last_ts}
        ceil: dict[str, int] = {}
        for fp, recs in by_fp.items():
            shown = [r for _, r in self._shown.get(fp, ())]
            for rec in recs:
                host = rec["host"]
                observations += [
                    Observation(host, rec["ts"], o["host"], o["ts"])
                    for o in recs
                    if _causes(rec, o)
                ]
                for other in shown:
                    if _causes(other, rec):
                        floor[host] = max(
                            floor.get(host, other["ts"] - rec["ts"]), other["ts"] - rec["ts"]
                        )
                    elif _causes(rec, other):
                        ceil[host] = min(
                            ceil.get(host, other["ts"] - rec["ts"]), other["ts"] - rec["ts"]
                        )
        floor = {h: need for h, need in floor.items() if need > 0}
        if not observations and not floor and not ceil:
            return
        bounds: dict[str, ClockEstimate] = {}
        for rec in batch:
            if "clock_error_ns" in rec:
                host, err = rec["host"], rec["clock_error_ns"]
                if host not in bounds or err < bounds[host].error_ns:
                    bounds[host] = ClockEstimate(0, err)
        consistent = True
        for host, est in list(bounds.items()):
            low = max(est.low, floor.get(host, est.low))
            high = min(est.high, ceil.get(host, est.high))
            consistent = consistent and low <= high
            bounds[host] = ClockEstimate.between(low, high)
        alignment = tighten(bounds, observations) if consistent else None
        if alignment is not None and alignment.consistent:
            shift = _least_moves(alignment, floor, observations)
            for rec in batch:
                est = alignment.get(rec["host"])
                if est is None or "ts" not in rec:
                    continue
                c = shift[rec["host"]]
                rec["ts"] += c
                if rec["host"] in floor or rec["host"] in ceil:  # moved for the display
                    rec["clock_error_ns"] += abs(c)
                else:  # moved by the packets' causality alone: the truth is in the interval
                    far = max(c - est.low, est.high - c)
                    rec["clock_error_ns"] = min(rec["clock_error_ns"], far)
            return
        # The bounds contradict the packets or what is shown: keep the clocks, move each
        # host's events as one (its own order stays) just far enough, and say so.
        shift = _raise_arrivals({h: max(floor.get(h, 0), 0) for h in first}, observations)
        for rec in batch:
            if shift.get(rec["host"], 0) > 0 and "ts" in rec:
                rec["ts"] += shift[rec["host"]]
                rec["ts_clamped_ns"] = shift[rec["host"]]

    def _remember(self, shown: list[dict], now: float) -> None:
        for rec in shown:
            if "ts" in rec:
                self._last_ts[rec["host"]] = max(
                    self._last_ts.get(rec["host"], rec["ts"]), rec["ts"]
                )
            fp = _fingerprint(rec)
            if fp is not None and "ts" in rec:
                self._shown[fp].append((now, rec))
        old = now - RECENT_S
        for fp in [fp for fp, recs in self._shown.items() if recs[0][0] < old]:
            recs = [(t, r) for t, r in self._shown[fp] if t >= old]
            if recs:
                self._shown[fp] = recs
            else:
                del self._shown[fp]

    def _schedule_release(self) -> None:
        if not self._held or self._release_timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # driven by hand (tests, replay): released on the next call
            return
        self._release_timer = loop.call_later(self.settle_s, self._timer_release)

    def _timer_release(self) -> None:
        self._release_timer = None
        self._release()

    # -- stop logic ------------------------------------------------------------------
    def _check_ready(self) -> None:
        if self.all_ready:
            return
        pending = [h for h in self.hosts.values() if not h.ready and h.result is None]
        if pending:
            return
        self.all_ready = True
        ready = [h for h in self.hosts.values() if h.ready]
        if not ready:
            return
        hellos = [h.hello or {} for h in ready]
        requested = {p for hello in hellos for p in (hello.get("filter") or {}).get("ports") or []}
        extra = follow_nat(requested, [hello.get("nat_ports") or [] for hello in hellos])
        self.ports = sorted(requested | extra)
        if extra and self.fanout is not None:
            # Every host gets every added port: the rewritten flow crosses all of them.
            for ht in ready:
                if all(self.fanout.control(ht.name, f"port {q}") for q in sorted(extra)):
                    self._awaiting[ht.name] = set(extra)
                else:
                    self.unconfirmed.append(ht.name)
            for ht in ready:
                self._confirmed(ht.name)  # a filter record may have come already
            if self._awaiting:
                self._confirm_timer = asyncio.get_running_loop().call_later(
                    CONFIRM_TIMEOUT_S, self._confirm_expired
                )
                return
        self._start_tracing()

    def _confirmed(self, host: str) -> None:
        """A host's filter record: done waiting for it once it has every added port."""
        waiting = self._awaiting.get(host)
        if waiting is None:
            return
        waiting -= set(self.hosts[host].ports or ())
        if waiting and self.hosts[host].result is None:  # a host that ended waits no more
            return
        del self._awaiting[host]
        if not self._awaiting and self._confirm_timer is not None:
            self._confirm_timer.cancel()
            self._confirm_timer = None
            self._start_tracing()

    def _confirm_expired(self) -> None:
        self._confirm_timer = None
        self.unconfirmed = sorted({*self.unconfirmed, *self._awaiting})
        self._awaiting.clear()
        self._start_tracing()

    def _start_tracing(self) -> None:
        """Every ready host traces with the whole filter (or was given up on): say so, and
        count ``duration`` from here."""
        ready = [h.name for h in self.hosts.values() if h.ready]
        failed = [h.name for h in self.hosts.values() if not h.ready]
        self.on_ready(ready, failed)
        if self.duration and self.fanout is not None:
            asyncio.get_running_loop().call_later(self.duration, self.fanout.stop)

    def _schedule_count_check(self) -> None:
        if self._count_check is not None:
            self._count_check.cancel()
        self._count_check = asyncio.get_running_loop().call_later(COUNT_SETTLE_S, self._count_flows)

    def _count_flows(self) -> None:
        flows = self.correlate().flows
        if len([f for f in flows if f.verdict]) >= self.count and self.fanout is not None:
            self.fanout.stop()

    # -- result ----------------------------------------------------------------------
    def clocks(self) -> dict[str, ClockEstimate]:
        """Per host, one constant estimate valid over the host time its events span (the
        drift and steps inside that span widen it): what correlation tightens."""
        span: dict[str, tuple[int, int]] = {}
        for rec in self.events:
            ts_ns = rec.get("ts_ns")
            if isinstance(ts_ns, int) and rec.get("type") in self.held:
                first, last = span.get(rec["host"], (ts_ns, ts_ns))
                span[rec["host"]] = (min(first, ts_ns), max(last, ts_ns))
        result = {}
        for name, ht in self.hosts.items():
            if ht.clock:
                first, last = span.get(name) or (ht.clock.segments[-1].last_h,) * 2
                result[name] = ht.clock.summary(first, last)
        return result

    def hellos(self) -> dict[str, dict]:
        """Each host's hello: which probes it attached is evidence for the verdicts."""
        return {name: ht.hello for name, ht in self.hosts.items() if ht.hello}

    def correlate(self) -> Correlation | Any:
        return self._question()(self.events, self.clocks(), hellos=self.hellos())

    def _question(self) -> Callable[..., Any]:
        if self._correlate is None:
            # Imported when first needed (a reset, or the end): not on the way to ready.
            from ebpfdiag.questions.rst import correlate

            self._correlate = correlate
        return self._correlate

    def finish(self, interrupted: bool) -> TraceResult:
        """Show what is still held (aligned if its host ever got a clock), then correlate."""
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        if self._confirm_timer is not None:
            self._confirm_timer.cancel()
            self._confirm_timer = None
        self._release(final=True)
        summaries = self.clocks()
        clocks = {
            name: {
                **ht.clock.report(),
                "summary": {
                    "offset_ns": summaries[name].offset_ns,
                    "error_ns": summaries[name].error_ns,
                },
            }
            for name, ht in self.hosts.items()
            if name in summaries
        }
        return TraceResult(
            self.hosts,
            self._question()(self.events, summaries, hellos=self.hellos()),
            interrupted,
            time.monotonic() - self.started,
            self.anchor,
            clocks,
        )


def follow_nat(requested: set[int], mappings: list[list]) -> set[int]:
    """The ports a flow on ``requested`` ports also uses past the hosts' DNAT rewrites
    (``[[P, Q], ...]`` per host, followed through chains of rewrites), minus
    ``requested``: what the filter must add so the translated legs are kept."""
    pairs = {
        (p, q)
        for per_host in mappings
        for pair in per_host
        if isinstance(pair, list) and len(pair) == 2
        for p, q in [pair]
        if isinstance(p, int) and isinstance(q, int)
    }
    ports = set(requested)
    while new := {q for p, q in pairs if p in ports and q not in ports}:
        ports |= new
    return ports - set(requested)


def _least_moves(
    alignment: Alignment, floor: dict[str, int], observations: list[Observation]
) -> dict[str, int]:
    """The corrections closest to none that keep every departure before its arrival.

    Each host starts at 0 moved into its tightened interval (and exactly onto its floor:
    the interval's ends are rounded outwards), then arrivals are raised past their
    departures (Bellman-Ford). Solutions of difference constraints are closed under max,
    and the intervals' upper ends are one, so raising stays inside them."""
    shift = {h: min(max(0, est.low, floor.get(h, 0)), est.high) for h, est in alignment.items()}
    return _raise_arrivals(shift, observations)


def _raise_arrivals(shift: dict[str, int], observations: list[Observation]) -> dict[str, int]:
    """Raise each arrival's host past its departure until nothing moves (Bellman-Ford over
    the hosts: at most one pass per host)."""
    for _ in range(len(shift) + 1):
        moved = False
        for obs in observations:
            need = obs.src_mono_ns + shift[obs.src] - obs.dst_mono_ns
            if need > shift[obs.dst]:
                shift[obs.dst] = need
                moved = True
        if not moved:
            break
    return shift


def _causes(first: dict, second: dict) -> bool:
    """True when ``first`` is the departure (from another host) of ``second``'s arrival."""
    return (
        first["host"] != second["host"]
        and first.get("dir") == "egress"
        and second.get("dir") == "ingress"
        and abs(first["ts"] - second["ts"]) <= MATCH_WINDOW_NS
    )
