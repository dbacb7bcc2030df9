"""DNAT port rewrites read from ``nft -j list ruleset`` (scripts/bpf/core/natports.py).

The fixtures are real nft 1.0.6 output: ``lab-lb.json`` / ``lab-server.json`` from the
lab's lb and server (``ebpfdiag lab``), ``edge-maps.json`` from ``edge-maps.nft`` loaded
in a scratch network namespace (sets, named sets, maps, redirect, rules to leave out).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.bpfstate import load_core

natports = load_core("natports")
FIXTURES = Path(__file__).parent / "fixtures" / "nft"


def ruleset(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def test_lab_lb_maps_the_vip_port_to_the_backend_port():
    # Only 8085 is rewritten; the shared rule (a set, no port) and masquerade are not.
    assert natports.nat_ports_from_ruleset(ruleset("lab-lb.json")) == [[8085, 9085]]


def test_a_host_without_rules_has_no_mappings():
    assert natports.nat_ports_from_ruleset(ruleset("lab-server.json")) == []


def test_sets_named_sets_maps_and_redirect():
    assert natports.nat_ports_from_ruleset(ruleset("edge-maps.json")) == [
        [8090, 9090],  # anonymous set, one target port
        [8091, 9090],
        [8092, 9092],  # map tcp dport -> addr . port
        [8093, 9093],
        [8095, 9095],  # redirect to :9095
        [8098, 9098],  # map tcp dport -> port
        [8099, 9099],
        [8100, 9100],  # @webports
        [8101, 9100],
    ]  # not: 8094 (no port), 8096 (udp), 8097 (same port)


@pytest.mark.parametrize(
    "doc",
    [None, [], {}, {"nftables": None}, {"nftables": [{"rule": {"expr": "x"}}, 3, "s"]}],
)
def test_unreadable_documents_give_no_mappings(doc):
    assert natports.nat_ports_from_ruleset(doc) == []


def test_a_dport_match_without_a_port_rewrite_adds_nothing():
    rule = {
        "family": "ip",
        "table": "t",
        "expr": [
            {"match": {"op": "!=", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                       "right": 80}},
            {"dnat": {"addr": "198.18.0.1", "port": 8080}},
        ],
    }  # fmt: skip
    assert natports.nat_ports_from_ruleset({"nftables": [{"rule": rule}]}) == []


def test_discovery_without_nft_is_empty(monkeypatch):
    monkeypatch.setattr(natports, "NFT_PATHS", ("/nonexistent/nft",))
    assert natports.discover_nat_ports() == []


def test_discovery_with_a_failing_nft_is_empty(tmp_path, monkeypatch):
    fake = tmp_path / "nft"
    fake.write_text("#!/bin/sh\necho 'not json'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(natports, "NFT_PATHS", (str(fake),))
    assert natports.discover_nat_ports() == []
    fake.write_text("#!/bin/sh\nexit 1\n")
    assert natports.discover_nat_ports() == []


def test_discovery_reads_nft(tmp_path, monkeypatch):
    fake = tmp_path / "nft"
    fake.write_text(
        f"#!/bin/sh\n[ \"$*\" = '-j list ruleset' ] && cat {FIXTURES / 'lab-lb.json'}\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(natports, "NFT_PATHS", (str(fake),))
    assert natports.discover_nat_ports() == [[8085, 9085]]


@pytest.mark.root
def test_discovery_on_real_nftables():
    """The lab's own rule, loaded into a scratch network namespace, read back by nft."""
    from tests.conftest import require_root_tools

    require_root_tools("nft", "unshare")
    rules = (
        "table ip t {\n chain p {\n  type nat hook prerouting priority dstnat; policy accept;\n"
        "  tcp dport 8085 dnat to 198.18.90.10 : 9085\n }\n}\n"
    )
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import subprocess;"
        "subprocess.run(['nft', '-f', '-'], input=sys.argv[2].encode(), check=True);"
        "from core.natports import discover_nat_ports; print(discover_nat_ports())"
    )
    core_dir = str(Path(natports.__file__).resolve().parents[1])
    out = subprocess.run(
        ["unshare", "-n", "/usr/bin/python3", "-c", script, core_dir, rules],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        env={**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    ).stdout
    assert out.strip() == "[[8085, 9085]]"


# ------------------------------------------------------------------ the controller's side


class Channels:
    """The fan-out's control lines, recorded (every host is running)."""

    def __init__(self, refuse: tuple[str, ...] = ()):
        self.sent: list[tuple[str, str]] = []
        self.refuse = refuse

    def control(self, host: str, text: str) -> bool:
        self.sent.append((host, text))
        return host not in self.refuse

    def stop(self) -> None:
        pass


def feed(session, host: str, *records: dict) -> None:
    session.lines(host, "stdout", [json.dumps(r).encode() for r in records])


def hello(ports: list[int], nat_ports: list) -> dict:
    return {"type": "hello", "filter": {"ports": ports, "addrs": []}, "nat_ports": nat_ports}


def started(ports: list[int], lb_nat: list, refuse: tuple[str, ...] = ()):
    from ebpfdiag.tracing import TraceSession

    shown: list[tuple] = []
    session = TraceSession(["client", "lb", "server"], on_ready=lambda r, f: shown.append((r, f)))
    session.fanout = Channels(refuse)
    for host in ("client", "lb", "server"):
        feed(session, host, hello(ports, lb_nat if host == "lb" else []), {"type": "ready"})
    return session, shown


def filter_rec(ports: list[int]) -> dict:
    return {"type": "filter", "ports": ports, "added": [], "why": "nat"}


def test_follow_nat_adds_the_translated_ports_through_chains():
    from ebpfdiag.tracing import follow_nat

    assert follow_nat({8085}, [[[8085, 9085]], []]) == {9085}
    assert follow_nat({80}, [[[80, 8080]], [[8080, 9090], [443, 8443]]]) == {8080, 9090}
    assert follow_nat(set(), [[[8085, 9085]]]) == set()  # no --port: nothing to follow
    assert follow_nat({22}, [[[8085, 9085], "junk", [1]]]) == set()


def test_tracing_waits_until_every_host_confirmed_the_nat_port():
    async def scenario():
        session, shown = started([8085], [[8085, 9085]])
        assert session.fanout.sent == [("client", "port 9085"), ("lb", "port 9085"),
                                       ("server", "port 9085")]  # fmt: skip
        feed(session, "client", filter_rec([8085, 9085]))
        feed(session, "lb", filter_rec([8085, 9085]))
        assert shown == []  # server has not confirmed yet
        feed(session, "server", filter_rec([8085, 9085]))
        assert shown == [(["client", "lb", "server"], [])]
        assert (session.ports, session.unconfirmed) == ([8085, 9085], [])
        session.finish(False)

    asyncio.run(scenario())


def test_a_host_that_does_not_confirm_is_named_after_the_timeout(monkeypatch):
    import ebpfdiag.tracing as tracing

    monkeypatch.setattr(tracing, "CONFIRM_TIMEOUT_S", 0.05)

    async def scenario():
        session, shown = started([8085], [[8085, 9085]], refuse=("client",))
        feed(session, "lb", filter_rec([8085, 9085]))
        feed(session, "server", filter_rec([8085]))  # not the added port: not a confirmation
        assert shown == []
        await asyncio.sleep(0.2)
        assert shown == [(["client", "lb", "server"], [])]
        assert session.unconfirmed == ["client", "server"]
        session.finish(False)

    asyncio.run(scenario())


def test_without_a_nat_mapping_of_a_requested_port_tracing_starts_at_once():
    async def scenario():
        for ports, nat in (([8085], []), ([], [[8085, 9085]]), ([80], [[8085, 9085]])):
            session, shown = started(ports, nat)
            assert session.fanout.sent == [] and len(shown) == 1
            assert session.ports == ports
            session.finish(False)

    asyncio.run(scenario())


def test_control_lines_go_to_a_running_script_only():
    from ebpfdiag.inventory import Host
    from ebpfdiag.transport import RemoteRun, Script, SSHOptions

    class Channel:
        data = b""

        def write(self, data: bytes) -> None:
            self.data += data

    run = RemoteRun(Host(name="lb", address="198.18.0.1"), Script("x.py", b""), SSHOptions(),
                    on_lines=print, on_running=print, on_clock=print)  # fmt: skip
    assert not run.send_control("port 9085")  # not launched
    run.chan = Channel()
    assert not run.send_control("port 9085")  # launched, script not running yet
    run.running = True
    assert run.send_control("port 9085")
    assert not run.send_control("port 1\nping 3")  # one line, never a forged ping
    run.stopped_by_us = True
    assert not run.send_control("port 9086")  # stdin is at EOF once stopped
    assert run.chan.data == b"ctl port 9085\n"
