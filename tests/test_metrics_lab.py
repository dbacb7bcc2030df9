"""``ebpfdiag metrics serve`` in the lab, scraped by a real Prometheus server.

Real parts throughout: the lab's sshd namespaces, the metrics tool's BPF programs on this
kernel, nftables, and Debian's ``prometheus``/``promtool``, started here with their own
config and data directory on 127.0.0.1. After reset scenarios, PromQL sees each reset by
reason on the host that sent it; one host's SSH session is cut (its sshd session processes
killed, new connections refused by an nftables rule for a few scrapes): ``host_up`` goes
to 0 and back to 1, the host's counters continue from where they were, and no counter
decreases in Prometheus' data. Packets an nftables rule drops on lb show up as
NETFILTER_DROP drops of lb, and of no other host. ``metrics textfile --once`` writes a file
promtool accepts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ebpfdiag.lab.scenarios import run_scenario
from tests.conftest import running_lab

pytestmark = pytest.mark.root

PREFIX, BASE = "ebmx", "198.18.152.0"
STATE_DIR = Path("/run/ebpfdiag/lab-metrics-test")
HOSTS = "client,lb,server"
CUT_TABLE = "ebmx_cut"
DROP_TABLE = "ebmx_drop"
DROP_PORT = 9997


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    yield from running_lab(
        tmp_path_factory,
        "metrics",
        ("ip", "nft", "bpftool", "/usr/sbin/sshd", "prometheus", "promtool"),
        state_dir=STATE_DIR,
        prefix=PREFIX,
        base=BASE,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


class Prometheus:
    """A Prometheus server of our own: config, data dir and port in a tmp dir."""

    def __init__(self, tmp: Path, target: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: ebpfdiag\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "prometheus.log", "w"),  # noqa: SIM115 - the server's lifetime
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if get(self.url + "/-/ready"):
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("prometheus did not become ready")

    def query(self, promql: str) -> dict[tuple, float]:
        """Instant query -> {(sorted label items without __name__): value}."""
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        data = json.loads(get(url))
        assert data["status"] == "success", data
        out = {}
        for item in data["data"]["result"]:
            labels = tuple(sorted((k, v) for k, v in item["metric"].items() if k != "__name__"))
            out[labels] = float(item["value"][1])
        return out

    def wait(self, promql: str, check, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            last = self.query(promql)
            if check(last):
                return last
            time.sleep(0.5)
        raise AssertionError(f"{promql}: still {last} after {timeout}s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def by_host(result: dict) -> dict[str, float]:
    return {dict(labels)["host"]: value for labels, value in result.items()}


def start_serve(lab, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ebpfdiag", "metrics", "serve", "-i", lab.inventory,
         "--hosts", HOSTS, "--listen", f"127.0.0.1:{port}", "--interval", "1s",
         "--host-label", "role"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def netns_inode(lab, host: str) -> int:
    return os.stat(f"/run/netns/{lab.host(host).netns}").st_ino


def kill_ssh_sessions(lab, host: str) -> list[int]:
    """SIGKILL every sshd process of the host's namespace except its listening daemon."""
    daemon = int((STATE_DIR / "hosts" / host / "sshd.pid").read_text())
    inode = netns_inode(lab, host)
    killed = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int(proc.name) == daemon:
                continue
            if os.stat(proc / "ns" / "net").st_ino != inode:
                continue
            if (proc / "comm").read_text().strip() != "sshd":
                continue
            os.kill(int(proc.name), signal.SIGKILL)
            killed.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return killed


def refuse_ssh(lab, host: str, on: bool, verdict: str = "reject with tcp reset") -> None:
    """An nftables rule in the host's namespace for every packet to port 22: reset it, or
    (``verdict`` drop) let it vanish like a link that went down."""
    ns = ["ip", "netns", "exec", lab.host(host).netns, "nft"]
    if on:
        script = (
            f"table inet {CUT_TABLE} {{\n chain input {{\n"
            f"  type filter hook input priority -10;\n  tcp dport 22 {verdict}\n }}\n}}\n"
        )
        subprocess.run([*ns, "-f", "-"], input=script, text=True, check=True)
    else:
        subprocess.run([*ns, "delete", "table", "inet", CUT_TABLE], capture_output=True)


def metrics_programs() -> list[str]:
    progs = json.loads(subprocess.run(
        ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
    ).stdout)  # fmt: skip
    return [p["name"] for p in progs if p.get("name", "").startswith("nm_")]


def test_prometheus_sees_resets_by_reason_and_host_survives_a_cut_session(lab, tmp_path):
    port = free_port()
    serve = start_serve(lab, port)
    prom = None
    try:
        prom = Prometheus(tmp_path, f"127.0.0.1:{port}")
        prom.wait("ebpfdiag_host_up == 1", lambda r: len(r) == 3, timeout=60)
        for name in ("rst-no-listener", "rst-no-listener", "rst-abort", "rst-lb-reject"):
            assert run_scenario(name, lab).reproduced, name
        sent = "ebpfdiag_tcp_resets_sent_total"
        got = prom.wait(f'{sent}{{reason="NO_SOCKET"}}', lambda r: by_host(r).get("server") == 2)
        assert by_host(got) == {"server": 2}  # the reset was the server kernel's, nobody else's
        assert dict(next(iter(got)))["role"] == "server"  # an inventory label on the series
        prom.wait(f'{sent}{{reason="TCP_STATE",state="TCP_CLOSE"}}',
                  lambda r: by_host(r) == {"server": 1})  # fmt: skip
        # the LB's firewall reject is not the TCP stack's: no reset sent counted on lb
        assert prom.query(f'{sent}{{host="lb"}}') == {}
        prom.wait('ebpfdiag_tcp_resets_received_total{host="client"}',
                  lambda r: sum(r.values()) >= 4)  # fmt: skip
        prom.wait('ebpfdiag_tcp_connect_seconds_count{host="client"}',
                  lambda r: sum(r.values()) >= 1)  # fmt: skip

        exposition = get(f"http://127.0.0.1:{port}/metrics")
        check = subprocess.run(["promtool", "check", "metrics"], input=exposition,
                               capture_output=True)  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr

        # Cut the server's SSH session; refuse reconnects for at least two scrapes.
        refuse_ssh(lab, "server", True)
        try:
            assert kill_ssh_sessions(lab, "server")
            prom.wait('ebpfdiag_host_up{host="server"}', lambda r: list(r.values()) == [0])
            time.sleep(2.5)
            assert list(prom.query('ebpfdiag_host_up{host="server"}').values()) == [0]
            # away: its series keep their last values
            assert by_host(prom.query(f'{sent}{{reason="NO_SOCKET"}}')) == {"server": 2}
        finally:
            refuse_ssh(lab, "server", False)
        prom.wait('ebpfdiag_host_up{host="server"}', lambda r: list(r.values()) == [1],
                  timeout=60)  # fmt: skip
        assert by_host(prom.query("ebpfdiag_host_sessions_total"))["server"] == 2
        assert run_scenario("rst-no-listener", lab).reproduced
        prom.wait(f'{sent}{{reason="NO_SOCKET"}}', lambda r: by_host(r).get("server") == 3)
        time.sleep(1.5)  # one more scrape after the last change
        for family in (sent, "ebpfdiag_tcp_resets_received_total", "ebpfdiag_host_sessions_total"):
            resets = prom.query(f"resets({family}[10m])")
            assert resets and set(resets.values()) == {0}, (family, resets)
        down = prom.query('min_over_time(ebpfdiag_host_up{host="server"}[10m])')
        assert list(down.values()) == [0]
    finally:
        if prom is not None:
            prom.stop()
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=30)
    assert serve.returncode == 0, err
    assert "server up" in err and "retrying in" in err, err
    deadline = time.monotonic() + 10
    while metrics_programs() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert metrics_programs() == []  # every host's script detached on SIGTERM


SEND_UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[3])):
    s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
"""


def test_prometheus_sees_netfilter_drops_on_the_host_that_dropped(lab, tmp_path):
    lb = lab.host("lb")
    target = lb.interfaces["to-client"].split("/")[0]
    rule = (
        f"table inet {DROP_TABLE} {{\n chain input {{\n"
        f"  type filter hook input priority -10;\n  udp dport {DROP_PORT} drop\n }}\n}}\n"
    )
    subprocess.run(["ip", "netns", "exec", lb.netns, "nft", "-f", "-"], input=rule, text=True,
                   check=True)  # fmt: skip
    port = free_port()
    serve = start_serve(lab, port)
    prom = None
    drops = "ebpfdiag_packet_drops_total"
    try:
        prom = Prometheus(tmp_path, f"127.0.0.1:{port}")
        prom.wait("ebpfdiag_host_up == 1", lambda r: len(r) == 3, timeout=60)
        subprocess.run(
            ["ip", "netns", "exec", lab.host("client").netns, "python3", "-c", SEND_UDP,
             target, str(DROP_PORT), "7"], check=True, timeout=20,
        )  # fmt: skip
        got = prom.wait(f'{drops}{{reason="NETFILTER_DROP"}}',
                        lambda r: by_host(r).get("lb") == 7)  # fmt: skip
        time.sleep(2.5)  # two more deltas: nothing else counts them
        assert by_host(prom.query(f'{drops}{{reason="NETFILTER_DROP"}}')) == {"lb": 7}, got
        assert prom.query(f'{drops}{{reason=~"SKB_CONSUMED|NOT_DROPPED_YET|CONSUMED"}}') == {}
        # the family is declared for every host, help text and type included
        text = get(f"http://127.0.0.1:{port}/metrics").decode()
        assert f"# TYPE {drops} counter" in text
    finally:
        if prom is not None:
            prom.stop()
        subprocess.run(["ip", "netns", "exec", lb.netns, "nft", "delete", "table", "inet",
                        DROP_TABLE], capture_output=True)  # fmt: skip
        serve.send_signal(signal.SIGTERM)
        _out, err = serve.communicate(timeout=30)
    assert serve.returncode == 0, err


def exposed(port: int, name: str) -> dict[str, float]:
    """{host: value} of one metric, read from serve's /metrics."""
    out = {}
    for line in get(f"http://127.0.0.1:{port}/metrics").decode().splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('host="', 1)[1].split('"', 1)[0]] = float(value)
    return out


def wait_exposed(port: int, name: str, check, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        try:
            last = exposed(port, name)
        except OSError:  # not listening yet
            last = {}
        if check(last):
            return last
        time.sleep(0.3)
    raise AssertionError(f"{name}: still {last} after {timeout}s")


def test_a_silent_link_is_detected_and_reconnected(lab):
    """Packets to the server's sshd vanish (no FIN, no RST): after 10 s without a delta the
    host is down and retried; once packets flow again it is back, counting on."""
    port = free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "ebpfdiag", "metrics", "serve", "-i", lab.inventory,
         "--hosts", "server", "--listen", f"127.0.0.1:{port}", "--interval", "1s"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_exposed(port, "ebpfdiag_host_up", lambda r: r == {"server": 1}, 60)
        refuse_ssh(lab, "server", True, verdict="drop")
        try:
            t0 = time.monotonic()
            wait_exposed(port, "ebpfdiag_host_up", lambda r: r == {"server": 0}, 25)
            assert time.monotonic() - t0 >= 9  # three missed deltas, at least 10 s
        finally:
            refuse_ssh(lab, "server", False)
        wait_exposed(port, "ebpfdiag_host_up", lambda r: r == {"server": 1}, 60)
        assert exposed(port, "ebpfdiag_host_sessions_total") == {"server": 2}
    finally:
        serve.send_signal(signal.SIGTERM)
        _out, err = serve.communicate(timeout=30)
    assert serve.returncode == 0, err
    assert "server: no data for 10s; retrying in" in err, err


def kill_remote_scripts(lab, host: str) -> int:
    """SIGKILL the host's remote script processes (the bootstrap runs the script in its own
    process; its argv is the bootstrap's source). Returns how many."""
    inode = netns_inode(lab, host)
    killed = 0
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or os.stat(proc / "ns" / "net").st_ino != inode:
                continue
            cmdline = (proc / "cmdline").read_bytes()
            if b"python3" in cmdline and b"want-script" in cmdline:
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
        except OSError:
            continue
    return killed


def test_a_killed_script_is_restarted_and_its_counters_continue(lab):
    port = free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "ebpfdiag", "metrics", "serve", "-i", lab.inventory,
         "--hosts", "server", "--listen", f"127.0.0.1:{port}", "--interval", "1s"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    sent = "ebpfdiag_tcp_resets_sent_total"
    try:
        wait_exposed(port, "ebpfdiag_host_up", lambda r: r == {"server": 1}, 60)
        assert run_scenario("rst-no-listener", lab).reproduced
        wait_exposed(port, sent, lambda r: r == {"server": 1}, 15)
        assert kill_remote_scripts(lab, "server") >= 1
        wait_exposed(port, "ebpfdiag_host_sessions_total", lambda r: r == {"server": 2}, 60)
        wait_exposed(port, "ebpfdiag_host_up", lambda r: r == {"server": 1}, 30)
        assert exposed(port, sent) == {"server": 1}  # kept, not restarted from zero
        assert run_scenario("rst-no-listener", lab).reproduced
        wait_exposed(port, sent, lambda r: r == {"server": 2}, 15)
    finally:
        serve.send_signal(signal.SIGTERM)
        _out, err = serve.communicate(timeout=30)
    assert serve.returncode == 0, err
    assert "server: the metrics script ended (signal KILL)" in err, err


def test_textfile_once_writes_a_file_promtool_accepts(lab, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ebpfdiag", "metrics", "textfile", "-i", lab.inventory,
         "--hosts", HOSTS, "--dir", str(tmp_path), "--interval", "1s", "--once",
         "--host-label", "groups", "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(r["host"] for r in records if r["type"] == "metrics-host" and r["up"]) == sorted(
        HOSTS.split(",")
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ebpfdiag.prom"]  # no temp file left
    text = (tmp_path / "ebpfdiag.prom").read_text()
    assert 'ebpfdiag_host_up{groups="lab",host="client"} 1.0' in text, text
    assert 'ebpfdiag_host_up{groups="lab,servers",host="server"} 1.0' in text, text
    assert "# TYPE ebpfdiag_tcp_resets_sent_total counter" in text
    check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                           capture_output=True)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


class PromReader:
    """Polls a textfile directory as fast as it can, as node_exporter would at any moment:
    every distinct content of the .prom file, the file's inodes, and any other ``*.prom``
    file or vanished file it came across."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.path = directory / "ebpfdiag.prom"
        self.texts: dict[bytes, int] = {}  # content -> order first seen
        self.inodes: set[int] = set()
        self.strays: set[str] = set()
        self.vanished = self.reads = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.poll)

    def poll(self) -> None:
        while not self.stop.is_set():
            for name in os.listdir(self.directory):
                if name.endswith(".prom") and name != self.path.name:
                    self.strays.add(name)
            try:
                with open(self.path, "rb") as f:
                    self.inodes.add(os.fstat(f.fileno()).st_ino)
                    data = f.read()
            except FileNotFoundError:
                self.vanished += self.reads > 0  # once written, the file is always there
                continue
            self.reads += 1
            self.texts.setdefault(data, len(self.texts))


def families(data: bytes) -> set[str]:
    """Family names of an exposition; a malformed one raises (the parser is strict)."""
    return {f.name for f in text_string_to_metric_families(data.decode())}


def test_textfile_readers_never_see_a_partial_file(lab, tmp_path):
    """textfile rewrites the file five times a second while a reader polls the directory:
    every read parses and, once every host is up, has every family; the file is replaced
    (a new inode each write), never rewritten in place, and no temporary file is left."""
    out = tmp_path / "prom"
    out.mkdir()
    reader = PromReader(out)
    reader.thread.start()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ebpfdiag", "metrics", "textfile", "-i", lab.inventory,
         "--hosts", HOSTS, "--dir", str(out), "--interval", "200ms"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            seen = dict(reader.texts)  # a copy: the reader thread adds to it
            latest = max(seen, key=seen.get, default=b"")
            if latest.count(b"ebpfdiag_host_up{") == 3 and b"} 0.0" not in b"".join(
                line for line in latest.splitlines() if line.startswith(b"ebpfdiag_host_up{")
            ):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("not every host came up in the textfile")
        assert run_scenario("rst-no-listener", lab).reproduced  # values change between writes
        # then at least 10 more writes, however slowly a loaded machine makes them
        wanted = len(reader.inodes) + 10
        deadline = time.monotonic() + 60
        while len(reader.inodes) < wanted and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        reader.stop.set()
        reader.thread.join()
    assert proc.returncode == 0, err
    ordered = sorted(reader.texts, key=reader.texts.get)
    full = families(ordered[-1])
    assert {"ebpfdiag_packet_drops", "ebpfdiag_tcp_resets_sent", "ebpfdiag_host_up"} <= full
    complete = [i for i, data in enumerate(ordered) if families(data) == full]
    assert len(ordered) - complete[0] >= 10, len(ordered)  # many distinct writes were read
    for data in ordered[complete[0] :]:
        assert families(data) == full, data[-300:]
    assert len(reader.inodes) >= 10  # renamed over, never rewritten in place
    assert reader.vanished == 0 and reader.strays == set()
    assert sorted(p.name for p in out.iterdir()) == ["ebpfdiag.prom"]  # no temp file left
