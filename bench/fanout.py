"""Fan-out: one sudo'd Python one-liner on N real sshd hosts, ebpfdiag vs clush vs pssh.

All three tools reach the same fleet with the same key, strict host key checking against
the same known_hosts file, batch mode and a concurrency of 64; sshd's MaxStartups is far
above 64, so no tool is throttled. A run counts only when every host answered ``1``: each
tool's per-host output is checked, and a run with a missing host is reported as a failure.

The fleet runs on the same cores as the tools, so each run also reports the fleet's own
CPU (every sshd with the sessions, sudo and python it reaped): the part of the wall time
that no controller can remove.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import EBPFDIAG, PYTHON, Measured, Section, Target, fmt, median, run_measured

PREFIX = "ebcf"
SUBNET = "198.19.8.0/21"  # room for 2,000 hosts
CONCURRENCY = 64
#: what `make bench` runs; 1,000 is behind --fanout-sizes (several minutes a tool)
DEFAULT_SIZES = (100, 500)
#: the subnet's room
MAX_SIZE = 2000
#: sizes from this one up get one round each (ClusterShell alone takes minutes at 1,000)
BIG = 500
#: the per-host targets apply from this size up
TARGET_FROM = 100
#: controller CPU per host the project aims for (ms)
CPU_PER_HOST_GOAL_MS = 6.0
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


def _timeout(hosts) -> float:
    """Generous: ClusterShell needs about 0.12 s per host on a quiet machine."""
    return max(300.0, 0.6 * len(hosts))


def run_ebpfdiag(fleet, hosts, work: Path) -> Measured:
    script = work / "one.py"
    script.write_text(SCRIPT)
    out = work / "ebpfdiag.out"
    argv = [EBPFDIAG, "run-script", str(script), "-i", str(fleet.inventory),
            "--hosts", ",".join(h.name for h in hosts), "--json", "--yes",
            "--fanout", str(CONCURRENCY)]  # fmt: skip
    with out.open("wb") as fh:
        m = run_measured(argv, stdout=fh, timeout=_timeout(hosts))
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


def _answered(out: Path) -> set[str]:
    """The hosts of ``HOST: OUTPUT`` lines whose output is ``1``."""
    got = set()
    for line in out.read_text().splitlines():
        host, _, text = line.partition(": ")
        if text.strip() == "1":
            got.add(host)
    return got


def run_asyncssh(fleet, hosts, work: Path) -> Measured:
    """The SSH library alone (bench/sshfloor.py): the floor under ebpfdiag's CPU."""
    out = work / "asyncssh.out"
    argv = [PYTHON, "-m", "bench.sshfloor", str(fleet.inventory), str(CONCURRENCY), REMOTE,
            *(h.name for h in hosts)]  # fmt: skip
    with out.open("wb") as fh:
        m = run_measured(argv, stdout=fh, timeout=_timeout(hosts), cwd=Path(__file__).parent.parent)
    _check("asyncssh", m, {h.name for h in hosts}, _answered(out))
    return m


def run_clush(fleet, hosts, work: Path) -> Measured:
    out = work / "clush.out"
    argv = [CLUSH, "-f", str(CONCURRENCY), "-l", fleet.user, "-S",
            "-o", " ".join(_ssh_options(fleet)),
            "-w", ",".join(h.address for h in hosts), REMOTE]  # fmt: skip
    with out.open("wb") as fh:
        m = run_measured(argv, stdout=fh, timeout=_timeout(hosts))
    _check("clush", m, {h.address for h in hosts}, _answered(out))
    return m


def run_pssh(fleet, hosts, work: Path) -> Measured:
    hostfile = work / "pssh.hosts"
    hostfile.write_text("".join(f"{h.address}\n" for h in hosts))
    outdir = work / "pssh-out"
    shutil.rmtree(outdir, ignore_errors=True)
    argv = [PSSH, "-h", str(hostfile), "-l", fleet.user, "-p", str(CONCURRENCY), "-t", "0",
            "-o", str(outdir), "-e", str(work / "pssh-err"),
            "-x", " ".join(_ssh_options(fleet)), REMOTE]  # fmt: skip
    m = run_measured(argv, timeout=_timeout(hosts))
    got = {
        h.address
        for h in hosts
        if (outdir / h.address).exists() and (outdir / h.address).read_text().strip() == "1"
    }
    _check("parallel-ssh", m, {h.address for h in hosts}, got)
    return m


TOOLS: dict[str, Callable] = {
    "ebpfdiag": run_ebpfdiag,
    "asyncssh alone": run_asyncssh,
    "clush": run_clush,
    "pssh": run_pssh,
}
#: the tools ebpfdiag is compared with: ratios are to the faster of them
ANCHORS = ("clush", "pssh")
#: ebpfdiag's run on a single host, in every round: the fixed cost of a run
ONE = "ebpfdiag, one host"
#: the SSH library's own run on a single host, in every round: its floor's fixed cost
ONE_FLOOR = "asyncssh alone, one host"


@dataclass
class Run:
    """One complete run: the tool's own figures and the fleet's CPU during it."""

    m: Measured
    fleet_cpu_s: float


def _marginal(results: dict, sizes: tuple[int, ...], section: Section) -> list[str]:
    """CPU per host between the smallest and the largest size: start-up (interpreter,
    imports, inventory) is paid once per run, so it cancels out of the difference."""
    small, big = min(sizes), max(sizes)
    if big == small:
        return []
    per_host = {}
    for name in ("ebpfdiag", "asyncssh alone"):
        a, b = results.get((small, name)), results.get((big, name))
        if a and b:
            cpu_a, cpu_b = median([r.m.cpu_s for r in a]), median([r.m.cpu_s for r in b])
            per_host[name] = 1000 * (cpu_b - cpu_a) / (big - small)
    ours = per_host.get("ebpfdiag")
    if ours is None:
        return []
    section.targets.append(
        Target(f"ebpfdiag CPU per additional host ({small} -> {big} hosts)", f"{ours:.1f} ms",
               f"<= {CPU_PER_HOST_GOAL_MS:g} ms", ours <= CPU_PER_HOST_GOAL_MS)
    )  # fmt: skip
    floor = per_host.get("asyncssh alone")
    text = (
        f"CPU per additional host, from {small} to {big} hosts (the difference of the "
        f"median CPU seconds over the difference of hosts, so start-up cancels): "
        f"ebpfdiag {ours:.1f} ms"
    )
    if floor is not None:
        text += (
            f", asyncssh alone {floor:.1f} ms (bench/sshfloor.py: the same key exchange, "
            "ciphers and loaded keys, the same command, no ebpfdiag code): what is above "
            f"the library's own cost is {ours - floor:.1f} ms a host."
        )
    return [text]


def _split(runs: list[Run]) -> str:
    """The median run's CPU as user and system seconds: the system part holds the lab's
    packet delivery to the fleet's namespaces, which runs in the sender's context here."""
    mid = sorted(runs, key=lambda r: r.m.cpu_s)[len(runs) // 2].m
    return f"user {mid.user_s:.2f} s, system {mid.sys_s:.2f} s"


def _beyond_one(results: dict, size: int, name: str, one: str) -> tuple[float, float, float] | None:
    """(median CPU s of a tool at a size, of its one-host run in the same rounds, ms a
    host beyond that run), when both exist."""
    runs, singles = results.get((size, name), []), results.get((size, one), [])
    if not runs or not singles or size < 2:
        return None
    cpu, single = median([r.m.cpu_s for r in runs]), median([r.m.cpu_s for r in singles])
    return cpu, single, 1000 * (cpu - single) / (size - 1)


def rounds_at(size: int, rounds: int) -> int:
    return rounds if size < BIG else 1


def run(sizes: tuple[int, ...] = DEFAULT_SIZES, rounds: int = 3) -> Section:
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
            "ratio to faster anchor",
            "median CPU s (tree)",
            "CPU ms per host",
            "peak RSS MiB (max of tree)",
            "fleet CPU s",
        ],  # fmt: skip
    )
    fleet = Fleet(PREFIX, max(sizes), subnet=SUBNET, max_startups="1000:30:1000",
                  max_sessions=64)  # fmt: skip
    results: dict[tuple[int, str], list[Run]] = {}
    failures: dict[tuple[int, str], list[str]] = {}
    with fleet, tempfile.TemporaryDirectory(prefix="ebpfdiag-bench-") as tmp:
        work = Path(tmp)
        for name in TOOLS:  # one warm-up each: page cache, sshd first-connection work
            TOOLS[name](fleet, fleet.hosts[: min(sizes)], work)
        for size in sizes:
            hosts = fleet.hosts[:size]
            if size > min(sizes):  # every host just contacted once, before the timed runs
                run_asyncssh(fleet, hosts, work)
            for _ in range(rounds_at(size, rounds)):
                # ebpfdiag on one host: start-up and what the first connection costs once
                results.setdefault((size, ONE), []).append(
                    Run(run_ebpfdiag(fleet, hosts[:1], work), 0.0)
                )
                results.setdefault((size, ONE_FLOOR), []).append(
                    Run(run_asyncssh(fleet, hosts[:1], work), 0.0)
                )
                for name, fn in TOOLS.items():
                    before = fleet.cpu_seconds()
                    try:
                        m = fn(fleet, hosts, work)
                    except (Missing, RuntimeError) as exc:
                        failures.setdefault((size, name), []).append(str(exc))
                        continue
                    run = Run(m, fleet.cpu_seconds() - before)
                    results.setdefault((size, name), []).append(run)
    for size in sizes:
        anchors = [median([r.m.wall_s for r in results.get((size, t), [])]) for t in ANCHORS]
        anchors = [w for w in anchors if w == w]
        anchor = min(anchors) if anchors else float("nan")
        for name in TOOLS:
            runs = results.get((size, name), [])
            walls = [r.m.wall_s for r in runs]
            wall = median(walls)
            cpu = median([r.m.cpu_s for r in runs])
            section.rows.append([
                str(size), name, f"{len(runs)}/{rounds_at(size, rounds)}", fmt(wall),
                f"{fmt(min(walls))}..{fmt(max(walls))}" if walls else "-",
                fmt(wall / anchor) if runs and anchor == anchor else "-",
                fmt(cpu), fmt(1000 * cpu / size, 1) if runs else "-",
                fmt(max([r.m.maxrss_mb for r in runs] or [0]), 1),
                fmt(median([r.fleet_cpu_s for r in runs])),
            ])  # fmt: skip
            for err in failures.get((size, name), []):
                section.notes.append(f"{size} hosts, failed run: {err}")
        ours = results.get((size, "ebpfdiag"), [])
        if not ours:
            section.failed = True
            continue
        cpu, one, per_host = _beyond_one(results, size, "ebpfdiag", ONE)
        note = (
            f"{size} hosts: ebpfdiag {cpu:.2f} CPU s ({_split(ours)}), of which a one-host run "
            "(interpreter, imports, inventory, keys, the first connection's one-time work) takes "
            f"{one:.2f} s in the same rounds: {1000 * cpu / size:.1f} ms a host with it, "
            f"{per_host:.1f} ms a host beyond it (connect, authenticate, open the channel, push, "
            "stream, close: the per-host work)."
        )
        floor = _beyond_one(results, size, "asyncssh alone", ONE_FLOOR)
        if floor is not None:
            note += (
                f" The SSH library alone (bench/sshfloor.py), the same way: {floor[0]:.2f} CPU "
                f"s ({_split(results[(size, 'asyncssh alone')])}), one-host run {floor[1]:.2f} "
                f"s, {floor[2]:.1f} ms a host beyond it: ebpfdiag is {per_host - floor[2]:+.1f} "
                "ms a host from that floor."
            )
        section.notes.append(note)
        if size < TARGET_FROM:  # start-up dominates a handful of hosts
            continue
        section.targets.append(
            Target(f"ebpfdiag CPU per host at {size} hosts (beyond a one-host run)",
                   f"{per_host:.1f} ms", f"<= {CPU_PER_HOST_GOAL_MS:g} ms",
                   per_host <= CPU_PER_HOST_GOAL_MS)
        )  # fmt: skip
        if anchors:
            ratio = median([r.m.wall_s for r in ours]) / anchor
            section.targets.append(
                Target(f"wall at {size} hosts vs faster of clush/pssh", f"{ratio:.2f}x",
                       "<= 0.6x", ratio <= 0.6)
            )  # fmt: skip
    section.notes += _marginal(results, sizes, section)
    big = max(sizes)
    ours = results.get((big, "ebpfdiag"), [])
    if ours:
        peak = max(r.m.maxrss_mb for r in ours)
        section.targets.append(
            Target(f"ebpfdiag peak RSS at {big} hosts", f"{peak:.0f} MiB", "< 150 MB",
                   peak * 1.048576 < 150)
        )  # fmt: skip
    section.notes += [
        f"Each tool runs `{REMOTE}` (ebpfdiag: a one-line script `print(1)` pushed over the "
        "channel and run by its bootstrap under `sudo -n /usr/bin/python3`), strict host key "
        "checking against the fleet's known_hosts, key auth, batch mode, concurrency "
        f"{CONCURRENCY}; {rounds} interleaved rounds below {BIG} hosts and one from {BIG} "
        "up, after one warm-up run per tool and, at each larger size, one untimed run over "
        "its hosts (asyncssh alone) just before the timed ones: the first tool to contact "
        "hosts not reached for a few minutes paid more CPU (what exactly was not "
        "separated), which at 500 hosts fell on ebpfdiag, the first in every round.",
        "Wall time is from process start to exit (Python start-up of each tool included). "
        "CPU is user+system of the whole process tree (clush and parallel-ssh fork one `ssh` "
        "per host; ebpfdiag is one process); CPU ms per host is that CPU divided by the "
        "hosts, start-up included. Peak RSS is the largest single process of the tree.",
        "Fleet CPU is what the hosts themselves used during the run: every sshd with the "
        "sessions, sudo and python3 it reaped (/proc utime+stime+cutime+cstime). The fleet "
        "and the tools share the machine's cores, so fleet CPU / cores bounds the wall time "
        "from below whatever the tool.",
        "A run counts only if the tool exited 0 and every host's output was `1` (checked "
        "per host in each tool's output, every run).",
    ]
    return section
