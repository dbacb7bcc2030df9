"""``ebpfdiag runner install|status|uninstall`` over the lab: real sshd, sudo and sudoers.

Each lab host has private runner paths and /etc/sudoers.d (``ebpfdiag.lab.hostfs``), so an
install lands on the hosts named and nowhere else. The lab's ``ebpfdiag-lab`` user has full
sudo (the admin); ``diag`` (group ``ebpfdiag``) has none until the runner is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ebpfdiag import __version__
from ebpfdiag.lab import hostfs
from ebpfdiag.remote.runner_build import build_payload, default_policy
from tests.conftest import running_lab

pytestmark = pytest.mark.root

PREFIX, BASE = "ebru", "198.18.244.0"
STATE_DIR = Path("/run/ebpfdiag/lab-runner-cli-test")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    yield from running_lab(
        tmp_path_factory,
        "runnercli",
        ("ip", "nft", "tc", "/usr/sbin/sshd", "sudo", "visudo"),
        state_dir=STATE_DIR,
        prefix=PREFIX,
        base=BASE,
    )


def ebpfdiag(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "ebpfdiag", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def records(out: str, kind: str) -> dict[str, dict]:
    return {r["host"]: r for r in map(json.loads, out.splitlines()) if r["type"] == kind}


def on_host(lab, host: str, target: str) -> Path:
    return Path(lab.state_dir) / "hosts" / host / "fs" / hostfs.host_dir_for(target)


def test_install_status_uninstall_over_ssh(lab):
    hosts = ["-i", str(lab.inventory), "--hosts", "client,lb", "--json"]
    before = ebpfdiag("runner", "status", *hosts)
    assert before.returncode == 0, before.stderr
    for rec in records(before.stdout, "runner").values():
        assert rec["installed"] is False and rec["current"] is False
        assert rec["update"] == "ebpfdiag runner install --hosts client,lb --group GROUP"

    done = ebpfdiag("runner", "install", *hosts, "--group", "ebpfdiag")
    assert done.returncode == 0, done.stdout + done.stderr
    installed = records(done.stdout, "runner")
    assert sorted(installed) == ["client", "lb"]
    release = build_payload().release
    for rec in installed.values():
        assert rec["action"] == "install" and rec["ready"] is True and rec["release"] == release
        assert set(rec["changed"]) == {"release", "current", "policy", "sudoers"}, rec
    assert not on_host(lab, "server", "/etc/sudoers.d").joinpath("ebpfdiag-runner").exists()
    rule = on_host(lab, "lb", "/etc/sudoers.d").joinpath("ebpfdiag-runner").read_text()
    assert '%ebpfdiag ALL=(root) NOPASSWD: /usr/local/lib/ebpfdiag-runner/current/runner ""' in rule
    summary = [json.loads(line) for line in done.stdout.splitlines()][-1]
    assert summary["type"] == "summary" and summary["action"] == "install" and summary["ok"] == 2

    again = ebpfdiag("runner", "install", *hosts, "--group", "ebpfdiag")
    assert again.returncode == 0 and all(
        r["changed"] == [] for r in records(again.stdout, "runner").values()
    ), again.stdout

    status = records(ebpfdiag("runner", "status", *hosts).stdout, "runner")
    for rec in status.values():
        assert rec["version"] == __version__ and rec["current"] is True and rec["ready"] is True
        assert rec["policy"] == default_policy("ebpfdiag") and rec["problems"] == []
        assert sorted(rec["tools"]) == ["doctor", "drop", "netmetrics", "tcp_latency", "tcp_rst"]

    # diag, who has no sudo rule of its own, now runs doctor on lb through the runner
    doctor = ebpfdiag("doctor", "-i", str(lab.diag_inventory), "--hosts", "lb", "--json")
    assert records(doctor.stdout, "host")["lb"]["status"] == "ok", doctor.stdout + doctor.stderr
    audit = on_host(lab, "lb", "/var/log/ebpfdiag").joinpath("runner.log").read_text()
    runs = [json.loads(line) for line in audit.splitlines()]
    ends = [r for r in runs if r["event"] == "end" and r["sudo_user"] == "diag"]
    assert ends and ends[-1]["tool"] == "doctor" and ends[-1]["exit_status"] == 0, runs

    text = ebpfdiag("runner", "status", "-i", str(lab.inventory), "--hosts", "lb")
    assert f"lb: runner {release} ready; policy " in text.stdout, text.stdout + text.stderr

    gone = ebpfdiag("runner", "uninstall", *hosts)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    for rec in records(gone.stdout, "runner").values():
        assert "/etc/sudoers.d/ebpfdiag-runner" in rec["removed"]
        assert rec["kept"] == ["/var/log/ebpfdiag/runner.log"]
    after = records(ebpfdiag("runner", "status", *hosts).stdout, "runner")
    assert all(r["installed"] is False for r in after.values())
    assert not any(on_host(lab, "lb", "/usr/local/lib/ebpfdiag-runner").iterdir())


def test_install_needs_an_existing_group(lab):
    done = ebpfdiag("runner", "install", "-i", str(lab.inventory), "--hosts", "lb", "--json",
                    "--group", "ebru-nosuchgroup")  # fmt: skip
    assert done.returncode == 1
    rec = records(done.stdout, "runner")["lb"]
    assert rec["error"] == "group ebru-nosuchgroup does not exist on this host (create it first)"
    assert not on_host(lab, "lb", "/etc/sudoers.d").joinpath("ebpfdiag-runner").exists()
