"""The test fleet: real sshd hosts in namespaces, reached with OpenSSH's own client."""

import os
import pwd
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from ebpfdiag.errors import UsageError
from ebpfdiag.lab import netns, users
from tests.conftest import require_root_tools
from tests.fleet import Fleet

# Prefixes and subnets of their own, so these tests never meet a developer's fleet or lab.
PREFIX = "ebdf"
SUBNET = "198.19.2.0/24"
OTHER_PREFIX = "ebdg"
OTHER_SUBNET = "198.19.3.0/24"


def ssh_argv(fleet: Fleet, name: str, command: str) -> list[str]:
    host = fleet.host(name)
    return [
        "ssh",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={fleet.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "ConnectTimeout=5",
        "-i", str(fleet.client_key),
        f"{host.user}@{host.address}",
        command,
    ]  # fmt: skip


def ssh(fleet: Fleet, name: str, command: str, stdin: str | None = None):
    argv = ssh_argv(fleet, name, command)
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)


def leftovers(prefix: str, workdir: Path) -> list[str]:
    """Everything a fleet with ``prefix`` could have left behind, checked on the machine."""
    found = [f"netns {n}" for n in netns.netns_list() if n.startswith(f"{prefix}-")]
    found += [f"link {n}" for n in netns.link_names() if n.startswith(f"{prefix}-")]
    found += [f"process {p}" for p in netns.pids_with_arg(f"fleet-{prefix}/")]
    found += [f"registry {u}" for u in users.owned_by(f"fleet-{prefix}")]
    found += [f"file {p}" for p in workdir.glob("*")] if workdir.exists() else []
    return found


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_rejects_bad_arguments():
    with pytest.raises(UsageError):
        Fleet("Bad-Prefix", 2)
    with pytest.raises(UsageError):
        Fleet("ebdf", 2, subnet="10.0.0.0/24")
    with pytest.raises(UsageError):
        Fleet("ebdf", 2, password_sudo_hosts=["h09"])
    assert [h.name for h in Fleet("ebdf", 12).hosts][:2] == ["h01", "h02"]
    assert Fleet("ebdf", 3, subnet=SUBNET).hosts[0].address == "198.19.2.10"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    require_root_tools("ip", "/usr/sbin/sshd", "sudo", "ssh", "useradd")
    workdir = tmp_path_factory.mktemp("fleet") / "client"
    fl = Fleet(PREFIX, 5, subnet=SUBNET, workdir=workdir, password_sudo_hosts=["h05"])
    with fl:
        yield fl
    assert leftovers(PREFIX, workdir) == []


@pytest.mark.root
def test_every_host_runs_sudo_over_ssh(fleet):
    for name in ("h01", "h02", "h03", "h04"):
        result = ssh(fleet, name, "sudo -n id -u")
        assert (result.returncode, result.stdout.strip()) == (0, "0"), (name, result.stderr)


@pytest.mark.root
def test_each_host_is_its_own_namespace(fleet):
    for host in fleet.hosts:
        pid = fleet.sshd_pid(host.name)
        assert pid is not None
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{host.netns}").st_ino
        out = fleet.ns_run(host.name, ["ip", "-4", "-o", "addr"], capture_output=True, text=True)
        assert f"{host.address}/24" in out.stdout


@pytest.mark.root
def test_password_host_needs_password(fleet):
    refused = ssh(fleet, "h05", "sudo -n id -u")
    assert refused.returncode != 0
    assert "password is required" in refused.stderr
    assert fleet.sudo_password
    allowed = ssh(fleet, "h05", "sudo -S -p '' id -u", stdin=fleet.sudo_password + "\n")
    assert (allowed.returncode, allowed.stdout.strip()) == (0, "0"), allowed.stderr


@pytest.mark.root
def test_inventory_and_known_hosts(fleet):
    inventory = yaml.safe_load(fleet.inventory.read_text())
    assert inventory["defaults"]["identity_file"] == str(fleet.client_key)
    assert inventory["defaults"]["known_hosts"] == str(fleet.known_hosts)
    assert inventory["defaults"]["sudo"] is True
    assert inventory["groups"]["fleet"] == [h.name for h in fleet.hosts]
    assert inventory["hosts"]["h01"] == {"address": "198.19.2.10", "port": 22}
    assert inventory["hosts"]["h05"]["user"] == fleet.host("h05").user
    names = [line.split()[0] for line in fleet.known_hosts.read_text().splitlines()]
    assert names == [h.address for h in fleet.hosts]


@pytest.mark.root
def test_up_again_is_a_no_op(fleet):
    before = {h.name: fleet.sshd_pid(h.name) for h in fleet.hosts}
    fleet.up()
    assert {h.name: fleet.sshd_pid(h.name) for h in fleet.hosts} == before
    assert ssh(fleet, "h01", "true").returncode == 0


@pytest.mark.root
def test_two_fleets_share_a_user_and_no_sshd_host(fleet, tmp_path):
    other = Fleet(OTHER_PREFIX, 2, subnet=OTHER_SUBNET, workdir=tmp_path, no_sshd_hosts=["h02"])
    with other:
        assert ssh(other, "h01", "sudo -n id -u").stdout.strip() == "0"
        unreachable = ssh(other, "h02", "true")
        assert unreachable.returncode == 255
        assert "Connection refused" in unreachable.stderr
        assert other.sshd_pid("h02") is None
    # The other fleet is gone, and this one (which shares its login user) still works.
    assert leftovers(OTHER_PREFIX, tmp_path) == []
    assert user_exists(fleet.user)
    assert ssh(fleet, "h01", "sudo -n id -u").stdout.strip() == "0"


@pytest.mark.root
def test_down_removes_everything_it_made(tmp_path):
    fl = Fleet(OTHER_PREFIX, 2, subnet=OTHER_SUBNET, workdir=tmp_path / "w", user="ebpfdiag-tdown")
    fl.up()
    assert user_exists("ebpfdiag-tdown")
    assert users.sudoers_path("ebpfdiag-tdown").exists()
    # A live login session must not keep anything alive.
    session = subprocess.Popen(ssh_argv(fl, "h01", "sleep 60"), stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not any("sleep" in " ".join(netns.pid_cmdline(p)) for p in netns.netns_pids("ebdg-h01")):
        assert time.monotonic() < deadline, "ssh session did not start"
        time.sleep(0.05)
    try:
        fl.down()
        fl.down()
    finally:
        session.kill()
        session.wait()
    assert leftovers(OTHER_PREFIX, tmp_path / "w") == []
    assert not (tmp_path / "w").exists()
    assert not user_exists("ebpfdiag-tdown")
    assert not users.sudoers_path("ebpfdiag-tdown").exists()


def test_neighbour_thresholds_are_raised_for_a_big_fleet_and_put_back(tmp_path, monkeypatch):
    """The kernel's one neighbour table holds two entries per host: a 1,000-host fleet
    raises its thresholds, records what it found, and down() puts that back unless
    someone changed the value since."""
    import tests.fleet as fleet_module

    neigh = tmp_path / "neigh"
    neigh.mkdir()
    for name, value in (("gc_thresh1", 128), ("gc_thresh2", 512), ("gc_thresh3", 1024)):
        (neigh / name).write_text(f"{value}\n")
    monkeypatch.setattr(fleet_module, "NEIGH_DIR", neigh)
    monkeypatch.setattr(fleet_module, "RUN_ROOT", tmp_path / "run")
    small = Fleet("ebcos", 100)
    record: dict = {}
    small._raise_neighbour_limits(record)
    assert "neigh" not in record and (neigh / "gc_thresh3").read_text() == "1024\n"
    big = Fleet("ebcob", 1000, subnet="198.19.8.0/21")
    big._raise_neighbour_limits(record)
    assert int((neigh / "gc_thresh3").read_text()) >= 2 * 1000 * 2
    assert int((neigh / "gc_thresh2").read_text()) >= 2 * 1000
    assert record["neigh"]["found"]["gc_thresh3"] == 1024
    fleet_module._restore_neighbour_limits(record["neigh"])
    assert (neigh / "gc_thresh3").read_text() == "1024\n"
    assert (neigh / "gc_thresh2").read_text() == "512\n"
    big._raise_neighbour_limits(record)
    (neigh / "gc_thresh3").write_text("9999\n")  # changed by someone else meanwhile
    fleet_module._restore_neighbour_limits(record["neigh"])
    assert (neigh / "gc_thresh3").read_text() == "9999\n"
    (neigh / "gc_thresh3").write_text(f"{record['neigh']['set']['gc_thresh3']}\n")
    fleet_module._restore_neighbour_limits(record["neigh"], others_need=1500)
    assert (neigh / "gc_thresh3").read_text() != "1024\n"  # another big fleet is still up


def test_bridges_follow_the_fleet_size():
    assert Fleet("ebdf", 5).bridges == ["ebdf-br"]
    assert Fleet("ebdf", 1000, subnet="198.19.8.0/21").bridges == ["ebdf-br"]
    assert Fleet("ebdf", 1001, subnet="198.19.8.0/21").bridges == ["ebdf-br", "ebdf-br1"]
    assert Fleet("ebdf", 40, hosts_per_bridge=16).bridges == ["ebdf-br", "ebdf-br1", "ebdf-br2"]
    with pytest.raises(UsageError):
        Fleet("ebdf", 5, hosts_per_bridge=1024)


@pytest.mark.root
def test_a_fleet_over_several_bridges_answers_from_every_host(tmp_path):
    """40 hosts, 16 to a bridge: three bridges joined into one segment behind one gateway,
    and run-script reaches every host, each answering with its own address."""
    import json
    import sys

    fl = Fleet("ebcot", 40, subnet="198.19.32.0/24", workdir=tmp_path / "w", hosts_per_bridge=16)
    with fl:
        masters = {
            h.netns: netns.run(["ip", "-o", "link", "show", h.netns])
            .split(" master ")[1]
            .split()[0]
            for h in fl.hosts
        }
        assert sorted(set(masters.values())) == ["ebcot-br", "ebcot-br1", "ebcot-br2"]
        assert list(masters.values()).count("ebcot-br2") == 8
        probe = tmp_path / "addr.py"
        probe.write_text(
            "import socket, sys\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.connect((sys.argv[1], 9))\n"
            "print(s.getsockname()[0])\n"
        )
        r = subprocess.run(
            [sys.executable, "-m", "ebpfdiag", "run-script", str(probe), "-i", str(fl.inventory),
             "--hosts", "fleet", "--json", "--", fl.gateway],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    answers = {x["host"]: x["text"] for x in recs if x["type"] == "line"}
    assert answers == {h.name: h.address for h in fl.hosts}
    assert recs[-1]["type"] == "summary" and recs[-1]["ok"] == 40
    assert leftovers("ebcot", tmp_path / "w") == []
