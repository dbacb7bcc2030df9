"""Clock estimation from SSH pings and tightening by packet causality (synthetic data)."""

import random

import pytest

from ebpfdiag.clock import (
    ERROR_FLOOR_NS,
    ClockEstimate,
    ClockSample,
    Observation,
    estimate,
    tighten,
)

MS = 1_000_000
US = 1_000


def test_estimate_uses_the_tightest_round_trip():
    samples = [
        ClockSample(t_send_ns=1_000 * MS, host_mono_ns=50 * MS, t_recv_ns=1_008 * MS),
        ClockSample(
            t_send_ns=2_000 * MS, host_mono_ns=1_050 * MS + 500 * US, t_recv_ns=2_001 * MS
        ),  # fmt: skip
        ClockSample(t_send_ns=3_000 * MS, host_mono_ns=2_052 * MS, t_recv_ns=3_004 * MS),
    ]
    est = estimate(samples)
    # midpoint of the 1 ms round trip (2000.5 ms) minus the host's reading (1050.5 ms)
    assert est.offset_ns == 950 * MS
    assert est.error_ns == 500 * US + ERROR_FLOOR_NS
    assert est.align(1_050 * MS + 500 * US) == 2_000 * MS + 500 * US


def test_estimate_rejects_empty_and_impossible_samples():
    with pytest.raises(ValueError):
        estimate([])
    with pytest.raises(ValueError):
        estimate([ClockSample(t_send_ns=10, host_mono_ns=5, t_recv_ns=9)])


def _world(seed: int, ssh_error_ns: dict[str, int]):
    """Hosts with true offsets, SSH estimates off by less than their error, and packets
    exchanged both ways between client<->lb and lb<->server with 20-80 us latency."""
    rng = random.Random(seed)
    true = {h: rng.randrange(-(10**12), 10**12) for h in ssh_error_ns}
    ssh = {
        h: ClockEstimate(true[h] + rng.randrange(-err + 1, err), err)
        for h, err in ssh_error_ns.items()
    }
    observations = []
    for src, dst in [("client", "lb"), ("lb", "client"), ("lb", "server"), ("server", "lb")]:
        for _ in range(20):
            real = rng.randrange(10**18, 2 * 10**18)
            latency = rng.randrange(20 * US, 80 * US)
            observations.append(Observation(src, real - true[src], dst, real + latency - true[dst]))
    return true, ssh, observations


@pytest.mark.parametrize("seed", range(8))
def test_tighten_narrows_bounds_and_keeps_the_truth(seed):
    true, ssh, observations = _world(seed, {"client": 2 * MS, "lb": 3 * MS, "server": 5 * MS})
    tight = tighten(ssh, observations)
    assert tight.consistent
    for host, est in tight.items():
        assert est.error_ns <= ssh[host].error_ns
        assert est.low <= true[host] <= est.high
    assert sum(e.error_ns for e in tight.values()) < sum(e.error_ns for e in ssh.values())
    # relative offsets are pinned down to the two-way latency, far below the SSH error
    for a, b in [("client", "lb"), ("lb", "server")]:
        err = (tight[b].offset_ns - tight[a].offset_ns) - (true[b] - true[a])
        assert abs(err) < 160 * US
    # the tightened midpoints never show a packet arriving before it left
    for obs in observations:
        assert tight[obs.dst].align(obs.dst_mono_ns) >= tight[obs.src].align(obs.src_mono_ns)


def test_tighten_rescues_a_fuzzy_host_through_a_precise_neighbour():
    true, ssh, observations = _world(42, {"client": 300 * US, "lb": 400 * US, "server": 20 * MS})
    assert tighten(ssh, []).flagged == ["server"]
    tight = tighten(ssh, observations)
    assert tight.flagged == []
    assert tight["server"].error_ns < 1 * MS
    assert tight["server"].low <= true["server"] <= tight["server"].high


def test_tighten_reports_contradictions_and_keeps_ssh_estimates():
    ssh = {"a": ClockEstimate(0, 50 * US), "b": ClockEstimate(0, 50 * US)}
    # a packet leaves a at 10 ms (a's clock) and arrives at b at 1 ms (b's clock): with
    # offsets within 50 us of each other, it arrived 9 ms before it was sent
    observations = [Observation("a", 10 * MS, "b", 1 * MS)]
    tight = tighten(ssh, observations)
    assert not tight.consistent
    assert tight.conflicts == [("a", "b")]
    assert dict(tight) == ssh


def test_tighten_detects_a_causality_cycle():
    ssh = {"a": ClockEstimate(0, 5 * MS), "b": ClockEstimate(0, 5 * MS)}
    # each direction alone fits the SSH bounds; together they need b - a >= 3 ms and <= -3 ms
    observations = [Observation("a", 3 * MS, "b", 0), Observation("b", 3 * MS, "a", 0)]
    tight = tighten(ssh, observations)
    assert not tight.consistent
    assert dict(tight) == ssh


def test_tighten_ignores_hosts_without_an_estimate():
    ssh = {"a": ClockEstimate(1_000, 2 * MS)}
    tight = tighten(ssh, [Observation("a", 0, "ghost", 0), Observation("a", 5, "a", 0)])
    assert tight.consistent
    assert dict(tight) == {"a": ClockEstimate(1_000, 2 * MS)}
