"""Fan-out: one sudo'd Python one-liner on N real sshd hosts, ebpfdiag vs clush vs pssh.

All three tools reach the same fleet with the same key, strict host key checking against
the same known_hosts file, batch mode and a concurrency of 64; sshd's MaxStartups is far
above 64, so no tool is throttled. A run counts only when every host answered ``1``: each
tool's per-host output is checked, and a run with a missing host is reported as a failure.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.common import EBPFDIAG, Measured, Section, Target, fmt, median, run_measured

PREFIX = "ebdb"
SUBNET = "198.19.1.0/24"
CONCURRENCY = 64
REMOTE = "sudo -n /usr/bin/python3 -c 'print(1)'"
SCRIPT = "print(1)\n"
CLUSH = "/usr/bin/clush"
PSSH = "/usr/bin/parallel-ssh"


class Missing(Exception):
    """A run where some host did not answer: not a result."""


def _ssh_options(fleet) -> list[str]:
    return [
        "-F", "/dev/null",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={fleet.known_hosts}",
        "-o", f"IdentityFile={fleet.client_key}",
        "-o", "IdentitiesOnly=yes",
    ]  # fmt: skip


def _check(tool: str, m: Measured, want: set[str], got: set[str]) -> None:
    if m.returncode != 0 or got != want:
        missing = sorted(want - got)
        raise Missing(
            f"{tool}: exit {m.returncode}, {len(got)}/{len(want)} hosts answered"
            + (f" (missing e.g. {', '.join(missing[:3])})" if missing else "")
        )


def run_ebpfdiag(fleet, hosts, work: Path) -> Measured:
    script = work / "one.py"
    script.write_text(SCRIPT)
    out = work / "ebpfdiag.out"
    argv = [EBPFDIAG, "run-script", str(script), "-i", str(fleet.inventory),
            "--hosts", ",".join(h.name for h in hosts), "--json",
            "--fanout", str(CONCURRENCY)]  # fmt: skip
    with out.open("wb") as fh:
        m = run_measured(argv, stdout=fh)
    got = set()
    ok = set()
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "line" and rec.get("stream") == "stdout" and rec["text"] == "1":
            got.add(rec["host"])
        elif rec.get("type") == "host" and rec.get("status") == "ok":
            ok.add(rec["host"])
    _check("ebpfdiag", m, {h.name for h in hosts}, got & ok)
    return m


def run_clush(fleet, hosts, work: Path) -> Measured:
    out = work / "clush.out"
    argv = [CLUSH, "-f", str(CONCURRENCY), "-l", fleet.user, "-S",
            "-o", " ".join(_ssh_options(fleet)),
            "-w", ",".join(h.address for h in hosts), REMOTE]  # fmt: skip
    with out.open("wb") as fh:
        m = run_measured(argv, stdout=fh)
    got = set()
    for line in out.read_text().splitlines():
        node, _, text = line.partition(": ")
        if text.strip() == "1":
            got.add(node)
    _check("clush", m, {h.address for h in hosts}, got)
    return m


def run_pssh(fleet, hosts, work: Path) -> Measured:
    hostfile = work / "pssh.hosts"
    hostfile.write_text("".join(f"{h.address}\n" for h in hosts))
    outdir = work / "pssh-out"
    shutil.rmtree(outdir, ignore_errors=True)
    argv = [PSSH, "-h", str(hostfile), "-l", fleet.user, "-p", str(CONCURRENCY), "-t", "0",
            "-o", str(outdir), "-e", str(work / "pssh-err"),
            "-x", " ".join(_ssh_options(fleet)), REMOTE]  # fmt: skip
    m = run_measured(argv)
    got = {
        h.address
        for h in hosts
        if (outdir / h.address).exists() and (outdir / h.address).read_text().strip() == "1"
    }
    _check("parallel-ssh", m, {h.address for h in hosts}, got)
    return m


TOOLS: dict[str, Callable] = {"ebpfdiag": run_ebpfdiag, "clush": run_clush, "pssh": run_pssh}


def run(sizes: tuple[int, ...] = (50, 100), rounds: int = 3) -> Section:
    """Interleave the tools A B C A B C ... at each size; medians of the complete runs."""
    from tests.fleet import Fleet

    section = Section(
        "fanout",
        "Fan-out: sudo'd one-liner on N sshd hosts (concurrency 64)",
        [
            "hosts",
            "tool",
            "complete runs",
            "median wall s",
            "min..max s",
            "ratio to ebpfdiag",
            "median CPU s (tree)",
            "peak RSS MiB (max of tree)",
        ],  # fmt: skip
    )
    fleet = Fleet(PREFIX, max(sizes), subnet=SUBNET, max_startups="1000:30:1000",
                  max_sessions=64)  # fmt: skip
    with fleet, tempfile.TemporaryDirectory(prefix="ebpfdiag-bench-") as tmp:
        work = Path(tmp)
        for name in TOOLS:  # one warm-up each: page cache, sshd first-connection work
            TOOLS[name](fleet, fleet.hosts[: min(sizes)], work)
        results: dict[tuple[int, str], list[Measured]] = {}
        failures: dict[tuple[int, str], list[str]] = {}
        for size in sizes:
            hosts = fleet.hosts[:size]
            for _ in range(rounds):
                for name, fn in TOOLS.items():
                    try:
                        results.setdefault((size, name), []).append(fn(fleet, hosts, work))
                    except (Missing, RuntimeError) as exc:
                        failures.setdefault((size, name), []).append(str(exc))
    for size in sizes:
        base = median([m.wall_s for m in results.get((size, "ebpfdiag"), [])])
        for name in TOOLS:
            ms = results.get((size, name), [])
            walls = [m.wall_s for m in ms]
            wall = median(walls)
            section.rows.append([
                str(size), name, f"{len(ms)}/{rounds}", fmt(wall),
                f"{fmt(min(walls))}..{fmt(max(walls))}" if walls else "-",
                fmt(wall / base) if ms and base == base else "-",
                fmt(median([m.cpu_s for m in ms])), fmt(max([m.maxrss_mb for m in ms] or [0]), 1),
            ])  # fmt: skip
            for err in failures.get((size, name), []):
                section.notes.append(f"{size} hosts, failed run: {err}")
    big = max(sizes)
    ours = results.get((big, "ebpfdiag"), [])
    others = [median([m.wall_s for m in results.get((big, t), [])]) for t in ("clush", "pssh")]
    others = [w for w in others if w == w]
    if ours and others:
        ratio = median([m.wall_s for m in ours]) / min(others)
        section.targets.append(
            Target(
                f"wall at {big} hosts vs faster of clush/pssh",
                f"{ratio:.2f}x",
                "<= 0.6x",
                ratio <= 0.6,
            )  # fmt: skip
        )
        peak = max(m.maxrss_mb for m in ours)
        section.targets.append(
            Target(
                f"ebpfdiag peak RSS at {big} hosts",
                f"{peak:.0f} MiB",
                "< 150 MB",
                peak * 1.048576 < 150,
            )  # fmt: skip
        )
    else:
        section.failed = True
    section.notes += [
        f"Each tool runs `{REMOTE}` (ebpfdiag: a one-line script `print(1)` pushed over the "
        "channel and run by its bootstrap under `sudo -n /usr/bin/python3`), strict host key "
        "checking against the fleet's known_hosts, key auth, batch mode, concurrency "
        f"{CONCURRENCY}, {rounds} interleaved rounds after one warm-up run per tool.",
        "Wall time is from process start to exit (Python start-up of each tool included). "
        "CPU is user+system of the whole process tree (clush and parallel-ssh fork one `ssh` "
        "per host; ebpfdiag is one process). Peak RSS is the largest single process of the "
        "tree.",
        "A run counts only if the tool exited 0 and every host's output was `1`.",
    ]
    return section
