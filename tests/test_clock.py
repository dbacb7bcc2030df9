"""Clock estimation from SSH pings and tightening by packet causality (synthetic data)."""

import json
import random
import time

import pytest

from ebpfdiag.clock import (
    ERROR_FLOOR_NS,
    ClockEstimate,
    ClockSample,
    EpochAnchor,
    HostClock,
    Observation,
    estimate,
    tighten,
)
from ebpfdiag.tracing import TraceSession

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


# ---------------------------------------------------------------- offset over time

S = 1_000_000_000


class _Host:
    """A host whose true offset is ``base + drift * h`` plus ``step`` from ``step_at`` on."""

    def __init__(self, drift: float = 0.0, step_ns: int = 0, step_at: int | None = None):
        self.base = 1_700_000_000 * S
        self.drift = drift
        self.step_ns = step_ns
        self.step_at = step_at

    def offset(self, h: int) -> float:
        off = self.base + self.drift * h
        if self.step_at is not None and h >= self.step_at:
            off += self.step_ns
        return off

    def ping(self, h: int, there_ns: int, back_ns: int) -> ClockSample:
        """The host reads h; the ping took ``there_ns`` to arrive and ``back_ns`` to return."""
        read = round(h + self.offset(h))
        return ClockSample(read - there_ns, h, read + back_ns)


def _assert_within(clock: HostClock, host: _Host, h: int) -> ClockEstimate:
    est = clock.at(h)
    true = host.offset(h)
    assert abs(est.offset_ns - true) <= est.error_ns, (h, est, true)
    return est


def test_drift_of_50_ppm_over_10_minutes_is_aligned_within_its_bounds():
    rng = random.Random(50)
    host = _Host(drift=50e-6)
    clock = HostClock()
    for h in range(10 * S, 610 * S, S):  # one ping a second, asymmetric delays
        clock.add(host.ping(h, rng.randrange(50 * US, 900 * US), rng.randrange(50 * US, 300 * US)))
    for _ in range(2000):
        h = rng.randrange(10 * S, 611 * S)  # includes a second past the last ping
        est = _assert_within(clock, host, h)
        assert est.error_ns < 1 * MS  # the drift (30 ms over the trace) is modelled
    assert len(clock.segments) == 1
    drift = clock.report()["segments"][0]["drift_ppm"]
    assert 49 < drift < 51
    # one constant for the whole trace must cover the 30 ms the offset moved
    summary = clock.summary(10 * S, 610 * S)
    assert summary.error_ns >= 15 * MS
    for h in (10 * S, 300 * S, 610 * S):
        assert abs(summary.offset_ns - host.offset(h)) <= summary.error_ns


def test_a_5_ms_step_starts_a_new_segment_and_each_side_keeps_its_own():
    rng = random.Random(5)
    step_at = 300 * S + 400 * MS
    host = _Host(drift=10e-6, step_ns=5 * MS, step_at=step_at)
    clock = HostClock()
    for h in range(0, 600 * S, S):
        clock.add(host.ping(h, rng.randrange(50 * US, 400 * US), rng.randrange(50 * US, 400 * US)))
    assert len(clock.segments) == 2
    assert clock.segments[1].first_h == 301 * S  # the first ping after the step
    for h in [rng.randrange(0, 300 * S) for _ in range(500)] + [300 * S]:
        est = _assert_within(clock, host, h)
        assert est.error_ns < 1 * MS
    for h in [rng.randrange(301 * S, 601 * S) for _ in range(500)]:
        est = _assert_within(clock, host, h)
        assert est.error_ns < 1 * MS
    for h in range(300 * S + 1, 301 * S, 50 * MS):  # between the pings around the step
        est = _assert_within(clock, host, h)
        assert est.error_ns >= 2 * MS  # either side may hold: the bound says so


@pytest.mark.parametrize("seed", [*range(20), 51, 139])  # 51, 139: step inside the span
def test_bounds_never_under_report_with_random_drift_delays_and_steps(seed):
    rng = random.Random(seed)
    step_at = rng.randrange(60 * S, 240 * S) if seed % 2 else None
    step = rng.choice([-1, 1]) * rng.randrange(5 * MS, 50 * MS)
    host = _Host(drift=rng.uniform(-150e-6, 150e-6), step_ns=step, step_at=step_at)
    clock = HostClock(floor_ns=1)  # no slack: the model alone must hold the truth
    h = rng.randrange(0, 1000 * S)
    start = h
    end = h + 300 * S
    if step_at is not None:
        host.step_at = start + step_at
    while h < end:
        slow = rng.random() < 0.1  # a busy host answers late now and then
        there = rng.randrange(20 * US, 30 * MS if slow else 1 * MS)
        clock.add(host.ping(h, there, rng.randrange(20 * US, 1 * MS)))
        h += rng.randrange(200 * MS, 3 * S)
    for _ in range(3000):
        _assert_within(clock, host, rng.randrange(start - S, end + 2 * S))
    if step_at is not None:
        assert len(clock.segments) == 2
    first, last = start + S, end - S
    summary = clock.summary(first, last)
    for h in range(first, last, S):
        assert abs(summary.offset_ns - host.offset(h)) <= summary.error_ns


def test_epoch_anchor_shifts_controller_stamps_only():
    anchor = EpochAnchor(mono_ns=5 * S, epoch_ns=1_700_000_000 * S)
    sample = anchor.sample(ClockSample(6 * S, 77, 6 * S + 10))
    assert sample == ClockSample(1_700_000_001 * S, 77, 1_700_000_001 * S + 10)
    now = EpochAnchor.now()
    assert abs(now.to_epoch(time.monotonic_ns()) - time.time_ns()) < 50 * MS


def test_host_clock_without_samples_has_no_estimate():
    clock = HostClock()
    assert not clock
    with pytest.raises(ValueError):
        clock.at(0)
    with pytest.raises(ValueError):
        clock.add(ClockSample(t_send_ns=10, host_mono_ns=5, t_recv_ns=9))


# ---------------------------------------------------------------- a session's clocks


def _session(names, settle_s: float, shown: list[dict]) -> TraceSession:
    session = TraceSession(names, on_event=shown.append, settle_s=settle_s)
    session.anchor = EpochAnchor(mono_ns=0, epoch_ns=0)  # controller ns == epoch ns here
    return session


def _packet(ts_ns: int, dir: str, flags: int = 0x14, seq: int = 1000) -> bytes:
    rec = {"type": "packet", "ts_ns": ts_ns, "ifname": "eth0", "dir": dir, "flags": flags,
           "seq": seq, "ack": 0, "len": 0, "ipid": 7, "saddr": "198.18.0.1", "sport": 4000,
           "daddr": "198.18.0.2", "dport": 80, "why": "rst"}  # fmt: skip
    return json.dumps(rec).encode()


def _reset(ts_ns: int) -> bytes:
    rec = {"type": "reset", "ts_ns": ts_ns, "probe": "tcp_receive_reset", "saddr": "198.18.0.2",
           "sport": 80, "daddr": "198.18.0.1", "dport": 4000, "state": "SYN_SENT"}  # fmt: skip
    return json.dumps(rec).encode()


# All hosts share one clock (offset 0); the SSH pings are lopsided in opposite directions,
# so each host's midpoint is off by 400 us, within its 500 us bound, in opposite senses.
def _lopsided(session: TraceSession, host: str, h: int, sign: int) -> None:
    there, back = (900 * US, 100 * US) if sign > 0 else (100 * US, 900 * US)
    session.clock(host, ClockSample(h - there, h, h + back))


def _offsets_agree(events: list[dict]) -> None:
    for a in events:
        for b in events:
            gap = abs((a["ts"] - a["ts_ns"]) - (b["ts"] - b["ts_ns"]))
            assert gap <= a["clock_error_ns"] + b["clock_error_ns"], (a, b)


@pytest.mark.parametrize("settle_s", [0.0, 60.0])  # shown one by one / held and ordered
def test_live_events_never_show_an_arrival_before_its_departure(settle_s):
    shown: list[dict] = []
    session = _session(["server", "lb", "client"], settle_s, shown)
    _lopsided(session, "server", 5 * S, -1)  # server's clock reads 400 us late
    _lopsided(session, "lb", 5 * S, +1)  # lb's 400 us early
    _lopsided(session, "client", 5 * S, +1)
    t = 5 * S + 100 * MS
    session.lines("server", "stdout", [_packet(t, "egress")])  # server sends the RST
    session.lines("lb", "stdout", [_packet(t + 20 * US, "ingress")])
    session.lines("lb", "stdout", [_packet(t + 30 * US, "egress")])  # forwarded
    session.lines("client", "stdout", [_packet(t + 50 * US, "ingress"), _reset(t + 60 * US)])
    result = session.finish(False)
    assert [(e["host"], e.get("dir")) for e in shown] == [
        ("server", "egress"), ("lb", "ingress"), ("lb", "egress"), ("client", "ingress"),
        ("client", None),
    ]  # fmt: skip
    times = [e["ts"] for e in shown]
    assert times == sorted(times)
    if settle_s:  # all in one batch: the clocks moved within their bounds, not the events
        assert all("ts_clamped_ns" not in e for e in shown)
        _offsets_agree(shown)
    else:  # each shown at once, with its clock's error: later ones had to move, flagged
        assert [e["host"] for e in shown if "ts_clamped_ns" in e] == [
            "lb",
            "lb",
            "client",
            "client",
        ]
    assert shown[-1]["ts"] - shown[-2]["ts"] == 10 * US  # one host keeps its own spacing
    assert result.correlation.flows and result.correlation.warnings == []


def test_held_events_are_ordered_by_aligned_time_across_hosts():
    shown: list[dict] = []
    session = _session(["a", "b"], 60.0, shown)
    session.clock("a", ClockSample(S - 50 * US, S, S + 50 * US))
    session.clock("b", ClockSample(S - 50 * US, S + 10 * MS, S + 50 * US))  # b is 10 ms ahead
    session.lines("b", "stdout", [_packet(S + 10 * MS + 3 * MS, "egress", seq=1)])
    session.lines("a", "stdout", [_packet(S + 1 * MS, "egress", seq=2)])
    assert shown == []  # still settling
    assert len(session.events) == 2  # held, yet counted (--count correlates them)
    session.finish(False)
    assert [(e["host"], e["ts"]) for e in shown] == [("a", S + 1 * MS), ("b", S + 3 * MS)]
    assert session.events == shown  # the saved document lists them as they were shown


def test_contradicting_bounds_clamp_the_arrival_and_flag_it():
    shown: list[dict] = []
    session = _session(["a", "b"], 0.0, shown)
    session.clock("a", ClockSample(S - 10 * US, S, S + 10 * US))
    session.clock("b", ClockSample(S - 10 * US, S + 2 * MS, S + 10 * US))  # b's bound is wrong
    session.lines("a", "stdout", [_packet(S + 5 * MS, "egress")])
    session.lines("b", "stdout", [_packet(S + 5 * MS + 100 * US, "ingress")])  # 1.9 ms "early"
    session.finish(False)
    arrival = shown[1]
    assert arrival["host"] == "b" and arrival["ts"] == shown[0]["ts"]
    assert arrival["ts_clamped_ns"] == 1_900 * US


def test_records_before_the_first_clock_sample_wait_and_are_kept():
    shown: list[dict] = []
    session = _session(["lb", "client"], 0.0, shown)
    _lopsided(session, "client", S, +1)
    # lb streams its records before its first ping comes back
    session.lines("lb", "stdout", [_packet(S + 10 * MS, "egress")])
    session.lines("client", "stdout", [_packet(S + 10 * MS + 40 * US, "ingress")])
    assert [e["host"] for e in shown] == ["client"]
    _lopsided(session, "lb", S + 20 * MS, -1)
    assert [e["host"] for e in shown] == ["client", "lb"]
    result = session.finish(False)
    assert all(isinstance(e["ts"], int) for e in session.events)
    assert not [w for w in result.correlation.warnings if w.kind == "malformed"]
    assert len(result.correlation.flows) == 1
    assert set(result.clocks) == {"lb", "client"}
    assert result.clocks["lb"]["segments"][0]["samples"] == 1


def test_a_host_that_never_answers_a_ping_keeps_its_records_without_ts():
    shown: list[dict] = []
    session = _session(["a"], 0.0, shown)
    session.lines("a", "stdout", [_packet(S, "egress")])
    assert shown == []
    result = session.finish(False)
    assert len(shown) == 1 and "ts" not in shown[0]
    assert not [w for w in result.correlation.warnings if w.kind == "malformed"]
    assert result.clocks == {}


@pytest.mark.parametrize("seed", [*range(30), 98, 733])  # 98, 733: streams never pause
def test_live_causality_holds_whatever_the_clock_errors_and_arrival_lags(seed, monkeypatch):
    """Random clock errors within the bounds, packets relayed client -> lb -> server and
    back at random pace, each host's records reaching the controller up to 0.2 s late in
    random chunks (less than the settle time): no arrival is shown before its departure and
    each host's events keep their own order, across however many batches it takes."""
    rng = random.Random(seed)
    now = [100.0]
    monkeypatch.setattr("ebpfdiag.tracing.time.monotonic", lambda: now[0])
    hosts = ["client", "lb", "server"]
    shown: list[dict] = []
    session = _session(hosts, 0.25, shown)
    for host in hosts:
        there = rng.randrange(10 * US, 2 * MS)
        session.clock(host, ClockSample(S - there, S, S + rng.randrange(10 * US, 2 * MS)))
    deliveries: list[tuple[float, str, bytes]] = []
    lag = {h: 0.0 for h in hosts}
    t = S + 50 * MS
    for seq in range(30):
        path = hosts if seq % 2 else hosts[::-1]
        for src, dst in zip(path, path[1:], strict=False):
            for host, dir in ((src, "egress"), (dst, "ingress")):
                lag[host] = max(lag[host] - 0.05, rng.uniform(0, 0.2))  # per host in order
                arrive = max([d[0] for d in deliveries if d[1] == host] + [t / S + lag[host]])
                deliveries.append((arrive, host, _packet(t, dir, seq=seq)))
                t += rng.randrange(5 * US, 60 * US)
        t += rng.choice([1 * MS, 100 * MS, 400 * MS])  # sometimes a pause, then a batch goes
    for arrive, host, line in sorted(deliveries, key=lambda d: d[0]):
        now[0] = 100.0 + arrive
        session.lines(host, "stdout", [line])
    now[0] += 10
    session.finish(False)
    assert len(shown) == 120
    for host in hosts:
        mine = [e for e in shown if e["host"] == host]
        assert sorted(mine, key=lambda e: e["ts_ns"]) == sorted(mine, key=lambda e: e["ts"])
    for arrival in shown:
        for departure in shown:
            if (
                arrival["dir"] == "ingress"
                and departure["dir"] == "egress"
                and arrival["seq"] == departure["seq"]
                and arrival["host"] != departure["host"]
            ):
                assert arrival["ts"] >= departure["ts"], (departure, arrival)
