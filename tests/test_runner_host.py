"""The runner on a real host: real sudo and sudoers, a real user in the runner's group.

Each test host is a private mount namespace (``unshare -m``, inside its own network
namespace) with fresh mounts over every path the runner uses: overlays over /usr/local/lib,
/etc (so /etc/sudoers.d is a private copy) and /var/log, a tmpfs on /run, and a /dev
whose ``log`` is a datagram socket this test listens on, since the machine runs no syslog
daemon. Nothing reaches the real system, and tests may run side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ebpfdiag.remote.runner_build import admin_script, build_payload, default_policy
from tests.conftest import require

pytestmark = pytest.mark.root

RUNNER = "/usr/local/lib/ebpfdiag-runner/current/runner"
RELEASE = "/usr/local/lib/ebpfdiag-runner/current"
AUDIT = "/var/log/ebpfdiag/runner.log"
MARK = b"\x1eebpfdiag:"
PREFIX = "ebru"
SETUP = r"""
set -e
S="$1"
mount -t tmpfs -o mode=0755 tmpfs "$S/mnt"
n=0
for d in /usr/local/lib /etc /var/log; do
    mkdir -p "$S/mnt/o$n/u" "$S/mnt/o$n/w"
    mount -t overlay overlay -o "lowerdir=$d,upperdir=$S/mnt/o$n/u,workdir=$S/mnt/o$n/w" "$d"
    n=$((n + 1))
done
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir "$S/mnt/dev"
mount --rbind /dev "$S/mnt/dev"
mount -t tmpfs -o mode=0755 tmpfs /dev
for f in null zero full random urandom tty; do
    touch "/dev/$f"
    mount --bind "$S/mnt/dev/$f" "/dev/$f"
done
for d in pts shm; do
    mkdir "/dev/$d"
    mount --bind "$S/mnt/dev/$d" "/dev/$d"
done
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
touch /dev/log
mount --bind "$S/log.sock" /dev/log
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
ip link set lo up
ip addr add 198.18.250.1/30 dev {pfx}v0
ip link set {pfx}v0 up
"""


def _retry(cmd: list[str], tries: int = 50) -> None:
    """useradd and friends fail while another process holds /etc/passwd's lock."""
    for _ in range(tries):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{cmd}: {proc.stderr.strip()}")


@pytest.fixture(scope="module")
def accounts():
    """A group the runner serves, a user in it with no other sudo right, and another user
    in no such group; removed afterwards."""
    for tool in ("unshare", "nsenter", "runuser", "visudo", "useradd", "/usr/bin/python3"):
        require(shutil.which(tool) is not None, f"needs {tool}")
    tag = os.getpid()
    group, user, other = f"{PREFIX}-g{tag}", f"{PREFIX}-d{tag}", f"{PREFIX}-o{tag}"
    _retry(["groupadd", group])
    try:
        _retry(["useradd", "-M", "-U", "-G", group, "-s", "/bin/sh", user])
        _retry(["useradd", "-M", "-U", "-s", "/bin/sh", other])
        password = secrets.token_hex(12)
        subprocess.run(["chpasswd"], input=f"{user}:{password}\n", text=True, check=True)
        yield {"group": group, "user": user, "other": other, "password": password}
    finally:
        for cmd in (["userdel", user], ["userdel", other], ["groupdel", group]):
            with contextlib.suppress(RuntimeError):  # already gone
                _retry(cmd, tries=10)


class Syslog:
    """A /dev/log stand-in: every datagram sent to it, read at once by a thread (a full
    queue would block every sender on the host: sudo, runuser, the runner)."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            self.lines.append(data.decode(errors="replace"))

    def drain(self, wait: float = 0.3) -> list[str]:
        time.sleep(wait)
        return list(self.lines)

    def runner_records(self, wait: float = 0.5) -> list[dict]:
        out = []
        for line in self.drain(wait):
            if "ebpfdiag-runner[" in line and "{" in line:
                out.append(json.loads(line[line.index("{") :]))
        return out


class Host:
    """One private host: its namespaces, its syslog, and ways to run things in it."""

    def __init__(self, tmp: Path, accounts: dict):
        self.tmp = tmp
        self.accounts = accounts
        tmp.chmod(0o755)
        (tmp / "mnt").mkdir()
        self.syslog = Syslog(tmp / "log.sock")
        self.netns = f"{PREFIX}-{os.getpid()}-{tmp.name[-12:]}"[:40]
        self.peer = self.netns + "p"
        for ns in (self.netns, self.peer):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(
            ["ip", "link", "add", f"{PREFIX}v0", "netns", self.netns, "type", "veth"]
            + ["peer", "name", f"{PREFIX}v1", "netns", self.peer],
            check=True,
        )
        peer = ["ip", "-n", self.peer]
        subprocess.run([*peer, "addr", "add", "198.18.250.2/30", "dev", f"{PREFIX}v1"], check=True)
        subprocess.run([*peer, "link", "set", f"{PREFIX}v1", "up"], check=True)
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "-m", "--propagation", "private"]
            + ["sleep", "infinity"]
        )
        mine = os.stat("/proc/self/ns/mnt").st_ino
        for _ in range(200):
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{self.holder.pid}/ns/mnt").st_ino != mine:
                    break
            time.sleep(0.01)
        # the holder is unshare's child when unshare forks; find the sleeping process
        self.pid = self._sleeper()
        self.sh(SETUP.replace("{pfx}", PREFIX), str(tmp))

    def _sleeper(self) -> int:
        for _ in range(200):
            out = subprocess.run(
                ["pgrep", "-P", str(self.holder.pid)], capture_output=True, text=True
            ).stdout.split()
            cmd = Path(f"/proc/{self.holder.pid}/cmdline").read_bytes()
            if cmd.startswith(b"sleep"):
                return self.holder.pid
            if out:
                return int(out[0])
            time.sleep(0.01)
        raise RuntimeError("namespace holder did not start")

    def enter(self) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-m", "-n", "--"]

    def sh(self, script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.enter(), "sh", "-c", script, "sh", *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def path(self, inside: str) -> Path:
        """A path of this host seen from outside (through the holder's root)."""
        return Path(f"/proc/{self.pid}/root{inside}")

    def admin(self, action: str, *args: str, policy: dict | None = None, payload=None) -> dict:
        if action == "install" and payload is None:
            payload = build_payload()
        if action == "install" and policy is None:
            policy = default_policy(self.accounts["group"])
        script = self.tmp / f"admin-{action}.py"
        script.write_text(admin_script(action, payload, policy))
        proc = subprocess.run(
            [*self.enter(), "/usr/bin/python3", str(script), action, *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.stdout, proc.stderr
        return json.loads(proc.stdout.splitlines()[-1]) | {"exit": proc.returncode}

    def start(self, user: str | None, env: dict | None = None, argv: list[str] | None = None):
        """The runner started as the controller would (sudo -n as ``user``), or directly
        as root when ``user`` is None."""
        cmd = argv or [RUNNER]
        if user is not None:
            sudo = ["sudo"] if argv and argv[0] == "-S" else ["sudo", "-n"]
            cmd = ["runuser", "-u", user, "--", *sudo, *cmd]
        base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        return subprocess.Popen(
            [*self.enter(), "env", "-i", *[f"{k}={v}" for k, v in {**base, **(env or {})}.items()]]
            + cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def ask(
        self,
        request: dict | None,
        user: str | None = "",
        env=None,
        argv=None,
        stdin=b"",
        hold: float | None = 0.0,
    ):
        """Start the runner, send ``request`` (or ``stdin``), close stdin after ``hold``
        seconds (None: only once the runner has exited, as a patient controller does) and
        wait for the end: (exit status, stdout, stderr, markers)."""
        user = self.accounts["user"] if user == "" else user
        proc = self.start(user, env, argv)
        line = stdin
        if request is not None:
            line = b"EBPFDIAG-RUN1 " + json.dumps(request).encode() + b"\n"
        out: list[bytes] = []
        err: list[bytes] = []
        readers = [
            threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True),
            threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True),
        ]
        for reader in readers:
            reader.start()
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(line)
            proc.stdin.flush()
        try:
            if hold is not None:
                time.sleep(hold)
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
            proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            for reader in readers:
                reader.join(10)
        errs = b"".join(err)
        markers = [
            ln[ln.index(MARK) + len(MARK) :].decode() for ln in errs.split(b"\n") if MARK in ln
        ]
        return proc.returncode, b"".join(out), errs, markers

    def audit(self) -> list[dict]:
        path = self.path(AUDIT)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def processes(self) -> list[str]:
        """Commands of the processes in this host's mount namespace, the holder aside."""
        ns = os.readlink(f"/proc/{self.pid}/ns/mnt")
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in (self.pid, self.holder.pid):
                continue
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "mnt") == ns:
                    found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        return found

    def close(self) -> None:
        self.holder.send_signal(signal.SIGTERM)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.holder.wait(timeout=10)
        for ns in (self.netns, self.peer):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.syslog.sock.shutdown(socket.SHUT_RDWR)
        self.syslog.sock.close()


@contextlib.contextmanager
def installed_host(tmp: Path, accounts: dict, policy: dict | None = None):
    """A private host with the runner installed for ``accounts``' group, removed after."""
    h = Host(tmp, accounts)
    try:
        result = h.admin("install", accounts["group"], policy=policy)
        assert result["exit"] == 0 and result["ready"], result
        yield h
    finally:
        h.close()


@pytest.fixture
def host(tmp_path, accounts):
    """A fresh host, for the tests that change what is installed."""
    with installed_host(tmp_path, accounts) as h:
        yield h


def request(tool: str, args: list[str] | None = None, sha: str | None = None) -> dict:
    catalog = build_payload().catalog["tools"]
    digest = sha or (catalog[tool]["sha256"] if tool in catalog else "0" * 64)
    return {"tool": tool, "sha256": digest, "args": args or [], "ssh_user": "alice"}


def test_install_leaves_root_owned_files_and_a_checked_sudoers_rule(host, accounts):
    release = host.path(RELEASE)
    for path in [release, release / "runner", release / "catalog.json", release / "tools"]:
        st = path.stat()
        assert st.st_uid == 0 and not st.st_mode & 0o022, path
    sudoers = host.path("/etc/sudoers.d/ebpfdiag-runner")
    assert oct(sudoers.stat().st_mode & 0o777) == "0o440"
    assert f'%{accounts["group"]} ALL=(root) NOPASSWD: {RUNNER} ""' in sudoers.read_text()
    assert not Path("/etc/sudoers.d/ebpfdiag-runner").exists()  # private to this host
    assert not Path(RUNNER).exists()
    again = host.admin("install", accounts["group"])
    assert again["exit"] == 0 and again["changed"] == [], again


@pytest.fixture(scope="module")
def shared(tmp_path_factory, accounts):
    """One installed host for the checks that change nothing on it."""
    with installed_host(tmp_path_factory.mktemp("shared"), accounts) as h:
        yield h


def assert_refused(h: Host, result, why: str, running: list[str] | None = None) -> dict:
    """Refused with the one line, exit 77, nothing started or left running, and the
    refusal both in the audit file and in syslog."""
    status, out, err, markers = result
    refusals = [m for m in markers if m.startswith("error refused ")]
    assert status == 77, (status, err)
    assert len(refusals) == 1 and why in refusals[0], markers
    assert not any(m.startswith("running") for m in markers) and out == b""
    assert sorted(h.processes()) == sorted(running or [])  # other runs on the host only
    line = refusals[0][len("error refused ") :]
    in_file = [r for r in h.audit() if r.get("refusal") == line]
    in_syslog = [r for r in h.syslog.runner_records() if r.get("refusal") == line]
    assert len(in_file) == 1 and in_syslog == in_file, (in_file, in_syslog)
    assert in_file[0]["event"] == "refused" and in_file[0]["exit_status"] == 77
    return in_file[0]


@pytest.mark.parametrize(
    "tool, args, why",
    [
        ("nosuch", [], "unknown tool 'nosuch' (allowed: doctor, drop, netmetrics"),
        ("../x", [], "tool '../x' is a path, not a tool name"),
        ("/usr/bin/id", [], "is a path, not a tool name"),
        ("tcp_rst", ["--port", "80;sh"], "--port: '80;sh' contains characters the runner"),
        ("tcp_rst", ["--addr", "$(id)"], "--addr: '$(id)' contains characters"),
        ("tcp_rst", ["--exec", "x"], "'--exec': not an option of this tool"),
        ("tcp_rst", ["--dur", "5"], "'--dur': not an option of this tool"),
        ("tcp_rst", ["--port=80"], "'--port=80': not an option of this tool"),
        ("tcp_rst", ["--count", "99999999999"], "--count: 99999999999 is too large"),
        ("tcp_rst", ["--port", "8" * 300], "--port: value of 300 characters"),
        ("tcp_rst", ["--history", "9"], "--history: 9 is out of range (0-8)"),
        ("tcp_rst", ["--duration", "nan"], "--duration: nan is not a finite number"),
        ("tcp_rst", ["--duration", "7200"], "--duration 2h over the policy's cap of 1h"),
        ("tcp_rst", ["--ebpf"], "--ebpf: only for local use"),
        ("tcp_rst", ["--format-dir", "x"], "--format-dir: only for local use"),
        ("tcp_rst", ["--port"], "--port: needs a value"),
    ],
)
def test_requests_outside_the_catalog_or_the_schema_are_refused(shared, accounts, tool, args, why):
    record = assert_refused(shared, shared.ask(request(tool, args)), why)
    assert record["sudo_user"] == accounts["user"] and record["ssh_user"] == "alice"
    assert record["tool"] == tool and record["args"] == [a[:257] for a in args]


def test_a_digest_the_controller_does_not_expect_names_both(shared):
    result = shared.ask(request("doctor", sha="ab" * 32))
    actual = build_payload().catalog["tools"]["doctor"]["sha256"]
    assert_refused(shared, result, f"controller expects sha256 {'ab' * 32}, runner has {actual}")


def test_a_user_outside_the_group_is_refused(shared, accounts):
    status, _, err, _ = shared.ask(request("doctor"), user=accounts["other"])
    assert status == 1 and err == b"sudo: a password is required\n", err  # no rule for them
    assert shared.processes() == []


def test_sudo_python3_is_refused_and_logged_by_sudo(shared, accounts):
    """Even with the user's password, sudo refuses python3 and logs it (sudo's own record:
    the runner never runs)."""
    status, out, err, markers = shared.ask(
        None,
        argv=["-S", "-p", "", "/usr/bin/python3", "-c", "import os; os.system('id')"],
        stdin=accounts["password"].encode() + b"\n",
    )
    assert status == 1 and markers == [] and out == b"", err
    assert b"not allowed to execute '/usr/bin/python3" in err, err
    assert shared.processes() == []
    lines = [line for line in shared.syslog.drain() if "sudo" in line and accounts["user"] in line]
    assert any("command not allowed" in line and "COMMAND=/usr/bin/python3" in line
               for line in lines), lines  # fmt: skip


@pytest.mark.parametrize(
    "env, why",
    [
        ({"PYTHONPATH": "/tmp"}, "environment: PYTHONPATH is set"),
        ({"PYTHONSTARTUP": "/tmp/x.py"}, "environment: PYTHONSTARTUP is set"),
        ({"PYTHONINSPECT": "1"}, "environment: PYTHONINSPECT is set"),
        ({"LD_PRELOAD": "/nonexistent/x.so"}, "environment: LD_PRELOAD is set"),
        ({"LD_LIBRARY_PATH": "/tmp"}, "environment: LD_LIBRARY_PATH is set"),
    ],
)
def test_the_runner_started_directly_with_an_injecting_environment_is_refused(shared, env, why):
    """As root without sudo (sudo's env_reset would hide these variables)."""
    assert_refused(shared, shared.ask(request("doctor"), user=None, env=env), why)


def test_the_runner_under_a_non_isolated_interpreter_is_refused(shared):
    result = shared.ask(request("doctor"), user=None, argv=["/usr/bin/python3", RUNNER])
    assert_refused(shared, result, "interpreter: not started isolated")


def test_a_changed_installed_tool_is_refused_naming_both_digests(host):
    tool = host.path(RELEASE + "/tools/doctor.py")
    expected = build_payload().catalog["tools"]["doctor"]["sha256"]
    with tool.open("a") as f:
        f.write("import os; os.system('id')\n")
    import hashlib

    actual = hashlib.sha256(tool.read_bytes()).hexdigest()
    why = f"tool doctor: installed copy changed (catalog sha256 {expected}, file sha256 {actual})"
    assert_refused(host, host.ask(request("doctor")), why)


def test_files_and_symlinks_planted_by_a_non_root_user_are_refused(host, accounts):
    uid = int(subprocess.run(["id", "-u", accounts["user"]], capture_output=True,
                             text=True).stdout)  # fmt: skip
    tools = host.path(RELEASE + "/tools")
    os.chown(tools / "doctor.py", uid, -1)
    assert_refused(host, host.ask(request("doctor")), f"doctor.py is owned by uid {uid}, not root")
    os.chown(tools / "doctor.py", 0, -1)
    # a symlink the user owns, where the runner looks for the policy
    policy = host.path("/etc/ebpfdiag/runner-policy.json")
    os.rename(policy, policy.with_name("real.json"))
    os.symlink("real.json", policy)
    os.lchown(policy, uid, -1)
    assert_refused(host, host.ask(request("doctor")), "runner-policy.json is owned by uid")
    os.unlink(policy)
    os.rename(policy.with_name("real.json"), policy)
    # a directory on the way that the group may write to
    tools.chmod(0o775)
    assert_refused(host, host.ask(request("doctor")), "tools is writable by group or other")
    tools.chmod(0o755)
    status, _, _, markers = host.ask(request("doctor", ["--no-compile"]), hold=None)
    assert status == 0 and any(m.startswith("running ") for m in markers), markers


class Live:
    """A runner whose output is read line by line while it runs."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.out: queue.Queue = queue.Queue()
        self.err: list[bytes] = []
        threading.Thread(target=self._pump, args=(proc.stdout, self.out.put), daemon=True).start()
        threading.Thread(
            target=self._pump, args=(proc.stderr, self.err.append), daemon=True
        ).start()

    @staticmethod
    def _pump(stream, put) -> None:
        for line in iter(stream.readline, b""):
            put(line)

    def send(self, req: dict) -> None:
        self.proc.stdin.write(b"EBPFDIAG-RUN1 " + json.dumps(req).encode() + b"\n")
        self.proc.stdin.flush()

    def record(self, kind: str, timeout: float = 60) -> dict:
        """The next stdout record of type ``kind`` (others are kept in ``seen``)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.out.get(timeout=0.2)
            except queue.Empty:
                continue
            rec = json.loads(line)
            self.seen.append(rec)
            if rec.get("type") == kind:
                return rec
        raise AssertionError(f"no {kind} record in {timeout}s: {b''.join(self.err)!r}")

    seen: list = []

    def markers(self) -> list[str]:
        text = b"".join(self.err)
        return [ln[ln.index(MARK) + len(MARK) :].decode() for ln in text.split(b"\n") if MARK in ln]

    def stop(self, timeout: float = 30) -> int:
        """Stdin EOF, as when the controller goes away; the exit status."""
        self.proc.stdin.close()
        return self.proc.wait(timeout=timeout)


def shape(records: list[dict]) -> list[tuple[str, str, tuple[str, ...]]]:
    return sorted({(r["type"], str(r.get("name", "")), tuple(sorted(r))) for r in records})


def test_doctor_through_the_runner_reports_what_a_root_run_reports(shared, accounts):
    status, out, err, markers = shared.ask(request("doctor"), hold=None)
    assert status == 0 and any(m.startswith("running ") for m in markers), err
    through = [json.loads(line) for line in out.splitlines()]
    root = subprocess.run(
        [*shared.enter(), "/usr/bin/python3", f"{RELEASE}/tools/doctor.py"],
        capture_output=True,
        timeout=120,
    )
    as_root = [json.loads(line) for line in root.stdout.splitlines()]
    assert len(through) >= 8 and shape(through) == shape(as_root)
    assert [(r["name"], r["ok"]) for r in through] == [(r["name"], r["ok"]) for r in as_root]
    events = [r for r in shared.audit() if r.get("pid") == int(markers[-1].split()[1])]
    assert [r["event"] for r in events] == ["start", "end"], events
    assert events[1]["exit_status"] == 0 and events[1]["tool"] == "doctor"
    assert events[1]["sudo_user"] == accounts["user"] and events[1]["end"] >= events[1]["start"]
    assert events[0]["sha256"] == build_payload().catalog["tools"]["doctor"]["sha256"]
    logged = [r for r in shared.syslog.runner_records() if r.get("pid") == events[0]["pid"]]
    assert logged == events


def _resets(h: Host, port: int, times: int = 3) -> None:
    """Connections from the peer to a port with no listener on the host: the host's
    kernel answers each SYN with a RST, out through its veth."""
    code = (
        "import socket\n"
        f"for _ in range({times}):\n"
        "    try:\n"
        f"        socket.create_connection(('198.18.250.1', {port}), timeout=2).close()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    subprocess.run(["ip", "netns", "exec", h.peer, "/usr/bin/python3", "-c", code], timeout=30)


def test_tcp_rst_through_the_runner_traces_then_detaches_on_stdin_eof(shared):
    from tests.bpfstate import load_core, tcx_progs

    nr = load_core("tc").bpf_syscall_number()
    args = ["--interfaces", f"{PREFIX}v0", "--port", "9"]
    live = Live(shared.start(shared.accounts["user"]))
    live.seen = []
    live.send(request("tcp_rst", args))
    hello = live.record("hello")
    assert hello["interfaces"] == [f"{PREFIX}v0"]
    attached = tcx_progs(shared.netns, f"{PREFIX}v0", nr)
    _resets(shared, 9)
    reset = live.record("reset")
    status = live.stop()
    assert status in (0, 143 - 256, 143), (status, live.markers())
    assert "eof" in live.markers() and "error grace-expired" not in live.markers()
    assert attached["ingress"] and attached["egress"], (hello, attached)  # tcx on this kernel
    assert tcx_progs(shared.netns, f"{PREFIX}v0", nr) == {"ingress": [], "egress": []}
    assert shared.processes() == []
    # the same tool run by root directly gives records of the same shape
    root = subprocess.Popen(
        [*shared.enter(), "/usr/bin/python3", f"{RELEASE}/tools/tcp_rst.py", *args]
        + ["--duration", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    as_root = Live.__new__(Live)
    as_root.proc, as_root.out, as_root.err, as_root.seen = root, queue.Queue(), [], []
    threading.Thread(target=Live._pump, args=(root.stdout, as_root.out.put), daemon=True).start()
    threading.Thread(target=Live._pump, args=(root.stderr, as_root.err.append), daemon=True).start()
    root_hello = as_root.record("hello")
    _resets(shared, 9)
    root_reset = as_root.record("reset")
    root.wait(timeout=30)
    assert sorted(root_hello) == sorted(hello) and sorted(root_reset) == sorted(reset)
    assert reset["type"] == root_reset["type"] == "reset"
    ends = [r for r in shared.audit() if r["event"] == "end" and r.get("tool") == "tcp_rst"]
    assert ends and ends[-1]["args"] == args


def test_a_run_is_stopped_at_the_policy_cap_and_runs_at_once_are_limited(tmp_path, accounts):
    policy = default_policy(accounts["group"])
    policy.update(max_runs_per_host=1)
    policy["groups"][accounts["group"]]["max_duration_s"] = 20
    with installed_host(tmp_path, accounts, policy) as h:
        first = Live(h.start(accounts["user"]))
        first.seen = []
        started = time.monotonic()
        first.send(request("tcp_rst", ["--interfaces", f"{PREFIX}v0"]))
        first.record("hello")
        before = h.processes()
        second = h.ask(request("doctor"))
        assert_refused(h, second, "1 runs already on this host (policy max 1)", before)
        status = first.proc.wait(timeout=30)  # stdin still open: the cap ends it
        elapsed = time.monotonic() - started
        assert 20 <= elapsed < 40 and status == 0, (elapsed, status, first.err)
        assert b"tcp_rst stopped at the policy's cap of 20s" in b"".join(first.err)
        first.proc.stdin.close()
        status, _, err, markers = h.ask(request("doctor", ["--no-compile"]), hold=None)
        assert status == 0, err  # the slot is free again


def test_a_reconnecting_long_running_session_replaces_its_stale_one(tmp_path, accounts):
    policy = default_policy(accounts["group"])
    policy.update(max_runs_per_host=1)
    with installed_host(tmp_path, accounts, policy) as h:
        args = ["--interval", "1"]
        old = Live(h.start(accounts["user"]))
        old.seen = []
        old.send(request("netmetrics", args))
        deadline = time.monotonic() + 60
        while not any(m.startswith("running") for m in old.markers()):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(2)
        new = Live(h.start(accounts["user"]))
        new.seen = []
        new.send(request("netmetrics", args))
        old_status = old.proc.wait(timeout=30)  # stopped by the new session
        assert old_status is not None
        deadline = time.monotonic() + 60
        while not any(m.startswith("running") for m in new.markers()):
            assert time.monotonic() < deadline, new.markers()
            time.sleep(0.1)
        assert not any(m.startswith("error") for m in new.markers())
        new.stop()
        old.proc.stdin.close()
        events = [(r["event"], r["pid"]) for r in h.audit() if r.get("tool") == "netmetrics"]
        assert [e for e, _ in events] == ["start", "end", "start", "end"], events


def test_status_then_uninstall_keeps_the_audit_and_works_twice(host, accounts):
    status = host.admin("status")
    assert status["exit"] == 0 and status["installed"] and status["ready"], status
    assert status["version"] == build_payload().version and status["problems"] == []
    assert all(t["ok"] for t in status["tools"].values()) and len(status["tools"]) == 5
    assert status["policy"] == default_policy(accounts["group"])
    tool = host.path(RELEASE + "/tools/drop.py")
    tool.write_text(tool.read_text() + "# changed\n")
    changed = host.admin("status")
    assert changed["tools"]["drop"]["ok"] is False and changed["problems"], changed
    gone = host.admin("uninstall")
    assert gone["exit"] == 0 and "/etc/sudoers.d/ebpfdiag-runner" in gone["removed"], gone
    assert gone["kept"] == [AUDIT] and host.audit()
    assert not host.path("/usr/local/lib/ebpfdiag-runner").exists()
    assert not host.path("/etc/sudoers.d/ebpfdiag-runner").exists()
    again = host.admin("uninstall")
    assert again["exit"] == 0 and again["removed"] == [], again
    status, _, err, _ = host.ask(request("doctor"))
    assert status == 1 and b"a password is required" in err  # no rule any more
    assert host.admin("status")["installed"] is False


def test_an_upgrade_swaps_current_and_status_says_an_old_runner_is_old(tmp_path, accounts):
    from ebpfdiag.cli.runner import judge

    h = Host(tmp_path, accounts)
    try:
        old = h.admin("install", accounts["group"], payload=build_payload("0.0.1"))
        assert old["exit"] == 0 and old["release"].startswith("0.0.1-"), old
        status = judge(h.admin("status"), "ebpfdiag runner install --hosts H --group G")
        assert status["current"] is False and "older than the controller" in status["update"]
        assert "ebpfdiag runner install --hosts H --group G" in status["update"]
        new = h.admin("install", accounts["group"])
        assert new["exit"] == 0 and {"release", "current"} <= set(new["changed"]), new
        current = os.readlink(h.path("/usr/local/lib/ebpfdiag-runner/current"))
        assert current == "releases/" + new["release"]
        releases = sorted(os.listdir(h.path("/usr/local/lib/ebpfdiag-runner/releases")))
        assert releases == sorted([old["release"], new["release"]])  # the previous one kept
        assert judge(h.admin("status"), "x")["current"] is True
        status, _, err, markers = h.ask(request("doctor", ["--no-compile"]), hold=None)
        assert status == 0 and build_payload().version in markers[0], (markers, err)
    finally:
        h.close()
