"""Long-running metrics sessions: one per host, reconnected with backoff for as long as the
controller runs.

Each session connects, launches the metrics script through the usual bootstrap (see
``transport.RemoteRun``), and feeds every record to the :class:`Fleet`. When the script or
the connection ends (sshd restarted, link down, script killed) the host is marked down (its
totals stay) and the session tries again after a delay that doubles from ``BACKOFF_MIN_S``
to ``BACKOFF_MAX_S`` (with jitter, so a fleet that dropped together does not come back in
lockstep), and starts from the minimum again once a run has delivered data. A run that
stays silent for ``stale_after`` seconds (a link that went away without a FIN) is ended
and retried the same way. ``stop()`` ends every run with stdin EOF, which makes each
host's script detach its programs and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable

import asyncssh

from ebpfdiag.inventory import Host
from ebpfdiag.metrics.exposition import Fleet
from ebpfdiag.transport import (
    HostFailure,
    JumpPool,
    RemoteRun,
    Script,
    SSHOptions,
    StopSignal,
    connect,
)

#: Time a run gets from connecting to its first record (BCC compiles on the host meanwhile).
SETUP_TIMEOUT_S = 120.0
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 60.0
#: stderr lines of a host's script kept for its status line
STDERR_KEEP = 3


def stale_after(interval: float) -> float:
    """Silence that ends a run: three missed deltas, and never less than 10 s."""
    return max(3 * interval, 10.0)


def backoff_delays(
    low: float = BACKOFF_MIN_S,
    high: float = BACKOFF_MAX_S,
    rand: Callable[[], float] = random.random,
):
    """Delays between attempts: doubling from ``low`` up to ``high``, each +-20%."""
    delay = low
    while True:
        yield delay * (0.8 + 0.4 * rand())
        delay = min(delay * 2, high)


def _ignore(*_args: object) -> None:
    """Clock samples: metrics are stamped by the controller when they arrive."""


class HostSession:
    """Keeps one host's metrics script running and its records flowing into the fleet."""

    def __init__(
        self,
        host: Host,
        script: Script,
        ssh: SSHOptions,
        jumps: JumpPool,
        fleet: Fleet,
        interval: float,
        on_state: Callable[[str, bool, str | None], None],
        gate: asyncio.Semaphore,
    ):
        self.host = host
        self.gate = gate
        self.script = script
        self.ssh = ssh
        self.jumps = jumps
        self.fleet = fleet
        self.interval = interval
        self.on_state = on_state
        self.stopping = asyncio.Event()
        self._run_stop: StopSignal | None = None
        self._heard = 0.0
        self._got_data = False
        self._stderr: list[str] = []
        #: seconds of silence that ended the last run (0: it did not go stale)
        self._stale = 0.0
        #: records of the current run
        self._records = 0

    def stop(self) -> None:
        self.stopping.set()
        if self._run_stop is not None:
            self._run_stop.set()

    async def run(self) -> None:
        delays = backoff_delays()
        while not self.stopping.is_set():
            self._got_data = False
            error = None
            try:
                error = await self._once()
            except HostFailure as exc:
                error = str(exc)
            except (OSError, asyncssh.Error) as exc:
                error = f"connection to {self.host.name} lost: {exc}"
            except Exception as exc:  # a bug must not end the other hosts' sessions
                error = f"internal error: {exc!r}"
            if self.stopping.is_set():
                self.fleet.down(self.host.name)
                break
            if self._got_data:
                delays = backoff_delays()
            delay = next(delays)
            error = error or "the metrics script ended"
            self.fleet.down(self.host.name, error)
            self.on_state(self.host.name, False, f"{error}; retrying in {delay:.1f}s")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    async def _once(self) -> str | None:
        """One connection and one run of the script; returns why it ended (None: stopped)."""
        self._stderr.clear()  # only this attempt's stderr explains how it ended
        connecting = asyncio.ensure_future(self._connect())
        stopper = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({connecting, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, HostFailure):
                await connecting
            return None
        conn = connecting.result()
        self._run_stop = run_stop = StopSignal()
        if self.stopping.is_set():
            run_stop.set()
        self._heard = time.monotonic()
        self._records = 0
        run = RemoteRun(
            self.host,
            self.script,
            self.ssh,
            on_lines=self._lines,
            on_running=_ignore,
            on_clock=None,  # deltas carry no host times: no pings
        )
        watchdog = asyncio.ensure_future(self._watch(run_stop))
        outcome = None
        try:
            outcome = await run.run(conn, run_stop)
        except HostFailure as exc:
            if exc.kind != "stop":  # else it did not stop in time: said below
                raise
        finally:
            watchdog.cancel()
            self._run_stop = None
            conn.close()
        if self.stopping.is_set():
            return None
        if self._stale:
            return f"no data for {self._stale:g}s"
        if outcome is None:
            return "the metrics script did not stop in time"
        tail = "; ".join(self._stderr)
        how = (
            f"signal {outcome.exit_signal}"
            if outcome.exit_signal
            else f"exit {outcome.exit_status}"
        )
        return f"the metrics script ended ({how}){': ' + tail if tail else ''}"

    async def _connect(self) -> asyncssh.SSHClientConnection:
        """At most --fanout hosts connect at once (a fleet that comes back together)."""
        async with self.gate:
            return await connect(self.host, self.ssh, self.jumps)

    async def _watch(self, run_stop: StopSignal) -> None:
        """End a run that went silent (no record, not even a heartbeat delta), or that
        said nothing within SETUP_TIMEOUT_S of connecting."""
        self._stale = 0.0
        while not run_stop.is_set():
            await asyncio.sleep(1.0)
            limit = stale_after(self.interval) if self._records else SETUP_TIMEOUT_S
            if time.monotonic() - self._heard > limit:
                self._stale = limit
                run_stop.set()

    def _lines(self, stream: str, lines: list[bytes]) -> None:
        if stream != "stdout":
            self._stderr.extend(line.decode(errors="replace").strip() for line in lines)
            del self._stderr[:-STDERR_KEEP]
            return
        now = time.time()
        for line in lines:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            self._heard = time.monotonic()
            self._records += 1
            was_up = self.fleet.hosts[self.host.name].up
            self.fleet.record(self.host.name, rec, now)
            if rec.get("type") == "delta":
                self._got_data = True
            if not was_up and self.fleet.hosts[self.host.name].up:
                self._stderr.clear()
                self.on_state(self.host.name, True, None)


class Sessions:
    """Every host's session; ``run()`` returns once ``stop()`` has ended them all."""

    def __init__(
        self,
        hosts: list[Host],
        script: Script,
        ssh: SSHOptions,
        fleet: Fleet,
        interval: float,
        on_state: Callable[[str, bool, str | None], None] = _ignore,
        fanout: int = 64,
    ):
        self.jumps = JumpPool(ssh)
        gate = asyncio.Semaphore(max(1, fanout))
        self.sessions = [
            HostSession(h, script, ssh, self.jumps, fleet, interval, on_state, gate) for h in hosts
        ]
        self.interrupted = False

    def stop(self, interrupted: bool = False) -> None:
        self.interrupted = self.interrupted or interrupted
        for session in self.sessions:
            session.stop()

    async def run(self) -> None:
        try:
            await asyncio.gather(*(s.run() for s in self.sessions))
        finally:
            self.jumps.close()
