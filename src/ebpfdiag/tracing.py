"""A live trace over many hosts: collect each host's records, align, correlate at the end.

``TraceSession`` is the fan-out sink of ``trace`` commands. It never prints: the CLI gives
it callbacks for what to show live (readiness, each reset as it happens) and renders the
``TraceResult`` it builds at the end.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ebpfdiag.clock import ClockEstimate, ClockSample, estimate
from ebpfdiag.fanout import Fanout, HostResult
from ebpfdiag.questions.rst import Correlation, correlate

RST = 0x04
#: After a reset is seen, wait this long for the other hosts' sightings before counting flows.
COUNT_SETTLE_S = 0.3


@dataclass
class HostTrace:
    """What one host's script said about itself."""

    name: str
    hello: dict | None = None
    ready: bool = False
    lost: int = 0
    bye: dict | None = None
    samples: list[ClockSample] = field(default_factory=list)
    #: from the samples so far; kept current as pings arrive, read for every event
    clock: ClockEstimate | None = None
    diagnostics: list[str] = field(default_factory=list)
    result: HostResult | None = None


@dataclass
class TraceResult:
    hosts: dict[str, HostTrace]
    correlation: Correlation
    interrupted: bool
    duration_s: float


class TraceSession:
    """Sink + stop logic for one trace run (duration counted from 'all hosts ready')."""

    def __init__(
        self,
        names: list[str],
        *,
        duration: float | None = None,
        count: int | None = None,
        on_event: Callable[[dict], None] | None = None,
        on_ready: Callable[[list[str], list[str]], None] | None = None,
        on_state: Callable[[str, str], None] | None = None,
        on_diagnostic: Callable[[str, str], None] | None = None,
    ):
        self.hosts = {n: HostTrace(n) for n in names}
        self.events: list[dict] = []
        self.duration = duration
        self.count = count
        self.on_event = on_event
        self.on_ready = on_ready
        self.on_state = on_state
        self.on_diagnostic = on_diagnostic
        self.fanout: Fanout | None = None
        self.all_ready = False
        self._count_check: asyncio.TimerHandle | None = None
        self.started = time.monotonic()

    # -- FanoutSink ------------------------------------------------------------------
    def state(self, host: str, state: str) -> None:
        if self.on_state:
            self.on_state(host, state)

    def lines(self, host: str, stream: str, lines: list[bytes]) -> None:
        for line in lines:
            if stream != "stdout":
                self._diagnostic(host, line.decode(errors="replace"))
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if isinstance(rec, dict):
                self._record(host, rec)
            else:
                self._diagnostic(host, line.decode(errors="replace"))

    def _diagnostic(self, host: str, text: str) -> None:
        self.hosts[host].diagnostics.append(text)
        if self.on_diagnostic:
            self.on_diagnostic(host, text)

    def clock(self, host: str, sample: ClockSample) -> None:
        ht = self.hosts[host]
        ht.samples.append(sample)
        ht.clock = estimate(ht.samples)

    def result(self, result: HostResult) -> None:
        self.hosts[result.host].result = result
        self._check_ready()

    # -- records ---------------------------------------------------------------------
    def _record(self, host: str, rec: dict) -> None:
        kind = rec.get("type")
        ht = self.hosts[host]
        if kind in ("packet", "reset"):
            rec["host"] = host
            est = ht.clock
            rec["ts"] = est.align(rec["ts_ns"]) if est and "ts_ns" in rec else None
            self.events.append(rec)
            if self.on_event:
                self.on_event(rec)
            if self.count and (kind == "reset" or rec.get("flags", 0) & RST):
                self._schedule_count_check()
        elif kind == "hello":
            ht.hello = rec
        elif kind == "ready":
            ht.ready = True
            self._check_ready()
        elif kind == "lost":
            ht.lost += int(rec.get("count", 0))
            rec["host"] = host
            self.events.append(rec)
        elif kind == "bye":
            ht.bye = rec

    def _check_ready(self) -> None:
        if self.all_ready:
            return
        pending = [h for h in self.hosts.values() if not h.ready and h.result is None]
        if pending:
            return
        self.all_ready = True
        ready = [h.name for h in self.hosts.values() if h.ready]
        failed = [h.name for h in self.hosts.values() if not h.ready]
        if not ready:
            return
        if self.on_ready:
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
        return {name: ht.clock for name, ht in self.hosts.items() if ht.clock is not None}

    def correlate(self) -> Correlation:
        return correlate(self.events, self.clocks())

    def finish(self, interrupted: bool) -> TraceResult:
        return TraceResult(
            self.hosts, self.correlate(), interrupted, time.monotonic() - self.started
        )
