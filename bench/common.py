"""Shared pieces of the benchmarks: measured child processes, medians and report sections.

Every figure comes from a real child process reaped with ``os.wait4``, whose resource
usage covers the process and every descendant it waited for (the ssh children of clush
and parallel-ssh included): CPU seconds of the whole tree and the largest resident set
any process of it reached.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
EBPFDIAG = str(VENV_BIN / "ebpfdiag")
PYTHON = str(VENV_BIN / "python")
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass
class Measured:
    """One finished child: wall seconds, tree CPU seconds (user + system, and the two
    apart), peak RSS (MiB), exit code."""

    wall_s: float
    cpu_s: float
    maxrss_mb: float
    returncode: int
    user_s: float = 0.0
    sys_s: float = 0.0


def run_measured(
    argv: Sequence[str],
    *,
    stdout: IO | int | None = subprocess.DEVNULL,
    stderr: IO | int | None = subprocess.DEVNULL,
    stdin: IO | int | None = subprocess.DEVNULL,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Measured:
    """Run ``argv`` to completion; kill it (and fail) past ``timeout``."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, stdin=stdin, env=env, cwd=cwd)
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            proc.returncode = -9
            raise RuntimeError(f"{argv[0]} ran longer than {timeout:g}s")
        time.sleep(0.005)
    wall = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        maxrss_mb=usage.ru_maxrss / 1024,
        returncode=proc.returncode,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
    )


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Target:
    """A goal from the project's requirements and whether this run met it."""

    what: str
    figure: str
    goal: str
    met: bool


@dataclass
class Section:
    """One benchmark's result: a table, its targets and notes on what the figures include."""

    name: str
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: bool = False

    def markdown(self) -> str:
        out = [f"## {self.title}", ""]
        out.append("| " + " | ".join(self.headers) + " |")
        out.append("|" + "|".join(" --- " for _ in self.headers) + "|")
        out += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.targets:
            out += ["", "| target | figure | goal | met |", "| --- | --- | --- | --- |"]
            for t in self.targets:
                out.append(f"| {t.what} | {t.figure} | {t.goal} | {'yes' if t.met else 'NO'} |")
        if self.notes:
            out.append("")
            out += [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def text(self) -> str:
        widths = [len(h) for h in self.headers]
        for row in self.rows:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=False)]
        line = "  ".join(h.ljust(w) for h, w in zip(self.headers, widths, strict=False))
        out = [f"== {self.title}", line, "-" * len(line)]
        out += [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) for row in self.rows
        ]
        for t in self.targets:
            out.append(
                f"  target {t.what}: {t.figure} (goal {t.goal}) {'ok' if t.met else 'MISSED'}"
            )
        return "\n".join(out)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    load = os.getloadavg()
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "loadavg": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    }


def fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def is_record(line: bytes, kind: str) -> bool:
    """Whether an NDJSON line from ebpfdiag is a record of ``kind``: a cheap test on the
    line's head, which holds the type right after the schema version (none before
    version 2, so an earlier build compared with ``--against`` matches too)."""
    return f'"type":"{kind}"'.encode() in line[:32]
