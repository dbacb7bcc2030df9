"""Terminal output while hosts run: coloured host prefixes and the live status view.

Status goes to stderr, data to stdout; nothing here runs in ``--json`` mode (end-of-run
tables are in ``render.tables``).
"""

from __future__ import annotations

import sys
import zlib
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

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


class StatusView:
    """A live per-host status block on stderr (only on a terminal), else failure lines."""

    def __init__(self, names: list[str], console: Console, prog: str = "ebpfdiag"):
        self.names = names
        self.console = console
        self.prog = prog
        self.states = dict.fromkeys(names, "queued")
        self.live: Live | None = None

    def __enter__(self) -> StatusView:
        if self.console.is_terminal:
            self.live = Live(
                self._render(),
                console=self.console,
                transient=True,
                refresh_per_second=8,
                redirect_stdout=sys.stdout.isatty(),
                redirect_stderr=False,
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
        if self.live is not None:
            self.live.update(self._render())

    def note_failure(self, result: HostResult) -> None:
        """Outside a terminal, a failed host is reported the moment it fails."""
        if self.live is None:
            self.console.print(
                f"{self.prog}: {result.host}: {result.error}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    def _render(self) -> Table:
        counts = Counter(self.states.values())
        table = Table.grid(padding=(0, 1))
        rows = self.names if len(self.names) <= self.console.height - 3 else []
        for name in rows:
            state = self.states[name]
            table.add_row(Text(name, style=host_colour(name)), Text(state, STATE_STYLE[state]))
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        table.add_row(Text(f"{len(self.names)} hosts", style="bold"), Text(summary))
        return table
