"""Time to ready for ``trace tcp-rst`` on the lab's three hosts, and where it goes.

The product has no timing hooks, so the split is built from what can be observed:

- ``ebpfdiag --version``: the controller's own start-up (interpreter and imports);
- ``run-script`` of an empty script: start-up + SSH connect + sudo + bootstrap + push, and
  the clean end of the run (the script returns at once);
- ``run-script`` of a staging script that embeds the real ``tcp_rst.py`` and times, on each
  host, importing BCC, the probe discovery before compiling, the BPF compile (BCC/clang),
  attaching (filters, tracepoints, TC, buffers) and detaching again;
- ``trace tcp-rst --json`` itself: from process start until its ``tracing`` status record.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench.builds import CURRENT, Build
from bench.common import EBPFDIAG, ROOT, Measured, Section, fmt, median, run_measured
from bench.labenv import HOSTS, Tracer, bench_lab
from ebpfdiag.remote.bundle import bundle

TRACE_PORT = 8080

STAGE = r"""
import json, sys, time
t_start = time.monotonic()
SRC = %(src)r
ns = {"__name__": "tcp_rst_stage", "__file__": "tcp_rst.py"}
exec(compile(SRC, "tcp_rst.py", "exec"), ns)
ns["ensure_tracefs"]()
t0 = time.monotonic()
import bcc
t_import = time.monotonic() - t0
marks = {}
Base = bcc.BPF


class TimedBPF(Base):
    def __init__(self, *args, **kwargs):
        marks["compile_start"] = time.monotonic()
        Base.__init__(self, *args, **kwargs)
        marks["compile_end"] = time.monotonic()


bcc.BPF = TimedBPF
args = ns["parse_args"](%(args)r)
session = ns["Session"](args, ns["Output"](sys.stdout), ns["StopState"]())
t1 = time.monotonic()
try:
    session.setup()
    t2 = time.monotonic()
finally:
    t3 = time.monotonic()
    errors = session.cleanup()
    t4 = time.monotonic()
if errors:
    sys.stderr.write("cleanup: %%s\n" %% errors)
    sys.exit(1)
print(json.dumps({
    "stage": 1,
    "import_bcc_s": t_import,
    "discover_s": marks["compile_start"] - t1,
    "compile_s": marks["compile_end"] - marks["compile_start"],
    "attach_s": t2 - marks["compile_end"],
    "detach_s": t4 - t3,
}))
"""

PHASES = ("import_bcc_s", "discover_s", "compile_s", "attach_s", "detach_s")


def _stage_script(work: Path) -> Path:
    src = bundle(ROOT / "scripts" / "bpf" / "tcp_rst.py")
    path = work / "tcp_rst_stages.py"
    path.write_text(STAGE % {"src": src, "args": ["--port", str(TRACE_PORT)]})
    return path


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


def run(rounds: int = 3, against: Build | None = None) -> Section:
    section = Section(
        "ready",
        "Time to ready: trace tcp-rst on client, lb, server",
        ["what", "median s", "min..max s", "includes"],
    )
    walls: dict[str, list[float]] = {}
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    with bench_lab() as state, tempfile.TemporaryDirectory(prefix="ebpfdiag-bench-") as tmp:
        work = Path(tmp)
        empty = work / "empty.py"
        empty.write_text("pass\n")
        stage = _stage_script(work)
        out = work / "out.ndjson"
        _run_script(state, empty, out)  # warm-up: page cache, first logins
        for rnd in range(rounds):
            m = run_measured([EBPFDIAG, "--version"])
            walls.setdefault("startup", []).append(m.wall_s)
            walls.setdefault("empty", []).append(_run_script(state, empty, out).wall_s)
            walls.setdefault("stages", []).append(_run_script(state, stage, out).wall_s)
            for line in out.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("type") == "record" and rec["record"].get("stage") == 1:
                    for p in PHASES:
                        phases[p].append(rec["record"][p])
            # Whichever trace runs right after the staging run meets its hosts still busy
            # cleaning up: with --against, the two builds take turns going first.
            runs = [("trace", CURRENT)] + ([("trace-against", against)] if against else [])
            for key, build in runs[:: -1 if rnd % 2 else 1]:
                tracer = Tracer(state, [TRACE_PORT], build)
                walls.setdefault(key, []).append(tracer.start())
                tracer.stop()

    def row(label: str, values: list[float], includes: str) -> list[str]:
        return [label, fmt(median(values)), f"{fmt(min(values))}..{fmt(max(values))}", includes]

    section.rows.append(row("trace tcp-rst: start -> `tracing` status", walls["trace"],
                            "everything below, 3 hosts in parallel, plus clock pings"))  # fmt: skip
    if against is not None:
        section.rows.append(row(f"  the same with {against.label}", walls["trace-against"],
                                "the earlier build, interleaved with this one"))  # fmt: skip
    section.rows += [
        row("controller start-up (`ebpfdiag --version`)", walls["startup"],
            "interpreter + CLI imports"),
        row("run-script empty script", walls["empty"],
            "start-up, SSH connect + auth, sudo, bootstrap, push, exit and close"),
        row("run-script staging script (whole run)", walls["stages"],
            "as above + the remote phases below + detach"),
        row("  remote: import bcc (per host)", phases["import_bcc_s"], "python3 imports BCC"),
        row("  remote: discovery before compile", phases["discover_s"],
            "addresses, tracepoint formats, netns offsets, program text"),
        row("  remote: BPF compile", phases["compile_s"],
            "BCC/clang compile + load, 3 hosts at once on 2 cores"),
        row("  remote: attach", phases["attach_s"], "filters, tracepoints, TC clsact, buffers"),
        row("  remote: detach", phases["detach_s"], "not part of time to ready"),
    ]  # fmt: skip
    section.notes += [
        f"{rounds} interleaved rounds (start-up, empty, staging, trace; with --against the "
        "two builds' traces take turns going first) after one warm-up. "
        "Remote phases are measured with the host's monotonic clock inside the staging "
        "script, which runs the real `tcp_rst.py` set-up code with `--port 8080`; each value "
        "is the median over hosts and rounds.",
        "The product has no timing hook, so connect + push has no figure of its own: the "
        "empty-script run is an upper bound for it (it also includes start-up and the clean "
        "end of the run).",
    ]
    return section
