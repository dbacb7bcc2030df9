"""Full sudo or the runner, per host, in the lab: real sshd, real sudo, real sudoers.

The lab's ``ebpfdiag-lab`` has full sudo; ``diag`` (group ``ebpfdiag``) has no sudo rule of
its own. Each lab host has private runner paths and /etc/sudoers.d, so what is installed
on one host is on that host only. Until a runner is installed on a host, ``diag`` may
run nothing there; a stand-in runner (a real program speaking the runner's side of the
launch, ``FAKE_RUNNER``) checks the controller's side on its own, and the real runner,
installed as an admin would, checks the whole path: the reset scenarios traced as
``diag`` give the same verdicts as with full sudo.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ebpfdiag.catalog import script_path
from ebpfdiag.lab import hostfs
from ebpfdiag.lab.scenarios import SCENARIOS, run_scenario
from ebpfdiag.lab.topology import DIAG_USER, LAB_USER, Lab
from ebpfdiag.remote.bundle import bundle
from tests.conftest import require, require_root_tools
from tests.test_trace_lab import start_trace

pytestmark = pytest.mark.root

PREFIX, BASE = "ebrc", "198.18.200.0"
STATE_DIR = Path("/run/ebpfdiag/lab-runnerctl-test")
RUNNER_DIR = "/usr/local/lib/ebpfdiag-runner"
TOOLS = ("doctor", "drop", "netmetrics", "tcp_latency", "tcp_rst")
BOOTSTRAP = Path(__file__).resolve().parents[1] / "src" / "ebpfdiag" / "remote" / "bootstrap.py"
SUDOERS_RULE = f'%ebpfdiag ALL=(root) NOPASSWD: {RUNNER_DIR}/current/runner ""\n'

#: The runner's side of the launch and nothing more: no policy, no parameter checks. It
#: logs every request line it reads in its host's /run/ebpfdiag-runner/requests.log, then
#: runs the installed tool through the bootstrap (fed the tool instead of stdin's script).
FAKE_RUNNER = r"""#!/usr/bin/python3 -I
import hashlib, json, os, sys

HERE = os.path.dirname(os.path.realpath(__file__))
MARK = "\x1eebpfdiag:"
TOOLS = sorted(n[:-3] for n in os.listdir(os.path.join(HERE, "tools")) if n.endswith(".py"))


def mark(text):
    os.write(2, (MARK + text + "\n").encode())


def refuse(why):
    mark("error refused " + why)
    sys.exit(77)


mark("want-request %d.%d.%d fake-1 %s" % (sys.version_info[:3] + (",".join(TOOLS),)))
inp = sys.stdin.buffer
line = inp.readline()
with open("/run/ebpfdiag-runner/requests.log", "ab") as log:
    log.write(line if line.endswith(b"\n") else line + b"<EOF>\n")
if not line.startswith(b"EBPFDIAG-RUN1 "):
    sys.exit(98)
req = json.loads(line[len(b"EBPFDIAG-RUN1 "):].decode())
tool = req["tool"]
if tool not in TOOLS:
    refuse("unknown tool %r (allowed: %s)" % (tool, ", ".join(TOOLS)))
with open(os.path.join(HERE, "tools", tool + ".py"), "rb") as f:
    src = f.read()
digest = hashlib.sha256(src).hexdigest()
if digest != req["sha256"]:
    refuse("tool %s: controller expects sha256 %s..., runner has %s..."
           % (tool, req["sha256"][:12], digest[:12]))
frame = b"EBPFDIAG1 %d %s %s.py\n" % (len(src), digest.encode(), tool.encode()) + src


class Prefixed:
    def __init__(self, first, rest):
        self.first, self.rest = first, rest

    def readline(self):
        if self.first:
            line, nl, self.first = self.first.partition(b"\n")
            return line + nl
        return self.rest.readline()

    def read(self, n):
        out, self.first = self.first[:n], self.first[n:]
        return out + (self.rest.read(n - len(out)) if len(out) < n else b"")


class Stdin:
    buffer = Prefixed(frame, inp)


with open(os.path.join(HERE, "bootstrap.py")) as f:
    boot = f.read().replace('_mark("want-script %d.%d.%d" % sys.version_info[:3])', "pass")
sys.argv = ["bootstrap"] + [str(a) for a in req["args"]]
sys.stdin = Stdin()
exec(compile(boot, "bootstrap", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""

#: Arbitrary code: loads a BPF program, says so in a root-only file of its host, waits.
PROBE = """
import os, signal, sys, time
from bcc import BPF
b = BPF(text="int f(void *ctx) { return 0; }")
b.load_func("f", BPF.SOCKET_FILTER)
with open("/run/ebpfdiag-runner/probe-ran", "w") as f:
    f.write(str(os.getpid()))
print("probe loaded", flush=True)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    time.sleep(0.2)
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    require_root_tools("ip", "nft", "tc", "bpftool", "/usr/sbin/sshd", "sudo", "visudo")
    require(Path("/usr/lib/python3/dist-packages/bcc").is_dir(), "needs python3-bpfcc")
    inventory = tmp_path_factory.mktemp("runnerctl") / "inventory.yaml"
    the_lab = Lab(state_dir=STATE_DIR, prefix=PREFIX, base=BASE, inventory_out=inventory)
    the_lab.down()
    try:
        yield the_lab.up()
    finally:
        the_lab.down()
        assert not inventory.exists() and not Path(the_lab.plan().diag_inventory).exists()


@pytest.fixture
def clean(lab):
    """Every host starts and ends without a runner (nothing installed, nothing logged)."""
    for host in lab.hosts:
        remove_runner(lab, host)
    yield lab
    for host in lab.hosts:
        remove_runner(lab, host)


def fs(lab, host: str, target: str) -> Path:
    """The host's own copy of ``target`` (what the host sees at ``target``)."""
    return Path(lab.state_dir) / "hosts" / host / "fs" / hostfs.host_dir_for(target)


def remove_runner(lab, host: str) -> None:
    hostfs.unpin(Path(lab.state_dir) / "hosts")
    for target in (RUNNER_DIR, "/etc/ebpfdiag", "/run/ebpfdiag-runner", "/var/log/ebpfdiag"):
        for item in fs(lab, host, target).iterdir():
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
    fs(lab, host, "/etc/sudoers.d").joinpath("ebpfdiag-runner").unlink(missing_ok=True)


def install_fake_runner(lab, host: str, *, tamper: str | None = None) -> None:
    release = fs(lab, host, RUNNER_DIR) / "releases" / "fake"
    (release / "tools").mkdir(parents=True)
    for name in TOOLS:
        text = bundle(script_path(name), check=False)
        (release / "tools" / f"{name}.py").write_text(
            text + ("# changed\n" if name == tamper else "")
        )
    boot = BOOTSTRAP.read_text()
    assert '_mark("want-script %d.%d.%d" % sys.version_info[:3])' in boot  # FAKE_RUNNER drops it
    (release / "bootstrap.py").write_text(boot)
    (release / "runner").write_text(FAKE_RUNNER)
    (release / "runner").chmod(0o755)
    (release.parent.parent / "current").symlink_to("releases/fake")
    rule = fs(lab, host, "/etc/sudoers.d") / "ebpfdiag-runner"
    rule.write_text(SUDOERS_RULE)
    rule.chmod(0o440)


def requests(lab, host: str) -> list[str]:
    log = fs(lab, host, "/run/ebpfdiag-runner") / "requests.log"
    return log.read_text().splitlines() if log.exists() else []


def inventory(lab, tmp_path: Path, users: dict[str, str], **settings: dict) -> str:
    """The lab's inventory with a login user per host (and other settings per host)."""
    data = yaml.safe_load(Path(lab.inventory).read_text())
    for host, user in users.items():
        data["hosts"][host]["user"] = user
    for host, values in settings.items():
        data["hosts"][host].update(values)
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def ebpfdiag(
    *args: str, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ebpfdiag", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def hosts_of(recs: list[dict]) -> dict[str, dict]:
    return {r["host"]: r for r in recs if r["type"] == "host"}


def netns_pids(lab, host: str) -> dict[int, str]:
    """Processes in the host's network namespace other than its sshd daemon: pid -> cmdline."""
    inode = os.stat(f"/run/netns/{lab.host(host).netns}").st_ino
    out = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or os.stat(proc / "ns" / "net").st_ino != inode:
                continue
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "sshd_config" not in cmd:  # the daemon (``sshd: ... -f CONFIG [listener]``)
            out[int(proc.name)] = cmd
    return out


def bpf_progs(lab, host: str) -> list[str]:
    """BPF programs held by processes in the host's network namespace."""
    ids = []
    for pid in netns_pids(lab, host):
        try:
            for info in Path(f"/proc/{pid}/fdinfo").iterdir():
                ids += re.findall(r"^prog_id:\s+(\d+)", info.read_text(), re.M)
        except OSError:
            continue
    return ids


def settled(check, timeout: float = 10.0):
    """``check()`` once it is falsy (processes take a moment to end), else its last value."""
    deadline = time.monotonic() + timeout
    value = check()
    while value and time.monotonic() < deadline:
        time.sleep(0.2)
        value = check()
    return value


# -- detection ------------------------------------------------------------------------


def test_full_sudo_user_runs_with_sudo(clean, tmp_path):
    install_fake_runner(clean, "lb")  # full sudo wins over an installed runner
    install_fake_runner(clean, "client")  # and sudo: false is left as it is
    mixed = inventory(clean, tmp_path, {}, client={"sudo": False})
    log = tmp_path / "audit.ndjson"
    proc = ebpfdiag("run-script", "tcp_rst", "-i", mixed, "--hosts", "client,lb,server",
                    "--json", "--", "--help", env={"EBPFDIAG_AUDIT_LOG": str(log)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert {h: r["status"] for h, r in hosts_of(records(proc.stdout)).items()} == {
        "client": "ok",
        "lb": "ok",
        "server": "ok",
    }
    audit = {r["host"]: r for r in records(log.read_text())}
    assert {h: (r["via"], r["ssh_user"]) for h, r in audit.items()} == {
        "client": ("direct", LAB_USER),
        "lb": ("sudo", LAB_USER),
        "server": ("sudo", LAB_USER),
    }
    assert requests(clean, "lb") == requests(clean, "client") == []


def test_an_install_is_on_its_host_only(clean, tmp_path):
    install_fake_runner(clean, "lb")
    look = tmp_path / "look.py"
    look.write_text(
        "import json, os\n"
        "print(json.dumps({p: sorted(os.listdir(p)) for p in ("
        "'/usr/local/lib/ebpfdiag-runner', '/etc/sudoers.d')}))\n"
    )
    proc = ebpfdiag("run-script", str(look), "-i", clean.inventory, "--hosts", "lb,server",
                    "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seen = {r["host"]: r["record"] for r in records(proc.stdout) if r["type"] == "record"}
    assert seen["lb"] == {
        RUNNER_DIR: ["current", "releases"],
        "/etc/sudoers.d": [hostfs.MACHINE_INCLUDE, "ebpfdiag-runner"],
    }
    assert seen["server"] == {RUNNER_DIR: [], "/etc/sudoers.d": [hostfs.MACHINE_INCLUDE]}


def test_diag_runs_through_the_runner_where_one_is_installed(clean, tmp_path):
    install_fake_runner(clean, "lb")  # on lb only: server has nothing for diag
    log = tmp_path / "audit.ndjson"
    proc = ebpfdiag("run-script", "tcp_rst", "-i", clean.diag_inventory, "--hosts", "lb,server",
                    "--json", "--", "--help", env={"EBPFDIAG_AUDIT_LOG": str(log)})  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    recs = records(proc.stdout)
    hosts = hosts_of(recs)
    assert hosts["lb"]["status"] == "ok"
    assert any(r["type"] == "line" and "usage: tcp_rst" in r["text"] for r in recs)
    assert hosts["server"]["error_kind"] == "sudo"
    assert hosts["server"]["error"] == (
        "sudo needs a password on server; use --ask-sudo-pass or allow NOPASSWD for this "
        "user, or install the ebpfdiag runner for this user's group"
    )
    digest = hashlib.sha256(bundle(script_path("tcp_rst")).encode()).hexdigest()
    [line] = requests(clean, "lb")
    tag, body = line.split(" ", 1)
    assert tag == "EBPFDIAG-RUN1"
    assert json.loads(body) == {
        "tool": "tcp_rst",
        "sha256": digest,
        "args": ["--help"],
        "ssh_user": DIAG_USER,
    }
    assert not fs(clean, "server", RUNNER_DIR).joinpath("current").exists()
    audit = {r["host"]: r for r in records(log.read_text())}
    assert audit["lb"]["via"] == "runner" and audit["lb"]["exit_code"] == 0
    assert audit["lb"]["tool"] == "tcp_rst" and audit["lb"]["sha256"] == digest
    assert audit["server"]["via"] is None and audit["server"]["error_kind"] == "sudo"


def test_arbitrary_code_is_refused_where_only_the_runner_is(clean, tmp_path):
    install_fake_runner(clean, "lb")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    mixed = inventory(clean, tmp_path, {"lb": DIAG_USER, "server": LAB_USER})
    argv = [sys.executable, "-m", "ebpfdiag", "run-script", str(probe), "-i", mixed,
            "--hosts", "lb,server", "--json", "--duration", "30s"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ran = fs(clean, "server", "/run/ebpfdiag-runner") / "probe-ran"
        deadline = time.monotonic() + 60
        while not ran.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ran.exists(), proc.stderr.read() if proc.poll() is not None else "probe never ran"
        assert bpf_progs(clean, "server")  # the full-sudo host runs it, BPF and all
        assert bpf_progs(clean, "lb") == []
        assert settled(lambda: netns_pids(clean, "lb")) == {}
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err  # stopped by us: the exit code says interrupted
    hosts = hosts_of(records(out))
    assert hosts["lb"]["status"] == "failed" and hosts["lb"]["error_kind"] == "runner"
    assert hosts["lb"]["error"] == (
        "runner only on lb: allows doctor, drop, netmetrics, tcp_latency, tcp_rst"
    )
    assert hosts["server"]["status"] == "interrupted"
    assert not (fs(clean, "lb", "/run/ebpfdiag-runner") / "probe-ran").exists()
    assert [line for line in requests(clean, "lb") if "EBPFDIAG-RUN1" in line] == []
    assert settled(lambda: bpf_progs(clean, "server")) == []


def test_arbitrary_code_alone_exits_1(clean, tmp_path):
    install_fake_runner(clean, "lb")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    mixed = inventory(clean, tmp_path, {"lb": DIAG_USER, "server": LAB_USER})
    proc = ebpfdiag("run-script", str(probe), "-i", mixed, "--hosts", "lb", "--json")
    assert proc.returncode == 1, proc.stderr
    [host] = hosts_of(records(proc.stdout)).values()
    assert (host["error_kind"], host["exit_code"]) == ("runner", None)
    assert host["error"].startswith("runner only on lb: allows doctor, drop")
    assert [line for line in requests(clean, "lb") if "EBPFDIAG-RUN1" in line] == []
    assert not (fs(clean, "lb", "/run/ebpfdiag-runner") / "probe-ran").exists()


def test_a_refusal_names_the_runners_reason(clean):
    install_fake_runner(clean, "lb", tamper="tcp_rst")
    proc = ebpfdiag("run-script", "tcp_rst", "-i", clean.diag_inventory, "--hosts", "lb",
                    "--json", "--", "--help")  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    [host] = hosts_of(records(proc.stdout)).values()
    assert host["error_kind"] == "runner"
    assert re.fullmatch(
        r"the runner on lb refused: tool tcp_rst: controller expects sha256 [0-9a-f]{12}\.\.\., "
        r"runner has [0-9a-f]{12}\.\.\.",
        host["error"],
    ), host["error"]


# -- the real runner ------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(lab):
    """The runner installed on every lab host for group ebpfdiag, as an admin with full
    sudo installs it (``ebpfdiag runner install``, over the normal fan-out)."""
    for host in lab.hosts:
        remove_runner(lab, host)
    proc = ebpfdiag("runner", "install", "-i", lab.inventory, "--hosts", "client,lb,server",
                    "--group", "ebpfdiag", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        yield lab
    finally:
        for host in lab.hosts:
            remove_runner(lab, host)


def trace_scenario(lab, inventory: str, name: str, env: dict) -> list[dict]:
    """The scenario traced by ``trace tcp-rst --count 1`` as the inventory's user."""
    proc = start_trace(lab, SCENARIOS[name].port, "--count", "1", "--duration", "20s",
                       inventory=inventory, env=env)  # fmt: skip
    result = run_scenario(name, lab)
    assert result.reproduced, result.summary()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    recs = records(out)
    assert all(h["status"] == "ok" and h["ready"] for h in hosts_of(recs).values())
    return recs


def verdicts(recs: list[dict]) -> list[tuple]:
    """Each flow's verdict: who sent the reset, what kind, why, and where it went."""
    return [
        (v["origin_host"], v["origin_kind"], v["reason"], [hop["host"] for hop in v["path"]])
        for v in (r["verdict"] for r in recs if r["type"] == "flow")
    ]


def vias(recs: list[dict]) -> dict[str, str | None]:
    return {r["host"]: r.get("via") for r in recs if r["type"] == "hello"}


def programs_of(recs: list[dict]) -> dict[str, str | None]:
    """Per host, where its BPF program came from (hello.program)."""
    return {r["host"]: r.get("program") for r in recs if r["type"] == "hello"}


@pytest.mark.parametrize("name", ["rst-no-listener", "rst-abort", "rst-lb-reject"])
def test_diag_traces_resets_through_the_runner_with_root_verdicts(
    installed, name, tmp_path, syslog_listener
):
    as_root = trace_scenario(installed, installed.inventory, name, {})
    log = tmp_path / "audit.ndjson"
    as_diag = trace_scenario(
        installed, installed.diag_inventory, name, {"EBPFDIAG_AUDIT_LOG": str(log)}
    )
    expected = SCENARIOS[name].expected
    [(host, kind, reason, path)] = verdicts(as_diag)
    assert (host, kind, reason, path[-1]) == (
        expected.host,
        expected.kind,
        expected.reason,
        "client",
    )
    assert verdicts(as_diag) == verdicts(as_root)
    every = ("client", "lb", "server")
    assert (vias(as_root), vias(as_diag)) == (
        dict.fromkeys(every, "sudo"),
        dict.fromkeys(every, "runner"),
    )
    # the runner's tools compile their own program: they never ask for a kept one, even
    # where the controller keeps one for this very program and host (as root just did)
    assert set(programs_of(as_root).values()) <= {"compiled", "kept"}
    assert programs_of(as_diag) == dict.fromkeys(every, None)
    digest = hashlib.sha256(bundle(script_path("tcp_rst")).encode()).hexdigest()
    audit = records(log.read_text())
    assert sorted(r["host"] for r in audit) == list(every)
    for rec in audit:
        assert (rec["via"], rec["tool"], rec["sha256"], rec["ssh_user"]) == (
            "runner", "tcp_rst", digest, DIAG_USER,
        )  # fmt: skip
        assert rec["args"][:2] == ["--port", str(SCENARIOS[name].port)] and rec["stopped"]
    # every host's runner recorded the run in the system log and in its own audit file
    logged = syslog_listener.wait_for('"ssh_user": "diag"')
    assert logged and all("ebpfdiag-runner[" in m and "tcp_rst" in m for m in logged)
    for host in every:
        own = fs(installed, host, "/var/log/ebpfdiag") / "runner.log"
        assert '"ssh_user": "diag"' in own.read_text()
    assert settled(lambda: netns_pids(installed, "server")) == {}


def test_run_script_name_goes_through_the_runner_and_code_does_not(installed, tmp_path):
    log = tmp_path / "audit.ndjson"
    proc = ebpfdiag("run-script", "doctor", "-i", installed.diag_inventory, "--hosts", "lb",
                    "--json", env={"EBPFDIAG_AUDIT_LOG": str(log)})  # fmt: skip
    recs = records(proc.stdout)
    assert hosts_of(recs)["lb"]["status"] == "ok", proc.stdout + proc.stderr
    checks = [r["record"] for r in recs if r["type"] == "record" and r["record"]["type"] == "check"]
    assert {c["name"] for c in checks} >= {"bcc", "compile", "tracepoint"}
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    proc = ebpfdiag("run-script", str(probe), "-i", installed.diag_inventory, "--hosts", "lb",
                    "--json", env={"EBPFDIAG_AUDIT_LOG": str(log)})  # fmt: skip
    assert proc.returncode == 1
    [host] = hosts_of(records(proc.stdout)).values()
    assert host["error"] == (
        "runner only on lb: allows doctor, drop, netmetrics, tcp_latency, tcp_rst"
    )
    first, second = records(log.read_text())
    assert (first["tool"], first["via"], first["exit_code"]) == ("doctor", "runner", 0)
    assert (second["tool"], second["via"], second["error_kind"]) == (None, "runner", "runner")
    assert second["script"] == "probe.py"


def test_doctor_and_metrics_work_through_the_runner(installed, tmp_path):
    log = tmp_path / "audit.ndjson"
    env = {"EBPFDIAG_AUDIT_LOG": str(log)}
    proc = ebpfdiag("doctor", "-i", installed.diag_inventory, "--hosts", "lb", "--json", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = records(proc.stdout)
    assert recs[-1]["type"] == "summary" and recs[-1]["ready"] == 1
    textfile = tmp_path / "prom"
    textfile.mkdir()
    proc = ebpfdiag("metrics", "textfile", "-i", installed.diag_inventory, "--hosts", "lb",
                    "--dir", str(textfile), "--once", "--interval", "1s", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert 'host="lb"' in (textfile / "ebpfdiag.prom").read_text()
    audit = records(log.read_text())
    assert [(r["tool"], r["via"], r["error_kind"]) for r in audit] == [
        ("doctor", "runner", None),
        ("netmetrics", "runner", None),
    ]


@pytest.mark.parametrize("command", [("latency", "--sample", "1"), ("drop",)])
def test_the_other_tracers_work_through_the_runner(installed, command, tmp_path):
    """trace latency and trace drop as diag: every host runs its tool through the runner
    (hello.via), with the same parameters a root user's run would send."""
    log = tmp_path / "audit.ndjson"
    proc = ebpfdiag("trace", *command[:1], "-i", installed.diag_inventory, "--hosts",
                    "client,lb,server", "--port", "8080", "--duration", "3s", *command[1:],
                    "--json", env={"EBPFDIAG_AUDIT_LOG": str(log)})  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = records(proc.stdout)
    every = ("client", "lb", "server")
    assert vias(recs) == dict.fromkeys(every, "runner")
    assert all(h["status"] == "ok" for h in hosts_of(recs).values())
    tool = {"latency": "tcp_latency", "drop": "drop"}[command[0]]
    audit = records(log.read_text())
    assert sorted((r["host"], r["tool"], r["via"]) for r in audit) == [
        (host, tool, "runner") for host in every
    ]
    assert all("--port" in r["args"] and r["stopped"] for r in audit)


def test_uninstall_leaves_each_host_as_before_but_its_audit_file(installed):
    """Last of the module: the runner's mount points stay, their contents go."""
    proc = ebpfdiag("runner", "uninstall", "-i", installed.inventory, "--hosts", "client,lb,server")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for host in installed.hosts:
        assert list(fs(installed, host, RUNNER_DIR).iterdir()) == []
        assert sorted(p.name for p in fs(installed, host, "/etc/sudoers.d").iterdir()) == [
            hostfs.MACHINE_INCLUDE
        ]
        assert [p.name for p in fs(installed, host, "/var/log/ebpfdiag").iterdir()] == [
            "runner.log"
        ]
    proc = ebpfdiag(
        "run-script", "doctor", "-i", installed.diag_inventory, "--hosts", "lb", "--json"
    )
    assert proc.returncode == 1 and hosts_of(records(proc.stdout))["lb"]["error_kind"] == "sudo"
