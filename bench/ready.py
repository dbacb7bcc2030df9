"""Time to ready for ``trace tcp-rst`` as a user runs it, and where the time goes; the
same totals for ``trace latency`` and ``trace drop``.

A user builds the lab (``ebpfdiag lab up``; here the benchmark's own lab, built the same
way) and runs ``trace tcp-rst --hosts client,lb,server --json`` with no options; the time
that counts is from the process start to the ``tracing`` status record, the first moment
a reset would be caught. Measured, interleaved, on a warm lab (one trace ran before):

- ``ebpfdiag --version`` and ``ebpfdiag hosts``: the controller's own start-up;
- ``run-script`` of an empty script on the three hosts: start-up, SSH connect + auth, sudo,
  bootstrap, push and the clean end of the run (an upper bound for connect + push);
- ``trace tcp-rst`` on the three hosts and on ``server`` alone: the total, each host's own
  ``ready`` status record (``after_s``: from the process start), and the phases each host
  reports in its ``hello`` (``setup``: process start to set-up, import BCC, discovery, BPF
  compile, attach). In the lab the three hosts compile on the same 2 cores; real hosts do
  not, so ``server`` alone gives the compile floor of one host.

A host keeps nothing, but the controller keeps each host's last compile and sends it back
when the same program is asked for again (``ebpfdiag.programs``): on a warm lab the timed
traces load it instead of compiling. Every trace is also timed with the store off
(``EBPFDIAG_PROGRAM_CACHE=off``), the first start on a host or after a change of kernel,
BCC or options, whose phases give the compile floor.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from bench.builds import CURRENT, Build
from bench.common import EBPFDIAG, Measured, Section, Target, fmt, median, run_measured
from bench.labenv import HOSTS, Tracer, bench_lab
from ebpfdiag.programs import ENV as STORE_ENV

#: every trace with the store off: what a host's first start costs (it compiles)
COLD = Build("this tree, nothing kept", CURRENT.argv, {STORE_ENV: "off"})

ONE_HOST = "server"
#: hello.setup keys, in the order they happen on the host
PHASES = (
    ("process", "interpreter, bootstrap, script transfer (host process start -> set-up)"),
    ("import", "python3 imports BCC"),
    ("discover", "interfaces, addresses, tracepoint formats, BTF offsets, program text"),
    ("compile", "BCC/clang compile + maps, or the kept program's maps and load"),
    ("attach", "programs loaded (verifier), tracepoints, tcx links, buffers, nft NAT ports"),
    ("cpu", "CPU seconds the host's process used up to ready: the figure load does not move"),
)
#: the other tracers, timed the same way (3 hosts and the one host) in every round
OTHER_TRACERS = ("latency", "drop")
#: goals: seconds (medians)
GOAL_THREE, GOAL_ONE, GOAL_STARTUP = 1.5, 1.0, 0.15


def _run_script(state, script: Path, out: Path) -> Measured:
    argv = [EBPFDIAG, "run-script", str(script), "-i", str(state.inventory), "--hosts", HOSTS,
            "--json"]  # fmt: skip
    with out.open("wb") as fh:
        m = run_measured(argv, stdout=fh, timeout=120)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    ok = {r["host"] for r in recs if r["type"] == "host" and r["status"] == "ok"}
    if m.returncode != 0 or ok != {"client", "lb", "server"}:
        raise RuntimeError(f"run-script {script.name}: exit {m.returncode}, ok on {sorted(ok)}")
    return m


def _trace(state, build: Build, hosts: str, samples: dict[str, list[float]], key: str,
           command: str = "tcp-rst") -> None:  # fmt: skip
    """One trace, started and stopped: its total, per-host ready and phase figures."""
    tracer = Tracer(state, [], build, hosts=hosts, command=command)
    samples.setdefault(key, []).append(tracer.start())
    tracer.stop()
    for host, after in tracer.host_ready.items():
        samples.setdefault(f"{key}:ready:{host}", []).append(after)
    for hello in tracer.hellos.values():
        for phase, value in (hello.get("setup") or {}).items():
            samples.setdefault(f"{key}:phase:{phase}", []).append(value)
        samples.setdefault(f"{key}:kept", []).append(float(hello.get("program") == "kept"))


def run(rounds: int = 3, against: Build | None = None) -> Section:
    section = Section(
        "ready",
        "Time to ready: traces on client, lb, server",
        ["what", "median s", "min..max s", "includes"],
    )
    s: dict[str, list[float]] = {}
    load_start = os.getloadavg()[0]
    with bench_lab() as state, tempfile.TemporaryDirectory(prefix="ebpfdiag-bench-") as tmp:
        work = Path(tmp)
        kept = Build(CURRENT.label, CURRENT.argv, {STORE_ENV: str(work / "programs")})
        empty = work / "empty.py"
        empty.write_text("pass\n")
        out = work / "out.ndjson"
        hosts_argv = [EBPFDIAG, "hosts", "-i", str(state.inventory), "--hosts", HOSTS]
        # warm-up: page cache, first logins, one earlier trace (a warm lab)
        _run_script(state, empty, out)
        for command in ("tcp-rst", *OTHER_TRACERS):
            _trace(state, kept, HOSTS, {}, "warm", command)
        for rnd in range(rounds):
            for key, argv in (("version", [EBPFDIAG, "--version"]), ("hosts", hosts_argv)):
                m = run_measured(argv)
                s.setdefault(key, []).append(m.wall_s)
                s.setdefault(f"{key}:cpu", []).append(m.cpu_s)
            s.setdefault("empty", []).append(_run_script(state, empty, out).wall_s)
            runs = [("trace", kept)] + ([("trace-against", against)] if against else [])
            for key, build in runs[:: -1 if rnd % 2 else 1]:  # builds take turns going first
                _trace(state, build, HOSTS, s, key)
            _trace(state, kept, ONE_HOST, s, "one")
            _trace(state, COLD, HOSTS, s, "cold")
            _trace(state, COLD, ONE_HOST, s, "cold-one")
            for command in OTHER_TRACERS:
                _trace(state, kept, HOSTS, s, command, command)
                _trace(state, kept, ONE_HOST, s, f"{command}-one", command)
                _trace(state, COLD, HOSTS, s, f"{command}-cold", command)
                _trace(state, COLD, ONE_HOST, s, f"{command}-cold-one", command)

    def row(label: str, key: str, includes: str) -> list[str]:
        values = s.get(key) or [float("nan")]
        return [label, fmt(median(values)), f"{fmt(min(values))}..{fmt(max(values))}", includes]

    section.rows.append(row("trace tcp-rst, 3 hosts: start -> `tracing`", "trace",
                            "process start to the `tracing` status record"))  # fmt: skip
    if against is not None:
        section.rows.append(row(f"  the same with {against.label}", "trace-against",
                                "the earlier build, interleaved with this one"))  # fmt: skip
    for host in HOSTS.split(","):
        section.rows.append(row(f"  {host} ready (its `ready` status)", f"trace:ready:{host}",
                                "process start to that host's status record"))  # fmt: skip
    for phase, includes in PHASES:
        section.rows.append(row(f"  remote: {phase} (3 hosts at once)", f"trace:phase:{phase}",
                                includes))  # fmt: skip
    section.rows.append(row("  hosts that loaded their kept program (share)", "trace:kept",
                            "1.00: every host of every timed run skipped the compile"))  # fmt: skip
    section.rows.append(row(f"trace tcp-rst, {ONE_HOST} alone: start -> `tracing`", "one",
                            "the same, one host"))  # fmt: skip
    for phase, includes in PHASES:
        label = {"cpu": "cpu (one host)"}.get(phase, phase)
        section.rows.append(row(f"  remote: {label}", f"one:phase:{phase}", includes))
    section.rows.append(row("trace tcp-rst, 3 hosts, nothing kept (first start)", "cold",
                            "the same with the store off: every host compiles"))  # fmt: skip
    section.rows.append(row("  remote: compile (3 hosts at once)", "cold:phase:compile",
                            "BCC/clang compile + maps"))  # fmt: skip
    section.rows.append(row(f"trace tcp-rst, {ONE_HOST} alone, nothing kept", "cold-one",
                            "the same, one host"))  # fmt: skip
    section.rows.append(row("  remote: compile floor: one host's compile alone",
                            "cold-one:phase:compile", "BCC/clang compile + maps"))  # fmt: skip
    section.rows.append(row("  remote: cpu (one host)", "cold-one:phase:cpu",
                            "CPU seconds the host's process used up to ready"))  # fmt: skip
    for command in OTHER_TRACERS:
        section.rows += [
            row(f"trace {command}, 3 hosts: start -> `tracing`", command,
                "the same, with no options"),
            row("  remote: cpu (3 hosts at once)", f"{command}:phase:cpu",
                "CPU seconds the host's process used up to ready"),
            row("  hosts that loaded their kept program (share)", f"{command}:kept",
                "1.00: every host of every timed run skipped the compile"),
            row(f"trace {command}, {ONE_HOST} alone: start -> `tracing`", f"{command}-one",
                "the same, one host"),
            row(f"trace {command}, 3 hosts, nothing kept (first start)", f"{command}-cold",
                "the same with the store off: every host compiles"),
            row("  remote: compile (3 hosts at once)", f"{command}-cold:phase:compile",
                "BCC/clang compile + maps"),
            row(f"trace {command}, {ONE_HOST} alone, nothing kept", f"{command}-cold-one",
                "the same, one host"),
            row("  remote: compile floor: one host's compile alone",
                f"{command}-cold-one:phase:compile", "BCC/clang compile + maps"),
        ]  # fmt: skip
    section.rows += [
        row("controller start-up: `ebpfdiag --version`", "version", "interpreter + CLI imports"),
        row("  CPU seconds", "version:cpu", "the same in CPU time"),
        row("controller start-up: `ebpfdiag hosts`", "hosts",
            "start-up + inventory + host expression, no connection"),
        row("  CPU seconds", "hosts:cpu", "the same in CPU time"),
        row("run-script empty script, 3 hosts", "empty",
            "start-up, SSH connect + auth, sudo, bootstrap, push, exit and close"),
    ]  # fmt: skip
    for what, key, goal in (
        ("trace tcp-rst on 3 lab hosts", "trace", GOAL_THREE),
        (f"trace tcp-rst on {ONE_HOST} alone", "one", GOAL_ONE),
        *[(f"trace {c} on 3 lab hosts", c, GOAL_THREE) for c in OTHER_TRACERS],
        *[(f"trace {c} on {ONE_HOST} alone", f"{c}-one", GOAL_ONE) for c in OTHER_TRACERS],
        ("`ebpfdiag --version`", "version", GOAL_STARTUP),
        ("`ebpfdiag hosts`", "hosts", GOAL_STARTUP),
    ):
        value = median(s[key])
        section.targets.append(Target(what, f"{fmt(value)} s", f"<= {goal:g} s", value <= goal))
    section.notes += [
        f"{rounds} interleaved rounds (start-up, empty run-script, the 3-host trace"
        f"{' and the earlier build, taking turns going first' if against else ''}, the "
        f"{ONE_HOST}-alone trace, the same two with nothing kept, then the same four for "
        f"trace {' and trace '.join(OTHER_TRACERS)}) after a warm-up run-script and one "
        "warm-up trace of each kind (which leaves each host's compile with the controller: "
        "the timed traces load it; the `nothing kept` ones run with the store off). Traces "
        "run with no options, as a user would start one. Per-host "
        "and phase figures are the trace's own: each host's `ready` status record and the "
        "`setup` its hello reports (host monotonic clock; `process` from the host's process "
        "start, to 10 ms); phase figures are medians over hosts and rounds.",
        f"The machine is shared: absolute figures move with its load (1-minute load average "
        f"{load_start:.1f} at the start of this section, {os.getloadavg()[0]:.1f} at its end, "
        f"on {os.cpu_count()} cores); the interleaved comparisons and the CPU figures hold "
        "better.",
    ]
    return section
