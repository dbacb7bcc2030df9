"""``ebpfdiag trace drop`` end to end in the lab: real sshd, real BPF, real nftables.

Each drop scenario, traced with ``--port`` on client, lb and server through the CLI, gives
its drops on the host and with the reason the scenario expects (``DROP_EXPECTED``); a SYN
the LB's firewall drops is joined to its sightings on the client and on the LB's way in
(the other hosts' packet history, asked for with ``ctl drops`` at the stop); a full accept
queue shows as the server's netstat counters and the client's SYN retransmissions,
verdict "counted"; healthy traffic gives no drop; nothing stays attached afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ebpfdiag.lab.scenarios import (
    DROP_EXPECTED,
    SCENARIOS,
    _read_until_listening,
    _run_client,
    _start_server,
    _stop,
    run_scenario,
)
from tests.conftest import running_lab
from tests.test_trace_lab import assert_clean

pytestmark = pytest.mark.root

PREFIX, BASE = "ebdx", "198.18.160.0"
STATE_DIR = Path("/run/ebpfdiag/lab-drop-cli-test")
HOSTS = "client,lb,server"
SYN = 0x02


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    yield from running_lab(
        tmp_path_factory,
        "drop-cli",
        ("ip", "nft", "tc", "bpftool", "/usr/sbin/sshd"),
        state_dir=STATE_DIR,
        prefix=PREFIX,
        base=BASE,
    )


def start(lab, name: str, *extra: str) -> tuple[subprocess.Popen, list[dict]]:
    """``trace drop --json`` on the three hosts filtered on scenario ``name``'s port,
    returned once every host traces."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ebpfdiag", "trace", "drop", "-i", lab.inventory,
         "--hosts", HOSTS, "--port", str(SCENARIOS[name].port), "--json", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    records = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            raise AssertionError(f"trace drop never became ready: {proc.stderr.read()}")
        records.append(json.loads(line))
        if records[-1]["type"] == "status" and records[-1]["state"] == "tracing":
            assert sorted(records[-1]["hosts"]) == sorted(HOSTS.split(",")), records[-1]
            return proc, records
    raise AssertionError("trace drop never became ready")


def stop(proc: subprocess.Popen, records: list[dict]) -> list[dict]:
    """Stopped as by Ctrl-C (SIGINT) a moment after the traffic, and checked whole."""
    time.sleep(1.5)  # the hosts' periodic counts, and the last events, reach the controller
    proc.send_signal(2)
    out, err = proc.communicate(timeout=60)
    records += [json.loads(line) for line in out.splitlines()]
    assert proc.returncode in (0, 130), err
    hosts = {r["host"]: r for r in records if r["type"] == "host"}
    assert set(hosts) == set(HOSTS.split(","))
    assert all(h["ready"] and h["lost"] == 0 for h in hosts.values()), hosts
    return records


def trace_drop(lab, name: str, *extra: str) -> list[dict]:
    """``trace drop`` while scenario ``name`` runs (its teardown included)."""
    proc, records = start(lab, name, *extra)
    result = run_scenario(name, lab)
    assert result.reproduced, result.summary()
    return stop(proc, records)


def of(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["type"] == kind]


@pytest.mark.parametrize("name", sorted(DROP_EXPECTED))
def test_drops_are_put_on_the_right_host_with_the_right_reason(lab, name):
    expected = DROP_EXPECTED[name]
    records = trace_drop(lab, name)
    summary = records[-1]
    assert summary["type"] == "summary"
    drops = of(records, "drop")
    if expected.reason:
        assert drops, records
        assert {(d["host"], d["reason"]) for d in drops} == {(expected.host, expected.reason)}
        assert summary["verdict"] == "dropped"
        counted = [c for c in of(records, "drop_count") if c["matched"]]
        assert {(c["host"], c["reason"]) for c in counted} == {(expected.host, expected.reason)}
    else:  # no packet freed with a reason for the SYNs (the teardown's are other packets)
        assert [d for d in drops if d["flags"] == SYN] == []
    netstat = {n["host"]: n for n in of(records, "netstat")}
    for counter in expected.counters:
        assert netstat[expected.host]["delta"][counter] > 0, netstat[expected.host]
    assert_clean(lab)


def test_firewall_drop_is_joined_to_the_syn_leaving_client_and_entering_lb(lab):
    records = trace_drop(lab, "drop-lb-firewall")
    drops = of(records, "drop")
    assert drops and all(d["flags"] == SYN for d in drops)
    history = [
        e for e in of(records, "event") if e["kind"] == "packet" and e.get("why") == "history"
    ]
    assert {e["host"] for e in history} >= {"client", "lb"}, history
    joined = [d for d in drops if len(d["path"]) >= 3]
    assert joined, [d["text"] for d in drops]
    for d in joined:
        steps = [(h["host"], h["dir"]) for h in d["path"]]
        assert steps[0] == ("client", "egress") and steps[-1] == ("lb", "drop"), steps
        assert ("lb", "ingress") in steps
        assert d["path"][-1]["ifname"] == "to-client"
        assert "left client" in d["text"] and "entered lb to-client" in d["text"], d["text"]
        assert "dropped on lb by NETFILTER_DROP" in d["text"], d["text"]
        assert d["since_first_ns"] is not None and d["since_first_ns"] >= 0
    assert_clean(lab)


def test_full_accept_queue_is_counted_with_the_clients_syn_retransmissions(lab):
    """The scenario's traffic alone: the trace stops before the server helper does, since
    closing its listener purges the connection waiting in the queue (QUEUE_PURGE on server,
    the reset that follows dropped on client) - real drops, but not the overflow's."""
    spec = SCENARIOS["drop-server-backlog"]
    proc, records = start(lab, spec.name)
    server = _start_server(lab.hosts["server"].netns, spec)
    try:
        _read_until_listening("server", server)
        seen = _run_client(lab, spec, 3.0, ["--many", "5"])
        assert seen["error"] == spec.client_error, seen
        records = stop(proc, records)
    finally:
        _stop(server)
    summary = records[-1]
    assert summary["verdict"] == "counted", summary
    netstat = {n["host"]: n for n in of(records, "netstat")}
    assert netstat["server"]["delta"]["ListenOverflows"] > 0
    assert "ListenOverflows" in netstat["server"]["kernel_drops"]
    assert netstat["client"]["retrans"]["syn"] > 0, netstat["client"]
    retrans = [e for e in of(records, "event") if e["kind"] == "retrans"]
    assert any(e["host"] == "client" and e["state"] == "TCP_SYN_SENT" for e in retrans)
    assert_clean(lab)


def test_a_server_closing_first_gives_no_drop(lab):
    """The server answers and closes before the client's FIN arrives. When the client
    closes at once, the kernel purges that FIN unread when it destroys the socket
    (QUEUE_PURGE); when the client closes later than its delayed ACK of the server's FIN,
    the server's socket is a time-wait socket by then, which handles the FIN and frees it
    as NOT_SPECIFIED. Either way it was delivered, so it is no drop, and no history is
    dumped for it."""
    spec = dataclasses.replace(SCENARIOS["healthy"], server_mode="close")
    proc, records = start(lab, spec.name)
    server = _start_server(lab.hosts["server"].netns, spec)
    try:
        _read_until_listening("server", server)
        for delay in (0, 0, 0, 300, 300):
            seen = _run_client(lab, spec, 3.0, ["--close-delay-ms", str(delay)])
            assert seen["error"] is None and seen["received"].startswith("ok "), seen
        records = stop(proc, records)
    finally:
        closed = [e for e in _stop(server) if e.get("event") == "closed"]
    assert len(closed) == 5, closed
    assert of(records, "drop") == []
    assert all(c["matched"] == 0 for c in of(records, "drop_count")), of(records, "drop_count")
    assert [e for e in of(records, "event") if e["kind"] == "packet"] == []
    assert_clean(lab)


def test_healthy_traffic_gives_no_drop_and_no_history(lab):
    records = trace_drop(lab, "healthy")
    assert of(records, "drop") == []
    assert all(c["matched"] == 0 for c in of(records, "drop_count"))
    assert records[-1]["verdict"] == "none", records[-1]
    events = of(records, "event")
    assert [e for e in events if e["kind"] == "packet"] == []  # nothing asked for history
    assert_clean(lab)
