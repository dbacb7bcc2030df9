"""Datapath overhead of ``trace tcp-rst`` in the lab: bulk throughput and short connections.

Traffic goes client -> VIP (lb, nftables DNAT + masquerade) -> server on ports the lab's
DNAT already forwards: iperf3 on 8080, a small echo server on 8082 (both only while no
scenario runs). Three conditions are interleaved in every round: no tracer, the tracer on
all three hosts filtering on the traffic's ports, and filtering on an unrelated port.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time

from bench.builds import CURRENT, Build
from bench.common import SYSTEM_PYTHON, Section, Target, fmt, median
from bench.labenv import HOSTS, Tracer, bench_lab, ns_argv

BULK_PORT = 8080
SHORT_PORT = 8082
UNRELATED_PORT = 9999

ECHO_SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(512)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    data = c.recv(64)
    c.sendall(data)
    c.close()
"""

SHORT_CLIENT = r"""
import json, socket, sys, time
vip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
errors = 0
t0 = time.monotonic()
for _ in range(n):
    try:
        c = socket.create_connection((vip, port), timeout=5)
        c.sendall(b"ping")
        while c.recv(64):
            pass
        c.close()
    except OSError:
        errors += 1
print(json.dumps({"n": n, "errors": errors, "elapsed": time.monotonic() - t0}))
"""

CONDITIONS = {
    "no tracer": None,
    "trace, traffic's ports": [BULK_PORT, SHORT_PORT],
    "trace, unrelated port": [UNRELATED_PORT],
}
#: ``trace drop`` conditions (this tree only): TC history programs on every interface plus
#: kfree_skb and the retransmit tracepoints.
DROP_CONDITIONS = {
    "trace drop, traffic's ports": [BULK_PORT, SHORT_PORT],
}
#: lb drops UDP to this port (nftables, a table of the benchmark's own) while the kfree_skb
#: program's cost per call is measured: drops of traffic the trace does not filter on.
DROP_UDP_PORT = 9998
DROP_TABLE = "bench_drop"

UDP_BLAST = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
addr, end, n = (sys.argv[1], int(sys.argv[2])), time.monotonic() + float(sys.argv[3]), 0
while time.monotonic() < end:
    for _ in range(100):
        s.sendto(b"x", addr)
    n += 100
print(n)
"""


#: ``trace latency`` conditions: name -> the command's sampling arguments (ports: the traffic's)
LATENCY_CONDITIONS = {
    "latency, default sampling": (),
    "latency, --sample 1": ("--sample", "1"),
}
CONDITIONS.update({name: [BULK_PORT, SHORT_PORT] for name in LATENCY_CONDITIONS})
#: conditions measured for their figures only (no goal): latency keeping every packet
FIGURE_ONLY = "latency, --sample 1"


def tracer_for(state, cond: str, ports: list[int], build: Build) -> Tracer:
    """The tracer of a condition (also of its ``[against]`` copy): tcp-rst, trace drop, or
    trace latency with its sampling arguments."""
    if cond in DROP_CONDITIONS:
        return Tracer(state, ports, build, command="drop")
    for name, sampling in LATENCY_CONDITIONS.items():
        if cond.startswith(name):
            return Tracer(state, ports, build, command="latency", extra=sampling)
    return Tracer(state, ports, build)


def conditions(against: Build | None) -> dict[str, tuple[list[int], Build] | None]:
    """Every condition of a round; with ``against``, the traced ones once more with that
    build, so this tree and the earlier one are compared in the same run."""
    out: dict[str, tuple[list[int], Build] | None] = {}
    for name, ports in CONDITIONS.items():
        out[name] = (ports, CURRENT) if ports else None
        if ports and against is not None:
            out[f"{name} [{against.label}]"] = (ports, against)
    for name, ports in DROP_CONDITIONS.items():
        out[name] = (ports, CURRENT)
    return out


def _bulk(state, seconds: float) -> float:
    """iperf3 client in the client namespace; received Gbit/s."""
    argv = ns_argv(state, "client", ["iperf3", "-c", state.vip, "-p", str(BULK_PORT), "-t",
                                     f"{seconds:g}", "-J"])  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    data = json.loads(out.stdout)
    if out.returncode != 0 or "error" in data:
        raise RuntimeError(f"iperf3: {data.get('error', out.stderr.strip())}")
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


def _short(state, n: int) -> float:
    """Connect-request-close exchanges per second from the client namespace."""
    argv = ns_argv(state, "client", [SYSTEM_PYTHON, "-c", SHORT_CLIENT, state.vip,
                                     str(SHORT_PORT), str(n)])  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True)
    data = json.loads(out.stdout)
    if data["errors"]:
        raise RuntimeError(f"short connections: {data['errors']} of {n} failed")
    return n / data["elapsed"]


def _servers(state) -> list[subprocess.Popen]:
    procs = [
        subprocess.Popen(ns_argv(state, "server", ["iperf3", "-s", "-p", str(BULK_PORT)]),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen(ns_argv(state, "server", [SYSTEM_PYTHON, "-c", ECHO_SERVER,
                                                   str(SHORT_PORT)]),
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL),
    ]  # fmt: skip
    procs[1].stdout.readline()
    time.sleep(0.3)  # iperf3 prints nothing until a client comes; give it time to listen
    return procs


def _prog_stats() -> dict[str, tuple[int, int]]:
    """Program name -> (run time ns, runs) summed over the loaded ``ebd_*`` programs (one
    per host and name), from the kernel's bpf_stats."""
    out = subprocess.run(
        ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
    ).stdout
    stats: dict[str, tuple[int, int]] = {}
    for p in json.loads(out):
        name = p.get("name", "")
        if name.startswith("ebd_"):
            ns, runs = stats.get(name, (0, 0))
            stats[name] = (ns + p.get("run_time_ns", 0), runs + p.get("run_cnt", 0))
    return stats


def _split(before: dict, after: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    """((ns, runs) of the TC programs, (ns, runs) of the others) between two _prog_stats."""
    sums = {True: [0, 0], False: [0, 0]}
    for name, (ns, runs) in after.items():
        ns0, runs0 = before.get(name, (0, 0))
        sums[name.startswith("ebd_tc_")][0] += ns - ns0
        sums[name.startswith("ebd_tc_")][1] += runs - runs0
    return tuple(sums[True]), tuple(sums[False])


def _cost(ns: int, runs: int, per: float, unit: str) -> str:
    return f"{runs / per:,.0f} runs{unit} at {ns / max(runs, 1):.0f} ns"


def _tracer_cpu(state, controller: int, ours: set[int]) -> dict[str, float]:
    """CPU seconds so far of the tracer's user space: the controller (``controller``, its
    pid) and, in the lab's namespaces, the hosts' python3 (bootstraps and tool scripts)
    and sshd (their sessions). ``ours``: the benchmark's own servers (the echo server is a
    python3 there too), not counted."""
    tick = os.sysconf("SC_CLK_TCK")
    lab = set()
    for name in HOSTS.split(","):
        with contextlib.suppress(OSError):
            lab.add(os.stat(f"/run/netns/{state.host(name).netns}").st_ino)
    cpu = {"controller": 0.0, "python3": 0.0, "sshd": 0.0}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            net = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:  # gone meanwhile
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        used = (int(fields[11]) + int(fields[12])) / tick
        if int(pid) == controller:
            cpu["controller"] += used
        elif net in lab and comm in cpu and int(pid) not in ours:
            cpu[comm] += used
    return cpu


def _user_space(before: dict[str, float], after: dict[str, float], per: float, unit: str) -> str:
    """The tracer's user space over a run: ``unit`` "core", ``per`` the run's seconds, in %
    of one core; else ``per`` the run's connections, in us each. On this lab it shares the
    2 cores with the traffic, so it counts against the traffic as much as the kernel's."""

    def show(seconds: float) -> str:
        return f"{100 * seconds / per:.0f}%" if unit == "core" else f"{1e6 * seconds / per:.1f} us"

    used = {k: after[k] - before.get(k, 0.0) for k in after}
    return (
        f"user space {show(sum(used.values()))}{' of one core' if unit == 'core' else ''} "
        f"(controller {show(used['controller'])}, the hosts' scripts {show(used['python3'])}, "
        f"their sshd {show(used['sshd'])})"
    )


def _profile(state, conds, connections: int, bulk_s: float, ours: set[int]) -> list[str]:
    """Where the traced datapath's time goes, in the kernel and in the tracer's user space
    (``ours``: the benchmark's servers, not counted): one more traced bulk and short run
    with bpf_stats on (outside the timed rounds: the stats cost a little per run)."""
    stats = "/proc/sys/kernel/bpf_stats_enabled"
    with open(stats) as f:
        before = f.read().strip()
    lines = []
    try:
        with open(stats, "w") as f:
            f.write("1")
        for cond, (ports, build) in [c for c in conds.items() if c[1]]:
            tracer = tracer_for(state, cond, ports, build)
            tracer.start()
            try:
                s0, u0 = _prog_stats(), _tracer_cpu(state, tracer.proc.pid, ours)
                t0 = time.monotonic()
                gbit = _bulk(state, bulk_s)
                s1, u1 = _prog_stats(), _tracer_cpu(state, tracer.proc.pid, ours)
                user = _user_space(u0, u1, time.monotonic() - t0, "core")
                rate = _short(state, connections)
                s2, u2 = _prog_stats(), _tracer_cpu(state, tracer.proc.pid, ours)
                short_user = _user_space(u1, u2, connections, "connection")
            finally:
                tracer.stop()
            (bulk_ns, bulk_runs), (bulk_tp_ns, bulk_tp) = _split(s0, s1)
            (short_ns, short_runs), (short_tp_ns, short_tp) = _split(s1, s2)
            line = (
                f"{cond}: bulk {gbit:.1f} Gbit/s, TC {_cost(bulk_ns, bulk_runs, bulk_s, '/s')}"
                f" = {bulk_ns / bulk_s / 1e7:.1f}% of one core"
            )
            if bulk_tp:
                line += (f", tracepoints {_cost(bulk_tp_ns, bulk_tp, bulk_s, '/s')} = "
                         f"{bulk_tp_ns / bulk_s / 1e7:.1f}%")  # fmt: skip
            line += f", {user}"
            line += (
                f"; short {rate:,.0f} conn/s, TC {_cost(short_ns, short_runs, connections, '')}"
                f" per connection = {short_ns / connections / 1e3:.1f} us"
            )
            if short_tp:
                line += (f", tracepoints {_cost(short_tp_ns, short_tp, connections, '')} = "
                         f"{short_tp_ns / connections / 1e3:.1f} us")  # fmt: skip
            lines.append(f"{line} per connection, {short_user} per connection")
        lines += _kfree_skb_cost(state)
    finally:
        with open(stats, "w") as f:
            f.write(before)
    return lines


def _kfree_skb_cost(state, seconds: float = 3.0) -> list[str]:
    """The kfree_skb program's cost per call while lb drops UDP the trace does not filter
    on (bpf_stats must be on): the price every drop on a traced host pays."""
    lb = ["nft", "-f", "-"]
    rules = (f"table inet {DROP_TABLE} {{\n chain input {{\n  type filter hook input "
             f"priority 0;\n  udp dport {DROP_UDP_PORT} drop\n }}\n}}\n")  # fmt: skip
    subprocess.run(ns_argv(state, "lb", lb), input=rules, text=True, check=True)
    lines = []
    try:
        for label, ports in (("--port (no match)", [BULK_PORT, SHORT_PORT]), ("no filter", [])):
            tracer = Tracer(state, ports, command="drop")
            tracer.start()
            try:
                t0, n0 = _prog_stats().get("ebd_kfree_skb", (0, 0))
                blast = ns_argv(state, "client", [SYSTEM_PYTHON, "-c", UDP_BLAST, state.vip,
                                                  str(DROP_UDP_PORT), f"{seconds:g}"])  # fmt: skip
                sent = int(subprocess.run(blast, capture_output=True, text=True, check=True,
                                          timeout=seconds + 30).stdout)  # fmt: skip
                t1, n1 = _prog_stats().get("ebd_kfree_skb", (0, 0))
            finally:
                tracer.stop()
            calls = max(n1 - n0, 1)
            lines.append(
                f"trace drop kfree_skb, {label}: {sent / seconds:,.0f} UDP packets/s dropped on "
                f"lb, {calls / seconds:,.0f} calls/s (every host's program sees every drop of "
                f"the kernel) at {(t1 - t0) / calls:.0f} ns each"
            )
    finally:
        subprocess.run(ns_argv(state, "lb", ["nft", "delete", "table", "inet", DROP_TABLE]),
                       check=False)  # fmt: skip
    return lines


def run(
    rounds: int = 3, connections: int = 2000, bulk_s: float = 3.0, against: Build | None = None
) -> Section:
    section = Section(
        "datapath",
        "Datapath overhead in the lab (client -> VIP -> server)",
        [
            "condition",
            "bulk Gbit/s (median)",
            "bulk ratio",
            "short conn/s (median)",
            "short ratio",
            "tracer events per round",
            "rounds",
        ],  # fmt: skip
    )
    conds = conditions(against)
    bulk: dict[str, list[float]] = {c: [] for c in conds}
    short: dict[str, list[float]] = {c: [] for c in conds}
    events: dict[str, list[int]] = {c: [] for c in conds}
    rates: dict[str, list[float]] = {c: [] for c in conds}
    with bench_lab() as state:
        procs = _servers(state)
        profile: list[str] = []
        try:
            _bulk(state, 1)  # warm-up
            _short(state, 100)
            for _ in range(rounds):
                for cond, how in conds.items():
                    tracer = tracer_for(state, cond, *how) if how else None
                    if tracer:
                        tracer.start()
                    try:
                        bulk[cond].append(_bulk(state, bulk_s))
                        short[cond].append(max(_short(state, connections) for _ in range(3)))
                    finally:
                        if tracer:
                            tracer.stop()
                            events[cond].append(tracer.events)
                            if cond.startswith(tuple(LATENCY_CONDITIONS)):
                                rates[cond].append(tracer.records_per_s)
            profile = _profile(state, conds, connections, bulk_s, {p.pid for p in procs})
        finally:
            for p in procs:
                p.kill()
                p.wait()
    base_b, base_s = median(bulk["no tracer"]), median(short["no tracer"])
    for cond in conds:
        b, s = median(bulk[cond]), median(short[cond])
        ev = f"{median(events[cond]):,.0f}" if events[cond] else "-"
        section.rows.append([cond, fmt(b), fmt(b / base_b), f"{s:,.0f}", fmt(s / base_s), ev,
                             str(len(bulk[cond]))])  # fmt: skip
    for cond in list(conds)[1:]:
        if cond.startswith(FIGURE_ONLY):
            continue
        rb, rs = median(bulk[cond]) / base_b, median(short[cond]) / base_s
        # trace drop's and trace latency's goals are 0.95 for short connections too
        newer = cond in DROP_CONDITIONS or cond.startswith(tuple(LATENCY_CONDITIONS))
        short_goal = 0.95 if newer else 0.90
        section.targets += [
            Target(f"bulk ratio, {cond}", fmt(rb), ">= 0.95", rb >= 0.95),
            Target(f"short-connection ratio, {cond}", fmt(rs), f">= {short_goal:.2f}",
                   rs >= short_goal),
        ]  # fmt: skip
    section.notes += latency_notes(rates)
    section.notes += [
        f"Bulk: one iperf3 TCP stream for {bulk_s:g} s to VIP:{BULK_PORT} (DNAT to the server). "
        f"Short: best of 3 runs (the same for every condition, so a run slowed by another "
        f"process on this shared VM does not decide) of {connections} sequential connect, "
        f"send 4 bytes, read echo until the server closes, close, to VIP:{SHORT_PORT}. "
        "The traced conditions run `ebpfdiag trace "
        "tcp-rst --hosts client,lb,server --json` (TC classifiers on every interface plus the "
        "reset tracepoints) started before and stopped after each measurement. `trace drop, "
        "traffic's ports` runs `ebpfdiag trace drop` the same way (TC history programs on "
        "every interface, skb:kfree_skb and the retransmit tracepoints).",
        f"{rounds} rounds, conditions interleaved within each round; everything shares one "
        "kernel and 2 cores, so the tracer's user-space (controller and 3 remote scripts) "
        "competes with the traffic for CPU.",
        "Tracer events per round: packet/reset records the trace printed while one bulk and one "
        "short run went by: none, since no flow resets (a flow's handshake and last packets "
        "wait in the kernel until a RST needs them; `--all-flows` would stream them).",
        "The baseline itself moves by several percent from round to round on this shared "
        "2-core VM (see min..max of repeated runs in the fan-out section); ratios near the "
        "goal are within that noise.",
        "Where the cost goes (one extra traced run per condition after the timed rounds). In "
        "the kernel, from kernel.bpf_stats_enabled: the path crosses 5 interfaces, with a "
        "program on ingress and egress of each; 'tracepoints' are the tool's other programs, "
        "whose events every host's program sees on the lab's one kernel. In user space, from "
        "/proc: the controller, and in the lab's namespaces the hosts' python3 (bootstrap and "
        "tool) and sshd; the benchmark's own servers are left out:\n\n"
        + "\n".join(f"  - {line}" for line in profile),
    ]
    return section


def latency_notes(rates: dict[str, list[float]]) -> list[str]:
    """What the latency conditions run and how many records the controller took."""
    seen = {c: r for c, r in rates.items() if r}
    if not seen:
        return []
    per = "; ".join(f"{c}: {median(r):,.0f} records/s (median, {min(r):,.0f}-{max(r):,.0f})"
                    for c, r in seen.items())  # fmt: skip
    return [
        "The latency conditions run `ebpfdiag trace latency --hosts client,lb,server --port "
        f"{BULK_PORT} --port {SHORT_PORT} --json` (default sampling, or `--sample 1`: every "
        "packet) started before and stopped after each measurement; its tracer events are "
        "the packet records it streamed. Controller records/s over the whole traced time "
        f"(bulk + short runs): {per}.",
    ]
