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
from ebpfdiag.lab.scenarios import (
    DROP_EXPECTED,
    RULE_COMMENT,
    SCENARIOS,
    parse_conntrack,
    run_scenario,
)
from ebpfdiag.lab.topology import INVENTORY_MARKER, LAB_USER, NFT_TABLE, Lab
from tests.conftest import require, require_root_tools

# Own prefixes, networks and state dirs: the tests never touch a developer's lab.
PREFIX, BASE = "eblt", "198.18.64.0"
STATE_DIR = Path("/run/ebpfdiag/lab-test")
MULTI_PREFIX, MULTI_BASE = "eblm", "198.18.72.0"
MULTI_STATE_DIR = Path("/run/ebpfdiag/lab-test-multi")
# Drop scenarios time out or hold connections on purpose: tests/test_drop_script.py has them.
ONE_SERVER = sorted(
    name for name, s in SCENARIOS.items() if s.min_servers == 1 and name not in DROP_EXPECTED
)


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


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """A lab with two servers behind the VIP."""
    require_lab_tools()
    inventory = tmp_path_factory.mktemp("multi") / "inv.yaml"
    the_lab = Lab(state_dir=MULTI_STATE_DIR, prefix=MULTI_PREFIX, base=MULTI_BASE, servers=2,
                  inventory_out=inventory)  # fmt: skip
    the_lab.down()
    try:
        yield the_lab.up()
    finally:
        the_lab.down()
    assert leftovers(MULTI_PREFIX, MULTI_STATE_DIR) == []


def ns_out(lab, host: str, *argv: str) -> str:
    return netns.run(netns.ns_exec_argv(lab.hosts[host].netns, list(argv)))


def out_rsts(lab, host: str) -> int:
    """The host's TCP OutRsts counter (per network namespace)."""
    lines = [line.split() for line in ns_out(lab, host, "cat", "/proc/net/snmp").splitlines()]
    names, values = [f for f in lines if f[0] == "Tcp:"][:2]
    return int(values[names.index("OutRsts")])


def lb_rules(lab) -> str:
    return ns_out(lab, "lb", "nft", "list", "table", "ip", NFT_TABLE)


def listeners(lab, host: str) -> str:
    return ns_out(lab, host, "ss", "-Htln")


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
    assert set(listed) >= {"healthy", "rst-no-listener", "rst-abort", "rst-lb-reject",
                           "rst-lb-failover", "rst-no-listener-portmap"}  # fmt: skip
    assert listed["rst-lb-failover"]["min_servers"] == 2
    assert listed["rst-lb-failover"]["moves"] == {"host": "lb", "from": "server1", "to": "server2"}
    assert listed["rst-lb-failover"]["expected"]["state"] == "TCP_LISTEN"
    portmap = listed["rst-no-listener-portmap"]
    assert (portmap["port"], portmap["backend_port"], portmap["masquerade"]) == (
        8085,
        9085,
        "fully-random",
    )
    assert all(listed[n]["backend_port"] is None for n in ("healthy", "rst-no-listener"))
    assert "maps VIP port 8085 to server port 9085" in portmap["summary"]  # what --list shows
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


def test_parse_conntrack_line():
    line = (
        "tcp      6 120 SYN_SENT src=198.18.1.10 dst=198.18.3.1 sport=40000 dport=8085 "
        "[UNREPLIED] src=198.18.2.10 dst=198.18.2.1 sport=9085 dport=31337"
    )
    assert parse_conntrack(line) == {
        "state": "SYN_SENT",
        "original": {"src": "198.18.1.10", "dst": "198.18.3.1", "sport": 40000, "dport": 8085},
        "reply": {"src": "198.18.2.10", "dst": "198.18.2.1", "sport": 9085, "dport": 31337},
    }


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
@pytest.mark.parametrize("name", ONE_SERVER)
def test_scenario_reproduces_what_the_client_sees(lab, name):
    spec = SCENARIOS[name]
    result = run_scenario(name, lab)
    assert (result.error, result.phase) == (spec.client_error, spec.client_phase)
    assert result.reproduced
    assert result.elapsed_ms < 1000  # a reset arrives at once; a timeout would take 3 s
    assert result.vip_port == spec.port
    if spec.client_error:
        assert result.errno is not None and result.received == ""
    if spec.forwarded:  # the LB's NAT of this flow, from its conntrack events
        assert [e["original"]["dport"] for e in result.lb_conntrack] == [spec.port]
        assert result.lb_conntrack[0]["reply"]["sport"] == spec.server_port
        assert (result.server_host, result.server_port) == ("server", spec.server_port)
    else:
        assert result.lb_conntrack == []
    # Server-side helpers are gone: only sshd is left in the server namespace.
    pids = netns.netns_pids(lab.hosts["server"].netns)
    assert pids and all("sshd" in " ".join(netns.pid_cmdline(p)) for p in pids), pids


@pytest.mark.root
@pytest.mark.parametrize("name", ["healthy", "rst-no-listener", "rst-abort"])
def test_existing_scenarios_keep_their_ports_through_the_lb(lab, name):
    """Only the portmap scenario rewrites ports: the others keep VIP port and client port."""
    result = run_scenario(name, lab)
    [entry] = result.lb_conntrack
    assert entry["reply"] == {
        "src": lab.hosts["server"].data_address,
        "dst": lab.hosts["lb"].interfaces["br-servers"].split("/")[0],
        "sport": SCENARIOS[name].port,
        "dport": result.client_port,
    }


@pytest.mark.root
def test_portmap_rewrites_both_ports(lab):
    spec = SCENARIOS["rst-no-listener-portmap"]
    before = out_rsts(lab, "server")
    for _ in range(2):
        result = run_scenario(spec.name, lab)
        assert (result.error, result.phase) == ("ECONNREFUSED", "connect") and result.reproduced
        [entry] = result.lb_conntrack
        assert entry["original"] == {"src": result.client_address, "dst": lab.vip,
                                     "sport": result.client_port, "dport": 8085}  # fmt: skip
        # DNAT rewrote the destination port; masquerade fully-random the source port.
        assert entry["reply"]["src"] == lab.hosts["server"].data_address
        assert entry["reply"]["sport"] == 9085
        assert entry["reply"]["dport"] != result.client_port
    # The server's own stack answered each SYN (to port 9085, where nothing listens).
    assert out_rsts(lab, "server") - before == 2
    assert (result.server_host, result.server_port) == ("server", 9085)


@pytest.mark.root
def test_failover_needs_two_servers(lab):
    with pytest.raises(UsageError, match="needs a lab with 2 servers, this one has 1"):
        run_scenario("rst-lb-failover", lab)
    proc = subprocess.run(
        [sys.executable, "-m", "ebpfdiag", "lab", "--state-dir", str(STATE_DIR), "scenario",
         "rst-lb-failover"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--servers 2" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.root
def test_failover_moves_the_flow_to_the_second_server(multi):
    spec = SCENARIOS["rst-lb-failover"]
    server1, server2 = (multi.hosts[n].data_address for n in ("server1", "server2"))
    rules_before = lb_rules(multi)
    resets_before = {h: out_rsts(multi, h) for h in ("server1", "server2", "lb")}
    result = run_scenario(spec.name, multi)
    assert (result.error, result.phase) == ("ECONNRESET", "recv") and result.reproduced
    assert result.elapsed_ms < 1000
    assert result.received == "ok hello\n"  # data went both ways before the failover
    assert (result.server_host, result.server_address) == ("server1", server1)
    accepted = [e for e in result.server_events if e["event"] == "accepted"]
    assert [e["host"] for e in accepted] == ["server1"]
    # lb's conntrack: the flow was NATed to server1, then (after the delete) to server2.
    assert [e["original"]["sport"] for e in result.lb_conntrack] == [result.client_port] * 2
    assert [e["reply"]["src"] for e in result.lb_conntrack] == [server1, server2]
    assert [e["state"] for e in result.lb_conntrack] == ["SYN_SENT", "ESTABLISHED"]
    assert result.moved == {"host": "lb", "from": "server1", "to": "server2"}
    # server2's stack sent the one reset; server1 (closed in repair mode) and lb sent none.
    resets = {h: out_rsts(multi, h) - n for h, n in resets_before.items()}
    assert resets == {"server1": 0, "server2": 1, "lb": 0}
    # The scenario's pinning rules are gone, the lab's rules are as before.
    assert RULE_COMMENT not in lb_rules(multi)
    assert lb_rules(multi) == rules_before
    assert all(f":{spec.port} " not in listeners(multi, h) for h in multi.servers)


@pytest.mark.root
def test_failover_removes_rules_a_killed_run_left(multi):
    lb = multi.hosts["lb"].netns
    netns.run(netns.ns_exec_argv(lb, ["nft", "insert", "rule", "ip", NFT_TABLE, "prerouting",
              "ip", "daddr", multi.vip, "tcp", "dport", "8084", "dnat", "to",
              multi.hosts["server2"].data_address, "comment", f'"{RULE_COMMENT}"']))  # fmt: skip
    assert run_scenario("rst-lb-failover", multi).moved == {
        "host": "lb",
        "from": "server1",
        "to": "server2",
    }
    assert RULE_COMMENT not in lb_rules(multi)


@pytest.mark.root
def test_status_and_second_up(lab_obj, lab):
    before = {h["name"]: h["sshd_pid"] for h in lab_obj.status()["hosts"]}
    assert set(before) == {"client", "lb", "server"} and all(before.values())
    again = Lab(state_dir=STATE_DIR).up()
    assert again.to_dict() == lab.to_dict()
    status = lab_obj.status()
    assert {h["name"]: h["sshd_pid"] for h in status["hosts"]} == before
    assert "reject with tcp reset" in status["lb_rules"]
    assert "dnat to" in status["lb_rules"] and "masquerade" in status["lb_rules"]
    cli = CliRunner().invoke(_lab_cli(), ["--state-dir", str(STATE_DIR), "status", "--json"])
    assert cli.exit_code == 0 and json.loads(cli.output)["up"] is True


@pytest.mark.root
def test_several_servers_share_the_vip(multi):
    assert multi.servers == ["server1", "server2"]
    hit = {run_scenario("healthy", multi).server_host for _ in range(4)}
    assert hit == {"server1", "server2"}  # numgen inc alternates
    assert run_scenario("rst-abort", multi).error == "ECONNRESET"
    # Port rewrite with round robin: each server in turn, always on the backend port.
    hit = [run_scenario("rst-no-listener-portmap", multi) for _ in range(2)]
    assert {(r.server_host, r.server_port) for r in hit} == {("server1", 9085), ("server2", 9085)}


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
