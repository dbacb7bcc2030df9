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
import bisect
import operator
import time
from collections import defaultdict, deque
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
from ebpfdiag.records import decode_flat_objects

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
        on_flat_events: Callable[[list[dict]], None] | None = None,
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
        came (not aligned live); ``on_flat_events``: called instead of ``on_event`` with
        the events known to be flat (string keys; strings, ints, booleans and None as
        values, the session's own additions too), as many at once as follow each other:
        a writer need not check them one by one."""
        self.hosts = {n: HostTrace(n) for n in names}
        self._correlate = correlate
        self.keep = keep
        self.held = held
        #: records in the order they were shown (``lost`` records where they came)
        self._released: list[dict] = []
        self.duration = duration
        self.count = count
        self.on_event = on_event
        self.on_flat_events = on_flat_events
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
        #: records of the held types not yet aligned and shown, in the order they came, with
        #: when each came (monotonic s) and its packet fingerprint (taken as it comes, while
        #: the record is at hand): parallel lists, not tuples, so that a busy stream gives
        #: the garbage collector no object per record to go over
        self._waiting: list[dict] = []
        self._arrivals: list[float] = []
        self._fps: list[tuple | None] = []
        #: ids of the held records decoded flat (see ``decode_flat_objects``), until shown
        self._flat: set[int] = set()
        #: fingerprint -> shown packet records, in the order shown
        self._shown: dict[tuple, list[dict]] = {}
        #: (when, [(fingerprint, how many)]) of each batch in ``_shown``, oldest first
        self._shown_batches: deque[tuple[float, list[tuple[tuple, int]]]] = deque()
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
        return self._released + self._waiting

    # -- FanoutSink ------------------------------------------------------------------
    def state(self, host: str, state: str) -> None:
        self.on_state(host, state)

    def lines(self, host: str, stream: str, lines: list[bytes]) -> None:
        if stream != "stdout":
            for line in lines:
                self._diagnostic(host, line.decode(errors="replace"))
            return
        objs, flat = decode_flat_objects(lines)
        waiting = self._waiting
        before = len(waiting)
        for line, rec in zip(lines, objs, strict=True):
            if rec is not None:
                self._record(host, rec)
            else:
                self._diagnostic(host, line.decode(errors="replace"))
        if flat and len(waiting) > before:  # what this chunk added (held until released)
            self._flat.update(map(id, waiting[before:]))
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
            self._waiting.append(rec)
            self._arrivals.append(time.monotonic())
            self._fps.append(_fingerprint(rec))
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
        waiting, arrivals, fps = self._waiting, self._arrivals, self._fps
        if not waiting:
            return
        now = time.monotonic()
        if final or now - arrivals[-1] >= self.settle_s:
            cut = len(waiting)
        elif now - arrivals[0] >= MAX_HOLD_S:  # never quiet: cut, keeping pairs whole
            cut = self._cut(now - self.settle_s)
        else:
            cut = 0
        if cut:  # most calls (a chunk while the streams flow) release nothing: no copy
            clocked = {name for name, ht in self.hosts.items() if ht.clock}
            if final or len(clocked) == len(self.hosts):
                due, due_fps = waiting[:cut], fps[:cut]
                kept: list[dict] = []
                kept_arrivals: list[float] = []
                kept_fps: list[tuple | None] = []
            else:  # events of hosts without a clock sample yet wait for one
                due, due_fps, kept, kept_arrivals, kept_fps = [], [], [], [], []
                for rec, arrived, fp in zip(waiting[:cut], arrivals[:cut], fps[:cut], strict=True):
                    if rec["host"] in clocked:
                        due.append(rec)
                        due_fps.append(fp)
                    else:
                        kept.append(rec)
                        kept_arrivals.append(arrived)
                        kept_fps.append(fp)
            self._waiting = kept + waiting[cut:]
            self._arrivals = kept_arrivals + arrivals[cut:]
            self._fps = kept_fps + fps[cut:]
            if due:
                self._show(due, now, due_fps)
        self._schedule_release()

    def _show(self, due: list[dict], now: float, fps: list[tuple | None]) -> None:
        """Align and correct a released batch (``fps``: its records' fingerprints), then
        show it in time order."""
        extremes = self._align(due)
        if extremes is None:  # some events have no aligned time: the others count
            by_fp, first = _sightings(due, fps)
        else:
            by_fp = _per_fingerprint(due, fps)
            first = {host: ts for host, (ts, _) in extremes.items()}
        self._correct(due, by_fp, first, extremes)
        _shown_sort(due, aligned=extremes is not None)
        self._remember(due, by_fp, now)
        self._released += due
        ids = [id(rec) for rec in due]
        flat, on_flat_events = self._flat, self.on_flat_events
        if on_flat_events is not None and flat.issuperset(ids):  # a busy stream's batches
            on_flat_events(due)
        else:
            for rec in due:
                if on_flat_events is not None and id(rec) in flat:
                    on_flat_events([rec])
                else:
                    self.on_event(rec)
        flat.difference_update(ids)

    def _cut(self, before: float) -> int:
        """How many held records to release when the streams never pause: those that
        arrived before ``before``, plus every later departure whose arrival on another
        host goes now (with what its host sent before it), so no pair is split."""
        held, fps = self._waiting, self._fps
        cut = bisect.bisect_left(self._arrivals, before)  # held in the order they came
        arrivals: dict[tuple, set[str]] = defaultdict(set)  # of the records before the cut
        counted = 0
        while True:
            for i in range(counted, cut):
                fp, rec = fps[i], held[i]
                if fp is not None and rec.get("dir") == "ingress":
                    arrivals[fp].add(rec["host"])
            counted = cut
            hosts = {
                rec["host"]
                for i in range(cut, len(held))
                if fps[i] in arrivals
                and (rec := held[i]).get("dir") == "egress"
                and arrivals[fps[i]] - {rec["host"]}
            }
            if not hosts:
                return cut
            # past the last record of those hosts: the last one's index, found from the end
            cut = len(held) - next(
                n for n, rec in enumerate(reversed(held)) if rec["host"] in hosts
            )

    def _align(self, batch: list[dict]) -> dict[str, tuple[int, int]] | None:
        """``ts`` and ``clock_error_ns`` of each event whose host has a clock (the host's
        clock is looked up for the whole batch at once). When every event got them: each
        host's earliest ``ts`` and smallest ``clock_error_ns`` in the batch."""
        groups: dict[str, tuple[list[dict], list[int]]] = {}  # host -> events, host times
        for rec in batch:
            if "ts_ns" not in rec:
                continue
            try:
                h = int(rec["ts_ns"])
            except (TypeError, ValueError):
                continue
            group = groups.get(rec["host"])
            if group is None:
                group = groups[rec["host"]] = ([], [])
            group[0].append(rec)
            group[1].append(h)
        extremes: dict[str, tuple[int, int]] = {}
        count = 0
        for host, (recs, times) in groups.items():
            clock = self.hosts[host].clock
            if not clock:
                continue
            offsets = clock.offsets(times)
            for rec, h, (offset, error) in zip(recs, times, offsets, strict=True):
                rec["ts"] = h + offset
                rec["clock_error_ns"] = error
            extremes[host] = (min(map(_ts, recs)), min(map(_error, offsets)))
            count += len(recs)
        return extremes if count == len(batch) else None

    def _correct(
        self,
        batch: list[dict],
        by_fp: dict[tuple, list[dict]],
        first: dict[str, int],
        extremes: dict[str, tuple[int, int]] | None,
    ) -> None:
        """One causal correction per host for this batch (see the module docstring).

        ``by_fp``: the batch's aligned packets per fingerprint; ``first``: each host's
        earliest aligned ts in the batch; ``extremes``: what ``_align`` found, if it
        aligned every event. The batch's departures and arrivals are reduced to one
        constraint per host pair (its tightest), which is all the corrections depend on:
        see ``_raise_arrivals``."""
        edges: dict[tuple[str, str], int] = {}  # (src, dst) -> largest departure - arrival
        # Limits from what is already shown: fixed, so they bind this batch's hosts alone.
        floor = {h: self._last_ts[h] - ts for h, ts in first.items() if h in self._last_ts}
        ceil: dict[str, int] = {}
        shown_by_fp = self._shown
        for fp, recs in by_fp.items():
            if len(recs) > 1:
                for src, gap, dst in _pairs(recs):
                    pair = (src, dst)
                    if gap > edges.get(pair, gap - 1):
                        edges[pair] = gap
            shown = shown_by_fp.get(fp)
            if not shown:
                continue
            for rec in recs:
                host, ts, direction = rec["host"], rec["ts"], rec.get("dir")
                for other in shown:
                    if other["host"] == host or abs(other["ts"] - ts) > MATCH_WINDOW_NS:
                        continue
                    need = other["ts"] - ts
                    if direction == "ingress" and other.get("dir") == "egress":
                        floor[host] = max(floor.get(host, need), need)
                    elif direction == "egress" and other.get("dir") == "ingress":
                        ceil[host] = min(ceil.get(host, need), need)
        floor = {h: need for h, need in floor.items() if need > 0}
        if not edges and not floor and not ceil:
            return
        # each host's tightest bound in the batch
        if extremes is not None:
            bounds = {host: ClockEstimate(0, err) for host, (_, err) in extremes.items()}
        else:
            bounds = {}
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
        pairs = [(src, gap, dst) for (src, dst), gap in edges.items()]
        alignment = None
        if consistent:  # tighten needs each pair's gap alone: as departure time, arrival 0
            alignment = tighten(bounds, [Observation(src, gap, dst, 0) for src, gap, dst in pairs])
        if alignment is not None and alignment.consistent:
            shift = _least_moves(alignment, floor, pairs)
            moves: dict[str, tuple[int, int | None]] = {}  # host -> its correction, error cap
            for host, est in alignment.items():
                c = shift[host]
                if host in floor or host in ceil:  # moved for the display: the error grows
                    moves[host] = (c, None)
                else:  # moved by the packets' causality alone: the truth is in the interval
                    moves[host] = (c, max(c - est.low, est.high - c))
            for rec in batch:
                move = moves.get(rec["host"])
                if move is None or "ts" not in rec:
                    continue
                c, cap = move
                rec["ts"] += c
                if cap is None:
                    rec["clock_error_ns"] += abs(c)
                else:
                    rec["clock_error_ns"] = min(rec["clock_error_ns"], cap)
            return
        # The bounds contradict the packets or what is shown: keep the clocks, move each
        # host's events as one (its own order stays) just far enough, and say so.
        shift = {h: max(floor.get(h, 0), 0) for h in first}
        if not _raise_arrivals(shift, pairs):
            # a cycle of sightings that cannot all hold: what the passes leave depends on
            # the order they go in, so they go over every sighting as it came
            shift = {h: max(floor.get(h, 0), 0) for h in first}
            _raise_arrivals(
                shift, [pair for recs in by_fp.values() if len(recs) > 1 for pair in _pairs(recs)]
            )
        for rec in batch:
            if shift.get(rec["host"], 0) > 0 and "ts" in rec:
                rec["ts"] += shift[rec["host"]]
                rec["ts_clamped_ns"] = shift[rec["host"]]

    def _remember(self, shown: list[dict], by_fp: dict[tuple, list[dict]], now: float) -> None:
        """Keep what was just shown: each host's latest ts, and the sightings per
        fingerprint (of ``by_fp``, the same records) to hold later ones to causality."""
        last_ts = self._last_ts
        # ``shown`` is in ts order: each host's last one is its latest
        for host, ts in {rec["host"]: rec["ts"] for rec in shown if "ts" in rec}.items():
            if ts > last_ts.get(host, ts - 1):
                last_ts[host] = ts
        kept = self._shown
        added: list[tuple[tuple, int]] = []
        for fp, recs in by_fp.items():
            added.append((fp, len(recs)))
            known = kept.get(fp)
            if known is None:  # the batch's own list (no copy: by_fp goes after this batch)
                kept[fp] = recs
            else:
                known += recs
        if added:
            self._shown_batches.append((now, added))
        # Sightings older than RECENT_S go: those of the batches shown before then, the
        # first ones of their fingerprints' lists.
        old = now - RECENT_S
        batches = self._shown_batches
        while batches and batches[0][0] < old:
            for fp, count in batches.popleft()[1]:
                if count == len(kept[fp]):
                    del kept[fp]
                else:
                    del kept[fp][:count]

    def _schedule_release(self) -> None:
        if not self._waiting or self._release_timer is not None:
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
    alignment: Alignment, floor: dict[str, int], pairs: list[tuple[str, int, str]]
) -> dict[str, int]:
    """The corrections closest to none that keep every departure before its arrival.

    Each host starts at 0 moved into its tightened interval (and exactly onto its floor:
    the interval's ends are rounded outwards), then arrivals are raised past their
    departures (Bellman-Ford). Solutions of difference constraints are closed under max,
    and the intervals' upper ends are one, so raising stays inside them. A consistent
    alignment means the sightings hold no cycle that cannot be satisfied, so the raising
    settles."""
    shift = {h: min(max(0, est.low, floor.get(h, 0)), est.high) for h, est in alignment.items()}
    _raise_arrivals(shift, pairs)
    return shift


def _raise_arrivals(shift: dict[str, int], pairs: list[tuple[str, int, str]]) -> bool:
    """Raise each arrival's host past its departure until nothing moves (Bellman-Ford over
    the hosts: at most one pass per host); ``pairs``: (departure host, departure ts minus
    arrival ts, arrival host). True when it settled.

    Once it settles the result is the least one above the start whatever the order and
    however many pairs each host pair has, so one pair per host pair (its largest gap)
    gives the same. Only when it cannot settle (a cycle of sightings that cannot all hold)
    does what the passes leave depend on the pairs as they came."""
    for _ in range(len(shift) + 1):
        moved = False
        for src, gap, dst in pairs:
            need = shift[src] + gap
            if need > shift[dst]:
                shift[dst] = need
                moved = True
        if not moved:
            return True
    return False


def _sightings(
    batch: list[dict], fps: list[tuple | None]
) -> tuple[dict[tuple, list[dict]], dict[str, int]]:
    """A released batch's aligned packets grouped per fingerprint (``fps``, the records'),
    in the order they came, and each host's earliest aligned ts in it."""
    by_fp: dict[tuple, list[dict]] = defaultdict(list)
    first: dict[str, int] = {}
    for rec, fp in zip(batch, fps, strict=True):
        if "ts" not in rec:
            continue
        host, ts = rec["host"], rec["ts"]
        first[host] = min(first.get(host, ts), ts)
        if fp is not None:
            by_fp[fp].append(rec)
    return by_fp, first


def _per_fingerprint(batch: list[dict], fps: list[tuple | None]) -> dict[tuple, list[dict]]:
    """A batch's packets grouped per fingerprint (``fps``, the records'), in the order
    they came."""
    by_fp: dict[tuple, list[dict]] = defaultdict(list)
    for rec, fp in zip(batch, fps, strict=True):
        if fp is not None:
            by_fp[fp].append(rec)
    return by_fp


def _pairs(recs: list[dict]) -> list[tuple[str, int, str]]:
    """Each departure of one packet with its arrival on another host within
    ``MATCH_WINDOW_NS``, as (departure host, departure ts minus arrival ts, arrival host):
    departures in the order they came, each with its arrivals in that order."""
    arrivals = [rec for rec in recs if rec.get("dir") == "ingress"]
    if not arrivals:
        return []
    return [
        (src["host"], src["ts"] - dst["ts"], dst["host"])
        for src in recs
        if src.get("dir") == "egress"
        for dst in arrivals
        if dst["host"] != src["host"] and abs(src["ts"] - dst["ts"]) <= MATCH_WINDOW_NS
    ]


_ts = operator.itemgetter("ts")
_error = operator.itemgetter(1)
_ts_then_host_time = operator.itemgetter("ts", "ts_ns")


def _shown_order(rec: dict) -> tuple[bool, int, int]:
    """Live order: by aligned time (events without one last), then host time."""
    return rec.get("ts") is None, rec.get("ts") or 0, rec.get("ts_ns", 0)


def _shown_sort(batch: list[dict], aligned: bool) -> None:
    """Sort a batch by ``_shown_order``. Once every event is aligned (each has an int
    ``ts`` and a ``ts_ns``), the same order is keyed in C: by ``ts`` alone, then by both
    only when two events share a ``ts``."""
    if not aligned:
        batch.sort(key=_shown_order)
        return
    batch.sort(key=_ts)
    times = list(map(_ts, batch))
    if any(map(operator.eq, times, times[1:])):
        batch.sort(key=_ts_then_host_time)
