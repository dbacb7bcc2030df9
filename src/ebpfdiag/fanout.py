"""Run one script on many hosts at once, with bounded concurrency and per-host results.

The engine never prints: it reports what happens through a ``FanoutSink`` (state changes,
output lines, clock samples, results), so every command chooses how that looks. One host's
failure never stops the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes.util
import functools
import gc
import logging
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Protocol

from ebpfdiag.clock import ClockSample
from ebpfdiag.errors import UsageError
from ebpfdiag.inventory import Host

#: the names asyncssh looks liboqs up by (post-quantum key exchange) when it is imported
LIBOQS_NAMES = ("oqs", "liboqs")


def _import_asyncssh() -> ModuleType:
    """asyncssh, imported without the slow half of its search for liboqs.

    At import, asyncssh asks ``ctypes.util.find_library`` for liboqs under two names; on
    Linux each question runs ldconfig, then gcc, then ld: six processes, most of the
    import's time on a busy machine, before any host is contacted. For those two names
    alone the answer here comes from the ldconfig cache (where an installed liboqs is);
    every other lookup, and every one after the import, is the standard one."""
    ldconfig_only = getattr(ctypes.util, "_findSoname_ldconfig", None)
    standard = ctypes.util.find_library
    if ldconfig_only is not None:
        ctypes.util.find_library = lambda name: (
            ldconfig_only(name) if name in LIBOQS_NAMES else standard(name)
        )
    try:
        import asyncssh
    finally:
        ctypes.util.find_library = standard
    _log_only_when_logged()
    _options_built_in_the_loop()
    return asyncssh


def _log_only_when_logged() -> None:
    """Make asyncssh skip the text it builds for log lines nobody will see.

    It formats a description of every SSH packet (about 40 a host) before checking that
    packet logging is on, and converts the arguments of every log call before asking
    whether the level is enabled: together 3 to 6% of the controller's CPU per host in
    profiles. Both checks now come first; what is logged when logging is on is unchanged."""
    from asyncssh.logging import SSHLogger
    from asyncssh.packet import SSHPacketLogger

    log_packet = SSHPacketLogger._log_packet
    log = SSHLogger.log

    @functools.wraps(log_packet)
    def _log_packet(self, *args, **kwargs):
        if SSHLogger._debug_level >= 3 and self.logger.isEnabledFor(logging.DEBUG):
            log_packet(self, *args, **kwargs)

    @functools.wraps(log)
    def _log(self, level, *args, **kwargs):
        if self.isEnabledFor(level):
            log(self, level, *args, **kwargs)

    SSHPacketLogger._log_packet = _log_packet
    SSHLogger.log = _log


def _options_built_in_the_loop() -> None:
    """Make asyncssh build a connection's options in the event loop's own thread.

    ``asyncssh.connect`` builds its SSHClientConnectionOptions in the loop's thread pool,
    because reading ~/.ssh/config and key files may block. The controller hands it the
    known_hosts it parsed once and, when the inventory names an identity file, the key
    pair it loaded once (``transport``); what is left is CPU (and, without an identity
    file, asyncssh reading the default keys in ~/.ssh: local files), while the hand-off
    costs the GIL changing hands and dozens of futex calls per host (3,300 to 4,400 for a
    100-host run). Measured: 2.29 -> 2.07 s of controller CPU on 300 hosts (medians of 4,
    ranges overlapping). DNS lookups still go to asyncio's thread pool, so a slow
    resolver never stops the loop."""
    from asyncssh.connection import SSHClientConnectionOptions

    async def construct(cls, options=None, **kwargs):
        return cls(options, loop=asyncio.get_running_loop(), **kwargs)

    SSHClientConnectionOptions.construct = classmethod(construct)


asyncssh = _import_asyncssh()

from ebpfdiag.transport import (  # noqa: E402 - transport imports asyncssh: after the above
    HostFailure,
    JumpPool,
    RemoteRun,
    RunOutcome,
    Script,
    SSHOptions,
    StopSignal,
    connect,
)

DEFAULT_FANOUT = 64


@dataclass
class HostResult:
    """How one host's run ended; ``error_kind`` is stable for JSON consumers."""

    host: str
    status: str  # ok | failed | timeout | interrupted
    exit_code: int | None = None
    exit_signal: str | None = None
    error: str | None = None
    error_kind: str | None = None
    duration_s: float = 0.0
    #: how the script ran: sudo, runner, root or direct; None when it never started
    via: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict:
        return {
            "type": "host",
            "host": self.host,
            "status": self.status,
            "exit_code": self.exit_code,
            "exit_signal": self.exit_signal,
            "error_kind": self.error_kind,
            "error": self.error,
            "duration_s": round(self.duration_s, 3),
            "via": self.via,
        }


class FanoutSink(Protocol):
    """Receives engine events; implementations render or collect them. Hosts are pinged
    for clock samples only when ``wants_clock`` (each ping is a packet each way)."""

    wants_clock: bool

    def state(self, host: str, state: str) -> None: ...
    def lines(self, host: str, stream: str, lines: list[bytes]) -> None: ...
    def clock(self, host: str, sample: ClockSample) -> None: ...
    def result(self, result: HostResult) -> None: ...


@dataclass
class FanoutOptions:
    fanout: int = DEFAULT_FANOUT
    timeout: float | None = None  # per host, from connect to exit: a failure when reached
    duration: float | None = None  # per host, from script start: a normal end when reached
    ssh: SSHOptions = field(default_factory=SSHOptions)


#: Descriptors the controller holds whatever the fleet's size: the interpreter's own,
#: stdio, the event loop's selector and wake-up pipe, the threads of its DNS lookups, a
#: script or inventory file being read.
FD_BASE = 64
#: Per host connected at once: its TCP socket (jumped hosts ride their jump host's
#: connection), and a file it may hold open for a moment (a known_hosts file being
#: appended to, a key being read).
FD_PER_HOST = 2


def fd_need(hosts: int, fanout: int, jump_hosts: int = 0) -> int:
    """Descriptors a run needs at its peak: at most ``fanout`` hosts are connected at
    once, plus one connection per jump host, which stays open for the whole run."""
    return FD_BASE + FD_PER_HOST * min(hosts, max(1, fanout)) + jump_hosts


def fd_soft_limit_for(need: int, soft: int, hard: int) -> int:
    """The soft limit to set: raised to ``need`` (never above ``hard``), never lowered."""
    if need <= soft:
        return soft
    return need if hard == resource.RLIM_INFINITY else min(need, hard)


def hosts_at_once(limit: int, jump_hosts: int = 0) -> int:
    """How many hosts fit in ``limit`` descriptors at once (0: not even one)."""
    return max(0, (limit - FD_BASE - jump_hosts) // FD_PER_HOST)


def raise_fd_limit(hosts: int, fanout: int | None = None, jump_hosts: int = 0) -> int:
    """Lift the soft RLIMIT_NOFILE towards what the run needs (up to the hard limit);
    returns the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = fd_soft_limit_for(fd_need(hosts, hosts if fanout is None else fanout, jump_hosts),
                             soft, hard)  # fmt: skip
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            return soft
    return want


def plan_fanout(hosts: int, fanout: int, jump_hosts: int) -> int:
    """The concurrency the descriptors allow: ``fanout`` when they suffice (after raising
    the soft limit), else as many hosts as fit, with a warning; a usage error when not
    even one host fits."""
    fanout = max(1, min(fanout, hosts))
    limit = raise_fd_limit(hosts, fanout, jump_hosts)
    need = fd_need(hosts, fanout, jump_hosts)
    if limit >= need:
        return fanout
    fit = hosts_at_once(limit, jump_hosts)
    if fit < 1:
        raise UsageError(
            f"open-file limit {limit} is too low to reach any host ({need} needed for "
            f"{fanout} at once); raise it (ulimit -n {need})"
        )
    sys.stderr.write(
        f"ebpfdiag: warning: open-file limit {limit} allows {fit} hosts at once, not "
        f"{fanout}; running {fit} at a time (ulimit -n {need} for all)\n"
    )
    return fit


#: Allocations between two young-generation collections during a run (Python's default: 700).
GC_YOUNG_THRESHOLD = 50_000


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """During a run, the cyclic collector leaves alone what start-up loaded (``gc.freeze``:
    modules, the inventory) and runs less often: each full collection walks every live
    object, and those grow with the hosts, so its cost per host grew with the fleet
    (1,000 hosts: 6.5-6.8 user CPU s for a run, 5.7-6.1 s with this; two runs each)."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


class Fanout:
    """One run of one script over a host list; ``stop()`` ends it everywhere, cleanly."""

    def __init__(
        self,
        hosts: list[Host],
        script: Script,
        opts: FanoutOptions,
        sink: FanoutSink,
        *,
        before_stop: Callable[[], None] | None = None,
    ):
        """``before_stop`` is called at every ``stop()``, before the hosts are told to stop
        (its last chance to send them a control line)."""
        self.hosts = hosts
        self.script = script
        self.opts = opts
        self.sink = sink
        self.before_stop = before_stop
        self.interrupted = False
        self._stops = {h.name: StopSignal() for h in hosts}
        self._timed_out: set[str] = set()
        self._runs: dict[str, RemoteRun] = {}

    def stop(self, interrupted: bool = False) -> None:
        """End every host's script (stdin EOF -> the script cleans up and exits)."""
        if self.before_stop is not None:
            self.before_stop()
        self.interrupted = self.interrupted or interrupted
        for ev in self._stops.values():
            ev.set()

    def control(self, host: str, text: str) -> bool:
        """Send a control line to ``host``'s running script; False when it is not running."""
        run = self._runs.get(host)
        return run is not None and run.send_control(text)

    async def run(self) -> list[HostResult]:
        jump_hosts = len({j.name for j in self.opts.ssh.jumps.values()})
        gate = asyncio.Semaphore(plan_fanout(len(self.hosts), self.opts.fanout, jump_hosts))
        self._jumps = JumpPool(self.opts.ssh)
        try:
            with _fewer_collections():
                return list(await asyncio.gather(*(self._one(h, gate) for h in self.hosts)))
        finally:
            self._jumps.close()

    async def _one(self, host: Host, gate: asyncio.Semaphore) -> HostResult:
        start = time.monotonic()
        stop = self._stops[host.name]
        self.sink.state(host.name, "queued")
        async with gate:
            timer = None
            if self.opts.timeout:
                timer = asyncio.get_running_loop().call_later(
                    self.opts.timeout, self._expire, host.name
                )
            try:
                result = await self._connect_and_run(host, stop)
            except HostFailure as exc:
                result = HostResult(
                    host.name, "failed", error=str(exc), error_kind=exc.kind, via=exc.via
                )
            except Exception as exc:  # a bug must not take the other hosts down with it
                result = HostResult(
                    host.name, "failed", error=f"internal error: {exc!r}", error_kind="internal"
                )
            finally:
                if timer is not None:
                    timer.cancel()
        if host.name in self._timed_out and result.status == "ok":
            result.status, result.error_kind = "timeout", "timeout"
            result.error = f"timed out after {self.opts.timeout:g}s"
        elif self.interrupted and result.status == "ok" and result.error_kind is None:
            result.status = "interrupted"
        result.duration_s = time.monotonic() - start
        del self._stops[host.name]  # a finished host keeps only its result
        self.sink.state(host.name, "done" if result.ok else result.status)
        self.sink.result(result)
        return result

    def _expire(self, name: str) -> None:
        self._timed_out.add(name)
        self._stops[name].set()

    async def _connect_and_run(self, host: Host, stop: StopSignal) -> HostResult:
        self.sink.state(host.name, "connecting")
        connecting = asyncio.ensure_future(connect(host, self.opts.ssh, self._jumps))
        forget = stop.on_set(connecting.cancel)
        try:
            conn = await connecting
        except asyncio.CancelledError:
            if not stop.is_set():
                raise
            return HostResult(host.name, "ok", error_kind=None)  # stopped before it began
        finally:
            forget()
        try:
            self.sink.state(host.name, "starting")
            duration_timer = None

            def running() -> None:
                nonlocal duration_timer
                self.sink.state(host.name, "running")
                if self.opts.duration:
                    duration_timer = asyncio.get_running_loop().call_later(
                        self.opts.duration, stop.set
                    )

            run = RemoteRun(
                host,
                self.script,
                self.opts.ssh,
                on_lines=functools.partial(self.sink.lines, host.name),
                on_running=running,
                on_clock=(
                    functools.partial(self.sink.clock, host.name) if self.sink.wants_clock else None
                ),
            )
            self._runs[host.name] = run
            try:
                outcome = await run.run(conn, stop)
            finally:
                del self._runs[host.name]
                if duration_timer is not None:
                    duration_timer.cancel()
        except (OSError, asyncssh.Error) as exc:
            raise HostFailure("ssh", f"connection to {host.name} lost: {exc}") from None
        finally:
            conn.close()
        result = _result_of(host.name, outcome)
        result.via = outcome.via
        return result


def _result_of(name: str, outcome: RunOutcome) -> HostResult:
    """Exit status -> result; a script ending on our SIGTERM after a stop is a normal end."""
    signal = outcome.exit_signal
    status = None if signal else outcome.exit_status
    clean_stop = outcome.stopped_by_us and (signal == "TERM" or status in (0, 143, None))
    if status == 0 or clean_stop:
        return HostResult(name, "ok", exit_code=status, exit_signal=signal)
    if signal:
        return HostResult(
            name,
            "failed",
            exit_code=status,
            exit_signal=signal,
            error=f"script killed by SIG{signal}",
            error_kind="killed",
        )
    return HostResult(
        name, "failed", exit_code=status, error=f"script exited with {status}", error_kind="exit"
    )
