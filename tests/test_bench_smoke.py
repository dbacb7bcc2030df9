"""The benchmark code runs at a tiny size and writes a well-formed report (no timing asserts)."""

import re
import shutil

import pytest

from bench.__main__ import main, parse_args
from tests.conftest import require, require_root_tools


def test_unknown_benchmark_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        parse_args(["--only", "fanout,nosuch"])
    assert exc.value.code == 2


def test_full_run_writes_the_doc_and_partial_runs_only_print():
    assert parse_args([]).out.name == "benchmarks.md"
    assert parse_args(["--quick"]).out is None
    assert parse_args(["--only", "ready"]).out is None


def test_quick_correlation_report(tmp_path, capsys):
    out = tmp_path / "bench.md"
    assert main(["--quick", "--only", "correlation", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks\n")
    for field in ("| kernel |", "| CPU |", "| cores |", "| memory |", "| date |"):
        assert field in text
    assert "## Correlation at scale" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| 10,") or ln.startswith("| 30,")]
    assert len(rows) == 2, text
    assert "| correlate 30,000 events |" in text
    assert "Correlation at scale" in capsys.readouterr().out


@pytest.mark.root
def test_quick_fanout_and_pipeline_on_a_real_fleet(tmp_path):
    require_root_tools("/usr/sbin/sshd", "ssh")
    require(shutil.which("clush") is not None, "needs clush (clustershell)")
    require(shutil.which("parallel-ssh") is not None, "needs parallel-ssh (pssh)")
    require_root_tools("ip", "nft")  # the pipeline's trace runs in a lab
    out = tmp_path / "bench.md"
    assert main(["--quick", "--only", "fanout,pipeline", "--out", str(out)]) == 0
    text = out.read_text()
    for tool in ("ebpfdiag", "asyncssh alone", "clush", "pssh"):
        for size in (3, 6):
            assert f"| {size} | {tool} | 1/1 |" in text, text
    # per additional host (start-up cancels), ebpfdiag's and the SSH library's alone
    assert "| ebpfdiag CPU per additional host (3 -> 6 hosts) |" in text, text
    assert re.search(r"ebpfdiag -?\d+\.\d ms, asyncssh alone -?\d+\.\d ms", text), text
    # a one-host run in the same rounds: the run's fixed cost, apart from the per-host work
    assert re.search(
        r"6 hosts: ebpfdiag \d+\.\d\d CPU s \(user \d+\.\d\d s, system \d+\.\d\d s\), "
        r"of which a one-host run .* takes \d+\.\d\d s .* -?\d+\.\d ms a host beyond it",
        text,
    ), text
    # the SSH library's floor measured the same way (its own one-host run in each round)
    assert re.search(
        r"The SSH library alone .*: \d+\.\d\d CPU s \(user \d+\.\d\d s, system "
        r"\d+\.\d\d s\), one-host run \d+\.\d\d s, -?\d+\.\d ms a host beyond it: "
        r"ebpfdiag is [+-]\d+\.\d ms a host from that floor",
        text,
    ), text
    assert "| records lost | 0 | 0 | yes |" in text, text
    # what users run: print-per-line next to batched, a lone line's delay, and a tracer
    # (trace tcp-rst --all-flows under short connections, its decode cost per record)
    for row in ("| batched, file | 2/2 |", "| per-line, file | 2/2 |",
                "| lone line every 20 ms, reader stamps | 1/1 |",
                "| trace tcp-rst --all-flows, 30 short connections | 1/1 |",
                "| trace tcp-rst: decoding alone"):  # fmt: skip
        assert row in text, (row, text)
    for target in ("per-line / batched records/s", "controller CPU per record, per-line",
                   "lone line print -> controller stdout, p99"):  # fmt: skip
        assert f"| {target}" in text, (target, text)


@pytest.mark.root
def test_quick_time_to_ready_on_the_lab(tmp_path):
    """The time-to-ready section measures what a user runs and keeps its breakdown: per-host
    ready figures, every set-up phase from the hosts' hellos (3 hosts and one alone), the
    same totals for trace latency and trace drop, and the targets, each a number."""
    require_root_tools("ip", "nft", "/usr/sbin/sshd")
    require(shutil.which("bpftool") is not None, "needs bpftool")
    out = tmp_path / "bench.md"
    assert main(["--quick", "--only", "ready", "--out", str(out)]) == 0
    text = out.read_text()
    rows = {line.split(" | ")[0].strip("| ").strip(): line for line in text.splitlines()
            if line.startswith("| ")}  # fmt: skip
    wanted = ["trace tcp-rst, 3 hosts: start -> `tracing`", "trace tcp-rst, server alone: "
              "start -> `tracing`", "controller start-up: `ebpfdiag --version`",
              "controller start-up: `ebpfdiag hosts`", "remote: compile floor: one host's "
              "compile alone"]  # fmt: skip
    wanted += [f"{host} ready (its `ready` status)" for host in ("client", "lb", "server")]
    wanted += [f"trace {c}, {n}: start -> `tracing`" for c in ("latency", "drop")
               for n in ("3 hosts", "server alone")]  # fmt: skip
    wanted += [f"remote: {p} (3 hosts at once)" for p in ("process", "import", "discover", "cpu",
                                                           "compile", "attach")]  # fmt: skip
    wanted += [
        f"trace {c}, {n}"
        for c in ("tcp-rst", "latency", "drop")
        for n in ("3 hosts, nothing kept (first start)", "server alone, nothing kept")
    ]
    for label in wanted:
        assert label in rows, (label, text)
        median = rows[label].split(" | ")[1]
        assert float(median) > 0, rows[label]
    # after the warm-up, every host of every timed trace loaded its kept program
    shares = [line for line in text.splitlines() if "hosts that loaded their kept" in line]
    assert len(shares) == 3 and all("| 1.00 | 1.00..1.00 |" in line for line in shares), shares
    assert "| trace tcp-rst on 3 lab hosts |" in text and "| `ebpfdiag hosts` |" in text
    assert "| trace drop on server alone |" in text, text


@pytest.mark.root
def test_quick_datapath_says_where_each_tracers_cost_goes(tmp_path):
    """The datapath section compares each tracer with no tracer on the lab and says where
    its cost goes: its programs in the kernel, and its user space (controller, the hosts'
    scripts, their sshd) per bulk run and per short connection."""
    require_root_tools("ip", "nft", "/usr/sbin/sshd", "iperf3")
    require(shutil.which("bpftool") is not None, "needs bpftool")
    out = tmp_path / "bench.md"
    assert main(["--quick", "--only", "datapath", "--out", str(out)]) == 0
    text = out.read_text()
    traced = ("trace, traffic's ports", "trace, unrelated port", "latency, default sampling",
              "latency, --sample 1", "trace drop, traffic's ports")  # fmt: skip
    for cond in ("no tracer", *traced):
        assert f"| {cond} | " in text, (cond, text)
    user = {}
    for cond in traced:
        m = re.search(
            rf"  - {re.escape(cond)}: bulk [\d.]+ Gbit/s, TC .* ns = [\d.]+% of one core.*, "
            r"user space (\d+)% of one core \(controller (\d+)%, the hosts' scripts (\d+)%, "
            r"their sshd (\d+)%\); short .* per connection, user space [\d.]+ us \(controller "
            r"[\d.]+ us, the hosts' scripts [\d.]+ us, their sshd [\d.]+ us\) per connection",
            text,
        )
        assert m, (cond, text)
        user[cond] = [int(g) for g in m.groups()]
    # every packet streamed: the controller and the hosts' scripts are busy, and counted
    total, controller, scripts, _ = user["latency, --sample 1"]
    assert controller > 5 and scripts > 5 and total >= controller + scripts, user
    # an idle tracer (no packet passes its filter): next to nothing in user space
    assert user["trace, unrelated port"][0] < controller, user
