"""``trace latency`` at scale, and the synthetic tcp_latency streams its tests replay.

``LatencyStream`` writes what tcp_latency would record (docs/scripts and the record
contract) on client -> lb -> server: lb does DNAT+SNAT and forwards through a bridge (it
sees a request on ``to-client`` ingress, ``br-servers`` and ``to-server`` egress, a
response on ``to-server`` and ``br-servers`` ingress and ``to-client`` egress). Each host
has its own monotonic clock (``offsets``: true epoch = host ns + offset); the stream
chooses the sampled points itself (every request's first byte), as the tool's hash would.

``python -m bench.latency SIGHTINGS`` correlates that many sightings in a fresh
interpreter and prints the time and the peak RSS as JSON.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from collections.abc import Iterator

from bench.common import PYTHON, ROOT, Section, Target, fmt, run_measured
from ebpfdiag.clock import ClockEstimate

CLIENT, VIP, LB, SERVER = "198.18.1.10", "198.18.3.1", "198.18.2.1", "198.18.2.10"
BASE_NS = 1_795_000_000_000_000_000
MSS = 1448
ACK, PSH, SYN = 16, 8, 2


class LatencyStream:
    """Records of one or more flows through client -> lb -> server (see the module doc).

    ``wire_ns`` is each link's one-way delay (plus up to ``jitter_ns``, plus ``back_ns``
    on the way back: an asymmetric path), ``lb_ns`` the
    time lb holds a packet, ``offsets`` each host's true clock offset. ``hosts`` are the
    traced ones."""

    def __init__(
        self,
        *,
        wire_ns: int = 20_000,
        back_ns: int = 0,
        jitter_ns: int = 10_000,
        lb_ns: int = 15_000,
        offsets: dict[str, int] | None = None,
        hosts: tuple[str, ...] = ("client", "lb", "server"),
        seed: int = 1,
    ) -> None:
        self.wire_ns, self.back_ns, self.jitter_ns, self.lb_ns = wire_ns, back_ns, jitter_ns, lb_ns
        self.offsets = {"client": BASE_NS, "lb": BASE_NS, "server": BASE_NS, **(offsets or {})}
        self.hosts = set(hosts)
        self.rng = random.Random(seed)
        self.records: list[dict] = []
        self.t = 1_000_000  # true time, ns after BASE_NS

    # -- clocks --------------------------------------------------------------------
    def clocks(self, error_ns: int = 60_000_000) -> dict[str, ClockEstimate]:
        """SSH-like estimates that know nothing of the injected offsets: BASE within
        ``error_ns``."""
        return {h: ClockEstimate(BASE_NS, error_ns) for h in sorted(self.hosts)}

    def _host_ns(self, host: str, t: int) -> int:
        return BASE_NS + t - self.offsets[host]

    def _wire(self, back: bool = False) -> int:
        return self.wire_ns + self.rng.randrange(self.jitter_ns + 1) + (self.back_ns if back else 0)

    # -- records -------------------------------------------------------------------
    def see(self, host, ifname, direction, tup, flags, seq, ack, length, why,
            pt=None, apt=None, t=0) -> None:  # noqa: ANN001  # fmt: skip
        if host not in self.hosts:
            return
        saddr, sport, daddr, dport = tup
        self.records.append({
            "type": "packet", "host": host, "ts_ns": self._host_ns(host, t), "ts": BASE_NS + t,
            "ifname": ifname,
            "ifindex": 3, "dir": direction, "family": 4, "saddr": saddr, "daddr": daddr,
            "sport": sport, "dport": dport, "flags": flags, "seq": seq % 2**32,
            "ack": ack % 2**32, "ipid": 0, "ttl": 64, "len": length, "win": 502, "why": why,
            "pt": None if pt is None else pt % 2**32, "apt": None if apt is None else apt % 2**32,
        })  # fmt: skip

    def counts(self, host: str, *, lost: int = 0, at: int | None = None) -> None:
        """A ``counts`` record of ``host`` (totals so far) at true time ``at``."""
        if host in self.hosts:
            t = self.t if at is None else at
            self.records.append({"type": "counts", "host": host, "ts_ns": self._host_ns(host, t),
                                 "seen": 100, "sampled": 50, "lost": lost})  # fmt: skip

    def lost(self, host: str, count: int, at: int) -> None:
        if host in self.hosts:
            self.records.append({"type": "lost", "host": host, "count": count,
                                 "ts_ns": self._host_ns(host, at)})  # fmt: skip

    def recv(self, host: str, tup: tuple, length: int, at: int) -> None:
        if host in self.hosts:
            saddr, sport, daddr, dport = tup
            self.records.append({"type": "recv", "host": host, "ts_ns": self._host_ns(host, at),
                                 "family": 4, "saddr": saddr, "sport": sport, "daddr": daddr,
                                 "dport": dport, "len": length})  # fmt: skip


class Flow:
    """One connection: client port ``cport`` to the VIP, masqueraded by lb to ``mport``."""

    def __init__(self, stream: LatencyStream, cport: int, mport: int | None = None,
                 c_isn: int = 1024 * 1000 - 1, s_isn: int = 7_000_000_005) -> None:  # fmt: skip
        self.s = stream
        self.c = (CLIENT, cport, VIP, 80)
        self.b = (LB, mport or cport + 10_000, SERVER, 8080)
        self.cseq = c_isn + 1
        self.sseq = s_isn + 1
        self.c_isn, self.s_isn = c_isn, s_isn

    def forward(self, flags, seq, ack, length, why, *, pt=None, apt=None, pieces=1,
                until="server") -> dict[str, int]:  # noqa: ANN001  # fmt: skip
        """client -> lb -> server from now; ``pieces`` > 1 cuts the payload after lb (GSO
        on the client and lb's entry, segments beyond). ``until`` is the last host that
        sees it (``"lb-in"``: it enters lb and is never seen again). Returns the true times
        (client out, server in)."""
        s = self.s
        t = s.t
        s.see("client", "eth0", "egress", self.c, flags, seq, ack, length, why, pt, apt, t)
        t += s._wire()
        s.see("lb", "to-client", "ingress", self.c, flags, seq, ack, length, why, pt, apt, t)
        if until == "lb-in":
            return {"client": s.t}
        t += s.lb_ns
        size = -(-length // pieces) if length else 0
        t_in = t
        for i in range(pieces):
            pseq = seq + size * i
            plen = min(size, length - size * i) if length else 0
            ppt = _lowest_point(pt, pseq, plen) if pt is not None else None
            pflags = flags if i == pieces - 1 else flags & ~PSH
            s.see("lb", "br-servers", "egress", self.b, pflags, pseq, ack, plen, why, ppt,
                  apt, t + 1_000 * i)  # fmt: skip
            s.see("lb", "to-server", "egress", self.b, pflags, pseq, ack, plen, why, ppt,
                  apt, t + 1_000 * i + 2_000)  # fmt: skip
            t_in = t + 1_000 * i + 2_000 + s._wire()
            s.see("server", "eth0", "ingress", self.b, pflags, pseq, ack, plen, why, ppt, apt,
                  t_in)  # fmt: skip
        return {"client": s.t, "server": t_in}

    def reply(self, flags, seq, ack, length, why, *, pt=None, apt=None, at=None) -> int:  # noqa: ANN001
        """server -> lb -> client at true time ``at``; returns the arrival at the client."""
        s = self.s
        t = s.t if at is None else at
        back = (self.b[2], self.b[3], self.b[0], self.b[1])
        half = (self.b[2], self.b[3], self.c[0], self.c[1])
        cback = (self.c[2], self.c[3], self.c[0], self.c[1])
        s.see("server", "eth0", "egress", back, flags, seq, ack, length, why, pt, apt, t)
        t += s._wire(back=True)
        s.see("lb", "to-server", "ingress", back, flags, seq, ack, length, why, pt, apt, t)
        s.see("lb", "br-servers", "ingress", half, flags, seq, ack, length, why, pt, apt,
              t + 3_000)  # fmt: skip
        t += s.lb_ns
        s.see("lb", "to-client", "egress", cback, flags, seq, ack, length, why, pt, apt, t)
        t += s._wire(back=True)
        s.see("client", "eth0", "ingress", cback, flags, seq, ack, length, why, pt, apt, t)
        return t

    def handshake(self, server_ns: int = 30_000) -> None:
        s = self.s
        times = self.forward(SYN, self.c_isn, 0, 0, "ctl")
        end = self.reply(SYN | ACK, self.s_isn, self.c_isn + 1, 0, "ctl",
                         at=times["server"] + server_ns)  # fmt: skip
        s.t = end + 50_000

    def exchange(self, server_ns: int, *, length: int = 1024, response: int = 300,
                 pieces: int = 1, ack_first: bool = False, lost_first: bool = False,
                 rto_ns: int = 200_000_000, recv_ns: int | None = None) -> int:  # fmt: skip
        """A request of ``length`` bytes (its first byte a sampled point) answered after
        ``server_ns`` by ``response`` bytes whose ``apt`` is the request's last point;
        ``ack_first``: the server acknowledges it with a pure ACK first; ``lost_first``:
        the first copy enters lb and is never seen again, the client resends after
        ``rto_ns``; ``recv_ns``: the server application reads it this long after it
        arrived. Returns the request's true send time."""
        s = self.s
        seq, ack = self.cseq, self.sseq
        last_point = seq + (length - 1) // 1024 * 1024
        sent = s.t
        if lost_first:
            self.forward(ACK | PSH, seq, ack, length, "data", pt=seq, pieces=pieces,
                         until="lb-in")  # fmt: skip
            s.t += rto_ns
        times = self.forward(ACK | PSH, seq, ack, length, "data", pt=seq, pieces=pieces)
        end_ack = seq + length
        if recv_ns is not None:
            s.recv("server", (self.b[2], self.b[3], self.b[0], self.b[1]), length,
                   times["server"] + recv_ns)  # fmt: skip
        if ack_first:
            self.reply(ACK, self.sseq, end_ack, 0, "ack", apt=last_point,
                       at=times["server"] + 5_000)  # fmt: skip
        end = self.reply(ACK | PSH, self.sseq, end_ack, response, "ack", apt=last_point,
                         at=times["server"] + server_ns)  # fmt: skip
        self.cseq += length
        self.sseq += response
        s.t = end + 100_000
        return sent


def _lowest_point(first: int, seq: int, length: int) -> int | None:
    """The lowest multiple-of-1024 point at or above ``first`` inside [seq, seq+length)."""
    p = max(first, -(-seq // 1024) * 1024)
    return p if p < seq + length else None


def simple_stream(
    exchanges: int = 20,
    server_ns: int = 20_000_000,
    *,
    offsets: dict[str, int] | None = None,
    flows: int = 1,
    seed: int = 1,
    back_ns: int = 0,
    **kw: object,
) -> LatencyStream:
    """``flows`` connections, each a handshake and ``exchanges`` request/responses."""
    stream = LatencyStream(offsets=offsets, seed=seed, back_ns=back_ns)
    for host in ("client", "lb", "server"):
        stream.counts(host, at=0)
    for f in range(flows):
        flow = Flow(stream, 40_000 + f, c_isn=1024 * (1000 + 100_000 * f) - 1,
                    s_isn=7_000_000_005 + 1_000_000 * f)  # fmt: skip
        flow.handshake()
        for _ in range(exchanges):
            flow.exchange(server_ns, **kw)  # type: ignore[arg-type]
    for host in ("client", "lb", "server"):
        stream.counts(host, at=stream.t + 1_000_000_000)
    return stream


def bulk_records(n_sightings: int, seed: int = 0) -> Iterator[dict]:
    """About ``n_sightings`` packet records: many flows of small request/responses (each
    exchange 10 sightings), made lazily so that only correlation holds them."""
    per_exchange = 10
    per_flow = 40
    n_flows = max(1, n_sightings // (per_exchange * per_flow))
    rng = random.Random(seed)
    offsets = {"client": BASE_NS - 31_000_000, "lb": BASE_NS + 12_000_000, "server": BASE_NS}
    for f in range(n_flows):
        stream = LatencyStream(offsets=offsets, seed=rng.getrandbits(32))
        stream.t = 1_000_000 + f * 3_000_000
        flow = Flow(stream, 1024 + f % 60_000, mport=20_000 + f % 40_000,
                    c_isn=rng.getrandbits(22) * 1024 - 1, s_isn=rng.getrandbits(32))  # fmt: skip
        for _ in range(per_flow):
            flow.exchange(rng.choice((50_000, 80_000, 120_000, 2_000_000)))
        yield from stream.records


# ---------------------------------------------------------------- benchmark


def measure(n: int) -> dict:
    """Correlate ``n`` generated sightings; the records are made lazily while correlation
    reads them, so generating them once alone first gives the share that is synthesis."""
    from ebpfdiag.questions.latency import correlate

    clocks = LatencyStream().clocks(error_ns=60_000_000)
    t0, c0 = time.perf_counter(), time.process_time()
    records = sum(1 for _ in bulk_records(n))
    t1, c1 = time.perf_counter(), time.process_time()
    result = correlate(bulk_records(n), clocks)
    t2, c2 = time.perf_counter(), time.process_time()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"sightings": records, "exchanges": result.exchanges, "flows": result.flows,
            "synth_s": t1 - t0, "seconds": (t2 - t1) - (t1 - t0),
            "cpu_s": (c2 - c1) - (c1 - c0), "peak_rss_mib": peak_mib,
            "verdicts": [v.text for v in result.verdicts]}  # fmt: skip


def run(sizes: tuple[int, ...] = (1_000_000,)) -> Section:
    section = Section(
        "latency",
        "trace latency: correlating tcp_latency streams (3 hosts, synthetic)",
        ["sightings", "exchanges", "flows", "correlate s", "CPU s", "synth s", "peak RSS MiB"],
    )
    for n in sizes:
        import tempfile

        with tempfile.TemporaryFile() as fh:
            m = run_measured([PYTHON, "-m", "bench.latency", str(n)], stdout=fh, stderr=None,
                             timeout=600, cwd=ROOT)  # fmt: skip
            fh.seek(0)
            data = json.loads(fh.read() or b"{}")
        if m.returncode != 0:
            raise RuntimeError(f"latency worker for {n} sightings exited {m.returncode}")
        section.rows.append([f"{data['sightings']:,}", f"{data['exchanges']:,}",
                             f"{data['flows']:,}", fmt(data["seconds"]), fmt(data["cpu_s"]),
                             fmt(data["synth_s"]), fmt(m.maxrss_mb, 0)])  # fmt: skip
        if n >= 1_000_000:
            section.targets += [
                Target(
                    f"correlate {n:,} sightings",
                    f"{data['seconds']:.1f} s",
                    "< 10 s",
                    data["seconds"] < 10,
                ),  # fmt: skip
                Target(
                    f"peak RSS at {n:,} sightings",
                    f"{m.maxrss_mb:,.0f} MiB",
                    "< 1 GB",
                    m.maxrss_mb * 1.048576 < 1000,
                ),  # fmt: skip
            ]
    section.notes.append(
        "`bulk_records`: flows of 40 request/responses through client -> lb (DNAT+SNAT, "
        "bridge) -> server, 10 sightings per exchange, host clocks off by tens of ms, SSH "
        "bounds of +-60 ms; generated lazily while `questions.latency.correlate` reads them "
        "(as a replayed file is read), so the peak RSS is correlation's own. 'correlate s' "
        "is the whole run minus 'synth s', the time to generate the same records alone; "
        "'CPU s' the same in process CPU time (the machine is shared)."
    )
    return section


def main() -> None:
    json.dump(measure(int(sys.argv[1])), sys.stdout)


if __name__ == "__main__":
    main()
