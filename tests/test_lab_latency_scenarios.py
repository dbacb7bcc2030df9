"""The latency scenarios in the real lab: delay from the server application, loss from lb's
nftables, and a healthy load, each checked from the client's own sockets and TCP counters
(not from what the scenario says about itself), and lb's rules gone afterwards."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ebpfdiag.lab import netns
from ebpfdiag.lab.scenarios import (
    LOSS_CHAIN,
    LOSS_SET,
    NFT_TABLE,
    RULE_COMMENT,
    SCENARIOS,
    LoadScenario,
    run_scenario,
)
from tests.conftest import running_lab

pytestmark = pytest.mark.root

PREFIX, BASE = "eblp", "198.18.140.0"
STATE_DIR = Path("/run/ebpfdiag/lab-eblp-test")  # also test_pcapng's lab (one at a time)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    yield from running_lab(
        tmp_path_factory,
        "latency",
        ("ip", "nft", "nstat", "conntrack", "/usr/sbin/sshd"),
        bcc=False,
        state_dir=STATE_DIR,
        prefix=PREFIX,
        base=BASE,
    )


def ns(lab, host: str, *argv: str) -> str:
    argv_in = netns.ns_exec_argv(lab.hosts[host].netns, list(argv))
    return subprocess.run(argv_in, capture_output=True, text=True, check=True, timeout=30).stdout


def retransmitted(lab) -> dict[str, int]:
    """The client namespace's retransmission counters, as ``nstat`` reads them."""
    out = json.loads(ns(lab, "client", "nstat", "-asz", "--json", "TcpRetransSegs",
                        "TcpExtTCPLossProbes"))["kernel"]  # fmt: skip
    return {"segs": out["TcpRetransSegs"], "probes": out["TcpExtTCPLossProbes"]}


def lb_ruleset(lab) -> str:
    return ns(lab, "lb", "nft", "list", "table", "ip", NFT_TABLE)


def helpers_gone(lab) -> bool:
    pids = netns.netns_pids(lab.hosts["server"].netns)
    return all("sshd" in " ".join(netns.pid_cmdline(p)) for p in pids)


def test_latency_scenarios_are_described_on_their_own_ports():
    specs = [SCENARIOS[n] for n in ("slow-server", "lossy-lb", "healthy-load")]
    assert all(isinstance(s, LoadScenario) for s in specs)
    ports = [s.port for s in SCENARIOS.values()]
    assert len(ports) == len(set(ports))
    assert SCENARIOS["slow-server"].delay_ms >= 10 and SCENARIOS["lossy-lb"].drops >= 1
    assert "tracer finds" in SCENARIOS["lossy-lb"].summary


def test_slow_server_rounds_take_at_least_the_delay(lab):
    spec = SCENARIOS["slow-server"]
    before = retransmitted(lab)
    result = run_scenario("slow-server", lab)
    assert result.reproduced, result.summary()
    assert result.error is None and result.delay_ms == spec.delay_ms
    assert result.exchanges == spec.connections * spec.exchanges
    assert len({c["client_port"] for c in result.connections}) == spec.connections
    rtts = [t for c in result.connections for t in c["rtt_ms"]]
    assert len(rtts) == result.exchanges
    assert min(rtts) >= spec.delay_ms  # measured at the client, around the whole round
    assert result.elapsed_ms >= spec.exchanges * spec.delay_ms
    assert retransmitted(lab) == before  # the delay is the application's, not the network's
    assert result.dropped == [] and helpers_gone(lab)
    accepted = [e for e in result.server_events if e["event"] == "accepted"]
    assert len(accepted) == spec.connections
    assert result.lb_conntrack[0]["reply"]["sport"] == spec.port


def test_lossy_lb_drops_data_once_and_the_client_retransmits(lab):
    spec = SCENARIOS["lossy-lb"]
    before = retransmitted(lab)
    result = run_scenario("lossy-lb", lab)
    after = retransmitted(lab)
    assert result.reproduced, result.summary()
    assert after["segs"] - before["segs"] >= len(result.dropped) >= 1
    assert after["segs"] - before["segs"] == result.retransmissions
    assert result.exchanges == spec.connections * spec.exchanges  # every round got through
    # The set recorded each drop as lb's forward hook saw it: client -> server after DNAT,
    # on one of the client's connections, with a sequence number.
    ports = {c["client_port"] for c in result.connections}
    assert len(result.dropped) == spec.drops
    for drop in result.dropped:
        assert drop["saddr"] == lab.hosts["client"].data_address
        assert drop["daddr"] == lab.hosts["server"].data_address
        assert drop["sport"] in ports and drop["dport"] == spec.server_port
        assert 0 <= drop["seq"] < 2**32
    # A dropped round waited for the retransmission: the slowest round shows it.
    assert max(t for c in result.connections for t in c["rtt_ms"]) >= 5.0
    ruleset = lb_ruleset(lab)
    assert LOSS_CHAIN not in ruleset and LOSS_SET not in ruleset
    assert RULE_COMMENT not in ruleset and helpers_gone(lab)


def test_lossy_lb_rules_are_removed_also_after_a_run_that_left_them(lab):
    spec = SCENARIOS["lossy-lb"]
    leftover = (f"add set ip {NFT_TABLE} {LOSS_SET} {{ typeof ip saddr . tcp sport . ip daddr"
                f" . tcp sequence; size 1; flags dynamic; }}\n"
                f"add chain ip {NFT_TABLE} {LOSS_CHAIN} {{ type filter hook forward "
                f"priority filter; }}\n"
                f"add rule ip {NFT_TABLE} {LOSS_CHAIN} tcp dport {spec.port} drop\n")  # fmt: skip
    subprocess.run(netns.ns_exec_argv(lab.hosts["lb"].netns, ["nft", "-f", "-"]),
                   input=leftover, text=True, check=True)  # fmt: skip
    assert LOSS_CHAIN in lb_ruleset(lab)
    result = run_scenario("lossy-lb", lab)
    assert result.reproduced, result.summary()
    assert LOSS_CHAIN not in lb_ruleset(lab)


def test_healthy_load_completes_every_round_without_retransmission(lab):
    spec = SCENARIOS["healthy-load"]
    before = retransmitted(lab)
    result = run_scenario("healthy-load", lab)
    assert result.reproduced, result.summary()
    assert result.exchanges == spec.connections * spec.exchanges >= 100
    assert all(c["error"] is None and c["exchanges"] == spec.exchanges
               for c in result.connections)  # fmt: skip
    assert retransmitted(lab) == before and result.retransmissions == 0
    assert result.dropped == [] and RULE_COMMENT not in lb_ruleset(lab)
    assert helpers_gone(lab)
