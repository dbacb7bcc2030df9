"""Large runs of ``run-script``: folded output, confirmation and canaries.

The real part is a fleet of 60 sshd hosts in namespaces: 57 print the same report,
h58 has no sshd, h59's sudo wants a password and h60's script prints something else
and exits 3. The confirmation rules that need no host run against an inventory of
addresses nobody answers on (nothing may connect to them).
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_root_tools

PREFIX = "ebfo"
SUBNET = "198.19.128.0/24"
COUNT = 60
AGREE = [f"h{i:02d}" for i in range(1, 58)]
DOWN, SUDO_PW, ODD = "h58", "h59", "h60"

#: The same report everywhere but on the host whose address is argv[2]; each host also
#: leaves a marker (its address, and when it ran) in the directory argv[3], then sleeps
#: argv[4] seconds if given.
REPORT_SCRIPT = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 9))
addr = s.getsockname()[0]
with open(sys.argv[3] + "/" + addr, "w") as f:
    f.write(repr(time.time()))
if addr == sys.argv[2]:
    print("kernel ok", flush=True)
    print("probes 2", flush=True)
    sys.exit(3)
print("kernel ok", flush=True)
print("probes 3", flush=True)
if len(sys.argv) > 4:
    time.sleep(float(sys.argv[4]))
"""


def cli(*args: str, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ebpfdiag", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kw,
    )


def on_terminal(args: list[str], answer: bytes, timeout: float = 120) -> tuple[int, str]:
    """Run the CLI with stdin and stderr on a pseudo-terminal (stdout a pipe); answer the
    first question with ``answer``. Returns the exit code and what the terminal showed."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ebpfdiag", *args],
        stdin=follower,
        stdout=subprocess.PIPE,
        stderr=follower,
    )
    os.close(follower)
    shown = b""
    answered = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # the terminal closed: the process is gone
                    break
                if not chunk:
                    break
                shown += chunk
            if not answered and b"[y/N]" in shown:
                os.write(leader, answer)
                answered = True
            if proc.poll() is not None and not ready:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        os.close(leader)
    return code, shown.decode(errors="replace")


@pytest.fixture
def big_inventory(tmp_path) -> Path:
    """51 hosts on addresses no one answers on: any connection attempt would fail slowly."""
    hosts = {f"web{i:02d}": {"address": f"198.19.129.{i}"} for i in range(1, 52)}
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"user": "ops"}, "hosts": hosts}))
    return path


@pytest.fixture
def probe(tmp_path) -> Path:
    path = tmp_path / "probe.py"
    path.write_text("print('hi')\n")
    return path


@pytest.mark.parametrize("extra", [(), ("--json",), ("--canary", "2")])
def test_over_fifty_hosts_without_a_terminal_needs_yes(big_inventory, probe, extra):
    started = time.monotonic()
    r = cli("run-script", str(probe), "-i", str(big_inventory), "-H", "web[01-51]", *extra)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [
        "ebpfdiag: run-script on 51 hosts (more than 50) needs --yes when there is no "
        "terminal to confirm on"
    ]
    assert r.stdout == ""
    assert time.monotonic() - started < 20  # refused before any connection was tried


@pytest.mark.parametrize(
    "command",
    [("trace", "tcp-rst"), ("trace", "drop"), ("trace", "latency"),
     ("metrics", "textfile", "--dir", "."), ("metrics", "serve", "--listen", "127.0.0.1:19469")],
)  # fmt: skip
def test_tracers_and_metrics_over_fifty_hosts_need_yes_too(big_inventory, command):
    started = time.monotonic()
    r = cli(*command, "-i", str(big_inventory), "-H", "web[01-51]", "--json")
    assert r.returncode == 2, r.stderr
    name = " ".join(command[:2])
    assert r.stderr.splitlines() == [
        f"ebpfdiag: {name} on 51 hosts (more than 50) needs --yes when there is no "
        "terminal to confirm on"
    ]
    assert r.stdout == ""
    assert time.monotonic() - started < 20  # refused before any connection was tried


def test_declining_on_a_terminal_runs_nothing(big_inventory, probe):
    args = ["run-script", str(probe), "-i", str(big_inventory), "-H", "web[01-51]"]
    code, shown = on_terminal([*args, "--canary", "3"], b"n\n")
    assert code == 2, shown
    assert "Run probe.py on 51 hosts (web[01-51]), the first 3 alone first? [y/N]" in shown
    assert "ebpfdiag: not confirmed: nothing ran" in shown
    assert "refused" not in shown and "timed out" not in shown


def test_canary_must_be_positive(big_inventory, probe):
    r = cli("run-script", str(probe), "-i", str(big_inventory), "-H", "web01", "--canary", "0")
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and "--canary" in r.stderr


# -- a real fleet of 60 hosts -------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    require_root_tools("ip", "/usr/sbin/sshd", "sudo", "ssh-keygen")
    from tests.fleet import Fleet

    workdir = tmp_path_factory.mktemp("fleet-fold") / "client"
    f = Fleet(
        PREFIX,
        COUNT,
        subnet=SUBNET,
        workdir=workdir,
        no_sshd_hosts=[DOWN],
        password_sudo_hosts=[SUDO_PW],
    )
    with f:
        yield f


@pytest.fixture
def markers(tmp_path) -> Path:
    path = tmp_path / "ran"
    path.mkdir()
    path.chmod(0o777)
    return path


@pytest.fixture
def report(tmp_path) -> Path:
    path = tmp_path / "report.py"
    path.write_text(REPORT_SCRIPT)
    return path


def run(fleet, report: Path, markers: Path, hosts: str, *extra: str) -> subprocess.CompletedProcess:
    odd = fleet.host(ODD).address
    return cli(
        "run-script", str(report), "-i", str(fleet.inventory), "-H", hosts, *extra,
        "--", fleet.gateway, odd, str(markers),
    )  # fmt: skip


def ran_on(fleet, markers: Path) -> dict[str, float]:
    by_address = {h.address: h.name for h in fleet.hosts}
    return {by_address[p.name]: float(p.read_text()) for p in markers.iterdir()}


RULE = "-" * 15


@pytest.mark.root
def test_sixty_hosts_fold_into_one_report_and_three_causes(fleet, report, markers):
    r = run(fleet, report, markers, "@fleet", "--yes")
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines() == [
        RULE, "h[01-57] (57)", RULE, "kernel ok", "probes 3",
        RULE, "h60 (1)", RULE, "kernel ok", "probes 2",
    ]  # fmt: skip
    tail = r.stderr.splitlines()
    assert tail[-1] == "57/60 hosts ok"
    assert tail[-4:-1] == [  # same size: run order
        "1 host: connection refused: h58",
        "1 host: sudo needs a password; use --ask-sudo-pass or allow NOPASSWD for this user, "
        "or install the ebpfdiag runner for this user's group: h59",
        "1 host: script exited with 3: h60",
    ]
    assert len(tail) == 4, r.stderr  # no line per failed host as it failed, no table
    assert sorted(ran_on(fleet, markers)) == [*AGREE, ODD]


@pytest.mark.root
def test_json_still_streams_a_record_per_line(fleet, report, markers):
    r = run(fleet, report, markers, "@fleet", "--yes", "--json", "--fold")
    assert r.returncode == 1, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    lines = [(rec["host"], rec["text"]) for rec in recs if rec["type"] == "line"]
    assert len(lines) == 2 * 58
    assert {host for host, _ in lines} == {*AGREE, ODD}
    assert {rec["host"]: rec["status"] for rec in recs if rec["type"] == "host"}[DOWN] == "failed"
    summary = recs[-1]
    assert summary["type"] == "summary"
    assert (summary["ok"], summary["failed"], summary["not_run"]) == (57, 3, [])


@pytest.mark.root
def test_no_fold_lists_every_line(fleet, report, markers):
    r = run(fleet, report, markers, "h[01-20]", "--no-fold")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 40
    assert "h01 | kernel ok" in lines and "h20 | probes 3" in lines


@pytest.mark.root
def test_fifty_hosts_need_no_confirmation(fleet, report, markers):
    r = run(fleet, report, markers, "h[01-50]")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1] == "h[01-50] (50)"
    assert len(ran_on(fleet, markers)) == 50


@pytest.mark.root
def test_a_failing_canary_stops_the_rest(fleet, report, markers):
    r = run(fleet, report, markers, "h[01-02],h58,h[03-09]", "--canary", "3", "--json")
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == [
        "ebpfdiag: canary failed on 1 of 3 hosts (h58); not started on the other 7 hosts"
    ]
    assert sorted(ran_on(fleet, markers)) == ["h01", "h02"]
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(rec["host"] for rec in recs if rec["type"] == "host") == ["h01", "h02", "h58"]
    assert recs[-1]["not_run"] == [f"h{i:02d}" for i in range(3, 10)]


@pytest.mark.root
def test_a_failing_canary_on_the_terminal_renderer(fleet, report, markers):
    r = run(fleet, report, markers, "h60,h[01-20]", "--canary", "2")
    assert r.returncode == 1, r.stderr
    assert sorted(ran_on(fleet, markers)) == ["h01", ODD]
    assert r.stdout.splitlines()[1::5] == ["h60 (1)", "h01 (1)"]  # same size: run order
    assert r.stderr.splitlines()[-1] == (
        "ebpfdiag: canary failed on 1 of 2 hosts (h60); not started on the other 19 hosts"
    )


@pytest.mark.root
def test_passing_canaries_run_before_the_rest(fleet, report, markers):
    r = run(fleet, report, markers, "h[01-06]", "--canary", "2", "--json")
    assert r.returncode == 0, r.stderr
    ran = ran_on(fleet, markers)
    assert sorted(ran) == [f"h{i:02d}" for i in range(1, 7)]
    assert max(ran["h01"], ran["h02"]) < min(ran[f"h{i:02d}"] for i in range(3, 7))
    assert json.loads(r.stdout.splitlines()[-1])["not_run"] == []


@pytest.mark.root
def test_confirming_on_a_terminal_runs_the_fleet(fleet, report, markers):
    odd = fleet.host(ODD).address
    args = ["run-script", str(report), "-i", str(fleet.inventory), "-H", "h[01-55]"]
    code, shown = on_terminal([*args, "--", fleet.gateway, odd, str(markers)], b"y\n")
    assert code == 0, shown
    assert "Run report.py on 55 hosts (h[01-55])? [y/N]" in shown
    assert len(ran_on(fleet, markers)) == 55


@pytest.mark.root
@pytest.mark.parametrize(("hosts", "folds"), [("h[01-16]", False), ("h[01-17]", True)])
def test_folding_is_the_default_above_sixteen_hosts(fleet, report, markers, hosts, folds):
    r = run(fleet, report, markers, hosts)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    if folds:
        assert lines == [RULE, "h[01-17] (17)", RULE, "kernel ok", "probes 3"]
    else:
        assert len(lines) == 32 and "h16 | probes 3" in lines


@pytest.mark.root
def test_fold_flag_folds_a_small_run(fleet, report, markers):
    r = run(fleet, report, markers, "h[01-03]", "--fold")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [RULE, "h[01-03] (3)", RULE, "kernel ok", "probes 3"]
    assert r.stderr.splitlines() == ["3/3 hosts ok"]


@pytest.mark.root
def test_ctrl_c_during_the_canaries_starts_nothing_else(fleet, report, markers):
    args = ["run-script", str(report), "-i", str(fleet.inventory), "-H", "h[01-08]"]
    args += ["--canary", "2", "--json", "--", fleet.gateway, fleet.host(ODD).address]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ebpfdiag", *args, str(markers), "60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(markers.iterdir())) < 2:
            assert time.monotonic() < deadline, "the canaries did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "canary failed" not in err
    assert sorted(ran_on(fleet, markers)) == ["h01", "h02"]
    summary = json.loads(out.splitlines()[-1])
    assert summary["interrupted"] is True
    assert summary["not_run"] == [f"h{i:02d}" for i in range(3, 9)]
