"""The client -> LB -> server lab: real namespaces, sshd, nftables and sockets."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ebpfdiag.errors import UsageError
from ebpfdiag.inventory import load_inventory
from ebpfdiag.lab import netns, prereqs, users
from ebpfdiag.lab.scenarios import SCENARIOS, run_scenario
from ebpfdiag.lab.topology import INVENTORY_MARKER, LAB_USER, NFT_TABLE, Lab
from tests.conftest import require, require_root_tools

# Own prefixes, networks and state dirs: the tests never touch a developer's lab.
PREFIX, BASE = "eblt", "198.18.64.0"
STATE_DIR = Path("/run/ebpfdiag/lab-test")


def require_lab_tools() -> None:
    require_root_tools("ip", "nft", "/usr/sbin/sshd", "sudo", "ssh", "useradd", "dpkg-query")


def leftovers(prefix: str, state_dir: Path) -> list[str]:
    """What a lab with ``prefix`` left behind, looked up on the machine; a process still in
    the middle of exiting gets two seconds to finish."""
    deadline = time.monotonic() + 2
    found = _leftovers(prefix, state_dir)
    while found and time.monotonic() < deadline:
        time.sleep(0.1)
        found = _leftovers(prefix, state_dir)
    return found


def _leftovers(prefix: str, state_dir: Path) -> list[str]:
    found = [f"netns {n}" for n in netns.netns_list() if n.startswith(f"{prefix}-")]
    found += [f"link {n}" for n in netns.link_names() if n.startswith(f"{prefix}-")]
    found += [f"process {p}" for p in netns.pids_with_arg(str(state_dir))]
    found += [f"registry {u}" for u in users.owned_by(f"lab-{prefix}")]
    found += [f"dir {state_dir}"] if state_dir.exists() else []
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    found += [f"nft table {NFT_TABLE}"] if NFT_TABLE in tables else []
    return found


def lab_user_gone_unless_shared() -> bool:
    """The lab user must be gone, unless another lab on this machine still holds it."""
    if any((users.REGISTRY / LAB_USER / "owners").glob("*")):
        return True
    return not users.user_exists(LAB_USER) and not users.sudoers_path(LAB_USER).exists()


def ssh(lab, name: str, command: str) -> subprocess.CompletedProcess:
    host = lab.hosts[name]
    argv = [
        "ssh",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={lab.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "ConnectTimeout=5",
        "-i", lab.client_key,
        f"{lab.user}@{host.mgmt_address}",
        command,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def inventory_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lab") / "inventory.yaml"


@pytest.fixture(scope="module")
def lab_obj(inventory_path):
    require_lab_tools()
    the_lab = Lab(state_dir=STATE_DIR, prefix=PREFIX, base=BASE, inventory_out=inventory_path)
    the_lab.down()
    try:
        the_lab.up()
        yield the_lab
    finally:
        the_lab.down()
    assert leftovers(PREFIX, STATE_DIR) == []
    assert not inventory_path.exists()
    assert lab_user_gone_unless_shared()


@pytest.fixture
def lab(lab_obj):
    return lab_obj.state()


# -- pure logic ----------------------------------------------------------------------------


def test_plan_addresses_and_names():
    plan = Lab(state_dir=Path("/nonexistent/x"), prefix="eblq", base=BASE, servers=2).plan()
    assert list(plan.hosts) == ["client", "lb", "server1", "server2"]
    assert plan.servers == ["server1", "server2"]
    assert plan.vip == "198.18.67.1"
    assert plan.hosts["client"].interfaces == {"eth0": "198.18.65.10/24"}
    assert plan.hosts["server2"].data_address == "198.18.66.11"
    assert plan.hosts["lb"].netns == "eblq-lb"
    with pytest.raises(UsageError):
        Lab(state_dir=Path("/nonexistent/x"), base="10.0.0.0")


def test_missing_packages_message(monkeypatch):
    monkeypatch.setattr(prereqs, "missing_packages", lambda: ["nftables", "python3-bpfcc"])
    with pytest.raises(UsageError) as info:
        prereqs.check_packages()
    assert str(info.value) == (
        "missing Debian packages: nftables python3-bpfcc; "
        "fix: apt-get install nftables python3-bpfcc"
    )


def test_missing_packages_asks_dpkg():
    require(os.path.exists("/usr/bin/dpkg-query"), "needs dpkg")
    assert prereqs.missing_packages(("iproute2", "ebpfdiag-no-such-package")) == [
        "ebpfdiag-no-such-package"
    ]


def test_link_headers_only_when_asked(tmp_path, monkeypatch):
    build, common = (
        tmp_path / "linux-headers-6.1.0-9-amd64",
        tmp_path / "linux-headers-6.1.0-9-common",
    )
    build.mkdir()
    common.mkdir()
    monkeypatch.setattr(prereqs, "HEADERS_ROOT", tmp_path)
    monkeypatch.setattr(prereqs, "modules_dir", lambda: tmp_path / "modules" / "6.18.0")
    messages, made = prereqs.ensure_headers(link=False)
    assert made == {} and "--link-headers" in messages[0]
    messages, made = prereqs.ensure_headers(link=True)
    assert (tmp_path / "modules/6.18.0/build").resolve() == build
    assert (tmp_path / "modules/6.18.0/source").resolve() == common
    assert prereqs.remove_headers(made)
    assert not (tmp_path / "modules/6.18.0").exists()


def test_scenario_list_is_data():
    result = CliRunner().invoke(_lab_cli(), ["scenario", "--list", "--json"])
    assert result.exit_code == 0
    listed = {s["name"]: s for s in json.loads(result.output)}
    assert set(listed) >= {"healthy", "rst-no-listener", "rst-abort", "rst-lb-reject"}
    assert listed["rst-no-listener"]["expected"]["reason"] == "NO_SOCKET"
    assert listed["rst-lb-reject"]["expected"] == {
        "host": "lb",
        "kind": "firewall",
        "reason": None,
        "state": None,
    }
    assert len({s["port"] for s in listed.values()}) == len(listed)


def _lab_cli():
    from ebpfdiag.cli.lab import lab

    return lab


# -- the real lab --------------------------------------------------------------------------


@pytest.mark.root
def test_hosts_reachable_with_ssh_and_sudo(lab):
    assert set(lab.hosts) == {"client", "lb", "server"}
    for name, host in lab.hosts.items():
        result = ssh(lab, name, "sudo -n id -u; stat -L -c %i /proc/self/ns/net")
        assert result.returncode == 0, (name, result.stderr)
        uid, inode = result.stdout.split()
        assert uid == "0"
        # The session really runs inside the host's own namespace.
        assert int(inode) == os.stat(f"/run/netns/{host.netns}").st_ino


@pytest.mark.root
def test_inventory_is_ready_and_marked(lab, inventory_path):
    assert inventory_path.read_text().splitlines()[0] == INVENTORY_MARKER
    inventory = load_inventory(str(inventory_path))
    hosts = inventory.hosts
    assert set(hosts) == {"client", "lb", "server"}
    assert hosts["lb"].labels["role"] == "lb"
    assert hosts["server"].groups == ("lab", "servers")
    assert hosts["client"].known_hosts == lab.known_hosts
    assert hosts["client"].address == lab.hosts["client"].mgmt_address


@pytest.mark.root
def test_refuses_foreign_inventory(lab_obj, tmp_path):
    foreign = tmp_path / "inventory.yaml"
    foreign.write_text("hosts: {}\n")
    other = Lab(state_dir=STATE_DIR, inventory_out=foreign)
    with pytest.raises(UsageError, match="not written by the lab"):
        other.up()
    assert foreign.read_text() == "hosts: {}\n"


@pytest.mark.root
def test_client_reaches_server_through_vip_with_nat_on_lb(lab):
    result = run_scenario("healthy", lab)
    assert result.error is None and result.received == "ok hello\n"
    assert (result.server_host, result.server_port) == ("server", 8080)
    accepted = [e for e in result.server_events if e["event"] == "accepted"][0]
    # DNAT on lb sent it to the server; masquerade made lb's server-side address the peer.
    assert accepted["local"] == [lab.hosts["server"].data_address, 8080]
    assert accepted["peer"][0] == lab.hosts["lb"].interfaces["br-servers"].split("/")[0]
    assert result.client_address == lab.hosts["client"].data_address


@pytest.mark.root
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_reproduces_what_the_client_sees(lab, name):
    spec = SCENARIOS[name]
    result = run_scenario(name, lab)
    assert (result.error, result.phase) == (spec.client_error, spec.client_phase)
    assert result.reproduced
    assert result.elapsed_ms < 1000  # a reset arrives at once; a timeout would take 3 s
    assert result.vip_port == spec.port
    if spec.client_error:
        assert result.errno is not None and result.received == ""
    # Server-side helpers are gone: only sshd is left in the server namespace.
    pids = netns.netns_pids(lab.hosts["server"].netns)
    assert all("sshd" in " ".join(netns.pid_cmdline(p)) for p in pids), pids


@pytest.mark.root
def test_status_and_second_up(lab_obj, lab):
    before = {h["name"]: h["sshd_pid"] for h in lab_obj.status()["hosts"]}
    assert all(before.values())
    again = Lab(state_dir=STATE_DIR).up()
    assert again.to_dict() == lab.to_dict()
    status = lab_obj.status()
    assert {h["name"]: h["sshd_pid"] for h in status["hosts"]} == before
    assert "reject with tcp reset" in status["lb_rules"]
    assert "dnat to" in status["lb_rules"] and "masquerade" in status["lb_rules"]
    cli = CliRunner().invoke(_lab_cli(), ["--state-dir", str(STATE_DIR), "status", "--json"])
    assert cli.exit_code == 0 and json.loads(cli.output)["up"] is True


@pytest.mark.root
def test_several_servers_share_the_vip(tmp_path):
    require_lab_tools()
    state_dir = Path("/run/ebpfdiag/lab-test-multi")
    multi = Lab(state_dir=state_dir, prefix="eblm", base="198.18.72.0", servers=2,
                inventory_out=tmp_path / "inv.yaml")  # fmt: skip
    try:
        state = multi.up()
        assert state.servers == ["server1", "server2"]
        hit = {run_scenario("healthy", state).server_host for _ in range(4)}
        assert hit == {"server1", "server2"}  # numgen inc alternates
        assert run_scenario("rst-abort", state).error == "ECONNRESET"
    finally:
        multi.down()
    assert leftovers("eblm", state_dir) == []


@pytest.mark.root
def test_down_twice_leaves_nothing(tmp_path):
    require_lab_tools()
    state_dir = Path("/run/ebpfdiag/lab-test-down")
    inventory = tmp_path / "inv.yaml"
    the_lab = Lab(state_dir=state_dir, prefix="ebld", base="198.18.76.0", inventory_out=inventory)
    state = the_lab.up()
    assert netns.netns_exists(state.hosts["lb"].netns) and inventory.exists()
    assert the_lab.down()
    assert Lab(state_dir=state_dir).down() == []
    assert leftovers("ebld", state_dir) == []
    assert not inventory.exists()
    assert lab_user_gone_unless_shared()


@pytest.mark.root
def test_down_after_killed_up(tmp_path):
    require_lab_tools()
    state_dir = Path("/run/ebpfdiag/lab-test-crash")
    code = (
        "from pathlib import Path; from ebpfdiag.lab.topology import Lab; "
        f"Lab(state_dir=Path('{state_dir}'), prefix='eblk', base='198.18.80.0', "
        f"inventory_out=Path('{tmp_path / 'inv.yaml'}')).up()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 20
    while not any(n.startswith("eblk-") for n in netns.netns_list()):
        assert proc.poll() is None and time.monotonic() < deadline, "lab up never started"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    Lab(state_dir=state_dir).down()
    assert leftovers("eblk", state_dir) == []
    assert lab_user_gone_unless_shared()
