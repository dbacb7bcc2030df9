"""Terminal output while hosts run: coloured host prefixes and the live status view.

Status goes to stderr, data to stdout; nothing here runs in ``--json`` mode (end-of-run
tables are in ``render.tables``).
"""

from __future__ import annotations

import heapq
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ebpfdiag.render.fold import failure_line, group_failures, hosts_phrase, normalise_error

if TYPE_CHECKING:
    from ebpfdiag.fanout import HostResult

_PALETTE = ("cyan", "magenta", "green", "yellow", "blue", "bright_cyan", "bright_magenta")
_ANSI = {"cyan": 36, "magenta": 35, "green": 32, "yellow": 33, "blue": 34}
STATE_STYLE = {
    "queued": "dim",
    "connecting": "yellow",
    "starting": "yellow",
    "running": "cyan",
    "ready": "green",
    "done": "green",
    "failed": "bold red",
    "timeout": "bold red",
    "interrupted": "magenta",
}


#: attach kinds as a reader knows them
_HOOK_NAMES = {"tcx-link": "tcx", "tc-clsact": "clsact"}


def ready_line(host: str, after_s: float, hello: dict) -> str:
    """``server ready in 0.84 s (tcx, 6 interfaces)``: one host listens, and with what
    (from any tool's hello: its ``attach`` entries and the probes it had to go without)."""
    attach = hello.get("attach") if isinstance(hello.get("attach"), dict) else {}
    parts = []
    probes = 0
    for how in attach.values():
        if not isinstance(how, dict):
            continue
        if isinstance(how.get("interfaces"), list):
            kind = _HOOK_NAMES.get(how.get("kind"), how.get("kind") or "tc")
            n = len(how["interfaces"])
            parts.append(f"{kind}, {n} interface{'' if n == 1 else 's'}")
        else:
            probes += 1
    if probes:
        parts.append(f"{probes} probe{'' if probes == 1 else 's'}")
    missing = hello.get("missing")
    if isinstance(missing, list) and missing:
        parts.append(f"{len(missing)} missing")
    detail = f" ({', '.join(parts)})" if parts else ""
    return f"{host} ready in {after_s:.2f} s{detail}"


def host_colour(name: str) -> str:
    """A stable colour per host name, so the same host looks the same in every run."""
    return _PALETTE[zlib.crc32(name.encode()) % len(_PALETTE)]


class HostPrefixer:
    """Writes ``host | line`` to stdout, coloured when stdout is a terminal."""

    def __init__(self, names: Iterable[str], stream=None):
        self.stream = stream or sys.stdout
        names = list(names)
        width = max((len(n) for n in names), default=0)
        colour = self.stream.isatty()
        self.prefix = {}
        for n in names:
            label = n.ljust(width)
            code = _ANSI.get(host_colour(n), 36)
            self.prefix[n] = f"\x1b[{code}m{label}\x1b[0m | " if colour else f"{label} | "

    def write(self, host: str, text: str) -> None:
        self.stream.write(self.prefix[host] + text + "\n")
        self.stream.flush()


#: Up to this many hosts the live block has a line per host; above it (or when those lines
#: would not fit the terminal) it shows the fleet: counts by state, the hosts in progress
#: for longest and the failures folded by cause, in at most 2 + SLOWEST_SHOWN +
#: FAILURES_SHOWN lines whatever the number of hosts.
ROWS_UP_TO = 16
SLOWEST_SHOWN = 5
FAILURES_SHOWN = 4
IN_PROGRESS = ("connecting", "starting", "running", "ready")


class StatusView:
    """A live status block on stderr (only on a terminal), else failure lines.

    The block redraws itself (8 times a second, from rich's refresh thread) from the
    states recorded here, so a state change costs a dictionary store, not a render.
    """

    def __init__(
        self,
        names: list[str],
        console: Console,
        prog: str = "ebpfdiag",
        *,
        aliases: Mapping[str, Iterable[str]] | None = None,
        failure_lines: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``aliases``: each host's other spellings in error messages (its address), so
        failures fold by cause; ``failure_lines=False`` keeps quiet outside a terminal
        (the caller prints the failures folded at the end)."""
        self.names = names
        self.console = console
        self.prog = prog
        self.aliases = aliases or {}
        self.failure_lines = failure_lines
        self.clock = clock
        self.states = dict.fromkeys(names, "queued")
        self.since: dict[str, float | None] = dict.fromkeys(names)
        self.failures: list[tuple[str, str]] = []
        self._folded: tuple[int, list[str]] = (0, [])
        self.live: Live | None = None

    def __enter__(self) -> StatusView:
        if self.console.is_terminal:
            self.live = Live(
                console=self.console,
                transient=True,
                refresh_per_second=8,
                redirect_stdout=sys.stdout.isatty(),
                redirect_stderr=False,
                get_renderable=self._render,
            )
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End the live block early (e.g. once tracing starts and events take the screen)."""
        if self.live is not None:
            self.live.stop()
            self.live = None

    def set(self, host: str, state: str) -> None:
        self.states[host] = state
        if state != "queued" and self.since[host] is None:
            self.since[host] = self.clock()

    def note_failure(self, result: HostResult) -> None:
        """Kept for the fleet view; outside a terminal also reported the moment it fails."""
        message = result.error or result.status
        key = normalise_error(message, (result.host, *self.aliases.get(result.host, ())))
        self.failures.append((result.host, key))
        if self.live is None and self.failure_lines:
            self.console.print(
                f"{self.prog}: {result.host}: {message}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    def _render(self) -> Table:
        if len(self.names) <= min(ROWS_UP_TO, self.console.height - 3):
            return self._host_rows()
        return self._fleet()

    def _counts(self) -> Text:
        counts = Counter(self.states.values())
        return Text(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))

    def _host_rows(self) -> Table:
        table = Table.grid(padding=(0, 1))
        for name in self.names:
            state = self.states[name]
            table.add_row(Text(name, style=host_colour(name)), Text(state, STATE_STYLE[state]))
        table.add_row(Text(f"{len(self.names)} hosts", style="bold"), self._counts())
        return table

    def _fleet(self) -> Table:
        """Counts, the hosts in progress for longest, and failures folded by cause."""
        table = Table.grid(padding=(0, 1))
        table.add_row(Text(f"{len(self.names)} hosts", style="bold"), self._counts())
        now = self.clock()
        busy = [
            (now - started, name)
            for name, started in self.since.items()
            if started is not None and self.states[name] in IN_PROGRESS
        ]
        for i, (age, name) in enumerate(heapq.nlargest(SLOWEST_SHOWN, busy)):
            state = self.states[name]
            table.add_row(
                Text("slowest" if i == 0 else ""),
                Text.assemble(
                    (name, host_colour(name)), " ", (state, STATE_STYLE[state]), f" {age:.1f} s"
                ),
            )
        for i, line in enumerate(self._failure_lines()):
            table.add_row(
                Text("failed" if i == 0 else "", style="bold red"),
                Text(line, no_wrap=True, overflow="ellipsis"),  # a line each, whatever the width
            )
        return table

    def _failure_lines(self) -> list[str]:
        """Failures folded by cause, most hosts first; folded again only when a host has
        failed since the last frame (folding a thousand names takes milliseconds)."""
        failures = self.failures[:]
        if self._folded[0] != len(failures):
            groups = group_failures(failures)
            lines = [failure_line(g) for g in groups[:FAILURES_SHOWN]]
            if len(groups) > FAILURES_SHOWN:
                rest = sum(len(g.hosts) for g in groups[FAILURES_SHOWN:])
                more = len(groups) - FAILURES_SHOWN
                lines.append(f"and {hosts_phrase(rest)} failing in {more} other ways")
            self._folded = (len(failures), lines)
        return self._folded[1]
