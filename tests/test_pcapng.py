"""``--pcap``: sightings of several hosts as one pcapng file that tshark reads back: one
interface per host:interface, headers it can follow as TCP streams, the aligned time, and
a comment per packet; and, in the lab, a traced reset in a file tshark opens."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from ebpfdiag.lab.scenarios import SCENARIOS, run_scenario
from ebpfdiag.render.pcapng import save_pcap, write_pcap
from tests.conftest import require, running_lab

T0 = 1_795_000_000_123_456_789  # aligned ns since the epoch
CLIENT, VIP, LB_IN, LB_OUT, SERVER = (
    "198.18.1.10", "198.18.3.1", "198.18.1.1", "198.18.2.1", "198.18.2.10"
)  # fmt: skip
FIELDS = ["frame.interface_name", "frame.interface_description", "tcp.stream", "tcp.seq_raw",
          "tcp.ack_raw", "tcp.flags", "tcp.len", "frame.len", "frame.cap_len", "frame.comment",
          "frame.time_epoch", "ip.checksum.status", "ip.id", "ip.ttl", "ipv6.hlim",
          "tcp.analysis.lost_segment", "tcp.analysis.ack_lost_segment"]  # fmt: skip


def tshark(path: Path, *fields: str, extra: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """tshark's view of the file, one dict per frame (a missing tshark fails under CI)."""
    require(shutil.which("tshark") is not None, "needs tshark (Debian package tshark)")
    argv = ["tshark", "-r", str(path), "-o", "ip.check_checksum:TRUE", *extra, "-T", "fields"]
    for name in fields:
        argv += ["-e", name]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    noise = [line for line in proc.stderr.splitlines() if "Running as user" not in line]
    assert noise == []  # no "appears to be damaged or corrupt"
    return [dict(zip(fields, line.split("\t"), strict=True)) for line in proc.stdout.splitlines()]


def packet(host, ifname, direction, dt_us, src, dst, flags, seq, ack, length=0, why="history"):
    (saddr, sport), (daddr, dport) = src, dst
    return {
        "type": "packet", "host": host, "ts_ns": 1000 + dt_us, "ts": T0 + dt_us * 1000,
        "clock_error_ns": 20_000, "ifname": ifname, "ifindex": 2, "dir": direction,
        "family": 6 if ":" in saddr else 4, "saddr": saddr, "daddr": daddr, "sport": sport,
        "dport": dport, "flags": flags, "seq": seq, "ack": ack, "ipid": 0 if flags & 2 else 4242,
        "ttl": 64, "len": length, "win": 502, "why": why,
    }  # fmt: skip


def three_hosts() -> list[dict]:
    """One reset flow client -> lb (DNAT + masquerade) -> server, every packet seen at all
    four points, and a client-only IPv6 flow; lb's records come late, as a stream would."""
    c, v = (CLIENT, 40000), (VIP, 80)
    m, s = (LB_OUT, 40000), (SERVER, 80)
    flow = [  # (flags, seq, ack, len, why), forward = client -> server
        (0x02, 1000, 0, 0, "handshake", True),
        (0x12, 9000, 1001, 0, "handshake", False),
        (0x10, 1001, 9001, 0, "history", True),
        (0x18, 1001, 9001, 6, "history", True),
        (0x10, 9001, 1007, 0, "history", False),
        (0x04, 1007, 0, 0, "rst", True),
    ]
    events = []
    for i, (flags, seq, ack, length, why, forward) in enumerate(flow):
        t = i * 100
        hops = [("client", "eth0", "egress", c, v), ("lb", "to-client", "ingress", c, v),
                ("lb", "br-servers", "egress", m, s),
                ("server", "eth0", "ingress", m, s)]  # fmt: skip
        if not forward:
            hops = [(h, i_, {"egress": "ingress", "ingress": "egress"}[d], b, a)
                    for h, i_, d, a, b in reversed(hops)]  # fmt: skip
        for step, (host, ifname, direction, a, b) in enumerate(hops):
            events.append(packet(host, ifname, direction, t + step * 10, a, b, flags, seq, ack,
                                 length, why))  # fmt: skip
    six = (("2001:db8::10", 41000), ("2001:db8::1", 443))
    events.append(packet("client", "eth0", "egress", 900, *six, 0x02, 5, 0, why="handshake"))
    events.append(packet("client", "eth0", "ingress", 950, six[1], six[0], 0x14, 0, 6,
                         why="rst"))  # fmt: skip
    lb_first = sorted(events, key=lambda e: e["host"] != "lb")  # not in time order
    return [*lb_first, {"type": "reset", "host": "server", "ts": T0}, {"type": "lost", "count": 0}]


TCX = {"tc": {"kind": "tcx-link"}}
HELLOS = {
    "client": {"interfaces": ["eth0"], "attach": TCX},
    "lb": {"interfaces": ["to-client", "br-servers", "mgmt0"], "attach": TCX},
    "server": None,
}


def test_three_hosts_read_back_by_tshark(tmp_path):
    events = three_hosts()
    path = tmp_path / "trace.pcapng"
    stats = write_pcap(path, events, HELLOS)
    packets = sorted((e for e in events if e["type"] == "packet"), key=lambda e: e["ts"])
    frames = tshark(path, *FIELDS)
    assert len(frames) == len(packets) == stats.written == 26
    # One interface per host:interface, named so, its hook in the description; lb's
    # interface that saw nothing has its block too.
    assert Counter(f["frame.interface_name"] for f in frames) == {
        "client:eth0": 8, "lb:to-client": 6, "lb:br-servers": 6, "server:eth0": 6
    }  # fmt: skip
    assert stats.packets["lb:mgmt0"] == 0
    assert {f["frame.interface_description"] for f in frames if f["frame.interface_name"]
            == "lb:to-client"} == {"host lb, interface to-client, hook tcx-link"}  # fmt: skip
    assert {f["frame.interface_description"] for f in frames if f["frame.interface_name"]
            == "server:eth0"} == {"host server, interface eth0, hook unknown"}  # fmt: skip
    info = subprocess.run(["capinfos", str(path)], capture_output=True, text=True).stdout
    assert "Number of interfaces in file: 5" in info
    for frame, rec in zip(frames, packets, strict=True):
        # aligned time, to the ns, in order
        assert int(Decimal(frame["frame.time_epoch"]) * 10**9) == rec["ts"]
        assert frame["frame.comment"] == (
            f"host={rec['host']} hook={rec['dir']} why={rec['why']} clock_error_ns=20000"
        )
        assert frame["frame.interface_name"] == f"{rec['host']}:{rec['ifname']}"
        assert (int(frame["tcp.seq_raw"]), int(frame["tcp.ack_raw"])) == (rec["seq"], rec["ack"])
        assert int(frame["tcp.flags"], 16) == rec["flags"] and int(frame["tcp.len"]) == rec["len"]
        header = 40 if rec["family"] == 4 else 60
        assert int(frame["frame.cap_len"]) == header  # headers only ...
        assert int(frame["frame.len"]) == header + rec["len"]  # ... of the whole packet
        if rec["family"] == 4:
            assert frame["ip.checksum.status"] == "1"  # good
            assert (int(frame["ip.id"], 16), int(frame["ip.ttl"])) == (rec["ipid"], 64)
        else:
            assert frame["ipv6.hlim"] == "64"
        # seq + len are consistent: tshark finds no segment missing in any stream
        assert frame["tcp.analysis.lost_segment"] == frame["tcp.analysis.ack_lost_segment"] == ""
    # Streams: the client leg (client, lb's client side), the server leg after NAT (lb's
    # server side, server), and the IPv6 flow.
    streams = {}
    for frame, rec in zip(frames, packets, strict=True):
        leg = "v6" if rec["family"] == 6 else ("client" if VIP in (rec["saddr"], rec["daddr"])
                                                 else "server")  # fmt: skip
        streams.setdefault(leg, set()).add(frame["tcp.stream"])
    assert all(len(ids) == 1 for ids in streams.values()) and len(set.union(*streams.values())) == 3


def test_packets_without_aligned_time_or_fields_are_left_out_and_said(tmp_path):
    events = three_hosts()
    del events[0]["ts"]  # a host whose clock was never sampled
    events[1]["saddr"] = "not an address"
    said: list[str] = []
    path = tmp_path / "trace.pcapng"
    assert save_pcap(path, events, HELLOS, said.append)
    assert len(tshark(path, "frame.number")) == 24
    assert said == [f"{path}: 1 packets left out (their host's clock was never sampled)",
                    f"{path}: 1 packets left out (malformed records)"]  # fmt: skip


def test_an_unwritable_file_is_one_line(tmp_path):
    said: list[str] = []
    assert not save_pcap(tmp_path, three_hosts(), HELLOS, said.append)
    assert said == [f"cannot write {tmp_path}: Is a directory"]


def test_unwritable_pcap_is_refused_before_any_host(tmp_path):
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("hosts:\n  web01: {address: 198.18.200.1}\n")
    # --ask-sudo-pass without a terminal would fail next: the --pcap check comes first.
    base = [sys.executable, "-m", "ebpfdiag", "trace", "tcp-rst", "-i", str(inventory),
            "--hosts", "web01", "--ask-sudo-pass", "--pcap"]  # fmt: skip
    for bad in (tmp_path / "no-such-dir" / "x.pcapng", tmp_path):
        r = subprocess.run([*base, str(bad)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line
        assert r.stderr.startswith("ebpfdiag: ") and str(bad) in r.stderr


# -- the lab -------------------------------------------------------------------------

PREFIX, BASE = "eblp", "198.18.140.0"
STATE_DIR = Path("/run/ebpfdiag/lab-eblp-test")  # also test_lab_latency_scenarios' lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    yield from running_lab(
        tmp_path_factory,
        "pcap",
        ("ip", "nft", "tc", "conntrack", "/usr/sbin/sshd"),
        state_dir=STATE_DIR,
        prefix=PREFIX,
        base=BASE,
    )


@pytest.mark.root
def test_traced_reset_is_in_the_pcap(lab, tmp_path):
    spec = SCENARIOS["rst-abort"]
    path = tmp_path / "rst.pcapng"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ebpfdiag", "trace", "tcp-rst", "-i", lab.inventory,
         "--hosts", "client,lb,server", "--port", str(spec.port), "--count", "1",
         "--duration", "20s", "--json", "--pcap", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        rec = json.loads(line) if line else {"type": "eof"}
        if rec["type"] == "eof" or (rec["type"] == "status" and rec["state"] == "tracing"):
            break
    assert rec["type"] == "status", proc.stderr.read() if proc.poll() is not None else rec
    assert run_scenario(spec.name, lab).reproduced
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    events = [json.loads(x) for x in out.splitlines()]
    packets = sorted((e for e in events if e["type"] == "event" and e["kind"] == "packet"),
                     key=lambda e: e["ts"])  # fmt: skip
    frames = tshark(path, "frame.interface_name", "tcp.flags.reset", "tcp.seq_raw",
                    "frame.comment", "frame.time_epoch", "tcp.dstport")  # fmt: skip
    assert len(frames) == len(packets) > 0
    resets = [f for f in frames if f["tcp.flags.reset"] == "1"]
    # The server's RST, seen leaving the server, crossing lb (bridge port, bridge, client
    # side), reaching the client.
    assert {f["frame.interface_name"] for f in resets} == {"lb:to-server",
        "server:eth0", "lb:br-servers", "lb:to-client", "client:eth0"
    }  # fmt: skip
    assert all("why=rst" in f["frame.comment"] for f in resets)
    client_rst = next(f for f in resets if f["frame.interface_name"] == "client:eth0")
    assert "host=client hook=ingress" in client_rst["frame.comment"]
    for frame, rec in zip(frames, packets, strict=True):
        assert int(Decimal(frame["frame.time_epoch"]) * 10**9) == rec["ts"]
        assert int(frame["tcp.seq_raw"]) == rec["seq"]
