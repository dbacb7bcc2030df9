"""The SSH fan-out engine and ``run-script`` against real sshd hosts in network namespaces.

One fleet of 24 hosts serves the module: 20 healthy, one without sshd, one whose sudo
needs a password, one whose host key differs from known_hosts, one whose configured
python does not exist.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_root_tools

pytestmark = pytest.mark.root

HEALTHY = [f"h{i:02d}" for i in range(1, 21)]
DOWN, SUDO_PW, BAD_KEY, NO_PYTHON = "h21", "h22", "h23", "h24"

ADDR_SCRIPT = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 9))
print("addr", s.getsockname()[0], flush=True)
import os
print("uid", os.getuid(), flush=True)
"""

STREAM_SCRIPT = """
import sys, time
print("first", flush=True)
time.sleep(2.5)
print("second", flush=True)
"""

PIDFILE_SCRIPT = """
import os, sys, time
with open(sys.argv[1] + "/" + str(os.getpid()), "w") as f:
    f.write("x")
print("started", flush=True)
time.sleep(600)
"""


def cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ebpfdiag", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def spawn(*args: str) -> subprocess.Popen:
    """The controller in the background, its NDJSON readable line by line."""
    return subprocess.Popen(
        [sys.executable, "-m", "ebpfdiag", *args], stdout=subprocess.PIPE, text=True
    )


def run_json(probe: Path, inventory: Path, hosts: str, *extra: str) -> subprocess.CompletedProcess:
    return cli("run-script", str(probe), "-i", str(inventory), "--hosts", hosts, "--json", *extra)


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    require_root_tools("ip", "/usr/sbin/sshd", "sudo", "ssh-keygen")
    from tests.fleet import Fleet

    f = Fleet(
        "ebdt", 24, subnet="198.19.0.0/24", no_sshd_hosts=[DOWN], password_sudo_hosts=[SUDO_PW]
    )
    f.up()
    try:
        yield f
    finally:
        f.down()


@pytest.fixture(scope="module")
def inventory(fleet, tmp_path_factory) -> Path:
    """The fleet's inventory, plus one host with a wrong known key and one without python."""
    work = tmp_path_factory.mktemp("inv")
    inv = yaml.safe_load(fleet.inventory.read_text())
    other = work / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    bad_addr = fleet.host(BAD_KEY).address
    lines = [
        ln for ln in fleet.known_hosts.read_text().splitlines() if not ln.startswith(bad_addr + " ")
    ]
    lines.append(f"{bad_addr} {(other.with_suffix('.pub')).read_text().strip()}")
    (work / "known_hosts").write_text("\n".join(lines) + "\n")
    inv["defaults"]["known_hosts"] = str(work / "known_hosts")
    inv["hosts"][NO_PYTHON]["python"] = "/nonexistent/python3"
    path = work / "inventory.yaml"
    path.write_text(yaml.safe_dump(inv))
    return path


def script_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "probe.py"
    path.write_text(text)
    return path


def test_fanout_reaches_every_host_with_its_own_output(fleet, inventory, tmp_path):
    probe = script_file(tmp_path, ADDR_SCRIPT)
    r = run_json(probe, inventory, "h[01-20]", "--", fleet.gateway)
    assert r.returncode == 0, r.stderr
    recs = records(r.stdout)
    seen, uids = {}, {}
    for rec in recs:
        assert "type" in rec
        if rec["type"] == "line" and rec["text"].startswith("addr "):
            seen[rec["host"]] = rec["text"].split()[1]
        if rec["type"] == "line" and rec["text"].startswith("uid "):
            uids[rec["host"]] = rec["text"]
    assert seen == {h: fleet.host(h).address for h in HEALTHY}
    assert uids == {h: "uid 0" for h in HEALTHY}  # every host ran it under sudo
    hosts = [rec for rec in recs if rec["type"] == "host"]
    assert sorted(h["host"] for h in hosts) == HEALTHY
    assert all(h["status"] == "ok" and h["exit_code"] == 0 for h in hosts)
    assert recs[-1]["type"] == "summary" and recs[-1]["ok"] == 20 and recs[-1]["failed"] == 0


def test_lines_stream_before_the_script_ends(inventory, tmp_path):
    probe = script_file(tmp_path, STREAM_SCRIPT)
    proc = spawn("run-script", str(probe), "-i", str(inventory), "--hosts", "h01", "--json")
    first = json.loads(proc.stdout.readline())
    assert first["type"] == "line" and first["text"] == "first"
    assert proc.poll() is None, "the first line must arrive while the script still runs"
    rest = records(proc.stdout.read())
    assert proc.wait(30) == 0
    assert [r["text"] for r in rest if r["type"] == "line"] == ["second"]


def test_bad_hosts_are_reported_while_the_others_succeed(fleet, inventory, tmp_path):
    probe = script_file(tmp_path, ADDR_SCRIPT)
    r = run_json(probe, inventory, "h[01-03],h[21-24]", "--", fleet.gateway)
    assert r.returncode == 1, r.stderr
    by_host = {rec["host"]: rec for rec in records(r.stdout) if rec["type"] == "host"}
    assert {h: by_host[h]["status"] for h in ("h01", "h02", "h03")} == dict.fromkeys(
        ("h01", "h02", "h03"), "ok"
    )
    assert by_host[DOWN]["error_kind"] == "unreachable"
    assert by_host[SUDO_PW]["error_kind"] == "sudo"
    assert "password" in by_host[SUDO_PW]["error"]
    assert by_host[BAD_KEY]["error_kind"] == "host-key-changed"
    assert by_host[NO_PYTHON]["error_kind"] == "python"
    summary = records(r.stdout)[-1]
    assert summary["failed"] == 4 and summary["failed_hosts"] == ["h21", "h22", "h23", "h24"]


def test_terminal_output_prefixes_hosts_and_summarises(fleet, inventory, tmp_path):
    probe = script_file(tmp_path, ADDR_SCRIPT)
    r = cli(
        "run-script", str(probe), "-i", str(inventory), "--hosts", "h01,h21", "--", fleet.gateway
    )
    assert r.returncode == 1
    assert f"h01 | addr {fleet.host('h01').address}" in r.stdout
    assert "h21: connection refused" in r.stderr or "h21: cannot connect" in r.stderr
    assert "1/2 hosts ok; failed: h21" in r.stderr


def test_sudo_password_over_the_channel_never_in_argv(fleet, inventory, tmp_path):
    """--ask-sudo-pass reads the terminal; the password must not show in any argv."""
    import pty

    probe = script_file(
        tmp_path,
        "import os, glob\n"
        "argv = [open(p, 'rb').read() for p in glob.glob('/proc/[0-9]*/cmdline')]\n"
        f"print('leak' if any({fleet.sudo_password!r}.encode() in a for a in argv) else 'clean')\n"
        "print('uid', os.getuid())\n",
    )
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ebpfdiag",
            "run-script",
            str(probe),
            "-i",
            str(inventory),
            "--hosts",
            SUDO_PW,
            "--ask-sudo-pass",
            "--json",
        ],
        stdin=follower,
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
        start_new_session=True,
    )
    os.close(follower)
    buf = b""
    deadline = time.monotonic() + 30
    while b"password" not in buf and time.monotonic() < deadline:
        buf += os.read(leader, 1024)
    os.write(leader, fleet.sudo_password.encode() + b"\n")
    out, _ = proc.communicate(timeout=60)
    os.close(leader)
    texts = [r.get("text") for r in records(out) if r["type"] == "line"]
    assert proc.returncode == 0, out
    assert texts == ["clean", "uid 0"]
    assert fleet.sudo_password not in out


def test_remote_script_dies_with_a_killed_controller(fleet, inventory, tmp_path):
    piddir = Path("/run/ebpfdiag") / f"pids-{os.getpid()}"
    piddir.mkdir(parents=True, exist_ok=True)
    probe = script_file(tmp_path, PIDFILE_SCRIPT)
    proc = spawn(
        "run-script",
        str(probe),
        "-i",
        str(inventory),
        "--hosts",
        "h[01-03]",
        "--json",
        "--",
        str(piddir),
    )
    started = 0
    while started < 3:
        rec = json.loads(proc.stdout.readline())
        started += rec.get("text") == "started"
    pids = [int(p.name) for p in piddir.iterdir()]
    assert len(pids) == 3 and all(Path(f"/proc/{p}").exists() for p in pids)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = time.monotonic()
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() - killed < 5:
        time.sleep(0.1)
    alive = [p for p in pids if Path(f"/proc/{p}").exists()]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    for p in piddir.iterdir():
        p.unlink()
    piddir.rmdir()
    assert not alive, "remote scripts outlived their controller by 5 s"


def test_ctrl_c_stops_every_host_cleanly(inventory, tmp_path):
    probe = script_file(
        tmp_path,
        "import signal, sys, time\n"
        "def bye(*_):\n"
        "    print('cleaned up', flush=True); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('started', flush=True)\n"
        "time.sleep(600)\n",
    )
    proc = spawn("run-script", str(probe), "-i", str(inventory), "--hosts", "h01,h02", "--json")
    for _ in range(2):
        assert json.loads(proc.stdout.readline())["text"] == "started"
    proc.send_signal(signal.SIGINT)
    rest = records(proc.stdout.read())
    assert proc.wait(30) == 130
    assert sorted(r["host"] for r in rest if r.get("text") == "cleaned up") == ["h01", "h02"]
    assert rest[-1]["type"] == "summary" and rest[-1]["interrupted"] is True


def test_duration_and_timeout_end_the_run(inventory, tmp_path):
    probe = script_file(tmp_path, "import time\nprint('on', flush=True)\ntime.sleep(600)\n")
    r = run_json(probe, inventory, "h01", "--duration", "1s")
    assert r.returncode == 0, r.stderr
    host = [x for x in records(r.stdout) if x["type"] == "host"][0]
    assert host["status"] == "ok" and host["exit_signal"] == "TERM"
    r = run_json(probe, inventory, "h01", "--timeout", "1s")
    assert r.returncode == 1
    host = [x for x in records(r.stdout) if x["type"] == "host"][0]
    assert host["status"] == "timeout"


def test_accept_new_host_keys_records_unknown_keys(fleet, tmp_path):
    inv = yaml.safe_load(fleet.inventory.read_text())
    known = tmp_path / "known_hosts"
    inv["defaults"]["known_hosts"] = str(known)
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(inv))
    probe = script_file(tmp_path, "print('hi')\n")
    r = cli("run-script", str(probe), "-i", str(path), "--hosts", "h05", "--json")
    assert r.returncode == 1
    assert [x["error_kind"] for x in records(r.stdout) if x["type"] == "host"] == [
        "host-key-unknown"
    ]
    r = run_json(probe, path, "h05", "--accept-new-host-keys")
    assert r.returncode == 0, r.stdout
    assert known.read_text().startswith(fleet.host("h05").address + " ssh-ed25519 ")
    r = cli("run-script", str(probe), "-i", str(path), "--hosts", "h05", "--json")
    assert r.returncode == 0, r.stdout


def test_doctor_reports_checks_per_host(inventory):
    r = cli("doctor", "-i", str(inventory), "--hosts", f"h01,{SUDO_PW}", "--json")
    recs = records(r.stdout)
    checks = {(c["host"], c["name"]): c for c in recs if c["type"] == "check"}
    assert checks[("h01", "ssh")]["ok"] and checks[("h01", "sudo")]["ok"]
    assert checks[("h01", "tracepoint")]["ok"]
    assert checks[("h01", "bcc")]["ok"], checks[("h01", "bcc")]
    assert checks[("h01", "compile")]["ok"], checks[("h01", "compile")]
    assert checks[("h01", "kprobes")]["ok"] is Path("/sys/kernel/tracing/kprobe_events").exists()
    assert not checks[(SUDO_PW, "sudo")]["ok"] and checks[(SUDO_PW, "sudo")]["fix"]
    assert r.returncode == 1


def test_jump_host_tunnels_to_a_host_the_controller_cannot_reach(fleet, tmp_path):
    """``hidden`` is 127.0.0.1 as seen from h01: only reachable by jumping through h01."""
    inv = yaml.safe_load(fleet.inventory.read_text())
    h01 = fleet.host("h01")
    h01_key = next(
        ln.split(" ", 1)[1]
        for ln in fleet.known_hosts.read_text().splitlines()
        if ln.startswith(h01.address + " ")
    )
    known = tmp_path / "known_hosts"
    known.write_text(fleet.known_hosts.read_text() + f"127.0.0.1 {h01_key}\n")
    inv["defaults"]["known_hosts"] = str(known)
    inv["hosts"] = {
        "h01": inv["hosts"]["h01"],
        "hidden": {"address": "127.0.0.1", "port": 22, "jump": "h01"},
    }
    inv["groups"] = {}
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(inv))
    probe = script_file(tmp_path, ADDR_SCRIPT)
    r = run_json(probe, path, "hidden", "--", fleet.gateway)
    assert r.returncode == 0, r.stdout + r.stderr
    addrs = [x["text"] for x in records(r.stdout) if x["type"] == "line"]
    assert f"addr {h01.address}" in addrs


def test_connections_dropped_by_maxstartups_are_retried(tmp_path):
    """sshd drops connections beyond MaxStartups during key exchange; a burst of 12 logins
    to one sshd that admits 2 at a time must still reach every 'host'."""
    from tests.fleet import Fleet

    with Fleet("ebdr", 1, subnet="198.19.6.0/24", max_startups="2:100:2") as one:
        inv = yaml.safe_load(one.inventory.read_text())
        addr = one.host("h01").address
        inv["hosts"] = {f"alias{i:02d}": {"address": addr, "port": 22} for i in range(1, 13)}
        inv["groups"] = {}
        path = tmp_path / "inventory.yaml"
        path.write_text(yaml.safe_dump(inv))
        probe = script_file(tmp_path, "print('hi')\n")
        r = cli("run-script", str(probe), "-i", str(path), "--hosts", "alias[01-12]", "--json")
    assert r.returncode == 0, r.stdout
    assert records(r.stdout)[-1]["ok"] == 12


def test_a_changed_host_key_is_refused_even_with_accept_new(inventory, tmp_path):
    probe = script_file(tmp_path, "print('hi')\n")
    r = cli("run-script", str(probe), "-i", str(inventory), "--hosts", BAD_KEY, "--json",
            "--accept-new-host-keys")  # fmt: skip
    host = [x for x in records(r.stdout) if x["type"] == "host"][0]
    assert r.returncode == 1 and host["error_kind"] == "host-key-changed"
    assert "ssh-keygen -R" in host["error"]


def test_a_too_old_remote_python_is_a_clear_host_error(fleet, tmp_path):
    """An interpreter reporting 3.5 runs the bootstrap, which refuses it by name."""
    old_python = tmp_path / "python3.5"
    old_python.write_text(
        "#!/bin/sh\n"
        "shift\n"  # -c
        'exec /usr/bin/python3 -c "import sys; sys.version_info = (3, 5, 9); '
        'sys.version = \'3.5.9\'; exec(sys.argv[1])" "$@"\n'
    )
    old_python.chmod(0o755)
    tmp_path.chmod(0o755)
    inv = yaml.safe_load(fleet.inventory.read_text())
    inv["hosts"]["h01"]["python"] = str(old_python)
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(inv))
    r = run_json(script_file(tmp_path, "print('hi')\n"), path, "h01,h02")
    by_host = {x["host"]: x for x in records(r.stdout) if x["type"] == "host"}
    assert r.returncode == 1
    assert by_host["h01"]["error_kind"] == "python" and "3.5.9" in by_host["h01"]["error"]
    assert by_host["h02"]["status"] == "ok"


def test_ssh_config_and_its_known_hosts_are_honoured(fleet, tmp_path):
    """An inventory host named only by an ~/.ssh/config alias: HostName, User, IdentityFile
    and UserKnownHostsFile come from the config, as with OpenSSH."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    h03 = fleet.host("h03")
    (home / ".ssh" / "config").write_text(
        "Host fleet-three\n"
        f"  HostName {h03.address}\n"
        f"  User {fleet.user}\n"
        f"  IdentityFile {fleet.client_key}\n"
        f"  UserKnownHostsFile {fleet.known_hosts}\n"
    )
    inv = tmp_path / "inventory.yaml"
    inv.write_text("hosts:\n  three: {address: fleet-three, python: /usr/bin/python3}\n")
    r = cli(
        "run-script", str(script_file(tmp_path, ADDR_SCRIPT)), "-i", str(inv), "--hosts",
        "three", "--json", "--", fleet.gateway,
        env={**os.environ, "HOME": str(home), "SSH_AUTH_SOCK": ""},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"addr {h03.address}" in [x.get("text") for x in records(r.stdout)]


def test_ssh_config_ciphers_are_used_rather_than_ours(fleet, tmp_path, monkeypatch):
    """A site that sets Ciphers in ~/.ssh/config gets those, not the controller's order."""
    import asyncio

    from ebpfdiag import transport
    from ebpfdiag.inventory import Host

    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    h04, h05 = fleet.host("h04"), fleet.host("h05")
    (home / ".ssh" / "config").write_text(f"Host {h04.address}\n  Ciphers aes256-ctr\n")
    monkeypatch.setenv("HOME", str(home))
    for cached in (transport._config_text, transport._algorithms, transport._host_options):
        cached.cache_clear()

    async def cipher(address: str) -> str:
        host = Host(
            name=address,
            address=address,
            user=fleet.user,
            identity_file=str(fleet.client_key),
            known_hosts=str(fleet.known_hosts),
        )
        opts = transport.SSHOptions()
        conn = await transport.connect(host, opts, transport.JumpPool(opts))
        try:
            return conn.get_extra_info("send_cipher")
        finally:
            conn.close()

    try:
        assert asyncio.run(cipher(h04.address)) == "aes256-ctr"
        assert asyncio.run(cipher(h05.address)) == transport.ENCRYPTION_ALGS[0]
    finally:
        for cached in (transport._config_text, transport._algorithms, transport._host_options):
            cached.cache_clear()


def test_a_shipped_tool_runs_as_its_bundle(inventory):
    """``run-script tcp_rst -- --ebpf``: the host gets the tool and its core modules as one
    program (nothing of scripts/bpf exists there) and prints the generated C."""
    r = cli("run-script", "tcp_rst", "-i", str(inventory), "--hosts", "h01", "--json", "--",
            "--ebpf")  # fmt: skip
    assert r.returncode == 0, r.stderr
    text = "\n".join(rec["text"] for rec in records(r.stdout) if rec["type"] == "line")
    assert "ebd_tc_ingress" in text and "TC_ACT_UNSPEC" in text, text[-2000:]
    r = cli("run-script", "tcp_rst", "-i", str(inventory), "--hosts", "h01", "--json", "--",
            "--history", "9")  # fmt: skip
    assert r.returncode == 1
    errors = [rec["text"] for rec in records(r.stdout) if rec.get("stream") == "stderr"]
    assert any("--history: 9 is out of range (0-8)" in e for e in errors), errors


class Collect:
    """A fan-out sink that keeps each host's output and counts its clock samples."""

    def __init__(self, wants_clock: bool):
        self.wants_clock = wants_clock
        self.out: dict[str, list[bytes]] = {}
        self.clocks: dict[str, int] = {}

    def state(self, host, state):
        pass

    def lines(self, host, stream, lines):
        self.out.setdefault(host, []).extend(lines)

    def clock(self, host, sample):
        self.clocks[host] = self.clocks.get(host, 0) + 1

    def result(self, result):
        pass


def run_engine(inventory: Path, expr: str, sink: Collect, text: bytes):
    import asyncio

    from ebpfdiag.fanout import Fanout, FanoutOptions
    from ebpfdiag.inventory import load_inventory, resolve_hosts
    from ebpfdiag.transport import Script

    hosts = resolve_hosts(load_inventory(str(inventory)), expr)
    engine = Fanout(hosts, Script("one.py", text), FanoutOptions(fanout=8), sink)
    return engine, asyncio.run(engine.run())


def test_a_finished_host_keeps_only_its_result(fleet, inventory):
    """Memory per host is bounded once it has finished: the engine drops its stop event and
    its run, and keeps the result; every healthy host answered."""
    sink = Collect(wants_clock=False)
    engine, results = run_engine(inventory, "h[01-20]", sink, b"print(1)\n")
    assert [r.status for r in results] == ["ok"] * 20
    assert sink.out == {h: [b"1"] for h in HEALTHY}
    assert engine._stops == {} and engine._runs == {}


def test_hosts_are_pinged_for_clocks_only_when_the_sink_aligns_them(inventory):
    """A clock ping is a packet each way: run-script, doctor and metrics do without."""
    text = b"import time\nprint(1)\ntime.sleep(0.3)\n"
    plain = Collect(wants_clock=False)
    run_engine(inventory, "h[01-03]", plain, text)
    timed = Collect(wants_clock=True)
    run_engine(inventory, "h[01-03]", timed, text)
    assert plain.out == timed.out == {h: [b"1"] for h in HEALTHY[:3]}
    assert plain.clocks == {}
    assert sorted(timed.clocks) == HEALTHY[:3] and min(timed.clocks.values()) >= 3
